"""Detection on real loans: windows of a serving agent's traffic (coarsened, minimum count
10) against the consortium's reference. Without drift the windows stay quiet; each
injected drift is found, and its feature is the strongest finding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from consortia.core.detect import check_window
from consortia.core.profile import bins_from_quantiles, merge_sketches, quantile_sketch
from consortia.datasets.scenarios import load_scenario
from consortia.edge.monitoring import MISSING, WindowMonitor
from consortia.protocol.schemas import JobSpec, PreprocessingPlan
from consortia.site.monitor import build_reference, suppressed


@pytest.fixture(scope="module")
def world():
    sc = load_scenario("finance", 4, seed=0)
    spec = JobSpec.model_validate(sc.spec)
    frames = [f.sample(frac=1.0, random_state=7).reset_index(drop=True) for f in sc.partitions.values()]
    cut = [int(0.6 * len(f)) for f in frames]
    train = pd.concat([f.iloc[:k] for f, k in zip(frames, cut, strict=True)], ignore_index=True)
    live = pd.concat([f.iloc[k:] for f, k in zip(frames, cut, strict=True)], ignore_index=True)  # later traffic
    num = [f.name for f in spec.features if f.type == "numeric"]
    cat = [f.name for f in spec.features if f.type == "categorical"]
    sketches = {
        c: [
            (quantile_sketch(pd.to_numeric(f.iloc[:k][c], errors="coerce").to_numpy(), 10), k)
            for f, k in zip(frames, cut)
        ]
        for c in num
    }
    plan = PreprocessingPlan(
        numeric={c: (0.0, 1.0) for c in num},
        categorical={c: sorted(v for v, n in train[c].astype(str).value_counts().items() if n >= 5) for c in cat},
        feature_order=num + cat,
        cuts={c: bins_from_quantiles(merge_sketches(s)) for c, s in sketches.items()},
        bounds={c: tuple(merge_sketches(s, (0.01, 0.99))) for c, s in sketches.items()},
    )
    ref = suppressed(build_reference(train, spec, plan, np.zeros(2), np.zeros(2)), 10, plan).model_dump(mode="json")
    ref["scores"] = {}
    bins = {
        c: {"kind": "numeric", "cuts": plan.cuts[c], "bounds": list(plan.bounds[c])}
        if c in num
        else {"kind": "categorical", "vocabulary": plan.categorical[c]}
        for c in num + cat
    }
    return live, num, cat, bins, ref


def windows(frame, num, cat, bins, rows=500):
    m = WindowMonitor("m:1", bins, min_count=10, max_rows=rows, max_seconds=1e9)
    for start in range(0, len(frame) - rows + 1, rows):
        part = frame.iloc[start : start + rows]
        feeds = {c: pd.to_numeric(part[c], errors="coerce").to_numpy(np.float64).reshape(-1, 1) for c in num}
        feeds |= {c: part[c].astype("string").fillna(MISSING).to_numpy(object).reshape(-1, 1) for c in cat}
        m.observe(feeds, np.full(len(part), 0.5), 0.001)
    return m.drain()


def test_no_drift_windows_stay_quiet(world):
    live, num, cat, bins, ref = world
    flagged = 0
    for seed in range(4):
        shuffled = live.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        for w in windows(shuffled, num, cat, bins):
            flagged += bool(check_window(w, ref))
    assert flagged <= 1  # of ~30 windows of 500 rows of the same population, at most one has any finding


INJECTIONS = {  # feature, injection, the kinds of finding that name it
    "numeric covariate shift": (
        "int_rate",
        lambda f, rng: f.assign(int_rate=f["int_rate"] * 1.35),
        ("covariate_drift", "out_of_range"),
    ),
    "categorical mix change": (
        "term",
        lambda f, rng: f.assign(term=np.where(rng.random(len(f)) < 0.6, "term_60", f["term"])),
        ("covariate_drift",),
    ),
    "missing-value spike": (
        "annual_inc",
        lambda f, rng: f.assign(annual_inc=f["annual_inc"].mask(rng.random(len(f)) < 0.25)),
        ("missing_spike",),
    ),
}


@pytest.mark.parametrize("kind", sorted(INJECTIONS))
def test_each_injected_drift_is_the_strongest_finding(world, kind):
    live, num, cat, bins, ref = world
    feature, inject, expected = INJECTIONS[kind]
    hits = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        drifted = inject(live.sample(n=500, random_state=seed).reset_index(drop=True), rng)
        (w,) = windows(drifted, num, cat, bins)
        found = check_window(w, ref)
        hits += bool(found) and found[0].target == feature and found[0].kind in expected
    assert hits == 5


def test_accuracy_on_delayed_labels_drops_with_concept_drift():
    # reference: 93% accuracy on the test split at threshold 0.5 (10 score bins per class)
    ref = {
        "rows": 1000,
        "features": {},
        "scores": {
            "negative": [300, 200, 100, 50, 50, 30, 20, 0, 0, 0],
            "positive": [0, 0, 0, 10, 10, 40, 50, 50, 50, 40],
        },
    }

    def window(labelled, correct):
        return {
            "rows": labelled,
            "features": {},
            "predictions": [],
            "label_counts": {"labelled": labelled, "correct": correct},
        }

    assert check_window(window(300, 276), ref) == []  # 92%: noise
    (f,) = check_window(window(300, 195), ref)  # 65%: the world changed under the model
    assert (f.kind, f.target) == ("performance_drop", "accuracy") and f.effect == pytest.approx(0.28, abs=0.01)
    assert check_window(window(20, 17), ref) == []  # 85% of 20 labels: not enough evidence at q = 0.01
