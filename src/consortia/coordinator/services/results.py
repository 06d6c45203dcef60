"""Validation and pooling of what sites report: update metadata, evaluation histograms,
per-round and final metrics (pooled AUC and fairness from summed histograms)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from consortia.core.compression import decompress, wire_bytes
from consortia.core.metrics import SCORE_BINS, auc_from_histograms, fairness_from_groups
from consortia.core.profile import spread
from consortia.errors import UpdateError, ValidationError
from consortia.protocol.schemas import (
    DataFingerprint,
    EvaluationResult,
    FeatureProfile,
    JobSpec,
    PreprocessingPlan,
    ReferenceProfile,
)
from consortia.protocol.tensors import decode_wire
from consortia.site.monitor import SCORE_BINS as REFERENCE_SCORE_BINS

__all__ = ["check_histograms", "check_reference", "merge_references", "pool", "round_metrics", "update_metadata"]


def _check_pair(neg: list[int], pos: list[int], n: int, what: str) -> None:
    if len(neg) != SCORE_BINS or len(pos) != SCORE_BINS:
        raise ValidationError(f"{what}: score histograms must have {SCORE_BINS} bins each (or both be empty).")
    if any(c < 0 for c in neg) or any(c < 0 for c in pos):
        raise ValidationError(f"{what}: score histogram counts must be >= 0.")
    if sum(neg) + sum(pos) != n:
        raise ValidationError(f"{what}: score histogram counts must add up to n.")


def check_histograms(ev: EvaluationResult) -> None:
    if ev.neg_hist or ev.pos_hist:  # both empty: the site's policy does not share them
        _check_pair(ev.neg_hist, ev.pos_hist, ev.n, "evaluation")
    for g, ge in (ev.groups or {}).items():
        _check_pair(ge.neg_hist, ge.pos_hist, ge.n, f"group {g!r}")
        if ge.n > ev.n:
            raise ValidationError(f"group {g!r} has n == {ge.n}, more than the evaluation's n == {ev.n}.")


def read_update(
    body: bytes, reference: dict[str, np.ndarray], method: str
) -> tuple[dict[str, np.ndarray], dict[str, str], bool]:
    """Decode an update body into float32 parameters: ``(params, metadata, compressed)``.

    A body is either full float32 parameters (encoding ``full``, the default) or a delta
    compressed with the job's method (encoding ``delta/<method>``), which is decoded and
    added to ``reference`` (the round's global model). Anything else raises UpdateError.
    """
    wire, meta = decode_wire(body)
    encoding = meta.get("encoding", "full")
    if encoding == "full":
        bad = sorted(k for k, v in wire.items() if v.dtype != np.float32)
        if bad:
            raise UpdateError(f"tensor(s) {bad} are not float32; a full update must be float32.")
        meta["wire_bytes"] = str(wire_bytes(wire))
        return wire, meta, False
    if encoding != f"delta/{method}":
        raise UpdateError(
            f"update encoding {encoding!r} does not match the job's compression {method!r}; "
            f"send 'full' or 'delta/{method}'."
        )
    delta = decompress(wire, reference)
    meta["wire_bytes"] = str(wire_bytes(wire))
    return {k: (reference[k] + delta[k]).astype(np.float32) for k in reference}, meta, True


def update_metadata(meta: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        n = int(meta.get("num_examples", ""))
    except ValueError as exc:
        raise UpdateError("update metadata 'num_examples' must be an integer > 0.") from exc
    if n <= 0:
        raise UpdateError(f"num_examples == {n}, must be > 0.")
    metrics: dict[str, Any] = {}
    if "wire_bytes" in meta:  # set by read_update from the decoded tensors, not by the site
        metrics["wire_bytes"] = int(meta["wire_bytes"])
    if "train_loss" in meta:
        try:
            loss = float(meta["train_loss"])
        except ValueError as exc:
            raise UpdateError("update metadata 'train_loss' must be a number.") from exc
        if not math.isfinite(loss):
            raise UpdateError("update metadata 'train_loss' must be finite.")
        metrics["train_loss"] = loss
    if "evaluation" in meta:
        try:
            ev = EvaluationResult.model_validate_json(meta["evaluation"])
        except Exception as exc:
            raise UpdateError(f"update metadata 'evaluation' is invalid: {exc}") from exc
        try:
            check_histograms(ev)
        except ValidationError as exc:
            raise UpdateError(exc.message) from exc
        metrics["evaluation"] = ev.model_dump(mode="json")
    if "fingerprint" in meta:
        try:
            fp = DataFingerprint.model_validate_json(meta["fingerprint"])
        except Exception as exc:
            raise UpdateError(f"update metadata 'fingerprint' is invalid: {exc}") from exc
        metrics["fingerprint"] = fp.model_dump(mode="json")
    return n, metrics


def pool(evals: dict[str, EvaluationResult]) -> dict[str, Any]:
    """Per-site metrics, a pooled AUC from summed score histograms (sites that share
    them) and, when sites sent per-group histograms, pooled fairness metrics."""
    neg = np.zeros(SCORE_BINS, np.int64)
    pos = np.zeros(SCORE_BINS, np.int64)
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    per_site: dict[str, Any] = {}
    n = 0
    loss = acc = 0.0
    for site, ev in sorted(evals.items()):
        if ev.neg_hist:
            neg += np.asarray(ev.neg_hist, np.int64)
            pos += np.asarray(ev.pos_hist, np.int64)
        for g, ge in (ev.groups or {}).items():
            gn, gp = groups.setdefault(g, (np.zeros(SCORE_BINS, np.int64), np.zeros(SCORE_BINS, np.int64)))
            gn += np.asarray(ge.neg_hist, np.int64)
            gp += np.asarray(ge.pos_hist, np.int64)
        per_site[site] = {"auc": ev.auc, "accuracy": ev.accuracy, "loss": ev.loss, "n": ev.n}
        n += ev.n
        loss += ev.loss * ev.n
        acc += ev.accuracy * ev.n
    pooled = auc_from_histograms(neg, pos)
    out: dict[str, Any] = {
        "pooled_auc": None if np.isnan(pooled) else float(pooled),
        "pooled_accuracy": acc / n if n else None,
        "pooled_loss": loss / n if n else None,
        "n": n,
        "per_site": per_site,
    }
    if groups:
        out["fairness"] = fairness_from_groups(groups)
    return out


def round_metrics(updates: list[Any]) -> dict[str, Any]:
    evals = {
        u.site: EvaluationResult.model_validate(u.metrics["evaluation"])
        for u in updates
        if u.metrics and "evaluation" in u.metrics
    }
    pooled = pool(evals) if evals else {}
    total = sum(u.num_examples for u in updates)
    train_loss = sum((u.metrics or {}).get("train_loss", 0.0) * u.num_examples for u in updates)
    return {
        "sites_reported": [u.site for u in updates],
        "examples": total,
        "train_loss": train_loss / total if total else None,
        "bytes_received": sum(u.nbytes for u in updates),
        "validation_of_incoming_model": pooled,
    }


def check_reference(ref: ReferenceProfile, spec: JobSpec, plan: PreprocessingPlan) -> None:
    """A site's reference must describe exactly the job's features on the agreed bins."""
    names = {f.name for f in spec.features}
    if set(ref.features) != names:
        raise ValidationError(
            f"reference profile covers {sorted(ref.features)}, the job's features are {sorted(names)}."
        )
    for name, fp in ref.features.items():
        want = len(plan.cuts.get(name, [])) + 1 if name in plan.numeric else len(plan.categorical[name]) + 1
        if fp.bins != want:
            raise ValidationError(f"reference of {name!r} covers {fp.bins} bins; the agreed bins are {want}.")
        if sum(fp.counts) + fp.missing > ref.rows:
            raise ValidationError(f"reference of {name!r} counts more rows than the profile's {ref.rows}.")
    for cls, hist in ref.scores.items():
        groups = ref.score_groups.get(cls)
        bins = len(groups) if groups is not None else len(hist)
        if bins != REFERENCE_SCORE_BINS or any(c < 0 for c in hist):
            raise ValidationError(
                f"reference score histogram {cls!r} must cover {REFERENCE_SCORE_BINS} bins with counts >= 0."
            )


def merge_references(refs: list[ReferenceProfile]) -> ReferenceProfile:
    """The global reference: the sites' coarsened histograms summed bin by bin, each
    site's merged bins spread evenly over their members first
    (:func:`consortia.core.profile.spread`). Exact on the sites' common grouping; within
    a merged group of small bins the shape is approximated (mass that zeroing would have
    dropped, biasing the reference's tails). A single site's reference is returned as
    is, grouping included."""
    if len(refs) == 1:  # one site: its coarsened reference is exact as it stands
        return refs[0]
    features: dict[str, FeatureProfile] = {}
    for name in refs[0].features:
        fps = [r.features[name] for r in refs]
        features[name] = FeatureProfile(
            counts=[int(x) for x in np.sum([spread(fp.counts, fp.groups) for fp in fps], axis=0)],
            missing=sum(fp.missing for fp in fps),
            out_of_range=sum(fp.out_of_range for fp in fps),
            suppressed=sum(fp.suppressed for fp in fps),
        )
    scores: dict[str, list[int]] = {}
    for r in refs:
        for cls, hist in r.scores.items():
            per_bin = spread(hist, r.score_groups.get(cls))
            scores[cls] = [a + b for a, b in zip(scores.get(cls, [0] * len(per_bin)), per_bin, strict=True)]
    return ReferenceProfile.model_validate({"rows": sum(r.rows for r in refs), "features": features, "scores": scores})
