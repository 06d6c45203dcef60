"""Streaming weighted aggregation: memory O(model), not O(model x sites).

Each arriving update is folded into a running weighted sum and then dropped, so a round
with 1,000 sites costs the same memory as a round with 10. The fold works in cache-sized
chunks so the weighted add costs close to one plain ``np.add`` pass over the data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from consortia.core.params import Params, check_compatible
from consortia.errors import StrategyError, UpdateError

__all__ = ["WeightedSum"]

_CHUNK = 1 << 15  # 32K float32 = 128 KiB: the scratch buffer stays in L2 cache


class WeightedSum:
    """Running ``sum_k w_k * x_k`` and ``sum_k w_k`` over named float32 arrays.

    Parameters
    ----------
    reference
        Names and shapes every folded update must have (usually the global model).

    Examples
    --------
    >>> import numpy as np
    >>> acc = WeightedSum({"w": np.zeros(2, np.float32)})
    >>> acc.add({"w": np.array([1, 2], np.float32)}, 1.0)
    >>> acc.add({"w": np.array([3, 6], np.float32)}, 3.0)
    >>> acc.mean()["w"].tolist()
    [2.5, 5.0]
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self._reference = {k: np.empty(v.shape, np.float32) for k, v in reference.items()}
        self._sum = {k: np.zeros(v.shape, np.float32) for k, v in reference.items()}
        self._scratch = np.empty(_CHUNK, np.float32)
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], weight: float, *, check: bool = True) -> None:
        """Fold one update in.

        Parameters
        ----------
        update
            Named float32 arrays with the reference's names and shapes.
        weight
            The update's weight (its example count), finite and > 0.
        check
            Validate names, shapes, dtype and finiteness first (raises
            :class:`UpdateError`). Pass ``False`` only for updates already validated
            on arrival and read back from the content-addressed store.
        """
        if not np.isfinite(weight) or weight <= 0:
            raise UpdateError(f"weight == {weight!r}, must be a finite number > 0.")
        if check:
            check_compatible(self._reference, update)
        w = np.float32(weight)
        for name, acc in self._sum.items():
            flat_acc = acc.reshape(-1)
            flat_x = np.ascontiguousarray(update[name]).reshape(-1)
            n = flat_acc.size
            for start in range(0, n, _CHUNK):
                stop = min(start + _CHUNK, n)
                buf = self._scratch[: stop - start]
                np.multiply(flat_x[start:stop], w, out=buf)
                np.add(flat_acc[start:stop], buf, out=flat_acc[start:stop])
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> Params:
        """The weighted mean; raises :class:`StrategyError` if nothing was added."""
        if self.count == 0 or self.total_weight <= 0:
            raise StrategyError("no updates were aggregated; cannot compute a mean.")
        inv = np.float32(1.0 / self.total_weight)
        return {k: (v * inv).astype(np.float32) for k, v in self._sum.items()}
