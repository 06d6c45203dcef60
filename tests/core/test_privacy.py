"""DP-FedAvg pieces: accountant golden vectors, noise scale, clipping, adaptive clipping."""

from __future__ import annotations

import numpy as np
import pytest

from consortia.core.privacy import (
    AdaptiveClip,
    DpRound,
    clip,
    delta_noise_multiplier,
    epsilon,
    gaussian,
    noised_mean,
    rounds_within_budget,
    site_noise_std,
)
from consortia.errors import StrategyError, UpdateError

# ------------------------------------------------------------------ accountant (dp-accounting 0.6.0)


def test_rdp_golden_vector_subsampled():
    assert epsilon([DpRound(q=0.01, z=4.0, count=10_000)], 1e-5, "rdp") == pytest.approx(1.0355, abs=1e-3)


def test_pld_golden_vector_subsampled():
    assert epsilon([DpRound(q=0.01, z=4.0, count=10_000)], 1e-5, "pld") == pytest.approx(0.947, abs=0.02)


def test_rdp_golden_vector_full_participation():
    assert epsilon([DpRound(q=1.0, z=5.0, count=50)], 1e-5, "rdp") == pytest.approx(7.0774, abs=1e-3)


def test_jobs_compose_into_one_epsilon():
    one = epsilon([DpRound(1.0, 5.0, 25)], 1e-5)
    two = epsilon([DpRound(1.0, 5.0, 25), DpRound(1.0, 5.0, 25)], 1e-5)
    assert two == pytest.approx(epsilon([DpRound(1.0, 5.0, 50)], 1e-5))
    assert one < two < 2 * one  # composition is sub-additive under RDP
    assert epsilon([], 1e-5) == 0.0


def test_the_budget_search_finds_the_last_round_that_fits():
    budget = epsilon([DpRound(1.0, 5.0, 50)], 1e-5) + 1e-9
    assert rounds_within_budget([], 1.0, 5.0, 1000, 1e-5, budget) == 50
    assert rounds_within_budget([DpRound(1.0, 5.0, 30)], 1.0, 5.0, 1000, 1e-5, budget) == 20
    assert rounds_within_budget([DpRound(1.0, 5.0, 60)], 1.0, 5.0, 1000, 1e-5, budget) == 0


@pytest.mark.parametrize(
    ("rounds", "delta", "method", "message"),
    [
        ([DpRound(1.0, 5.0, 5)], 0.0, "rdp", "delta == 0.0"),
        ([DpRound(1.0, 5.0, 5)], 1e-5, "moments", "accountant 'moments'"),
    ],
)
def test_bad_accounting_arguments_are_refused(rounds, delta, method, message):
    with pytest.raises(StrategyError, match=message):
        epsilon(rounds, delta, method)


@pytest.mark.parametrize(("q", "z", "message"), [(0.0, 1.0, "q == 0.0"), (0.5, 0.0, "noise_multiplier == 0.0")])
def test_bad_round_parameters_are_refused(q, z, message):
    with pytest.raises(StrategyError, match=message):
        DpRound(q, z, 1)


# ------------------------------------------------------------------ noise


@pytest.mark.parametrize("rng", [None, np.random.default_rng(0)], ids=["os-urandom", "seeded"])
def test_with_all_updates_zero_the_noise_std_is_z_s_over_m(rng):
    z, S, m = 1.1, 0.7, 20
    clipped = [clip(np.zeros(10_000), S)[0] for _ in range(m)]
    mean = noised_mean(np.sum(clipped, axis=0), m, S, z, rng)
    assert np.std(mean) == pytest.approx(z * S / m, rel=0.03)
    assert abs(np.mean(mean)) < 4 * z * S / m / 100  # unbiased: 4 standard errors


def test_secure_noise_is_never_repeated_and_is_standard_normal():
    a, b = gaussian(50_001, 1.0), gaussian(50_001, 1.0)
    assert a.shape == (50_001,) and not np.array_equal(a, b)
    both = np.concatenate([a, b])
    assert abs(both.mean()) < 0.02 and both.std() == pytest.approx(1.0, rel=0.02)
    assert abs(np.mean(both**3)) < 0.05  # symmetric
    assert np.mean(np.abs(both) > 1.96) == pytest.approx(0.05, abs=0.005)


def test_distributed_noise_from_t_sites_adds_up_to_the_central_noise():
    z, S, t = 1.0, 2.0, 16
    per_site = site_noise_std(S, z, t)
    total = sum(gaussian(20_000, per_site, np.random.default_rng(i)) for i in range(t))
    assert np.std(total) == pytest.approx(z * S, rel=0.03)


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_rejected_not_clipped(bad):
    x = np.ones(10)
    x[3] = bad
    with pytest.raises(UpdateError, match="rejected"):
        clip(x, 1.0)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6, 1e150, 1e300])
def test_no_clipped_contribution_exceeds_the_bound(scale):
    rng = np.random.default_rng(7)
    S = 0.5
    for _ in range(200):
        x = rng.normal(size=int(rng.integers(1, 500))) * scale
        out, norm = clip(x, S)
        assert np.all(np.isfinite(out)) and np.linalg.norm(out) <= S
        if norm <= S:
            np.testing.assert_array_equal(out, x)  # within the bound: untouched
        else:
            np.testing.assert_allclose(out * (norm / S), x, rtol=1e-9)  # same direction


def test_clip_refuses_a_bad_norm():
    with pytest.raises(StrategyError, match="clip norm == -1.0"):
        clip(np.ones(3), -1.0)


# ------------------------------------------------------------------ adaptive clipping


def test_adaptive_clipping_tracks_the_target_quantile_of_update_norms():
    rng = np.random.default_rng(3)
    ac = AdaptiveClip(quantile=0.5, lr=0.2)
    norm, m = 10.0, 100
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)  # median 1.0
        norm = ac.next_norm(norm, norms <= norm, bit_std=m / 20, rng=rng)
    assert norm == pytest.approx(1.0, rel=0.2)


def test_the_bit_noise_leaves_a_valid_delta_noise_multiplier():
    assert delta_noise_multiplier(1.0, 5.0) > 1.0
    with pytest.raises(StrategyError, match="must exceed z / 2"):
        delta_noise_multiplier(1.0, 0.4)
