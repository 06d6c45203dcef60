"""Drift statistics: exact values against scipy, calibration under no drift (the reason
fixed PSI thresholds are not used for detection), BH over many features, and the
sequential detectors' delay and false alarms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from consortia.core.drift import (
    Cusum,
    PageHinkley,
    benjamini_hochberg,
    chi_square,
    drift_test,
    js_distance,
    missing_rate_change,
    psi,
    two_proportion,
    wasserstein_binned,
)


def test_effect_sizes_match_their_definitions():
    a, b = [10, 20, 30, 40], [25, 25, 25, 25]
    assert js_distance(a, b) == pytest.approx(jensenshannon(np.array(a) / 100, np.array(b) / 100, base=2))
    assert js_distance(a, a) == 0.0 and js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    # two point masses one bin apart, bins of width 2: the mass moves 2 units
    assert wasserstein_binned([0, 10, 0], [10, 0, 0], [0, 2, 4, 6]) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 20_000), rng.normal(0.5, 1, 20_000)
    edges = np.linspace(-5, 6, 221)
    hx, hy = np.histogram(x, edges)[0], np.histogram(y, edges)[0]
    assert wasserstein_binned(hx, hy, edges) == pytest.approx(stats.wasserstein_distance(x, y), abs=0.01)
    open_edges = [-np.inf, 0, 1, 2, np.inf]  # open outer bins take their neighbour's width
    assert wasserstein_binned([0, 0, 0, 5], [5, 0, 0, 0], open_edges) == pytest.approx(3.0)
    assert missing_rate_change(30, 100, 5, 100) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same >= 2 bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="need 4 edges"):
        wasserstein_binned([1, 2, 3], [1, 2, 3], [0, 1])


def test_chi_square_is_scipys_homogeneity_test():
    cur, ref = [30, 50, 20, 0], [300, 400, 300, 0]
    stat, p, dof, _ = stats.chi2_contingency(np.array([cur[:3], ref[:3]]), correction=False)
    got = chi_square(cur, ref)
    assert (got.statistic, got.dof, got.p_value) == (pytest.approx(stat), dof, pytest.approx(p))
    assert chi_square([5, 0], [0, 0]).p_value == 1.0  # nothing to compare with
    z = two_proportion(30, 100, 10, 100)
    assert z.p_value == pytest.approx(stats.chi2_contingency([[30, 70], [10, 90]], correction=False)[1])


def _no_drift_windows(n_rows: int, windows: int, seed: int):
    rng = np.random.default_rng(seed)
    probs = np.full(10, 0.1)  # decile bins, as the agreed (quantile) edges give
    ref = rng.multinomial(20_000, probs)
    return ref, [rng.multinomial(n_rows, probs) for _ in range(windows)]


def test_fixed_psi_threshold_fires_on_no_drift_windows_the_test_does_not():
    ref, windows = _no_drift_windows(100, 2000, seed=1)
    fixed = np.mean([psi(w, ref) > 0.1 for w in windows])
    calibrated = np.mean([chi_square(w, ref).p_value < 0.01 for w in windows])
    assert fixed > 0.2  # a fixed PSI > 0.1 flags a large share of pure-noise windows of 100 rows
    assert calibrated < 0.02  # the homogeneity test holds its 1% level
    # and it still sees a real shift in 100 rows
    rng = np.random.default_rng(2)
    shifted = rng.multinomial(100, [0.02, 0.03, 0.05, 0.1, 0.1, 0.1, 0.15, 0.15, 0.15, 0.15])
    assert drift_test(shifted, ref).p_value < 1e-4


def test_benjamini_hochberg_controls_many_features():
    assert benjamini_hochberg([0.001, 0.03, 0.02, 0.5], q=0.05) == [True, True, True, False]
    assert benjamini_hochberg([0.001, 0.04, 0.03, 0.5], q=0.05) == [True, False, False, False]
    assert benjamini_hochberg([0.04, 0.049], q=0.05) == [True, True]  # step-up: the largest k decides
    assert benjamini_hochberg([]) == []
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        benjamini_hochberg([1.5])
    # 40 features, no drift, 500 windows: per-feature 5% tests alarm on most windows, BH rarely
    rng = np.random.default_rng(3)
    raw = bh = 0
    for _ in range(500):
        p = rng.uniform(size=40)
        raw += bool((p < 0.05).any())
        bh += any(benjamini_hochberg(p, 0.05))
    assert raw > 400 and bh < 40


def _stream(rng, n_before: int, n_after: int, shift: float):
    return np.concatenate([rng.normal(0, 1, n_before), rng.normal(shift, 1, n_after)])


@pytest.mark.parametrize("make", [lambda: PageHinkley(threshold=30, delta=0.1), lambda: Cusum(k=1.0, h=8, warmup=50)])
def test_sequential_detectors_find_a_shift_quickly_and_stay_quiet_without_one(make):
    delays, false = [], 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        det = make()
        alarm = None
        for i, x in enumerate(_stream(rng, 300, 300, 1.5)):
            if det.update(x).drift_detected:
                alarm = i
                if i >= 300:
                    break
                false += 1  # an alarm before the change
        assert alarm is not None and alarm >= 300
        delays.append(alarm - 300)
    assert false <= 1 and np.median(delays) < 40
    quiet = make()
    assert not any(quiet.update(x).drift_detected for x in np.random.default_rng(99).normal(0, 1, 1000))


def test_page_hinkley_direction_and_reset():
    up = PageHinkley(threshold=10, delta=0.0, min_instances=5, mode="up")
    xs = [0.0] * 20 + [3.0] * 20
    hits = [i for i, x in enumerate(xs) if up.update(x).drift_detected]
    assert hits and hits[0] > 20
    down = PageHinkley(threshold=10, delta=0.0, min_instances=5, mode="down")
    assert not any(down.update(x).drift_detected for x in xs)  # only increases here
    with pytest.raises(ValueError, match="mode"):
        PageHinkley(mode="sideways")
    with pytest.raises(ValueError, match="not finite"):
        Cusum().update(float("nan"))


def test_coarsening_keeps_every_group_at_the_minimum_and_maps_every_bin():
    from consortia.core.profile import coarsen, regroup

    rng = np.random.default_rng(5)
    for _ in range(300):
        counts = rng.poisson(rng.uniform(0, 8), size=int(rng.integers(2, 12))).tolist()
        for ordered in (True, False):
            sums, groups, dropped = coarsen(counts, 5, ordered=ordered)
            assert len(groups) == len(counts) and sorted(set(groups)) == list(range(len(sums)))
            if sum(counts) < 5:  # too few rows in all: suppressed entirely
                assert sums == [0] and dropped == sum(counts)
            else:
                assert all(x == 0 or x >= 5 for x in sums) and regroup(counts, groups) == sums
                assert all(counts[i] == 0 for i, g in enumerate(groups) if sums[g] == 0)  # only empty bins
            if ordered:
                assert groups == sorted(groups)  # numeric bins merge with neighbours only


def test_rare_events_in_small_windows_use_an_exact_test():
    from consortia.core.drift import two_proportion

    # 5 of 100 against a 2% reference rate: the chi-square approximation says p ~ 0.02, while
    # the exact probability of so many is ~0.05; the rate test must not fire at q = 0.01
    rng = np.random.default_rng(3)
    fired = sum(two_proportion(int(rng.binomial(100, 0.02)), 100, 200, 10_000).p_value < 0.01 for _ in range(2000))
    assert fired / 2000 <= 0.01


def test_sparse_cells_are_pooled_before_the_chi_square():
    from consortia.core.drift import chi_square

    # 100 rows over 30 categories of a skewed reference: most cells expect under 5 rows
    rng = np.random.default_rng(4)
    shares = rng.dirichlet(np.full(30, 0.5))
    ref = np.round(shares * 10_000).astype(int)
    fired = sum(chi_square(rng.multinomial(100, shares), ref).p_value < 0.01 for _ in range(2000))
    assert fired / 2000 <= 0.015
