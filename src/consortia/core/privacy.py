"""Client-level differential privacy for federated averaging (DP-FedAvg).

Each site's update (its delta from the global model) is clipped to L2 norm ``S``; the
coordinator sums the clipped deltas, adds Gaussian noise of standard deviation ``z * S``
to the sum and divides by the expected number of sites ``m``, so the noise on the mean
has standard deviation ``z * S / m``. With secure aggregation the coordinator never sees
a noiseless sum: each site adds its share of the noise (``z * S / sqrt(t)`` for a round
that needs ``t`` survivors) before masking.

The clipping norm can adapt (Andrew et al. 2021): each round the sites report, as one
noised bit each, whether their update was within the norm, and the norm moves
geometrically towards the target quantile of the update norms. The bits' noise is part of
the privacy cost; :func:`delta_noise_multiplier` splits one noise multiplier between them.

Noise is drawn from the operating system's CSPRNG (``os.urandom``) unless a seeded
``np.random.Generator`` is passed explicitly (tests and simulations only). Privacy is
accounted with Google's ``dp-accounting`` (RDP or PLD), never by hand:
:func:`epsilon` composes the jobs' rounds as Poisson-sampled Gaussian mechanisms.

References
----------
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021.
Mironov, "Renyi Differential Privacy", CSF 2017; Doroshenko et al., "Connect the Dots:
Tighter Discrete Approximations of Privacy Loss Distributions", PETS 2022 (PLD).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortia.errors import StrategyError, UpdateError

__all__ = [
    "AdaptiveClip",
    "DpRound",
    "bit_noise_std",
    "clip",
    "delta_noise_multiplier",
    "epsilon",
    "gaussian",
    "noised_mean",
    "rounds_within_budget",
    "secure_bit_encoding",
    "site_noise_std",
]


def gaussian(size: int, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``size`` draws of N(0, std^2) as float64.

    Without ``rng`` the uniforms come from ``os.urandom`` (53 random bits each) and are
    turned into normals by the Box-Muller transform: DP noise an attacker could predict
    is no noise. Pass a seeded ``rng`` only to make a simulation reproducible.

    Examples
    --------
    >>> x = gaussian(100_000, 2.0)
    >>> bool(1.95 < x.std() < 2.05)
    True
    """
    if not math.isfinite(std) or std < 0:
        raise StrategyError(f"noise std == {std!r}, must be a finite number >= 0.")
    if size == 0 or std == 0:
        return np.zeros(size)
    if rng is not None:
        return rng.normal(0.0, std, size)
    pairs = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:size]
    return z * std


