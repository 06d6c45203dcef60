"""Plain, frozen views of stored objects: what the store hands out instead of ORM rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "Approval",
    "Device",
    "AuditEntry",
    "Job",
    "ModelVersion",
    "Policy",
    "Principal",
    "Round",
    "Site",
    "Task",
    "Tenant",
    "Update",
    "utcnow",
]


def utcnow() -> datetime:
    """Timezone-aware current UTC time: the only clock the store accepts."""
    from datetime import UTC

    return datetime.now(UTC)


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    regulated: bool
    created_at: datetime


@dataclass(frozen=True)
class Site:
    id: int
    name: str
    tenant_id: int
    tenant: str
    status: str
    created_at: datetime
    last_seen_at: datetime | None


@dataclass(frozen=True)
class Principal:
    """Who is calling: a credential with its role and scope."""

    credential_id: int
    name: str
    role: str
    tenant_id: int | None
    tenant: str | None
    site_id: int | None
    expires_at: datetime
    revoked: bool
    device_id: int | None = None

    @property
    def consortium_wide(self) -> bool:
        return self.tenant_id is None


@dataclass(frozen=True)
class Task:
    id: int
    round_id: int
    site_id: int
    site: str
    state: str
    reason: str | None
    rule: str | None
    result: dict[str, Any] | None
    job_id: int
    round_number: int
    attempt: int
    kind: str
    round_state: str
    global_in: str | None
    deadline_at: datetime


@dataclass(frozen=True)
class Round:
    id: int
    job_id: int
    number: int
    attempt: int
    kind: str
    state: str
    global_in: str | None
    global_out: str | None
    state_out: str | None
    metrics: dict[str, Any] | None
    reason: str | None
    deadline_at: datetime
    created_at: datetime
    closed_at: datetime | None
    tasks: tuple[Task, ...] = field(default=())


@dataclass(frozen=True)
class Update:
    id: int
    round_id: int
    task_id: int
    site_id: int
    site: str
    blob_hash: str
    num_examples: int
    nbytes: int
    metrics: dict[str, Any] | None
    status: str
    received_at: datetime


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    state: str
    reason: str | None
    spec: dict[str, Any]
    spec_hash: str
    preprocessing: dict[str, Any] | None
    global_hash: str | None
    state_hash: str | None
    rounds_completed: int
    final_metrics: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    actor: str
    tenant: str | None
    action: str
    subject: str
    detail: dict[str, Any]
    leaf_hash: str
    root_hash: str
    signature: str


@dataclass(frozen=True)
class ModelVersion:
    id: int
    model: str
    version: int
    job_id: int | None
    params_hash: str
    lineage: dict[str, Any]
    stage: str
    release_digest: str | None
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True)
class Approval:
    tenant: str
    stage: str
    decision: str
    signed_at: datetime
    key_fingerprint: str
    actor: str
    payload: dict[str, Any]
    signature: str


@dataclass(frozen=True)
class Policy:
    model: str
    revision: int
    document: dict[str, Any]
    digest: str
    actor: str
    created_at: datetime


@dataclass(frozen=True)
class Device:
    id: int
    tenant_id: int
    tenant: str
    name: str
    labels: dict[str, Any]
    status: str
    counter: int
    instruction: dict[str, Any] | None
    report: dict[str, Any] | None
    created_at: datetime
    last_seen_at: datetime | None
