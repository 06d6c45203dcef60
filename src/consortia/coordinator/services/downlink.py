"""Downlink compression: the next global model goes to sites as a compressed delta.

With ``compression.downlink`` set, a train round that closes does not publish the model
the strategy produced; it compresses the change from the round's input model (fp16,
int8, or top-k with the coordinator's own error feedback) and publishes

    w_{r+1} = w_r + decode(compress(strategy(w_r, mean) - w_r + e_r))

where ``e_r`` is what top-k has not sent yet (kept in the job's server state under
``downlink/``). The published model *is* that sum, so a site that holds ``w_r`` rebuilds
it bit for bit from the small delta (:func:`consortia.core.compression.add_delta` on
both sides) and checks it against the model's SHA-256; lineage and the registry name the
same bytes. A site that does not hold ``w_r`` (not sampled last round, or a fresh cache)
downloads the full model as before.

The delta's randomness (int8's stochastic rounding) is seeded by the job and round, so a
coordinator killed while closing recomputes the same bytes. Compressing a DP or robust
result is post-processing: it changes neither guarantee.

References
----------
Tang et al., "DoubleSqueeze: Parallel Stochastic Gradient Descent with Double-pass
Error-Compensated Compression", ICML 2019 (compressing both directions, error feedback
at the server).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from consortia.core.compression import add_delta, compress, decompress, wire_bytes
from consortia.core.params import Params
from consortia.protocol.schemas import JobSpec
from consortia.protocol.tensors import encode_wire

__all__ = ["DOWNLINK_STATE", "compress_downlink", "strategy_state"]

DOWNLINK_STATE = "downlink/"
_OWN_STATE = ("privacy/", DOWNLINK_STATE)


def strategy_state(state: Mapping[str, np.ndarray]) -> Params:
    """The part of a job's server state that belongs to its strategy (FedAdam's moments,
    ...), without what DP clipping and the downlink keep beside it."""
    return {k: v for k, v in state.items() if not k.startswith(_OWN_STATE)}


def compress_downlink(
    spec: JobSpec, number: int, current: Params, new: Params, state: Mapping[str, np.ndarray], base_hash: str
) -> tuple[Params, Params, bytes, dict[str, Any]]:
    """Compress round ``number``'s change ``new - current``.

    Returns ``(published, downlink_state, wire_body, info)``: the model to publish
    (``current`` plus the decoded delta), the coordinator's top-k residual to keep in
    the job's state, the delta as a safetensors body naming its base, and byte counts.
    """
    method = spec.compression.downlink
    residual = {k[len(DOWNLINK_STATE) :]: v for k, v in state.items() if k.startswith(DOWNLINK_STATE)}
    delta = {k: (np.asarray(new[k], np.float32) - np.asarray(current[k], np.float32)) for k in current}
    rng = np.random.default_rng([spec.seed, number, 0xD0])
    wire, rest = compress(
        delta, method, rng=rng, ratio=spec.compression.topk_ratio, residual=residual if method == "topk" else None
    )
    published = add_delta(current, decompress(wire, current))
    # one metadata key: safetensors writes a map of several in hash order, and a closing
    # repeated after a crash should write the same bytes (the parts name the encoding)
    body = encode_wire(wire, {"base": base_hash})
    fp32 = 4 * sum(int(np.size(v)) for v in current.values())
    sent = wire_bytes(wire)
    info = {"method": method, "base": base_hash, "tensor_bytes": sent, "bytes_fp32": fp32, "ratio": sent / fp32}
    return published, {DOWNLINK_STATE + k: v for k, v in rest.items()}, body, info
