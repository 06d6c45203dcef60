"""What sites call: long-poll for tasks, fetch global models, answer tasks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from consortia.coordinator.api.deps import RoundsDep, principal_with
from consortia.errors import NotFoundError, PayloadTooLargeError, PermissionDeniedError
from consortia.protocol.schemas import RefusalRequest, TaskResultPublic, TasksPublic
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1", tags=["tasks"])

SitePrincipal = Annotated[Principal, principal_with("site")]
Anyone = Annotated[Principal, principal_with("operator", "auditor", "site")]


@router.get("/sites/me/tasks", response_model=TasksPublic)
async def poll_tasks(
    rounds: RoundsDep,
    site: SitePrincipal,
    wait: Annotated[float, Query(ge=0, le=300, description="seconds to long-poll")] = 0,
) -> TasksPublic:
    if site.role != "site":
        raise PermissionDeniedError("only site credentials have tasks.")
    return TasksPublic(tasks=await rounds.poll(site, wait))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the limit of {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/tasks/{task_id}/update")
async def upload_update(
    task_id: int,
    request: Request,
    rounds: RoundsDep,
    site: SitePrincipal,
    wait: Annotated[float, Query(ge=0, le=60, description="secure rounds: long-poll the next stage")] = 0,
) -> dict[str, Any]:
    """Upload a model update as a safetensors body (metadata: num_examples, metrics)."""
    body = await _read_body(request, request.app.state.settings.max_update_bytes)
    return await rounds.receive_update(site, task_id, body, wait=wait)


@router.post("/tasks/{task_id}/secagg/{stage}")
async def secagg_stage(
    task_id: int,
    stage: str,
    body: dict[str, Any],
    rounds: RoundsDep,
    site: SitePrincipal,
    wait: Annotated[float, Query(ge=0, le=60, description="long-poll the next stage's view in the answer")] = 0,
) -> dict[str, Any]:
    """Secure aggregation: ``keys`` (stage 1), ``shares`` (stage 2), ``unmask`` (stage 4).
    The masked update of stage 3 goes to ``/update``. With ``wait`` the answer also holds
    the next stage's view once it opens (one round trip instead of two)."""
    task = rounds.secure.task(site, task_id)
    handlers = {"keys": rounds.secure.advertise, "shares": rounds.secure.share, "unmask": rounds.secure.unmask}
    numbers = {"keys": 1, "shares": 2, "unmask": 4}
    if stage not in handlers:
        raise NotFoundError(f"no secure-aggregation stage {stage!r}; use keys, shares or unmask.")
    out = await handlers[stage](site, task, body)
    if wait > 0 and stage != "unmask":
        out["view"] = await rounds.secure.poll(site, task, numbers[stage], wait)
    return out


@router.get("/tasks/{task_id}/secagg")
async def secagg_view(
    task_id: int,
    rounds: RoundsDep,
    site: SitePrincipal,
    after: Annotated[int, Query(ge=0, le=5)] = 0,
    wait: Annotated[float, Query(ge=0, le=60)] = 0,
) -> dict[str, Any]:
    """Long poll: what this site needs once the secure round is past stage ``after``."""
    task = rounds.secure.task(site, task_id)
    return await rounds.secure.poll(site, task, after, wait)


@router.post("/tasks/{task_id}/result")
async def post_result(task_id: int, body: TaskResultPublic, rounds: RoundsDep, site: SitePrincipal) -> dict[str, Any]:
    return await rounds.receive_result(site, task_id, body)


@router.post("/tasks/{task_id}/refuse")
async def refuse(task_id: int, body: RefusalRequest, rounds: RoundsDep, site: SitePrincipal) -> dict[str, Any]:
    """Decline a task with the reason and the rule that refused it."""
    return await rounds.refuse(site, task_id, body)


@router.get("/blobs/{digest}")
def get_blob(digest: str, request: Request, rounds: RoundsDep, who: Anyone) -> Response:
    if not rounds.may_read_blob(who, digest):
        raise NotFoundError(f"blob {digest[:80]} not found or not visible to this credential.")
    data = request.app.state.blobs.get(digest)
    return Response(content=data, media_type="application/octet-stream", headers={"X-Content-SHA256": digest})
