"""Incidents opened from monitoring windows: list, show, resolve (tenant-scoped)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from consortia.coordinator.api.deps import principal_with
from consortia.coordinator.services.monitoring import MonitoringService
from consortia.errors import ValidationError
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1", tags=["monitoring"])


async def _monitoring(request: Request) -> MonitoringService:
    return request.app.state.monitoring  # type: ignore[no-any-return]


Monitoring = Annotated[MonitoringService, Depends(_monitoring)]
Reader = Annotated[Principal, principal_with("operator", "auditor", "approver")]
Operator = Annotated[Principal, principal_with("operator")]


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field(min_length=1, max_length=2000, description="what was done, for the audit log")


@router.get("/incidents")
def list_incidents(monitoring: Monitoring, who: Reader, state: str | None = None) -> list[dict[str, Any]]:
    if state not in (None, "open", "resolved"):
        raise ValidationError("state must be 'open' or 'resolved'.")
    return monitoring.list(who, state)


@router.get("/incidents/{incident_id}")
def show_incident(incident_id: int, monitoring: Monitoring, who: Reader) -> dict[str, Any]:
    return monitoring.show(who, incident_id)


@router.post("/incidents/{incident_id}/resolve")
async def resolve_incident(
    incident_id: int, body: ResolveRequest, monitoring: Monitoring, who: Operator
) -> dict[str, Any]:
    return monitoring.resolve(who, incident_id, body.note)
