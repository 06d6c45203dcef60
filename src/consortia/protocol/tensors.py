"""Tensors on the wire: safetensors bodies with string metadata. Never pickle.

A body is decoded only after its header is checked: bounded header size, float32
tensors only, offsets inside the body. Anything else raises :class:`UpdateError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from consortia.core.params import Params
from consortia.errors import UpdateError

__all__ = ["WIRE_DTYPES", "decode", "decode_wire", "encode", "encode_wire"]

MAX_HEADER = 16 * 1024 * 1024


def encode(params: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named float32 arrays (and string metadata) to safetensors bytes."""
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    return _st_save(tensors, metadata=dict(metadata) if metadata else None)


WIRE_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I32": np.int32, "U32": np.uint32}


def encode_wire(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise wire tensors (compressed or masked: float32/16, int8, int32, uint32) to safetensors."""
    allowed = tuple(WIRE_DTYPES.values())
    out = {}
    for k, v in tensors.items():
        arr = np.ascontiguousarray(v)
        if arr.dtype.type not in allowed:
            raise UpdateError(f"wire tensor {k!r} has dtype {arr.dtype}; allowed: float32/16, int8, int32, uint32.")
        out[k] = arr
    return _st_save(out, metadata=dict(metadata) if metadata else None)


def decode_wire(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a compressed update body; like :func:`decode` but admits the wire dtypes."""
    return _decode(body, tuple(WIRE_DTYPES))


def decode(body: bytes) -> tuple[Params, dict[str, str]]:
    """Parse a safetensors body into ``(params, metadata)``; raises :class:`UpdateError`."""
    params, meta = _decode(body, ("F32",))
    return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}, meta


def _decode(body: bytes, dtypes: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if len(body) < 8:
        raise UpdateError("update body is not safetensors: shorter than its 8-byte header length.")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > MAX_HEADER or 8 + header_len > len(body):
        raise UpdateError(f"update body is not valid safetensors: header length {header_len} is out of range.")
    try:
        header = json.loads(body[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpdateError("update body is not valid safetensors: its header is not JSON.") from exc
    if not isinstance(header, dict):
        raise UpdateError("update body is not valid safetensors: its header is not an object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UpdateError("safetensors __metadata__ must map strings to strings.")
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in dtypes:
            want = "float32 (F32)" if dtypes == ("F32",) else "one of " + "/".join(dtypes)
            raise UpdateError(f"tensor {name!r} must be {want}, got {info!r:.80}.")
    try:
        params = _st_load(body)
    except Exception as exc:  # safetensors raises its own SafetensorError for torn bodies
        raise UpdateError(f"update body is not valid safetensors: {exc}") from exc
    return dict(params), dict(metadata)