def clip(delta: np.ndarray, norm: float) -> tuple[np.ndarray, float]:
    """Scale ``delta`` to L2 norm at most ``norm``; return ``(clipped, original_norm)``.

    Raises :class:`UpdateError` for NaN or Inf values: a non-finite update is rejected,
    never clipped into something that looks valid. Huge finite values are clipped like
    any other (the norm is computed without overflow).

    Examples
    --------
    >>> import numpy as np
    >>> c, n = clip(np.array([3e6, 4e6]), 1.0)
    >>> c.round(6).tolist(), n
    ([0.6, 0.8], 5000000.0)
    """
    if not math.isfinite(norm) or norm <= 0:
        raise StrategyError(f"clip norm == {norm!r}, must be a finite number > 0.")
    x = np.asarray(delta, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise UpdateError("update has NaN or Inf values; it is rejected, not clipped.")
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return x.copy(), 0.0
    original = peak * float(np.linalg.norm(x / peak))  # no overflow for 1e300-sized values
    factor = min(1.0, norm / original)
    out = x * factor
    size = float(np.linalg.norm(out))
    if size > norm:  # rounding: never let a clipped update exceed the bound
        out *= norm / size
    return out, original


def noised_mean(
    total: np.ndarray, expected_sites: int, clip_norm: float, z: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Central DP: ``(total + N(0, (z S)^2)) / m`` for a sum of clipped deltas.

    The denominator is the expected number of sites ``m``, not the number that reported,
    so one site's presence changes the mean by at most ``S / m``.

    Examples
    --------
    >>> import numpy as np
    >>> noised_mean(np.array([4.0, 8.0]), 4, 1.0, 1e-12).round(6).tolist()
    [1.0, 2.0]
    """
    if expected_sites < 1:
        raise StrategyError(f"expected_sites == {expected_sites!r}, must be >= 1.")
    noise = gaussian(int(np.size(total)), z * clip_norm, rng).reshape(np.shape(total))
    return (np.asarray(total, np.float64) + noise) / expected_sites


def site_noise_std(clip_norm: float, z: float, min_sites: int) -> float:
    """Distributed DP: the std each site adds so that any ``min_sites`` of them together
    add at least ``z * S`` (``z S / sqrt(min_sites)``); more survivors only add noise.

    Examples
    --------
    >>> site_noise_std(1.0, 2.0, 4)
    1.0
    """
    if min_sites < 1:
        raise StrategyError(f"min_sites == {min_sites!r}, must be >= 1.")
    return z * clip_norm / math.sqrt(min_sites)


def delta_noise_multiplier(z: float, bit_std: float) -> float:
    """The noise multiplier left for the deltas when the clipped-or-not bits take noise
    of standard deviation ``bit_std`` (Andrew et al. 2021, Theorem 1):
    ``z_delta = (z^-2 - (2 bit_std)^-2)^(-1/2)``.

    Examples
    --------
    >>> round(delta_noise_multiplier(1.0, 5.0), 4)
    1.005
    """
    if not (math.isfinite(z) and z > 0):
        raise StrategyError(f"noise_multiplier == {z!r}, must be > 0.")
    rest = z**-2 - (2.0 * bit_std) ** -2
    if rest <= 0:
        raise StrategyError(
            f"bit noise std {bit_std} is too small for noise_multiplier {z}: it must exceed z / 2 = {z / 2}."
        )
    return rest**-0.5


@dataclass(frozen=True)
class AdaptiveClip:
    """Geometric update of the clipping norm towards a target quantile of update norms.

    ``C <- C * exp(-lr * (b - quantile))``, where ``b`` is the noised share of sites
    whose update norm was at most ``C``.

    Examples
    --------
    >>> import numpy as np
    >>> ac = AdaptiveClip(quantile=0.5, lr=0.2)
    >>> round(ac.next_norm(1.0, np.array([True] * 10), bit_std=0.0), 4)  # all inside: shrink
    0.9048
    """

    quantile: float = 0.5
    lr: float = 0.2

    def __post_init__(self) -> None:
        if not (0.0 < self.quantile < 1.0):
            raise StrategyError(f"target quantile == {self.quantile!r}, must be in (0, 1).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise StrategyError(f"clip learning rate == {self.lr!r}, must be > 0.")

    def next_norm(
        self, norm: float, within: np.ndarray, *, bit_std: float, rng: np.random.Generator | None = None
    ) -> float:
        m = max(len(within), 1)
        share = (float(np.sum(within)) + float(gaussian(1, bit_std, rng)[0])) / m
        return self.from_share(norm, share)

    def from_share(self, norm: float, share: float) -> float:
        """The next norm from an already noised share of sites within the norm (the
        distributed case: the sites noised their bits, secure aggregation summed them)."""
        return float(norm * math.exp(-self.lr * (share - self.quantile)))


def bit_noise_std(expected_sites: int) -> float:
    """Standard deviation of the noise on the count of sites within the clipping norm:
    ``m / 20`` for ``m`` sites sampled (Andrew et al. 2021's recommendation)."""
    return expected_sites / 20.0


def secure_bit_encoding(expected_sites: int, threshold: int, clip_range: float) -> tuple[float, float]:
    """``(site_std, scale)`` for carrying a site's clipping bit in a secure round: each
    site adds noise of ``site_std`` (its ``1 / threshold`` share of the bits' variance) and
    sends ``(b - 1/2 + noise) * scale``, which stays within ``clip_range`` unless the
    noise passes 6 of its standard deviations (probability ~2e-9; clipped there, as the
    deltas' own noised values are). Sites and the coordinator both call this, so they
    agree on the encoding.

    Examples
    --------
    >>> secure_bit_encoding(20, 16, 1.0)
    (0.25, 0.5)
    """
    if threshold < 1:
        raise StrategyError(f"threshold == {threshold!r}, must be >= 1.")
    site_std = bit_noise_std(expected_sites) / math.sqrt(threshold)
    return site_std, clip_range / (0.5 + 6.0 * site_std)


@dataclass(frozen=True)
class DpRound:
    """One kind of DP round: sampling rate ``q`` of sites, noise multiplier ``z``."""

    q: float
    z: float
    count: int

    def __post_init__(self) -> None:
        if not (0.0 < self.q <= 1.0):
            raise StrategyError(f"sampling rate q == {self.q!r}, must be in (0, 1].")
        if not (math.isfinite(self.z) and self.z > 0):
            raise StrategyError(f"noise_multiplier == {self.z!r}, must be > 0.")
        if self.count < 0:
            raise StrategyError(f"round count == {self.count!r}, must be >= 0.")


def epsilon(rounds: Sequence[DpRound], delta: float, method: str = "rdp") -> float:
    """Epsilon at ``delta`` after composing every group of rounds (``dp-accounting``).

    Each group is ``count`` self-composed Poisson-sampled Gaussian mechanisms. ``method``
    is ``"rdp"`` (Renyi DP, the default: fast, slightly loose) or ``"pld"`` (privacy loss
    distributions: tighter, slower).

    Examples
    --------
    >>> round(epsilon([DpRound(q=1.0, z=5.0, count=50)], 1e-5), 4)
    7.0774
    """
    from dp_accounting import dp_event, pld, rdp

    if not (0.0 < delta < 1.0):
        raise StrategyError(f"delta == {delta!r}, must be in (0, 1).")
    events = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(r.q, dp_event.GaussianDpEvent(r.z)), r.count)
        for r in rounds
        if r.count > 0
    ]
    if not events:
        return 0.0
    event = events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)
    if method == "rdp":
        accountant = rdp.RdpAccountant()
    elif method == "pld":
        accountant = pld.PLDAccountant()
    else:
        raise StrategyError(f"accountant {method!r} is not known; use 'rdp' or 'pld'.")
    return float(accountant.compose(event).get_epsilon(delta))


def rounds_within_budget(
    spent: Sequence[DpRound], q: float, z: float, wanted: int, delta: float, budget: float, method: str = "rdp"
) -> int:
    """How many of ``wanted`` further rounds (rate ``q``, multiplier ``z``) fit in
    ``budget`` after ``spent`` (binary search: epsilon grows with the round count).

    Examples
    --------
    >>> rounds_within_budget([], 1.0, 5.0, 100, 1e-5, 7.0774 + 1e-4)
    50
    """

    def fits(k: int) -> bool:
        return epsilon([*spent, DpRound(q, z, k)], delta, method) <= budget

    if not fits(0):
        return 0
    lo, hi = 0, wanted
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
