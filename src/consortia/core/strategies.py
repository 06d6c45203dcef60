"""Server-side aggregation strategies as pure functions over named arrays.

Every strategy here turns the weighted mean of the sites' updated parameters into the
next global model. The server optimizers (FedAdam, FedYogi, FedAdagrad) treat
``mean - current`` as a pseudo-gradient and keep their moments in a state dict that the
coordinator persists between rounds, so a restarted coordinator continues exactly.

FedProx differs from FedAvg only on the site (a proximal term in the local loss), so its
server side is FedAvg; the site reads ``proximal_mu`` from the job spec.

References
----------
McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg).
Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (FedProx).
Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (FedAdam, FedYogi, FedAdagrad;
Algorithm 2, with v initialised to tau^2 and no bias correction, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from consortia.core.params import Params
from consortia.errors import StrategyError

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Strategy",
    "make_strategy",
]


class Strategy(Protocol):
    """Turns the round's weighted mean into the next global model."""

    name: str

    def init_state(self, params: Mapping[str, np.ndarray]) -> Params:
        """Server-side state for a fresh job (empty for stateless strategies)."""
        ...

    def apply(
        self,
        current: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
    ) -> tuple[Params, Params]:
        """Return ``(next_global, next_state)``; never mutates its inputs."""
        ...


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging: the next global model is the example-weighted mean.

    Examples
    --------
    >>> import numpy as np
    >>> new, _ = FedAvg().apply({"w": np.zeros(1, np.float32)},
    ...                         {"w": np.ones(1, np.float32)}, {})
    >>> new["w"].tolist()
    [1.0]
    """

    name: str = "fedavg"

    def init_state(self, params: Mapping[str, np.ndarray]) -> Params:
        return {}

    def apply(self, current, mean, state):  # type: ignore[no-untyped-def]
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in mean.items()}, {}


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedProx: FedAvg on the server; the site adds ``mu/2 * ||w - w_global||^2``."""

    name: str = "fedprox"
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        if not np.isfinite(self.proximal_mu) or self.proximal_mu < 0:
            raise StrategyError(f"proximal_mu == {self.proximal_mu!r}, must be >= 0.")


@dataclass(frozen=True)
class FedOpt:
    """Adaptive server optimizer over the pseudo-gradient ``delta = mean - current``.

    ``m = beta_1 m + (1 - beta_1) delta``; ``v`` per variant; then
    ``w = w + eta * m / (sqrt(v) + tau)``.
    """

    name: str = "fedadam"
    eta: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        for field, value, low, high in (
            ("eta", self.eta, 0.0, np.inf),
            ("tau", self.tau, 0.0, np.inf),
        ):
            if not np.isfinite(value) or not (low < value < high):
                raise StrategyError(f"{field} == {value!r}, must be > 0.")
        for field, value in (("beta_1", self.beta_1), ("beta_2", self.beta_2)):
            if not (0.0 <= value < 1.0):
                raise StrategyError(f"{field} == {value!r}, must be in [0, 1).")

    def init_state(self, params: Mapping[str, np.ndarray]) -> Params:
        state: Params = {}
        for k, v in params.items():
            state[f"m/{k}"] = np.zeros(v.shape, np.float32)
            state[f"v/{k}"] = np.full(v.shape, self.tau**2, np.float32)
        return state

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, current, mean, state):  # type: ignore[no-untyped-def]
        if not state:
            state = self.init_state(current)
        new_params: Params = {}
        new_state: Params = {}
        for k, w in current.items():
            delta = mean[k].astype(np.float64) - w.astype(np.float64)
            m = self.beta_1 * state[f"m/{k}"].astype(np.float64) + (1 - self.beta_1) * delta
            v = self._second_moment(state[f"v/{k}"].astype(np.float64), delta * delta)
            step = self.eta * m / (np.sqrt(v) + self.tau)
            new_params[k] = (w.astype(np.float64) + step).astype(np.float32)
            new_state[f"m/{k}"] = m.astype(np.float32)
            new_state[f"v/{k}"] = v.astype(np.float32)
        return new_params, new_state


@dataclass(frozen=True)
class FedAdam(FedOpt):
    """FedAdam: ``v = beta_2 v + (1 - beta_2) delta^2``."""

    name: str = "fedadam"

    def _second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        return self.beta_2 * v + (1 - self.beta_2) * d2


@dataclass(frozen=True)
class FedYogi(FedOpt):
    """FedYogi: ``v = v - (1 - beta_2) delta^2 sign(v - delta^2)``."""

    name: str = "fedyogi"

    def _second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        return v - (1 - self.beta_2) * d2 * np.sign(v - d2)


@dataclass(frozen=True)
class FedAdagrad(FedOpt):
    """FedAdagrad: ``v = v + delta^2``."""

    name: str = "fedadagrad"

    def _second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        return v + d2


STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def make_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """Build a strategy by name with its options; raises :class:`StrategyError`."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}.")
    try:
        return STRATEGIES[name](**dict(options or {}))  # type: ignore[no-any-return]
    except TypeError as exc:
        raise StrategyError(f"bad options for strategy {name!r}: {exc}") from exc
