"""The site side of a secure-aggregation round (SecAgg+, :mod:`consortia.core.secagg`).

After local training the site clips its delta (and, when the job uses DP, adds its share
of the noise), then walks the four stages with the coordinator: advertise keys, share
secrets with its neighbours, upload the masked update, answer the unmask request. Each
wait is a long poll bounded by the task's deadline plus the stages' deadlines; a site that
falls behind is dropped by the coordinator and the round continues without it. The site
checks every unmask request itself (disjoint lists, enough active neighbours, one answer
per round) and refuses one that could reveal its update.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from typing import Any

import numpy as np

from consortia.core.privacy import (
    bit_noise_std,
    clip,
    delta_noise_multiplier,
    gaussian,
    secure_bit_encoding,
    site_noise_std,
)
from consortia.core.robust import flatten
from consortia.core.secagg import SecAggConfig, SecAggError, SiteSession
from consortia.errors import CoordinatorUnavailable
from consortia.protocol.schemas import JobSpec, TaskPublic
from consortia.protocol.tensors import encode_wire

__all__ = ["secure_update"]

log = logging.getLogger(__name__)

DONE = 5
WAIT = 20.0  # seconds a stage POST may long-poll for the next stage


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _retry(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Every secure-aggregation call is idempotent (keys, shares and unmask answers are
    kept once; a masked update counts once), so a dropped connection is retried: a site
    that gave up on one transport error would be dropped from the round and hold up the
    stage until its deadline."""
    for attempt in range(4):
        try:
            return call(*args, **kwargs)
        except CoordinatorUnavailable:
            if attempt == 3:
                raise
            time.sleep(0.25 * (attempt + 1))
    raise AssertionError("unreachable")


def _wait(ctx: Any, task: TaskPublic, after: int, until: float, answer: Any = None) -> dict[str, Any]:
    """The view once the protocol is past stage ``after``: from ``answer`` (a stage POST
    made with ``wait``) when it got that far, else by long-polling the coordinator."""
    view = (answer or {}).get("view") if isinstance(answer, dict) else None
    if view is not None and view["stage"] > after:
        return _checked(task, view, after)
    while True:
        left = until - time.monotonic()
        if left <= 0:
            raise SecAggError(f"secure round of task {task.id}: gave up waiting after stage {after}.")
        view = _retry(
            ctx.client.request,
            "GET",
            f"/v1/tasks/{task.id}/secagg",
            params={"after": after, "wait": min(20.0, max(left, 0.1))},
            timeout=min(20.0, max(left, 0.1)) + 30.0,
        ).json()
        if view["stage"] > after:
            return _checked(task, view, after)


def _checked(task: TaskPublic, view: dict[str, Any], after: int) -> dict[str, Any]:
    if view.get("aborted") or view.get("dropped"):
        raise SecAggError(
            f"secure round of task {task.id} ended without this site: "
            + (view.get("aborted") or "dropped by the coordinator")
        )
    return view


def _distributed_dp(spec: JobSpec, config: SecAggConfig, cfg: dict, delta: np.ndarray, extra: int) -> np.ndarray:
    """Clip the delta here and add this site's share of the noise; with adaptive clipping
    append the noised clipping bit (Andrew et al. 2021), which then shares the budget."""
    assert spec.privacy is not None
    p = spec.privacy
    norm = float(cfg.get("clip_norm") or p.clip_norm)
    if not (math.isfinite(norm) and 0 < norm <= 1e6):
        raise SecAggError(f"the round's clip_norm == {norm!r} is not a usable norm; refusing to clip with it.")
    if (extra == 1) != (p.adaptive_clipping is not None):
        raise SecAggError("the secure round's layout does not match the job's adaptive clipping; out of date?")
    delta, raw_norm = clip(delta, norm)
    z = p.noise_multiplier
    if p.adaptive_clipping is None:
        return delta + gaussian(delta.size, site_noise_std(norm, z, config.threshold))
    m = len(config.sites)
    z = delta_noise_multiplier(z, bit_noise_std(m))
    noisy = delta + gaussian(delta.size, site_noise_std(norm, z, config.threshold))
    bit_site, scale = secure_bit_encoding(m, config.threshold, config.clip_range)
    bit = (float(raw_norm <= norm) - 0.5 + float(gaussian(1, bit_site)[0])) * scale
    return np.concatenate([noisy, [bit]])


