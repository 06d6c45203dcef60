"""Byzantine-robust rules: preconditions, shared behaviour, and the poisoning bar."""

from __future__ import annotations

import numpy as np
import pytest
from digits_sim import N_BYZANTINE, accuracy

from consortia.core.robust import DEFAULT_RULE, ROBUST_RULES, flatten, make_rule, unflatten
from consortia.errors import StrategyError

OPTIONS = {
    "centered_clip": {"f": 2},
    "krum": {"f": 2},
    "multi_krum": {"f": 2},
    "median": {"f": 2},
    "trimmed_mean": {"f": 2, "beta": 0.2},
    "bulyan": {"f": 2},
    "norm_bound": {"max_norm": 100.0},
}


def test_every_rule_is_covered_by_the_behaviour_suite():
    assert set(OPTIONS) == set(ROBUST_RULES)


@pytest.mark.parametrize(
    ("name", "options", "n", "needs"),
    [
        ("krum", {"f": 4}, 10, "n > 2f + 2 = 10"),
        ("multi_krum", {"f": 4}, 10, "n > 2f + 2 = 10"),
        ("bulyan", {"f": 4}, 18, "n >= 4f + 3 = 19"),
        ("trimmed_mean", {"f": 4, "beta": 0.1}, 20, "beta must be >= f / n = 0.200"),
        ("median", {"f": 4}, 8, "n >= 2f + 1 = 9"),
        ("centered_clip", {"f": 4}, 8, "n > 2f = 8"),
    ],
)
def test_a_rule_refuses_too_few_updates_for_its_f_and_says_what_it_needs(name, options, n, needs):
    rule = make_rule(name, options)
    with pytest.raises(StrategyError, match=needs.replace("+", r"\+").replace(".", r"\.")):
        rule.check(n)
    with pytest.raises(StrategyError):
        rule.combine(np.zeros((n, 3)), np.ones(n))


@pytest.mark.parametrize("n", [11, 19])
def test_the_precondition_boundary_is_exact(n):
    make_rule("krum", {"f": 4}).check(11)
    make_rule("bulyan", {"f": 4}).check(19)
    make_rule("trimmed_mean", {"f": 4, "beta": 0.2}).check(20)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("krum", {"f": -1}, "f == -1"),
        ("trimmed_mean", {"f": 1, "beta": 0.5}, "beta == 0.5"),
        ("norm_bound", {"max_norm": 0.0}, "max_norm == 0.0"),
        ("centered_clip", {"f": 1, "tau": float("nan")}, "tau == nan"),
        ("multi_krum", {"f": 1, "m": 0}, "m == 0"),
        ("krum", {"f": 1, "gamma": 2}, "bad options"),
        ("fltrust", {}, "unknown robust rule 'fltrust'"),
    ],
)
def test_bad_options_are_refused_with_the_offending_value(name, options, message):
    with pytest.raises(StrategyError, match=message):
        make_rule(name, options)


def test_integral_floats_from_yaml_are_accepted_as_counts():
    assert make_rule("krum", {"f": 2.0}).f == 2


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_same_input_same_output_and_inputs_untouched(name):
    rule = make_rule(name, OPTIONS[name])
    x = np.random.default_rng(1).normal(size=(12, 30))
    w = np.arange(1.0, 13.0)
    x0, w0 = x.copy(), w.copy()
    a, b = rule.combine(x, w), rule.combine(x, w)
    np.testing.assert_array_equal(a.delta, b.delta)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    assert a.delta.shape == (30,) and np.all(np.isfinite(a.delta))


@pytest.mark.parametrize("name", sorted(set(OPTIONS) - {"norm_bound"}))
def test_order_of_arrival_does_not_matter(name):
    rule = make_rule(name, OPTIONS[name])
    x = np.random.default_rng(2).normal(size=(12, 30))
    perm = np.random.default_rng(3).permutation(12)
    np.testing.assert_allclose(rule.combine(x, np.ones(12)).delta, rule.combine(x[perm], np.ones(12)).delta)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_identical_updates_pass_through_unchanged(name):
    row = np.linspace(-1, 1, 7)
    x = np.tile(row, (12, 1))
    np.testing.assert_allclose(make_rule(name, OPTIONS[name]).combine(x, np.ones(12)).delta, row, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(OPTIONS) - {"norm_bound"}))
def test_two_huge_updates_neither_move_the_result_nor_escape_the_flag(name):
    rng = np.random.default_rng(4)
    honest = rng.normal(loc=1.0, scale=0.1, size=(10, 20))
    x = np.vstack([honest, np.full((2, 20), -1e6)])
    result = make_rule(name, OPTIONS[name]).combine(x, np.ones(12))
    assert np.abs(result.delta - 1.0).max() < 0.3
    assert {10, 11} <= set(result.flagged)


def test_norm_bound_caps_each_sites_influence_and_flags_the_clipped():
    x = np.vstack([np.full((3, 4), 0.1), np.full((1, 4), 1e6)])
    result = make_rule("norm_bound", {"max_norm": 1.0}).combine(x, np.ones(4))
    assert result.flagged == (3,)
    assert np.linalg.norm(result.delta) <= 1.0  # the mean of vectors of norm <= 1


def test_flatten_round_trips_named_tensors():
    params = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    names = sorted(params)
    back = unflatten(flatten(params, names), params, names)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    with pytest.raises(StrategyError, match="has 8 values, the model 7"):
        unflatten(np.zeros(8), params, names)


# ------------------------------------------------------------------ the poisoning bar
# 20 sites, 4 Byzantine, softmax regression on sklearn digits, 40 rounds, three seeds.

SEEDS = (0, 1, 2)
DEFAULT = make_rule(DEFAULT_RULE, {"f": N_BYZANTINE})


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("attack", ["sign_flip", "scaling", "ipm"])
def test_default_rule_holds_within_3_points_under_attack_while_fedavg_collapses(attack, seed):
    clean = accuracy(DEFAULT, seed=seed)
    attacked = accuracy(DEFAULT, attack, eps=100.0, seed=seed)
    fedavg = accuracy(None, attack, eps=100.0, seed=seed)
    assert clean >= 0.9
    assert attacked >= clean - 0.03, (attack, clean, attacked)
    assert fedavg < 0.5, (attack, fedavg)


@pytest.mark.parametrize("seed", SEEDS)
def test_default_rule_on_non_iid_data_stays_within_2_5_points_of_fedavg(seed):
    fedavg = accuracy(None, alpha=0.3, seed=seed)
    robust = accuracy(DEFAULT, alpha=0.3, seed=seed)
    assert robust >= fedavg - 0.025, (fedavg, robust)


@pytest.mark.parametrize("seed", SEEDS)
def test_default_rule_on_non_iid_data_under_small_ipm_keeps_88_percent(seed):
    robust = accuracy(DEFAULT, "ipm", alpha=0.3, eps=0.5, seed=seed)
    krum = accuracy(make_rule("krum", {"f": N_BYZANTINE}), "ipm", alpha=0.3, eps=0.5, seed=seed)
    assert robust >= 0.88, robust
    assert krum < robust  # selecting one site's update throws non-IID knowledge away
