"""Automation policies and their runs over REST.

``operator`` (consortium-wide) applies policies; readers list runs (a tenant's credential
sees the runs that affected its tenant); ``approver`` (tenant-scoped) posts signed gate
decisions.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from consortia.coordinator.api.deps import principal_with
from consortia.coordinator.services.automation import AutomationService
from consortia.errors import PayloadTooLargeError, ValidationError
from consortia.protocol.governance import ApprovalRequest
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1/automation", tags=["automation"])


async def _automation(request: Request) -> AutomationService:
    return request.app.state.automation  # type: ignore[no-any-return]


Automation = Annotated[AutomationService, Depends(_automation)]
Reader = Annotated[Principal, principal_with("operator", "auditor", "approver")]
Operator = Annotated[Principal, principal_with("operator")]
Approver = Annotated[Principal, principal_with("approver")]


@router.post("/policies", status_code=201)
async def apply_policy(request: Request, automation: Automation, who: Operator) -> dict[str, Any]:
    """Apply an automation policy (JSON of the YAML document); each apply is a new revision."""
    raw = await request.body()
    if len(raw) > request.app.state.settings.max_json_bytes:
        raise PayloadTooLargeError("automation policy document is too large.")
    try:
        doc = json.loads(raw or b"null")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"automation policy is not valid JSON: {exc.msg}.") from exc
    return automation.apply(who, doc)


@router.get("/policies")
def list_policies(automation: Automation, _: Reader) -> list[dict[str, Any]]:
    return automation.policies()


@router.get("/runs")
def list_runs(automation: Automation, who: Reader, policy: str | None = None) -> list[dict[str, Any]]:
    """Runs, oldest first, each with its chain of steps (detect, decide, act, validate)."""
    return automation.history(who, policy)


@router.get("/runs/{run_id}")
def show_run(run_id: int, automation: Automation, who: Reader) -> dict[str, Any]:
    return automation.get(who, run_id)


@router.post("/runs/{run_id}/approvals", status_code=201)
async def approve_run(run_id: int, body: ApprovalRequest, automation: Automation, who: Approver) -> dict[str, Any]:
    """A regulated tenant's signed gate decision (see ``consortia automation approve``)."""
    return automation.approve(who, run_id, body)
