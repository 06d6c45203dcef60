"""Automation policies: what closes the monitoring loop, as YAML.

A policy names one registered model and says when to act (``triggers``, any of which
fires), who decides (``gate``), what to do (``actions``, in order) and how to check the
result (``validation``)::

    name: credit-risk-drift
    model: credit-risk
    triggers:
      - {kind: drift, min_tenants: 1}            # calibrated drift incidents at >= k tenants
      - {kind: performance_drop, min_drop: 0.05} # accuracy on delayed labels down by >= 5 points
      - {kind: schedule, every_hours: 168}
      - {kind: labels, min_labelled: 1000}       # new delayed labels since the last run
    gate: approval        # or automatic; approval: every affected regulated tenant signs
    actions:
      - {kind: retrain, rounds: 3}               # federated, from the production job spec, warm-started
      - {kind: webhook, url: "https://ops.example/hook", secret_env: CONSORTIA_WEBHOOK_SECRET}
    validation:
      plan: {target: {selector: {}}, steps: [{set_weight: 25}, {analysis: {...}}, {set_weight: 100}]}
      promote_to: production
    cooldown_hours: 24

A gate approval is a signed statement like a promotion approval
(:mod:`consortia.protocol.governance`): an :class:`AutomationApproval` naming the run,
the policy revision's digest and the tenant, signed with the tenant's Ed25519 approver key
over :func:`automation_approval_message`.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consortia.core.audit import canonical
from consortia.protocol.schemas import Name

__all__ = [
    "AUTOMATION_APPROVAL_TYPE",
    "AutomationApproval",
    "AutomationPolicy",
    "automation_approval_message",
    "new_automation_approval",
]

AUTOMATION_APPROVAL_TYPE = "consortia.automation-approval/v1"
DRIFT_KINDS = ("covariate_drift", "prediction_shift", "missing_spike", "out_of_range")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DriftTrigger(_Strict):
    kind: Literal["drift"]
    min_tenants: int = Field(default=1, ge=1, le=1000, description="open drift incidents at this many tenants")
    kinds: list[Literal["covariate_drift", "prediction_shift", "missing_spike", "out_of_range"]] = Field(
        default_factory=lambda: list(DRIFT_KINDS), min_length=1
    )


class PerformanceTrigger(_Strict):
    kind: Literal["performance_drop"]
    min_drop: float = Field(default=0.05, gt=0, lt=1, description="fall in accuracy on delayed labels")


class ScheduleTrigger(_Strict):
    kind: Literal["schedule"]
    every_hours: float = Field(gt=0, le=24 * 366)


class LabelsTrigger(_Strict):
    kind: Literal["labels"]
    min_labelled: int = Field(ge=1, description="delayed labels received on the model's releases since the last run")


Trigger = Annotated[DriftTrigger | PerformanceTrigger | ScheduleTrigger | LabelsTrigger, Field(discriminator="kind")]


class RetrainAction(_Strict):
    kind: Literal["retrain"]
    rounds: int | None = Field(default=None, ge=1, le=1000, description="default: the production job's rounds")


class RollbackAction(_Strict):
    kind: Literal["rollback"]


class WebhookAction(_Strict):
    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000)
    secret_env: str = Field(
        pattern=r"^[A-Z_][A-Z0-9_]{0,63}$",
        description="environment variable of the coordinator holding the HMAC key (never the key itself)",
    )


Action = Annotated[RetrainAction | RollbackAction | WebhookAction, Field(discriminator="kind")]


class Validation(_Strict):
    plan: dict[str, Any] = Field(description="a rollout plan (as `consortia rollout start --plan`) for the new version")
    promote_to: Literal["staging", "production"] | None = "production"


class AutomationPolicy(_Strict):
    name: Name
    model: Name
    triggers: list[Trigger] = Field(min_length=1, max_length=20)
    gate: Literal["automatic", "approval"]
    actions: list[Action] = Field(min_length=1, max_length=10)
    validation: Validation | None = None
    cooldown_hours: float = Field(default=24.0, ge=0, le=24 * 366, description="no new run this soon after one")

    @model_validator(mode="after")
    def _coherent(self) -> AutomationPolicy:
        kinds = [a.kind for a in self.actions]
        if self.validation is not None and "retrain" not in kinds:
            raise ValueError("validation checks a retrained version: add a retrain action or drop validation")
        if "retrain" in kinds and "rollback" in kinds:
            raise ValueError("one policy either retrains or rolls back; write two policies for both")
        if len(set(kinds) - {"webhook"}) != len([k for k in kinds if k != "webhook"]):
            raise ValueError("each of retrain and rollback may appear once")
        return self


class AutomationApproval(_Strict):
    type: Literal["consortia.automation-approval/v1"] = AUTOMATION_APPROVAL_TYPE
    run: int = Field(ge=1)
    policy: str
    policy_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    decision: Literal["approve", "reject"]
    tenant: str
    signed_at: datetime
    nonce: str = Field(pattern=r"^[0-9a-f]{32,64}$")


def automation_approval_message(payload: AutomationApproval) -> bytes:
    """The exact bytes an approver signs (domain-separated canonical JSON)."""
    return b"consortia-automation-approval/v1\n" + canonical(payload.model_dump(mode="json"))


def new_automation_approval(*, run: dict[str, Any], decision: str, tenant: str) -> AutomationApproval:
    """A fresh payload for ``run`` (as the API shows it): now, and a 128-bit nonce."""
    return AutomationApproval.model_validate(
        {
            "run": run["id"],
            "policy": run["policy"],
            "policy_digest": run["policy_digest"],
            "decision": decision,
            "tenant": tenant,
            "signed_at": datetime.now(UTC).isoformat(),
            "nonce": secrets.token_hex(16),
        }
    )
