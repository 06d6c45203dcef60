"""Streaming weighted aggregation: memory O(model), not O(model x sites).

Each arriving update is folded into a running weighted sum and then dropped, so a round
with 1,000 sites costs the same memory as a round with 10. The fold is one fused BLAS
``saxpy`` (``acc += w * x``) per tensor: a single pass over the data, like a plain
``np.add``, instead of a multiply pass plus an add pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.linalg.blas import saxpy

from consortia.core.params import Params, check_compatible
from consortia.errors import StrategyError, UpdateError

__all__ = ["WeightedSum"]


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
        for name, acc in self._sum.items():
            flat_acc = acc.reshape(-1)  # a view: acc is C-contiguous float32
            flat_x = np.ascontiguousarray(update[name], dtype=np.float32).reshape(-1)
            if flat_acc.size == 0:
                continue
            out = saxpy(flat_x, flat_acc, a=float(weight))  # in place on flat_acc
            if not np.shares_memory(out, flat_acc):  # defensive: never expected
                flat_acc[:] = out
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> Params:
        """The weighted mean; raises :class:`StrategyError` if nothing was added."""
        if self.count == 0 or self.total_weight <= 0:
            raise StrategyError("no updates were aggregated; cannot compute a mean.")
        inv = np.float32(1.0 / self.total_weight)
        return {k: (v * inv).astype(np.float32) for k, v in self._sum.items()}
