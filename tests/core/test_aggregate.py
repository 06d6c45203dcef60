import numpy as np
import pytest

from consortia.core.aggregate import WeightedSum
from consortia.errors import StrategyError, UpdateError

REF = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(70_000, np.float32)}  # b spans chunks


def test_weighted_mean_exact():
    acc = WeightedSum(REF)
    rng = np.random.default_rng(0)
    ups = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in REF.items()} for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    for u, w in zip(ups, weights):
        acc.add(u, w)
    mean = acc.mean()
    for k in REF:
        expected = sum(w * u[k].astype(np.float64) for u, w in zip(ups, weights)) / 100.0
        np.testing.assert_allclose(mean[k], expected, rtol=1e-5, atol=1e-6)
    assert acc.count == 3 and acc.total_weight == 100.0


def test_rejects_bad_updates_and_keeps_sum_intact():
    acc = WeightedSum(REF)
    good = {k: np.ones(v.shape, np.float32) for k, v in REF.items()}
    acc.add(good, 1.0)
    nan = {k: v.copy() for k, v in good.items()}
    nan["a"][0, 0] = np.nan
    with pytest.raises(UpdateError, match="non-finite"):
        acc.add(nan, 1.0)
    with pytest.raises(UpdateError, match="shape"):
        acc.add({"a": np.ones((3, 2), np.float32), "b": good["b"]}, 1.0)
    with pytest.raises(UpdateError, match="missing"):
        acc.add({"a": good["a"]}, 1.0)
    with pytest.raises(UpdateError, match="float32"):
        acc.add({"a": good["a"].astype(np.float64), "b": good["b"]}, 1.0)
    with pytest.raises(UpdateError, match="weight"):
        acc.add(good, 0.0)
    np.testing.assert_array_equal(acc.mean()["a"], 1.0)
    assert acc.count == 1


def test_empty_mean_raises():
    with pytest.raises(StrategyError, match="no updates"):
        WeightedSum(REF).mean()
