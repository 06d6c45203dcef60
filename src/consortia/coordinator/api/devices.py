"""Edge devices and the TUF repository they update from.

Device ids in instructions are ``tenant/device-name``. Writes are ``async`` (store
writes on the event loop: see api/registry.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from consortia.coordinator.api.deps import principal_with
from consortia.coordinator.services.devices import DeviceService
from consortia.coordinator.services.rollouts import RolloutService
from consortia.errors import ValidationError
from consortia.protocol.delivery import (
    AssignRequest,
    DeviceEnrolled,
    DeviceEnrollRequest,
    DeviceReport,
    MonitoringWindow,
)
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1", tags=["delivery"])


async def _devices(request: Request) -> DeviceService:
    return request.app.state.devices  # type: ignore[no-any-return]


Devices = Annotated[DeviceService, Depends(_devices)]
DevicePrincipal = Annotated[Principal, principal_with("device")]
SitePrincipal = Annotated[Principal, principal_with("site")]
Operator = Annotated[Principal, principal_with("operator")]
Reader = Annotated[Principal, principal_with("operator", "auditor", "approver", "promoter")]
Anyone = Annotated[Principal, principal_with("operator", "auditor", "approver", "promoter", "site", "device")]


@router.post("/tenants/{tenant}/device-enrollment-tokens", status_code=201)
async def device_token(tenant: str, devices: Devices, who: Operator) -> dict[str, Any]:
    """A one-time token that enrolls one edge device under ``tenant``."""
    return devices.enrollment_token(who, tenant)


@router.post("/devices/enroll", status_code=201, response_model=DeviceEnrolled)
async def enroll(body: DeviceEnrollRequest, devices: Devices) -> DeviceEnrolled:
    """Exchange a device enrollment token for a credential, the TUF root and the director key."""
    return devices.enroll(body)


@router.post("/sites/me/serving-device", status_code=201, response_model=DeviceEnrolled)
async def site_serving_device(devices: Devices, who: SitePrincipal) -> DeviceEnrolled:
    """Enroll the calling site's serving endpoint as a device (labels kind=site, site=NAME)."""
    return devices.site_serving_device(who)


@router.get("/devices/me/instruction")
def instruction(devices: Devices, who: DevicePrincipal) -> dict[str, Any]:
    """The latest signed instruction for the calling device (or null)."""
    return {"signed": devices.instruction(who)}


@router.post("/devices/me/report")
async def report(body: DeviceReport, devices: Devices, who: DevicePrincipal) -> dict[str, Any]:
    return devices.report(who, body)


@router.get("/devices/me/references/{model}/{version}")
def my_reference(model: str, version: int, devices: Devices, who: DevicePrincipal) -> dict[str, Any]:
    """The calling device's tenant's own training reference of a release (for attribution)."""
    return devices.reference(who, model, version)


@router.post("/devices/me/monitoring", status_code=201)
async def monitoring_window(body: MonitoringWindow, devices: Devices, who: DevicePrincipal) -> dict[str, Any]:
    """A serving agent's monitoring window (aggregates only, small counts suppressed)."""
    return devices.add_window(who, body)


@router.get("/monitoring/windows")
def monitoring_windows(
    devices: Devices, who: Reader, tenant: str | None = None, release: str | None = None, after: int = 0
) -> list[dict[str, Any]]:
    """Monitoring windows, oldest first (a tenant's own only, for tenant-scoped readers)."""
    return devices.windows(who, tenant, release, after)


@router.get("/devices")
def list_devices(devices: Devices, who: Reader) -> list[dict[str, Any]]:
    return devices.list(who)


@router.post("/devices/assign")
async def assign(body: AssignRequest, devices: Devices, who: Operator) -> list[dict[str, Any]]:
    """Sign instructions to run a release on every device matching the selector."""
    return devices.assign(who, body)


@router.get("/tuf/metadata/{name}")
def tuf_metadata(name: str, request: Request, _: Anyone) -> Response:
    return Response(request.app.state.tuf.metadata(name), media_type="application/json")


@router.get("/tuf/targets/{path:path}")
def tuf_target(path: str, request: Request, _: Anyone) -> Response:
    return Response(request.app.state.tuf.target(path), media_type="application/octet-stream")


async def _rollouts(request: Request) -> RolloutService:
    return request.app.state.rollouts  # type: ignore[no-any-return]


Rollouts = Annotated[RolloutService, Depends(_rollouts)]


@router.post("/rollouts", status_code=201)
async def start_rollout(request: Request, rollouts: Rollouts, who: Operator) -> dict[str, Any]:
    """Start a rollout: ``{"model", "version", "plan": {...}}``."""
    body = await request.json()
    if not isinstance(body, dict) or not {"model", "version", "plan"} <= set(body):
        raise ValidationError('body must be {"model": ..., "version": ..., "plan": {...}}.')
    if not isinstance(body["version"], int):
        raise ValidationError("version must be an integer.")
    return rollouts.start(who, str(body["model"]), body["version"], body["plan"])


@router.get("/rollouts")
def list_rollouts(rollouts: Rollouts, _: Reader) -> list[dict[str, Any]]:
    return rollouts.store.list_rollouts()


@router.get("/rollouts/{rollout_id}")
def get_rollout(rollout_id: int, rollouts: Rollouts, _: Reader) -> dict[str, Any]:
    return rollouts.store.get_rollout(rollout_id)


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(rollout_id: int, action: str, rollouts: Rollouts, who: Operator) -> dict[str, Any]:
    """``pause``, ``resume``, ``abort`` or ``rollback``."""
    if action == "pause":
        return rollouts.pause(who, rollout_id)
    if action == "resume":
        return rollouts.resume(who, rollout_id)
    if action in ("abort", "rollback"):
        return rollouts.abort(who, rollout_id, rollback=action == "rollback")
    raise ValidationError(f"unknown rollout action {action!r}; use pause, resume, abort or rollback.")
