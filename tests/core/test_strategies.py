"""Strategies: exact expected arrays, and a shared behaviour suite every strategy passes."""

import numpy as np
import pytest

from consortia.core.strategies import STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi, make_strategy
from consortia.errors import StrategyError

CUR = {"w": np.array([1.0, -2.0], np.float32), "b": np.array([0.5], np.float32)}
MEAN = {"w": np.array([1.5, -1.0], np.float32), "b": np.array([0.5], np.float32)}


def test_fedavg_returns_the_weighted_mean():
    new, state = FedAvg().apply(CUR, MEAN, {})
    np.testing.assert_array_equal(new["w"], [1.5, -1.0])
    np.testing.assert_array_equal(new["b"], [0.5])
    assert state == {}


def test_fedadam_first_step_matches_hand_computation():
    # delta = [0.5, 1.0, 0]; m = 0.1*delta; v = 0.99*tau^2 + 0.01*delta^2 (tau = 1e-3)
    s = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    new, state = s.apply(CUR, MEAN, s.init_state(CUR))
    delta = np.array([0.5, 1.0])
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    expected = np.array([1.0, -2.0]) + 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(new["w"], expected.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(state["m/w"], m, rtol=1e-6)
    np.testing.assert_allclose(state["v/w"], v, rtol=1e-6)
    np.testing.assert_array_equal(new["b"], [0.5])  # zero pseudo-gradient: no move


def test_fedyogi_and_fedadagrad_second_moments():
    d2 = np.array([0.25, 1.0])
    tau2 = 1e-6
    _, sy = FedYogi(tau=1e-3, beta_2=0.99).apply(CUR, MEAN, {})
    np.testing.assert_allclose(sy["v/w"], tau2 - 0.01 * d2 * np.sign(tau2 - d2), rtol=1e-6)
    _, sa = FedAdagrad(tau=1e-3).apply(CUR, MEAN, {})
    np.testing.assert_allclose(sa["v/w"], tau2 + d2, rtol=1e-6)


def test_fedadam_two_rounds_carry_state():
    s = FedAdam(eta=0.1, tau=1e-3)
    p1, st1 = s.apply(CUR, MEAN, {})
    p2, st2 = s.apply(p1, MEAN, st1)
    delta2 = MEAN["w"].astype(np.float64) - p1["w"].astype(np.float64)
    m2 = 0.9 * st1["m/w"].astype(np.float64) + 0.1 * delta2
    np.testing.assert_allclose(st2["m/w"], m2, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_deterministic_and_pure(name):
    s = make_strategy(name)
    cur = {k: v.copy() for k, v in CUR.items()}
    mean = {k: v.copy() for k, v in MEAN.items()}
    a, sa = s.apply(cur, mean, s.init_state(cur))
    b, sb = s.apply(cur, mean, s.init_state(cur))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == np.float32
    for k in CUR:  # inputs untouched
        np.testing.assert_array_equal(cur[k], CUR[k])
        np.testing.assert_array_equal(mean[k], MEAN[k])
    assert sa.keys() == sb.keys()


def test_bad_options_raise_clear_errors():
    with pytest.raises(StrategyError, match="eta == -1"):
        FedAdam(eta=-1)
    with pytest.raises(StrategyError, match="beta_1"):
        FedYogi(beta_1=1.0)
    with pytest.raises(StrategyError, match="proximal_mu"):
        FedProx(proximal_mu=-0.1)
    with pytest.raises(StrategyError, match="unknown strategy 'krum'"):
        make_strategy("krum")
    with pytest.raises(StrategyError, match="bad options"):
        make_strategy("fedavg", {"eta": 1.0})
