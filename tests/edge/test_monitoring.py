"""Monitoring windows at a serving agent: counts on the agreed bins, closing by rows or
time, suppression of small counts, delayed labels per class, and an offline queue."""

from __future__ import annotations

import time

import numpy as np
import pytest

from consortia.edge.monitoring import WindowMonitor
from consortia.protocol.delivery import MonitoringWindow

BINS = {
    "x": {"kind": "numeric", "cuts": [0.0, 1.0], "bounds": [-2.0, 3.0]},
    "c": {"kind": "categorical", "vocabulary": ["a", "b"]},
}


def feeds(x, c):
    return {"x": np.array(x, dtype=np.float64).reshape(-1, 1), "c": np.array(c, dtype=object).reshape(-1, 1)}


def test_a_window_counts_on_the_agreed_bins_and_suppresses_small_counts():
    m = WindowMonitor("m:1", BINS, min_count=3, max_rows=12, max_seconds=3600)
    m.observe(feeds([-1, 0.5, 0.7, 2, 5, np.nan], ["a", "a", "b", "z", "<missing>", "a"]), np.full(6, 0.15), 0.002)
    assert m.drain() == []  # 6 rows: still open
    m.observe(feeds([0.2] * 6, ["a"] * 6), np.full(6, 0.95), 0.004)
    (w,) = m.drain()
    MonitoringWindow.model_validate(w)  # what the coordinator accepts
    assert (w["rows"], w["requests"], w["errors"]) == (12, 2, 0)
    # x on (-inf,0], (0,1], (1,inf): 1, 8, 2 -> under 3 rows a bin merges with its neighbours
    # (zeroing would fake a drift); the NaN is a missing count under 3: zeroed
    assert w["features"]["x"] == {"counts": [11], "groups": [0, 0, 0], "missing": 0, "out_of_range": 0, "suppressed": 1}
    # c: a x9, b x1, other (z) x1 -> the small ones join the largest group; "<missing>" is missing
    assert w["features"]["c"]["counts"] == [11] and w["features"]["c"]["groups"] == [0, 0, 0]
    # scores 0.15 x6 and 0.95 x6: both bins hold the minimum; empty bins stay on their own (0 is allowed)
    assert w["predictions"] == [0, 6, 0, 0, 0, 0, 0, 0, 0, 6] and w["prediction_groups"] == list(range(10))
    assert w["latency"]["count"] == 2 and w["latency"]["p99"] == pytest.approx(0.004, rel=0.05)
    assert w["min_count"] == 3


def test_windows_close_by_time_carry_labels_and_wait_when_offline():
    m = WindowMonitor("m:1", BINS, min_count=1, max_rows=10_000, max_seconds=0.2)
    m.observe(feeds([0.5], ["a"]), np.array([0.72]), 0.001)
    m.label(0.72, True, True)
    m.label(0.12, False, True)
    m.error()
    m.tick()
    assert m.drain() == []
    time.sleep(0.25)
    m.tick()
    (w,) = m.drain()
    assert w["labelled"]["positive"][7] == 1 and w["labelled"]["negative"][1] == 1 and w["errors"] == 1
    assert w["label_counts"] == {"labelled": 2, "correct": 2}
    m.requeue([w])  # the coordinator was unreachable: the window waits for the next attempt
    assert m.drain() == [w]
    with pytest.raises(ValueError, match="at least min_count"):
        MonitoringWindow.model_validate({**w, "min_count": 5})


def test_single_row_and_batch_requests_count_alike():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.5, 40)
    x[::7] = np.nan
    c = rng.choice(["a", "b", "zz", "<missing>"], 40).tolist()
    probs = rng.uniform(size=40)
    one, batch = (WindowMonitor("m:1", BINS, min_count=1, max_rows=10_000, max_seconds=3600) for _ in range(2))
    for i in range(40):
        one.observe(feeds([x[i]], [c[i]]), probs[i : i + 1], 0.001)
    batch.observe(feeds(x, c), probs, 0.001)
    one.flush()
    batch.flush()
    (w1,), (w2,) = one.drain(), batch.drain()
    assert w1["features"] == w2["features"] and w1["predictions"] == w2["predictions"] and w1["rows"] == 40
    assert w1["features"]["x"]["missing"] == 6 and w1["features"]["c"]["out_of_range"] == c.count("zz")


def test_decisions_per_group_of_the_sensitive_attribute_leave_only_above_the_minimum():
    m = WindowMonitor("m:1", BINS, min_count=3, max_rows=100, max_seconds=3600, sensitive="c", threshold=0.5)
    # group a: 6 rows, 4 positive / 2 negative (2 < 3: the count is withheld); b: 5 rows, 0 positive;
    # z (unseen value, its own group): 2 rows (under the minimum: left out)
    c = ["a"] * 6 + ["b"] * 5 + ["z"] * 2
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2] + [0.1] * 5 + [0.9, 0.9])
    m.observe(feeds([0.5] * 13, c), probs, 0.001)
    m.flush()
    (w,) = m.drain()
    MonitoringWindow.model_validate(w)
    assert w["fairness"] == {
        "attribute": "c",
        "threshold": 0.5,
        "groups": {"a": {"rows": 6, "positive": None}, "b": {"rows": 5, "positive": 0}},
        "suppressed": 2,
    }
    bad = {**w, "fairness": {**w["fairness"], "groups": {"a": {"rows": 2, "positive": 0}}}}
    with pytest.raises(ValueError, match="at least min_count"):
        MonitoringWindow.model_validate(bad)
