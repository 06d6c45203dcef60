"""Comparison baselines for the demo, computed by the harness outside the coordinator:
centralized (one model on the union of the sites' training splits) and local-only (each
site alone). They use the same splits, recipe, optimiser and epoch budget as the
federated job, so the comparison is like for like."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from consortia.core.metrics import SCORE_BINS, auc_from_histograms, score_histograms
from consortia.ml import recipes
from consortia.ml.data import merge_profiles, profile, transform
from consortia.ml.evaluate import evaluate_scores
from consortia.protocol.schemas import JobSpec

__all__ = ["centralized_and_local"]


def _fit(spec: JobSpec, X: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    params = recipes.init_params(spec.recipe.name, X.shape[1], spec.recipe.options, spec.seed)
    epochs = spec.rounds * spec.local_epochs
    return recipes.train(
        spec.recipe.name,
        spec.recipe.options,
        params,
        X,
        y,
        epochs=epochs,
        batch_size=spec.batch_size,
        lr=spec.learning_rate,
        seed=seed,
    ).params


def centralized_and_local(spec_raw: dict[str, Any], partitions: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Pooled and per-site metrics of the centralized and local-only baselines."""
    from consortia.site.tasks import prepare

    spec = JobSpec.model_validate(spec_raw)
    prepared = {name: prepare(df, spec, name) for name, df in partitions.items()}

    def pooled_auc(predict) -> float:  # type: ignore[no-untyped-def]
        neg = np.zeros(SCORE_BINS, np.int64)
        pos = np.zeros(SCORE_BINS, np.int64)
        for p in prepared.values():
            n_, p_ = score_histograms(predict(p.frame.iloc[p.test]), p.y[p.test])
            neg += n_
            pos += p_
        return float(auc_from_histograms(neg, pos))

    # Centralized: statistics and training over the union of training splits.
    union = pd.concat([p.frame.iloc[p.train] for p in prepared.values()], ignore_index=True)
    y_union = np.concatenate([p.y[p.train] for p in prepared.values()])
    plan = merge_profiles([profile(union, spec)], spec)
    cparams = _fit(spec, transform(union, plan), y_union, spec.seed)

    def cpredict(df: pd.DataFrame) -> np.ndarray:
        return recipes.predict(spec.recipe.name, spec.recipe.options, cparams, transform(df, plan))

    centralized = {"pooled_auc": pooled_auc(cpredict), "per_site": {}}
    for name, p in prepared.items():
        ev = evaluate_scores(cpredict(p.frame.iloc[p.test]), p.y[p.test])
        centralized["per_site"][name] = {"auc": ev.auc, "accuracy": ev.accuracy, "n": ev.n}

    local: dict[str, Any] = {"per_site": {}}
    pooled = []
    for name, p in prepared.items():
        train_df = p.frame.iloc[p.train]
        lplan = merge_profiles([profile(train_df, spec)], spec)
        lparams = _fit(spec, transform(train_df, lplan), p.y[p.train], spec.seed)

        def lpredict(df: pd.DataFrame, lparams=lparams, lplan=lplan) -> np.ndarray:  # type: ignore[no-untyped-def]
            return recipes.predict(spec.recipe.name, spec.recipe.options, lparams, transform(df, lplan))

        ev = evaluate_scores(lpredict(p.frame.iloc[p.test]), p.y[p.test])
        site_pooled = pooled_auc(lpredict)
        pooled.append(site_pooled)
        local["per_site"][name] = {"auc": ev.auc, "accuracy": ev.accuracy, "n": ev.n, "pooled_auc": site_pooled}
    local["pooled_auc_mean"] = float(np.mean(pooled))
    return {"centralized": centralized, "local_only": local}
