"""Jobs: submit, list, status, event log."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Request

from consortia.coordinator.api.deps import RoundsDep, principal_with
from consortia.errors import PayloadTooLargeError, PermissionDeniedError, SpecError
from consortia.protocol.schemas import AdapterRequest, JobEventPublic, JobPublic, JobsPublic, RoundPublic
from consortia.store.entities import Job, Principal

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

Submitter = Annotated[Principal, principal_with("operator")]
Reader = Annotated[Principal, principal_with("operator", "approver", "auditor")]


def job_public(rounds: RoundsDep, job: Job) -> JobPublic:
    rows = rounds.store.job_rounds(job.id)
    return JobPublic(
        id=job.id,
        name=job.name,
        state=job.state,
        reason=job.reason,
        rounds_requested=int(job.spec["rounds"]),
        rounds_completed=job.rounds_completed,
        created_at=job.created_at,
        finished_at=job.finished_at,
        spec=job.spec,
        final_metrics=job.final_metrics,
        model_hash=job.global_hash,
        rounds=[
            RoundPublic(
                number=r.number,
                kind=r.kind,
                attempt=r.attempt,
                state=r.state,
                sampled=[t.site for t in r.tasks],
                reported=[t.site for t in r.tasks if t.state == "completed"],
                failed={
                    t.site: f"{t.state}: {t.rule or ''} {t.reason or ''}".strip()
                    for t in r.tasks
                    if t.state in ("failed", "refused", "expired", "late")
                },
                deadline_at=r.deadline_at,
                closed_at=r.closed_at,
                metrics=r.metrics or {},
                reason=r.reason,
            )
            for r in rows
        ],
    )


@router.post("", status_code=201, response_model=JobPublic)
async def submit_job(request: Request, rounds: RoundsDep, who: Submitter) -> JobPublic:
    """Submit a job spec (JSON of the YAML spec); errors name the offending field."""
    raw = await request.body()
    if len(raw) > request.app.state.settings.max_json_bytes:
        raise PayloadTooLargeError("job spec is too large.")
    try:
        spec: Any = json.loads(raw or b"null")
    except json.JSONDecodeError as exc:
        raise SpecError(f"job spec is not valid JSON: {exc.msg} at line {exc.lineno}.") from exc
    if who.tenant_id is not None:
        raise PermissionDeniedError("jobs span tenants: only consortium-wide operators submit them.")
    return job_public(rounds, rounds.submit(spec, who))


@router.post("/adapt", status_code=201, response_model=JobPublic)
async def adapt(req: AdapterRequest, rounds: RoundsDep, who: Submitter) -> JobPublic:
    """Fine-tune a declared subset of a released model's parameters at one site on its
    own data; the job registers the composite (base + adapter) as its own model."""
    return job_public(rounds, rounds.submit_adapter(req, who))


@router.get("", response_model=JobsPublic)
def list_jobs(rounds: RoundsDep, _: Reader) -> JobsPublic:
    return JobsPublic(jobs=[job_public(rounds, j) for j in rounds.store.list_jobs()])


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: int, rounds: RoundsDep, _: Reader) -> JobPublic:
    return job_public(rounds, rounds.store.get_job(job_id))


@router.get("/{job_id}/events", response_model=list[JobEventPublic])
def job_events(job_id: int, rounds: RoundsDep, _: Reader) -> list[JobEventPublic]:
    rounds.store.get_job(job_id)
    return [JobEventPublic(at=a, kind=k, detail=d) for a, k, d in rounds.store.events(job_id)]
