"""Update compression: fp16, unbiased stochastic int8, top-k with error feedback.

A compressor turns a delta (named float32 arrays) into *wire tensors* (named arrays of the
dtypes safetensors carries) and back. The wire names are ``"<tensor>::<part>"``, so a
decoder can check that every tensor of the model is there exactly once.

- ``fp16``: half precision; 0.5 of fp32 bytes; round-to-nearest.
- ``int8``: per tensor, ``q = floor(x / s * 127 + u)`` with ``u ~ U[0, 1)`` and
  ``s = max |x|``; ``E[q * s / 127] = x`` (unbiased); about 0.25 of fp32 bytes.
- ``topk``: the ``ratio`` largest-magnitude values of each tensor, as int32 indices and
  fp16 values (6 bytes per kept value). What is not sent is remembered by the site and
  added to its next update (error feedback), so nothing is lost, only delayed.

References
----------
Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding", NeurIPS 2017 (unbiased stochastic quantisation).
Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et
al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from consortia.core.params import Params
from consortia.errors import StrategyError, UpdateError

__all__ = ["METHODS", "add_delta", "compress", "decompress", "wire_bytes"]

METHODS = ("none", "fp16", "int8", "topk")


def wire_bytes(wire: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of a set of wire tensors (headers excluded)."""
    return int(sum(np.asarray(v).nbytes for v in wire.values()))


def add_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Params:
    """``base + delta`` in float32, tensor by tensor: the one way a decoded delta is applied,
    so a coordinator and a site that apply the same wire tensors get the same bytes.

    Examples
    --------
    >>> import numpy as np
    >>> add_delta({"w": np.ones(2, np.float32)}, {"w": np.array([0.5, -1.0], np.float32)})["w"].tolist()
    [1.5, 0.0]
    """
    if set(base) != set(delta):
        raise UpdateError(f"delta names {sorted(delta)}, the model {sorted(base)}.")
    return {k: (np.asarray(base[k], np.float32) + np.asarray(delta[k], np.float32)).astype(np.float32) for k in base}


def compress(
    delta: Mapping[str, np.ndarray],
    method: str,
    *,
    rng: np.random.Generator,
    ratio: float = 0.01,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], Params]:
    """Compress ``delta``; return ``(wire_tensors, new_residual)``.

    ``residual`` (top-k only) is what earlier rounds did not send; it is added first and
    the part not sent now is returned as the new residual. Other methods return ``{}``.

    Examples
    --------
    >>> import numpy as np
    >>> d = {"w": np.array([0.1, -2.0, 0.3, 0.0], np.float32)}
    >>> wire, rest = compress(d, "topk", rng=np.random.default_rng(0), ratio=0.25)
    >>> decompress(wire, d)["w"].tolist(), rest["w"].astype(float).round(2).tolist()
    ([0.0, -2.0, 0.0, 0.0], [0.1, 0.0, 0.3, 0.0])
    """
    if method not in METHODS:
        raise StrategyError(f"unknown compression {method!r}; choose one of {list(METHODS)}.")
    wire: dict[str, np.ndarray] = {}
    new_residual: Params = {}
    for name, arr in delta.items():
        x = np.asarray(arr, np.float32)
        if not np.all(np.isfinite(x)):
            raise UpdateError(f"tensor {name!r} has non-finite values; nothing to compress.")
        if method == "none":
            wire[f"{name}::f32"] = x
        elif method == "fp16":
            if np.abs(x).max(initial=0.0) > np.finfo(np.float16).max:
                raise UpdateError(f"tensor {name!r} exceeds the fp16 range (65504); use int8 or none.")
            wire[f"{name}::f16"] = x.astype(np.float16)
        elif method == "int8":
            scale = float(np.abs(x).max(initial=0.0))
            if scale == 0.0:
                q = np.zeros(x.shape, np.int8)
            else:
                y = x.astype(np.float64) / scale * 127.0
                q = np.clip(np.floor(y + rng.random(y.shape)), -127, 127).astype(np.int8)
            wire[f"{name}::i8"] = q
            wire[f"{name}::scale"] = np.array([scale], np.float32)
        else:
            if not (0.0 < ratio <= 1.0):
                raise StrategyError(f"topk ratio == {ratio!r}, must be in (0, 1].")
            full = x.astype(np.float32).reshape(-1)
            if residual is not None and name in residual:
                full = full + np.asarray(residual[name], np.float32).reshape(-1)
            k = max(1, math.ceil(ratio * full.size)) if full.size else 0
            idx = np.sort(np.argpartition(np.abs(full), full.size - k)[full.size - k :]) if k else np.zeros(0, int)
            vals = full[idx].astype(np.float16)
            sent = np.zeros_like(full)
            sent[idx] = vals.astype(np.float32)
            new_residual[name] = (full - sent).reshape(x.shape)
            wire[f"{name}::idx"] = idx.astype(np.int32)
            wire[f"{name}::val"] = vals  # the shape is the model's: not sent
    return wire, new_residual


def decompress(wire: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Params:
    """Rebuild float32 deltas shaped like ``reference``; raises :class:`UpdateError` on
    anything missing, extra, out of range or of the wrong dtype."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in wire.items():
        name, sep, part = key.rpartition("::")
        if not sep or name not in reference:
            raise UpdateError(f"wire tensor {key!r} names no tensor of the model.")
        parts.setdefault(name, {})[part] = np.asarray(arr)
    missing = sorted(set(reference) - set(parts))
    if missing:
        raise UpdateError(f"compressed update lacks tensor(s) {missing}.")
    out: Params = {}
    for name, ref in reference.items():
        p = parts[name]
        shape = np.shape(ref)
        size = int(np.prod(shape, dtype=np.int64))
        if set(p) == {"f32"} or set(p) == {"f16"}:
            (arr,) = p.values()
            if arr.shape != shape:
                raise UpdateError(f"tensor {name!r} has shape {arr.shape}, expected {shape}.")
            x = arr.astype(np.float32)
        elif set(p) == {"i8", "scale"}:
            q, scale = p["i8"], p["scale"]
            if q.dtype != np.int8 or q.shape != shape or scale.shape != (1,):
                raise UpdateError(f"int8 tensor {name!r} is malformed.")
            x = (q.astype(np.float32) * np.float32(scale[0] / 127.0)).astype(np.float32)
        elif set(p) == {"idx", "val"}:
            idx, vals = p["idx"], p["val"]
            if idx.dtype != np.int32 or idx.ndim != 1 or vals.shape != idx.shape:
                raise UpdateError(f"top-k tensor {name!r} is malformed.")
            if idx.size and (idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0)):
                raise UpdateError(f"top-k tensor {name!r} has indices out of range or repeated.")
            flat = np.zeros(size, np.float32)
            flat[idx] = vals.astype(np.float32)
            x = flat.reshape(shape)
        else:
            raise UpdateError(f"tensor {name!r} has an unknown encoding {sorted(p)}.")
        if not np.all(np.isfinite(x)):
            raise UpdateError(f"tensor {name!r} decodes to non-finite values.")
        out[name] = x
    return out
