"""Task handlers by kind: the site's task type registry.

Each handler takes the site context and a task, does its work on local data only, and
answers the coordinator (result, update or refusal). New kinds (monitoring, secure
aggregation stages, ...) register here with :func:`register`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from consortia.core.compression import add_delta, compress, decompress
from consortia.errors import ConsortiaError, SchemaMismatchError, SpecError, UpdateError
from consortia.ml import recipes
from consortia.ml.data import check_schema, fingerprint, labels, profile, split_indices, transform
from consortia.ml.evaluate import evaluate_scores
from consortia.protocol.schemas import EvaluationResult, JobSpec, PreprocessingPlan, TaskPublic, TaskResultPublic
from consortia.protocol.tensors import decode, decode_wire, encode, encode_wire
from consortia.site.client import CoordinatorClient
from consortia.site.monitor import build_reference, suppressed, write_reference
from consortia.site.policy import PolicyRefusal, SitePolicy, check_task
from consortia.site.secure import secure_update

__all__ = ["HANDLERS", "Prepared", "SiteContext", "dispatch", "prepare", "register", "task_seed"]

log = logging.getLogger("consortia.site")


@dataclass
class Prepared:
    """A job's view of the site's data: filtered rows, labels and the local split."""

    frame: pd.DataFrame
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def prepare(frame: pd.DataFrame, spec: JobSpec, site_name: str) -> Prepared:
    """Check the schema, keep rows with a usable label and split them, seeded by the job
    and salted by the site name (the demo harness reproduces this split exactly)."""
    check_schema(frame, spec)
    df, y = labels(frame, spec)
    if len(df) < 3:
        raise SchemaMismatchError(f"only {len(df)} labelled row(s) at this site; need at least 3.")
    tr, va, te = split_indices(len(df), spec.seed, spec.split, salt=site_name)
    return Prepared(df, y, tr, va, te)


def task_seed(spec: JobSpec, round_number: int, site_name: str) -> int:
    digest = hashlib.sha256(f"{spec.seed}/{round_number}/{site_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class SiteContext:
    name: str
    home: Path
    client: CoordinatorClient
    frame: pd.DataFrame
    policy: SitePolicy = field(default_factory=SitePolicy)
    _prepared: dict[str, Prepared] = field(default_factory=dict)

    def prepared(self, spec: JobSpec) -> Prepared:
        key = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        if key not in self._prepared:
            self._prepared = {key: prepare(self.frame, spec, self.name)}
        return self._prepared[key]

    def global_params(self, digest: str, delta: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """Global parameters by hash, from the local cache or downloaded once.

        ``delta`` (``{"base", "blob"}``, a job with ``compression.downlink``) names a
        compressed delta from a model this site may hold: if the base is in the cache, the
        site downloads the delta only and rebuilds the model, which must hash to
        ``digest``; otherwise, or if anything about the delta is wrong, it downloads the
        whole model."""
        cache = self.home / "cache" / digest
        if cache.exists():
            data = cache.read_bytes()
        else:
            data = self._from_delta(digest, delta) if delta else None
            if data is None:
                data = self.client.blob(digest)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(cache)
        return decode(data)[0]

    def _from_delta(self, digest: str, delta: dict[str, str]) -> bytes | None:
        base_file = self.home / "cache" / str(delta.get("base", ""))
        if not base_file.is_file() or not isinstance(delta.get("blob"), str):
            return None
        try:
            wire, meta = decode_wire(self.client.blob(delta["blob"]))
            if meta.get("base") != delta["base"]:
                raise UpdateError(f"delta {delta['blob'][:12]} does not say it applies to {delta['base'][:12]}.")
            base = decode(base_file.read_bytes())[0]
            data = encode(add_delta(base, decompress(wire, base)))
        except ConsortiaError as exc:
            log.warning("global model %s: delta unusable (%s); downloading the whole model", digest[:12], exc)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("global model %s: delta rebuilt other bytes; downloading the whole model", digest[:12])
            return None
        return data


Handler = Callable[[SiteContext, TaskPublic], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def register(kind: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return deco


def _spec(task: TaskPublic) -> JobSpec:
    try:
        return JobSpec.model_validate(task.payload["spec"])
    except Exception as exc:
        raise SpecError(f"task {task.id} carries an invalid job spec: {exc}") from exc


def _plan(task: TaskPublic) -> PreprocessingPlan:
    return PreprocessingPlan.model_validate(task.payload["preprocessing"])


@register("profile")
def handle_profile(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    spec = _spec(task)
    p = ctx.prepared(spec)
    rows = p.frame.iloc[p.train]
    result = profile(rows, spec, ctx.policy.min_count)
    return ctx.client.submit_result(task.id, TaskResultPublic(profile=result, fingerprint=fingerprint(rows, spec)))


def _scores(spec: JobSpec, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    return recipes.predict(spec.recipe.name, spec.recipe.options, params, X)


@register("train")
def handle_train(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    spec, plan = _spec(task), _plan(task)
    p = ctx.prepared(spec)
    assert task.global_hash is not None
    params = ctx.global_params(task.global_hash, task.payload.get("global_delta"))
    X = transform(p.frame, plan)
    evaluation = _evaluate(ctx, spec, p, params, X[p.val], p.val, with_groups=False)
    mu = float(spec.strategy.options.get("proximal_mu", 0.01)) if spec.strategy.name == "fedprox" else 0.0
    trainable = spec.adapter.params if spec.adapter is not None else None
    result = recipes.train(
        spec.recipe.name,
        spec.recipe.options,
        params,
        X[p.train],
        p.y[p.train],
        epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.learning_rate,
        seed=task_seed(spec, task.round, ctx.name),
        proximal_mu=mu,
        trainable=trainable,
    )
    out = result.params if trainable is None else {k: result.params[k] for k in trainable}
    meta = {
        "num_examples": str(result.num_examples),
        "evaluation": evaluation.model_dump_json(),
        "fingerprint": fingerprint(p.frame.iloc[p.train], spec).model_dump_json(),
    }
    if ctx.policy.shares("train_loss"):
        meta["train_loss"] = repr(result.loss)
    if spec.secure_aggregation is not None:
        return secure_update(ctx, task, spec, out, params, meta, result.num_examples)
    if spec.compression.method == "none":
        body = encode(out, meta)
    else:
        body = _compressed(ctx, task, spec, {k: out[k] - params[k] for k in out}, meta)
    return ctx.client.submit_update(task.id, body)


def _compressed(
    ctx: SiteContext, task: TaskPublic, spec: JobSpec, delta: dict[str, np.ndarray], meta: dict[str, str]
) -> bytes:
    """The update as a compressed delta; top-k keeps what it did not send for the next
    round of the same job (error feedback), on disk so a restarted site keeps it too."""
    method = spec.compression.method
    memory = ctx.home / "residuals" / f"job-{task.job_id}.safetensors"
    residual = decode(memory.read_bytes())[0] if method == "topk" and memory.exists() else None
    rng = np.random.default_rng(task_seed(spec, task.round, ctx.name))
    wire, residual = compress(delta, method, rng=rng, ratio=spec.compression.topk_ratio, residual=residual)
    if method == "topk":
        memory.parent.mkdir(parents=True, exist_ok=True)
        tmp = memory.with_suffix(".tmp")
        tmp.write_bytes(encode(residual))
        tmp.replace(memory)
    return encode_wire(wire, {**meta, "encoding": f"delta/{method}"})


@register("evaluate")
def handle_evaluate(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    spec, plan = _spec(task), _plan(task)
    p = ctx.prepared(spec)
    assert task.global_hash is not None
    params = ctx.global_params(task.global_hash, task.payload.get("global_delta"))
    rows = p.frame.iloc[p.test]
    X_test = transform(rows, plan)
    evaluation = _evaluate(ctx, spec, p, params, X_test, p.test, with_groups=True)
    # the reference for monitoring: training rows on the agreed bins, test scores per class
    reference = build_reference(p.frame.iloc[p.train], spec, plan, _scores(spec, params, X_test), p.y[p.test])
    write_reference(ctx.home, task.job_id, reference, task.global_hash)
    return ctx.client.submit_result(
        task.id,
        TaskResultPublic(
            evaluation=evaluation,
            fingerprint=fingerprint(rows, spec),
            reference=suppressed(reference, ctx.policy.min_count, plan),
        ),
    )


def _evaluate(
    ctx: SiteContext,
    spec: JobSpec,
    p: Prepared,
    params: dict[str, np.ndarray],
    X: np.ndarray,
    idx: np.ndarray,
    *,
    with_groups: bool,
) -> EvaluationResult:
    """Evaluate on rows ``idx`` as the site policy allows (min count, shared metrics)."""
    attr = spec.card.sensitive_attribute
    groups = p.frame[attr].to_numpy()[idx] if with_groups and attr and attr in p.frame.columns else None
    return evaluate_scores(
        _scores(spec, params, X), p.y[idx], groups, min_count=ctx.policy.min_count, share=ctx.policy.share_metrics
    )


def dispatch(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    """Run ``task`` with its handler; refuse it (with the rule) when the site cannot or
    will not do it: unknown kind, the site policy or its identifier scan says no, data
    that does not match the schema, too few rows."""
    handler = HANDLERS.get(task.kind)
    if handler is None:
        return ctx.client.refuse(task.id, f"this site does not know task kind {task.kind!r}", "task_kind")
    try:
        if "spec" in task.payload:
            spec = _spec(task)
            refusal = check_task(ctx.policy, task.kind, spec, ctx.frame)
            if refusal is None and spec.adapter is not None and spec.adapter.site != ctx.name:
                refusal = PolicyRefusal(
                    "adapter", f"this adapter is for site {spec.adapter.site!r}; this site is {ctx.name!r}."
                )
            if refusal is None and task.kind in ("profile", "train"):
                n_train = len(ctx.prepared(spec).train)
                if n_train < ctx.policy.min_count:
                    refusal = PolicyRefusal(
                        "policy.min_count",
                        f"only {n_train} training row(s) here; this site shares nothing computed over fewer "
                        f"than {ctx.policy.min_count}.",
                    )
            if refusal is not None:
                log.warning("refusing task %s by %s: %s", task.id, refusal.rule, refusal.reason)
                return ctx.client.refuse(task.id, refusal.reason, refusal.rule)
        return handler(ctx, task)
    except (SchemaMismatchError, SpecError) as exc:
        log.warning("refusing task %s: %s", task.id, exc.message)
        rule = "schema" if isinstance(exc, SchemaMismatchError) else "data"
        return ctx.client.refuse(task.id, exc.message, rule)
