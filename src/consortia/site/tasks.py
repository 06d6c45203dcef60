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

from consortia.errors import SchemaMismatchError, SpecError
from consortia.ml import recipes
from consortia.ml.data import check_schema, labels, profile, split_indices, transform
from consortia.ml.evaluate import evaluate_scores
from consortia.protocol.schemas import JobSpec, PreprocessingPlan, TaskPublic, TaskResultPublic
from consortia.protocol.tensors import decode, encode
from consortia.site.client import CoordinatorClient

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
    _prepared: dict[str, Prepared] = field(default_factory=dict)

    def prepared(self, spec: JobSpec) -> Prepared:
        key = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        if key not in self._prepared:
            self._prepared = {key: prepare(self.frame, spec, self.name)}
        return self._prepared[key]

    def global_params(self, digest: str) -> dict[str, np.ndarray]:
        """Global parameters by hash, from the local cache or downloaded once."""
        cache = self.home / "cache" / digest
        if cache.exists():
            data = cache.read_bytes()
        else:
            data = self.client.blob(digest)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(cache)
        return decode(data)[0]


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
    result = profile(p.frame.iloc[p.train], spec)
    return ctx.client.submit_result(task.id, TaskResultPublic(profile=result))


def _scores(spec: JobSpec, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    return recipes.predict(spec.recipe.name, spec.recipe.options, params, X)


@register("train")
def handle_train(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    spec, plan = _spec(task), _plan(task)
    p = ctx.prepared(spec)
    assert task.global_hash is not None
    params = ctx.global_params(task.global_hash)
    X = transform(p.frame, plan)
    evaluation = evaluate_scores(_scores(spec, params, X[p.val]), p.y[p.val])
    mu = float(spec.strategy.options.get("proximal_mu", 0.01)) if spec.strategy.name == "fedprox" else 0.0
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
    )
    body = encode(
        result.params,
        {
            "num_examples": str(result.num_examples),
            "train_loss": repr(result.loss),
            "evaluation": evaluation.model_dump_json(),
        },
    )
    return ctx.client.submit_update(task.id, body)


@register("evaluate")
def handle_evaluate(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    spec, plan = _spec(task), _plan(task)
    p = ctx.prepared(spec)
    assert task.global_hash is not None
    params = ctx.global_params(task.global_hash)
    X = transform(p.frame.iloc[p.test], plan)
    evaluation = evaluate_scores(_scores(spec, params, X), p.y[p.test])
    return ctx.client.submit_result(task.id, TaskResultPublic(evaluation=evaluation))


def dispatch(ctx: SiteContext, task: TaskPublic) -> dict[str, Any]:
    """Run ``task`` with its handler; refuse it (with the rule) when the site cannot or
    will not do it: unknown kind, data that does not match the schema, no usable rows."""
    handler = HANDLERS.get(task.kind)
    if handler is None:
        return ctx.client.refuse(task.id, f"this site does not know task kind {task.kind!r}", "task_kind")
    try:
        return handler(ctx, task)
    except (SchemaMismatchError, SpecError) as exc:
        log.warning("refusing task %s: %s", task.id, exc.message)
        rule = "schema" if isinstance(exc, SchemaMismatchError) else "data"
        return ctx.client.refuse(task.id, exc.message, rule)
