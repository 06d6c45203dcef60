"""Named float32 parameter arrays: the unit every strategy and wire format exchanges.

A model's parameters are a ``dict[str, np.ndarray]`` (``Params``) of float32 arrays with
stable names (a torch ``state_dict``'s keys, for instance). This module checks that an
incoming set matches a reference set exactly and holds only finite numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from consortia.errors import UpdateError

__all__ = ["Params", "check_compatible", "check_finite", "num_parameters", "zeros_like"]

Params = dict[str, np.ndarray]


def num_parameters(params: Mapping[str, np.ndarray]) -> int:
    """Total number of scalar parameters."""
    return int(sum(a.size for a in params.values()))


def zeros_like(params: Mapping[str, np.ndarray], dtype: type = np.float32) -> Params:
    """A fresh zero array per name, same shapes."""
    return {k: np.zeros(v.shape, dtype=dtype) for k, v in params.items()}


def check_finite(params: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateError` naming the first tensor with NaN or Inf values."""
    for name, arr in params.items():
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise UpdateError(
                f"tensor {name!r} has {bad} non-finite value(s) (NaN or Inf); "
                "updates must be finite: check the site's learning rate and data."
            )


def check_compatible(reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateError` unless ``update`` has exactly ``reference``'s names,
    shapes and a float32 dtype, and only finite values."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(
            f"update tensors do not match the global model: missing {missing}, "
            f"unexpected {extra}; the site must train the job's recipe unchanged."
        )
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise UpdateError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}.")
        if arr.dtype != np.float32:
            raise UpdateError(f"tensor {name!r} has dtype {arr.dtype}, expected float32.")
    check_finite(update)