def secure_update(
    ctx: Any,
    task: TaskPublic,
    spec: JobSpec,
    trained: dict[str, np.ndarray],
    base: dict[str, np.ndarray],
    meta: dict[str, str],
    num_examples: int,
) -> dict[str, Any]:
    """Run the site's part of the secure round for ``task``; returns the last answer."""
    assert spec.secure_aggregation is not None
    cfg = task.payload.get("secagg")
    if not isinstance(cfg, dict):
        raise SecAggError("the task carries no secure-aggregation parameters; the coordinator is out of date.")
    config = SecAggConfig(
        sites=tuple(int(s) for s in cfg["sites"]),
        threshold=int(cfg["threshold"]),
        clip_range=float(cfg["clip_range"]),
        context=_unb64(cfg["context"]),
        graph_seed=int(cfg["graph_seed"]),
        degree=int(cfg["degree"]),
    )
    me = int(cfg["site"])
    names = list(cfg["names"])
    if sorted(names) != sorted(base) or len(names) != len(set(names)):
        raise SecAggError("the secure round names other tensors than the global model's.")
    delta = flatten(trained, names) - flatten(base, names)
    extra = int(cfg.get("extra") or 0)
    if delta.size + extra != int(cfg["size"]):
        raise SecAggError(f"update has {delta.size} values, the secure round expects {int(cfg['size']) - extra}.")
    if spec.privacy is not None:
        delta = _distributed_dp(spec, config, cfg, delta, extra)
    session = SiteSession(config, me)
    until = time.monotonic() + max(
        (task.deadline_at.timestamp() - time.time()) + 4 * spec.secure_aggregation.stage_seconds, 1.0
    )
    base_url = f"/v1/tasks/{task.id}/secagg"
    c_pk, s_pk = session.advertise()
    advert = {"c_public": _b64(c_pk), "s_public": _b64(s_pk), "num_examples": num_examples}
    answer = _retry(ctx.client.post_json, f"{base_url}/keys?wait={WAIT}", advert)
    view = _wait(ctx, task, 1, until, answer)
    max_examples = int(view.get("max_examples") or 0)  # in the stage-2 view only
    keys = {int(j): (_unb64(c), _unb64(s)) for j, (c, s) in view["keys"].items()}
    cts = session.share_keys(keys)
    shared = {"ciphertexts": {str(j): _b64(ct) for j, ct in cts.items()}}
    answer = _retry(ctx.client.post_json, f"{base_url}/shares?wait={WAIT}", shared)
    view = _wait(ctx, task, 2, until, answer)
    weight = 1.0 if spec.privacy is not None else num_examples / max(max_examples, num_examples)
    received = {int(j): _unb64(ct) for j, ct in view["ciphertexts"].items()}
    masked = session.masked_input(delta, weight, received, np.random.default_rng())
    body = encode_wire({"masked": masked}, {**meta, "encoding": "secagg/masked"})
    answer = _retry(ctx.client.submit_update, task.id, body, wait=WAIT)
    view = _wait(ctx, task, 3, until, answer)
    request = view["unmask"]
    try:
        shares = session.unmask(request["active"], request["dropped"])
    except SecAggError as exc:  # a request that could reveal our update: say so, send nothing
        log.error("task %s: refused the unmask request: %s", task.id, exc.message)
        raise
    return _retry(
        ctx.client.post_json,
        f"{base_url}/unmask",
        {"shares": {str(j): [kind, str(v)] for j, (kind, v) in shares.items()}},
    )
