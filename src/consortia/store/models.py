"""ORM rows. They stay inside the store; callers get plain values or protocol models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ApprovalRow",
    "ApproverKeyRow",
    "AuditRow",
    "Base",
    "CredentialRow",
    "DeviceRow",
    "DpLedgerRow",
    "RolloutRow",
    "EnrollmentTokenRow",
    "JobEventRow",
    "JobRow",
    "ModelVersionRow",
    "PolicyRow",
    "RegisteredModelRow",
    "RoundRow",
    "SiteRow",
    "StageTransitionRow",
    "TaskRow",
    "TenantRow",
    "UpdateRow",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use consortia.store.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class TenantRow(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    regulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class SiteRow(Base):
    __tablename__ = "sites"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]


class CredentialRow(Base):
    """A bearer credential. Only the SHA-256 of the token is stored."""

    __tablename__ = "credentials"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"), index=True)
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class EnrollmentTokenRow(Base):
    """A one-time token that lets a new site join its tenant."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"))
    kind: Mapped[str] = mapped_column(String(16), default="site", server_default="site")


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    preprocessing: Mapped[dict[str, Any] | None]
    global_hash: Mapped[str | None] = mapped_column(String(64))
    state_hash: Mapped[str | None] = mapped_column(String(64))
    rounds_completed: Mapped[int] = mapped_column(Integer, default=0)
    final_metrics: Mapped[dict[str, Any] | None]
    submitted_by: Mapped[int | None] = mapped_column(ForeignKey("credentials.id"))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class RoundRow(Base):
    """One attempt at one round. ``kind`` is profile (round 0), train (1..R) or evaluate
    (R+1). A retried round gets a new row with ``attempt + 1``; the old row is abandoned
    and anything that still arrives for it is recorded as late."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number", "attempt"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    global_in: Mapped[str | None] = mapped_column(String(64))
    global_out: Mapped[str | None] = mapped_column(String(64))
    state_out: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None]
    reason: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime]
    created_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("round_id", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]


class UpdateRow(Base):
    """A received model update. Unique per (round, site): a resend is acknowledged but
    never stored or applied twice. ``status`` is accepted or late."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    blob_hash: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]


class JobEventRow(Base):
    """Append-only log of everything that happens to a job."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]]


# ---------------------------------------------------------------------------- governance


class AuditRow(Base):
    """One entry of the tamper-evident audit log (an RFC 6962 Merkle log).

    ``leaf_hash`` is over the canonical JSON of (seq, at, actor, tenant, action, subject,
    detail); ``root_hash`` is the tree head after this entry, ``frontier`` the subtree
    roots needed to append the next one, ``signature`` the coordinator's Ed25519 signature
    of the head. ``seq`` is assigned densely from 0, so a deleted row leaves a gap.
    """

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str | None] = mapped_column(String(63), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]]
    leaf_hash: Mapped[str] = mapped_column(String(64))
    root_hash: Mapped[str] = mapped_column(String(64))
    frontier: Mapped[list[str]] = mapped_column(JSON)
    signature: Mapped[str] = mapped_column(String(200))


class RegisteredModelRow(Base):
    __tablename__ = "registered_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime]


class ModelVersionRow(Base):
    """A registered model version: content address, lineage, card, stage, release."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), unique=True)  # None: a rollback version
    params_hash: Mapped[str] = mapped_column(String(64))
    lineage: Mapped[dict[str, Any]]
    stage: Mapped[str] = mapped_column(String(16))
    release_digest: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]


class StageTransitionRow(Base):
    """Stage history of a version: who moved it where, when, and the policy evidence."""

    __tablename__ = "stage_transitions"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    from_stage: Mapped[str] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(100))
    evaluation: Mapped[dict[str, Any]]
    at: Mapped[datetime]


class PolicyRow(Base):
    """A promotion policy for one registered model; every apply is a new revision."""

    __tablename__ = "promotion_policies"
    __table_args__ = (UniqueConstraint("model_name", "revision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(63), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]]
    digest: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]


class ApproverKeyRow(Base):
    """A tenant approver's Ed25519 public key (the private key never reaches us)."""

    __tablename__ = "approver_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ApprovalRow(Base):
    """A verified, signed approval (or rejection). ``nonce`` is unique: a replay fails."""

    __tablename__ = "approvals"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    decision: Mapped[str] = mapped_column(String(16))
    nonce: Mapped[str] = mapped_column(String(64), unique=True)
    signed_at: Mapped[datetime]
    payload: Mapped[dict[str, Any]]
    signature: Mapped[str] = mapped_column(String(200))
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]


# ---------------------------------------------------------------------------- delivery


class DeviceRow(Base):
    """An edge device enrolled under a tenant. ``instruction`` is the latest signed
    director instruction for it (its ``counter`` only grows); ``report`` is what the
    device last said it serves."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    labels: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="active")
    counter: Mapped[int] = mapped_column(Integer, default=0)
    instruction: Mapped[dict[str, Any] | None]
    report: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]


class RolloutRow(Base):
    """A progressive rollout of one release to a cohort; ``progress`` holds the step,
    the devices moved so far, analysis samples and what the cohort ran before."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    plan: Mapped[dict[str, Any]]
    progress: Mapped[dict[str, Any]]
    actor: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class MonitoringWindowRow(Base):
    """One monitoring window a serving agent sent: aggregates of its traffic on the
    release's agreed bins (small counts already suppressed at the agent)."""

    __tablename__ = "monitoring_windows"
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    release: Mapped[str] = mapped_column(String(200), index=True)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime]
    rows: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]


class IncidentRow(Base):
    """An anomaly that persisted in a tenant's monitoring windows of one release:
    its findings (strongest first), impact, priority and state."""

    __tablename__ = "incidents"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    release: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[str] = mapped_column(String(4))
    findings: Mapped[dict[str, Any]]
    impact: Mapped[dict[str, Any]]
    causes: Mapped[dict[str, Any]]
    summary: Mapped[str] = mapped_column(Text)
    opened_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]


class AutomationPolicyRow(Base):
    """One revision of an automation policy (YAML document as applied, and its digest)."""

    __tablename__ = "automation_policies"
    __table_args__ = (UniqueConstraint("name", "revision", name="uq_automation_policy_revision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(63), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]]
    digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(200))
    created_by_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class AutomationRunRow(Base):
    """One pass of a policy's loop: detect -> decide -> act -> validate, each step a
    dict in ``steps`` (also written to the audit log)."""

    __tablename__ = "automation_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    policy: Mapped[str] = mapped_column(String(63), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(63), index=True)
    state: Mapped[str] = mapped_column(String(24), index=True)
    trigger: Mapped[dict[str, Any]]
    tenants: Mapped[dict[str, Any]]
    steps: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class DpLedgerRow(Base):
    """Privacy spent by one job for one tenant's data on one registered model: ``rounds``
    Poisson-sampled Gaussian mechanisms of rate ``q`` and noise multiplier ``z``.
    Charged when a round opens (before anything is released), so a crash never
    under-counts."""

    __tablename__ = "dp_ledger"
    __table_args__ = (UniqueConstraint("tenant", "model", "job_id", name="uq_dp_ledger_entry"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(63), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    q: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    rounds: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]
