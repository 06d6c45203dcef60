"""The site's own policy (``consortia site run --policy FILE``): what it will run and share.

Only the site controls this file; nothing the coordinator sends can change it. Every task
is checked against it before any data is touched, and a refused task goes back with the
rule that refused it (e.g. ``policy.allowed_recipes``), which ``consortia job status``
shows. Example::

    allowed_recipes: [logistic_regression, mlp]
    denied_columns: [addr_state]
    allow_identifier_columns: []
    min_count: 10
    join_training: true
    join_evaluation: true
    privacy: {require_dp: false, max_epsilon: 3.0, require_secure_aggregation: false}
    share_metrics: [auc, score_histograms, fairness, train_loss]   # n, loss, accuracy always
    deployments_require_local_approval: true
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from consortia.errors import ValidationError
from consortia.protocol.schemas import JobSpec
from consortia.site.compliance import scan_columns

__all__ = ["METRICS", "PolicyRefusal", "PrivacyRequirements", "SitePolicy", "check_task", "load_policy"]

METRICS = ("auc", "score_histograms", "fairness", "train_loss")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyRequirements(_Strict):
    """Privacy a job must use before this site joins it."""

    require_dp: bool = False
    max_epsilon: float | None = Field(default=None, gt=0)
    require_secure_aggregation: bool = False


class SitePolicy(_Strict):
    """A site's local policy. Defaults: join everything, share everything, min count 5."""

    allowed_recipes: list[str] | None = Field(default=None, description="None: every built-in recipe")
    denied_columns: list[str] = Field(default_factory=list)
    allow_identifier_columns: list[str] = Field(
        default_factory=list, description="columns the identifier scan may let through"
    )
    min_count: int = Field(default=5, ge=1, description="minimum count behind any shared statistic")
    join_training: bool = True
    join_evaluation: bool = True
    privacy: PrivacyRequirements = PrivacyRequirements()
    share_metrics: list[Literal["auc", "score_histograms", "fairness", "train_loss"]] = Field(
        default_factory=lambda: list(METRICS),
        description="optional metrics to share; n, loss and accuracy of an evaluation are always shared",
    )
    deployments_require_local_approval: bool = False

    def shares(self, metric: str) -> bool:
        return metric in self.share_metrics


def load_policy(path: str | Path | None) -> SitePolicy:
    """Read and validate a policy file; no file means the default policy."""
    if path is None:
        return SitePolicy()
    p = Path(path)
    if not p.is_file():
        raise ValidationError(f"policy file {str(p)!r} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValidationError(f"policy file {p.name} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValidationError(f"policy file {p.name} must be a YAML mapping (allowed_recipes, min_count, ...).")
    try:
        return SitePolicy.model_validate(raw)
    except PydanticValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:8]]
        raise ValidationError(f"policy file {p.name} is invalid: " + "; ".join(parts)) from exc


@dataclass(frozen=True)
class PolicyRefusal:
    """Why the site will not run a task: the rule's name and a message for the operator."""

    rule: str
    reason: str


def check_task(policy: SitePolicy, kind: str, spec: JobSpec, frame: pd.DataFrame) -> PolicyRefusal | None:
    """The first rule of ``policy`` that ``kind`` of ``spec`` breaks, or None."""
    if kind in ("profile", "train") and not policy.join_training:
        return PolicyRefusal("policy.join_training", "this site's policy does not join training.")
    if kind == "evaluate" and not policy.join_evaluation:
        return PolicyRefusal("policy.join_evaluation", "this site's policy does not join evaluation.")
    if policy.allowed_recipes is not None and spec.recipe.name not in policy.allowed_recipes:
        return PolicyRefusal(
            "policy.allowed_recipes",
            f"recipe {spec.recipe.name!r} is not allowed by this site's policy (allowed: {policy.allowed_recipes}).",
        )
    used = [f.name for f in spec.features] + [spec.label.column]
    if spec.card.sensitive_attribute:
        used.append(spec.card.sensitive_attribute)
    denied = [c for c in used if c in policy.denied_columns]
    if denied:
        return PolicyRefusal("policy.denied_columns", f"column(s) {denied} are denied by this site's policy.")
    if policy.privacy.require_dp and spec.privacy is None:
        return PolicyRefusal(
            "policy.privacy.require_dp",
            "this site requires differential privacy"
            + (f" with epsilon <= {policy.privacy.max_epsilon}" if policy.privacy.max_epsilon else "")
            + "; the job does not use it.",
        )
    max_eps = policy.privacy.max_epsilon
    if spec.privacy is not None and max_eps is not None and spec.privacy.epsilon_budget > max_eps:
        return PolicyRefusal(
            "policy.privacy.max_epsilon",
            f"the job's epsilon budget {spec.privacy.epsilon_budget} exceeds this site's maximum {max_eps}; "
            "lower privacy.epsilon_budget in the job spec.",
        )
    if policy.privacy.require_secure_aggregation and spec.secure_aggregation is None:
        return PolicyRefusal(
            "policy.privacy.require_secure_aggregation",
            "this site requires secure aggregation; the job does not use it.",
        )
    scanned = scan_columns(frame, [f.name for f in spec.features])
    findings = [f for f in scanned if f.column not in policy.allow_identifier_columns]
    if findings:
        return PolicyRefusal(
            "compliance.direct_identifier",
            "declared feature column(s) look like direct identifiers: "
            + ", ".join(str(f) for f in findings)
            + ". Remove them from the job, or list them in allow_identifier_columns in the site policy.",
        )
    return None
