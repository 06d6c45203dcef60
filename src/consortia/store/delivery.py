"""Store methods for edge devices: enrollment, signed director instructions, reports
(mixed into :class:`~consortia.store.sqlstore.SqlStore`; changes are audited)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from consortia.errors import AuthError, ConflictError, NotFoundError
from consortia.store.entities import Device, utcnow
from consortia.store.governance import GovernanceStore
from consortia.store.models import (
    CredentialRow,
    DeviceRow,
    EnrollmentTokenRow,
    IncidentRow,
    MonitoringWindowRow,
    RolloutRow,
    TenantRow,
)

__all__ = ["DeliveryStore"]


def _device(r: DeviceRow, tenant: str) -> Device:
    return Device(
        r.id,
        r.tenant_id,
        tenant,
        r.name,
        r.labels,
        r.status,
        r.counter,
        r.instruction,
        r.report,
        r.created_at,
        r.last_seen_at,
    )


class DeliveryStore(GovernanceStore):
    """Devices; expects ``_tx()`` and ``_sign`` like its base."""

    def enroll_device(
        self, enrollment_hash: str, name: str, labels: Mapping[str, str], credential_hash: str, expires_at: datetime
    ) -> Device:
        """Consume a one-time device enrollment token; create the device and its credential."""
        now = utcnow()
        try:
            with self._tx() as s:
                tok = s.scalar(select(EnrollmentTokenRow).where(EnrollmentTokenRow.token_hash == enrollment_hash))
                if tok is None or tok.used_at is not None or tok.expires_at < now:
                    raise AuthError("device enrollment token is not valid, used or expired; ask for a new one.")
                if tok.kind != "device":
                    raise AuthError(f"this enrollment token is for a {tok.kind}, not a device.")
                tenant = s.get(TenantRow, tok.tenant_id)
                assert tenant is not None
                row = DeviceRow(
                    tenant_id=tenant.id, name=name, labels=dict(labels), status="active", counter=0, created_at=now
                )
                s.add(row)
                s.flush()
                done = s.execute(
                    update(EnrollmentTokenRow)
                    .where(EnrollmentTokenRow.id == tok.id, EnrollmentTokenRow.used_at.is_(None))
                    .values(used_at=now)
                )
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    raise AuthError("device enrollment token was already used.")
                s.add(
                    CredentialRow(
                        token_hash=credential_hash,
                        name=f"device:{name}",
                        role="device",
                        tenant_id=tenant.id,
                        device_id=row.id,
                        created_at=now,
                        expires_at=expires_at,
                    )
                )
                self._audit(s, f"device:{name}", tenant.name, "device.enrolled", name, {"labels": dict(labels)})
                return _device(row, tenant.name)
        except IntegrityError as exc:
            raise ConflictError(f"a device named {name!r} already exists in this tenant; choose another name.") from exc

    def list_devices(self, tenant_id: int | None = None) -> list[Device]:
        with self._tx() as s:
            q = select(DeviceRow, TenantRow.name).join(TenantRow).order_by(DeviceRow.id)
            if tenant_id is not None:
                q = q.where(DeviceRow.tenant_id == tenant_id)
            return [_device(r, t) for r, t in s.execute(q)]

    def get_device(self, device_id: int) -> Device:
        with self._tx() as s:
            row = s.execute(select(DeviceRow, TenantRow.name).join(TenantRow).where(DeviceRow.id == device_id)).first()
            if row is None:
                raise NotFoundError(f"device {device_id} not found.")
            return _device(*row)

    def instruct(self, device_id: int, build: Callable[[int], dict[str, Any]], actor: str) -> Device:
        """Store a new signed instruction built for the next counter value (atomically)."""
        with self._tx() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"device {device_id} not found.")
            tenant = s.get(TenantRow, row.tenant_id)
            assert tenant is not None
            row.counter += 1
            row.instruction = build(row.counter)
            self._audit(
                s,
                actor,
                tenant.name,
                "device.instructed",
                row.name,
                {
                    "counter": row.counter,
                    "release": row.instruction["instruction"]["release"],
                    "preview": row.instruction["instruction"].get("preview"),
                },
            )
            s.flush()
            return _device(row, tenant.name)

    def report_device(self, device_id: int, report: dict[str, Any]) -> None:
        """Record a device's report; audit when what it serves or its state changes."""
        with self._tx() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"device {device_id} not found.")
            before = row.report or {}
            row.report = report
            row.last_seen_at = utcnow()
            if (before.get("serving"), before.get("state")) != (report.get("serving"), report.get("state")):
                tenant = s.get(TenantRow, row.tenant_id)
                self._audit(
                    s,
                    f"device:{row.name}",
                    tenant.name if tenant else None,
                    "device.state",
                    row.name,
                    {"serving": report.get("serving"), "state": report.get("state"), "reason": report.get("reason")},
                )

    # ------------------------------------------------------------------ monitoring windows

    def add_window(self, device_id: int, window: dict[str, Any]) -> int:
        """Store one monitoring window from a device (already validated)."""
        with self._tx() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"device {device_id} not found.")
            w = MonitoringWindowRow(
                device_id=device_id,
                tenant_id=row.tenant_id,
                release=window["release"],
                started_at=datetime.fromisoformat(window["started_at"]),
                ended_at=datetime.fromisoformat(window["ended_at"]),
                rows=int(window["rows"]),
                payload=window,
                received_at=utcnow(),
            )
            s.add(w)
            s.flush()
            return int(w.id)

    def list_windows(
        self, tenant_id: int | None = None, release: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Windows (oldest first) with their device and tenant, optionally one tenant's or release's."""
        with self._tx() as s:
            q = (
                select(MonitoringWindowRow, DeviceRow.name, TenantRow.name)
                .join(DeviceRow, DeviceRow.id == MonitoringWindowRow.device_id)
                .join(TenantRow, TenantRow.id == MonitoringWindowRow.tenant_id)
                .where(MonitoringWindowRow.id > after)
                .order_by(MonitoringWindowRow.id)
                .limit(limit)
            )
            if tenant_id is not None:
                q = q.where(MonitoringWindowRow.tenant_id == tenant_id)
            if release is not None:
                q = q.where(MonitoringWindowRow.release == release)
            return [
                {"id": w.id, "device": d, "tenant": t, "received_at": w.received_at.isoformat(), **w.payload}
                for w, d, t in s.execute(q)
            ]

    def set_window_findings(self, window_id: int, findings: list[dict[str, Any]]) -> None:
        with self._tx() as s:
            row = s.get(MonitoringWindowRow, window_id)
            if row is None:
                raise NotFoundError(f"monitoring window {window_id} not found.")
            row.payload = {**row.payload, "findings": findings}

    def recent_windows(self, tenant_id: int, release: str, limit: int) -> list[dict[str, Any]]:
        """The tenant's newest ``limit`` windows of ``release``, newest first."""
        with self._tx() as s:
            q = (
                select(MonitoringWindowRow)
                .where(MonitoringWindowRow.tenant_id == tenant_id, MonitoringWindowRow.release == release)
                .order_by(MonitoringWindowRow.id.desc())
                .limit(limit)
            )
            return [{"id": w.id, "device_id": w.device_id, "rows": w.rows, **w.payload} for w in s.scalars(q)]

    def device_windows(self, device_id: int, before: int, limit: int) -> list[dict[str, Any]]:
        """The device's ``limit`` windows stored before window ``before``, newest first
        (any release): its own baseline for latency and errors."""
        with self._tx() as s:
            q = (
                select(MonitoringWindowRow)
                .where(MonitoringWindowRow.device_id == device_id, MonitoringWindowRow.id < before)
                .order_by(MonitoringWindowRow.id.desc())
                .limit(limit)
            )
            return [{"id": w.id, "device_id": w.device_id, "rows": w.rows, **w.payload} for w in s.scalars(q)]

    def model_windows(self, model: str, since: datetime, limit: int = 5000) -> list[dict[str, Any]]:
        """Operational summaries of every window of any release of ``model`` that ended
        after ``since``, consortium-wide, oldest first: ``{"id", "device_id", "tenant_id",
        "release", "started_at", "ended_at", "latency_p99_ms", "error_rate", "accuracy"}``. For
        comparisons across cohorts only; callers redact other tenants' identities."""
        with self._tx() as s:
            q = (
                select(MonitoringWindowRow)
                .where(MonitoringWindowRow.release.like(f"{model}:%"), MonitoringWindowRow.ended_at >= since)
                .order_by(MonitoringWindowRow.id.desc())
                .limit(limit)
            )
            out = []
            for w in s.scalars(q):
                if w.release.rpartition(":")[0] != model:
                    continue  # LIKE's wildcards may match more than the model's name
                p99 = (w.payload.get("latency") or {}).get("p99")
                calls = int(w.payload.get("requests", 0)) + int(w.payload.get("errors", 0))
                labels = w.payload.get("label_counts") or {}
                labelled = int(labels.get("labelled", 0))
                out.append(
                    {
                        "id": w.id,
                        "device_id": w.device_id,
                        "tenant_id": w.tenant_id,
                        "release": w.release,
                        "started_at": w.started_at.isoformat(),
                        "ended_at": w.ended_at.isoformat(),
                        "latency_p99_ms": None if p99 is None else 1000.0 * float(p99),
                        "error_rate": int(w.payload.get("errors", 0)) / calls if calls else None,
                        "accuracy": int(labels.get("correct", 0)) / labelled if labelled else None,
                    }
                )
            return out[::-1]

    def labelled_since(self, model: str, since: datetime) -> dict[str, int]:
        """Delayed labels received per tenant on windows of ``model``'s releases since ``since``."""
        with self._tx() as s:
            q = (
                select(MonitoringWindowRow, TenantRow.name)
                .join(TenantRow, TenantRow.id == MonitoringWindowRow.tenant_id)
                .where(MonitoringWindowRow.release.like(f"{model}:%"), MonitoringWindowRow.received_at >= since)
            )
            out: dict[str, int] = {}
            for w, tenant in s.execute(q):
                if w.release.rpartition(":")[0] != model:
                    continue
                n = int((w.payload.get("label_counts") or {}).get("labelled", 0))
                if n:
                    out[tenant] = out.get(tenant, 0) + n
            return out

    def release_rows(self, release: str, since: datetime) -> dict[int, int]:
        """Rows served per tenant in windows of ``release`` ending after ``since``."""
        with self._tx() as s:
            q = select(MonitoringWindowRow.tenant_id, MonitoringWindowRow.rows).where(
                MonitoringWindowRow.release == release, MonitoringWindowRow.ended_at >= since
            )
            out: dict[int, int] = {}
            for tenant_id, rows in s.execute(q):
                out[tenant_id] = out.get(tenant_id, 0) + int(rows)
            return out

    # ------------------------------------------------------------------ incidents

    def upsert_incident(
        self,
        tenant_id: int,
        release: str,
        findings: list[dict[str, Any]],
        impact: dict[str, Any],
        priority: str,
        causes: list[dict[str, Any]],
        summary: str,
    ) -> tuple[dict[str, Any], bool]:
        """Open an incident for (tenant, release), or update the open one; returns
        (incident, opened now). Opening and priority changes are audit entries."""
        now = utcnow()
        with self._tx() as s:
            row = s.scalars(
                select(IncidentRow).where(
                    IncidentRow.tenant_id == tenant_id, IncidentRow.release == release, IncidentRow.state == "open"
                )
            ).first()
            tenant = s.get(TenantRow, tenant_id)
            assert tenant is not None
            opened = row is None
            if row is None:
                row = IncidentRow(
                    tenant_id=tenant_id,
                    release=release,
                    state="open",
                    priority=priority,
                    findings={"items": findings},
                    impact=impact,
                    causes={"items": causes},
                    summary=summary,
                    opened_at=now,
                    updated_at=now,
                    resolved_at=None,
                )
                s.add(row)
                s.flush()
                top = findings[0] if findings else {}
                self._audit(
                    s,
                    "coordinator",
                    tenant.name,
                    "incident.opened",
                    f"incident:{row.id}",
                    {"release": release, "priority": priority, "top": {k: top.get(k) for k in ("kind", "target")}},
                )
            else:
                if row.priority != priority:
                    self._audit(
                        s,
                        "coordinator",
                        tenant.name,
                        "incident.priority",
                        f"incident:{row.id}",
                        {"from": row.priority, "to": priority},
                    )
                row.findings, row.impact, row.priority, row.updated_at = {"items": findings}, impact, priority, now
                row.causes, row.summary = {"items": causes}, summary
            s.flush()
            return _incident(row, tenant.name), opened

    def resolve_incident(self, incident_id: int, actor: str, note: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(IncidentRow, incident_id)
            if row is None:
                raise NotFoundError(f"incident {incident_id} not found.")
            tenant = s.get(TenantRow, row.tenant_id)
            assert tenant is not None
            if row.state != "open":
                raise ConflictError(f"incident {incident_id} is already {row.state}.")
            row.state, row.resolved_at, row.updated_at = "resolved", utcnow(), utcnow()
            self._audit(s, actor, tenant.name, "incident.resolved", f"incident:{row.id}", {"note": note})
            s.flush()
            return _incident(row, tenant.name)

    def list_incidents(self, tenant_id: int | None = None, state: str | None = None) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = select(IncidentRow, TenantRow.name).join(TenantRow).order_by(IncidentRow.id)
            if tenant_id is not None:
                q = q.where(IncidentRow.tenant_id == tenant_id)
            if state is not None:
                q = q.where(IncidentRow.state == state)
            return [_incident(r, t) for r, t in s.execute(q)]

    def get_incident(self, incident_id: int) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(IncidentRow, incident_id)
            if row is None:
                raise NotFoundError(f"incident {incident_id} not found; see `consortia incidents list`.")
            tenant = s.get(TenantRow, row.tenant_id)
            assert tenant is not None
            return {**_incident(row, tenant.name), "tenant_id": row.tenant_id}

    # ------------------------------------------------------------------ rollouts

    def create_rollout(
        self, model: str, version: int, plan: dict[str, Any], progress: dict[str, Any], actor: str
    ) -> int:
        now = utcnow()
        with self._tx() as s:
            row = RolloutRow(
                model=model,
                version=version,
                state="running",
                plan=plan,
                progress=progress,
                actor=actor,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            self._audit(
                s,
                actor,
                None,
                "rollout.started",
                f"rollout:{row.id}",
                {
                    "release": f"{model}:{version}",
                    "previous": progress.get("previous"),
                    "cohort": progress.get("cohort"),
                    "steps": len(plan["steps"]),
                },
            )
            return row.id

    def get_rollout(self, rollout_id: int) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"rollout {rollout_id} not found; see `consortia rollout status`.")
            return _rollout(row)

    def list_rollouts(self, state: str | None = None) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = select(RolloutRow).order_by(RolloutRow.id)
            if state is not None:
                q = q.where(RolloutRow.state == state)
            return [_rollout(r) for r in s.scalars(q)]

    def update_rollout(
        self,
        rollout_id: int,
        *,
        expect: str,
        state: str,
        progress: dict[str, Any],
        reason: str | None = None,
        action: str | None = None,
        detail: dict[str, Any] | None = None,
        actor: str = "coordinator",
    ) -> None:
        """Compare-and-set the rollout's state; audit ``action`` when given."""
        with self._tx() as s:
            done = s.execute(
                update(RolloutRow)
                .where(RolloutRow.id == rollout_id, RolloutRow.state == expect)
                .values(state=state, progress=progress, reason=reason, updated_at=utcnow())
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(f"rollout {rollout_id} is no longer {expect}.")
            if action is not None:
                self._audit(s, actor, None, action, f"rollout:{rollout_id}", detail or {})


def _rollout(r: RolloutRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "state": r.state,
        "reason": r.reason,
        "plan": r.plan,
        "progress": r.progress,
        "actor": r.actor,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }


def _incident(r: IncidentRow, tenant: str) -> dict[str, Any]:
    return {
        "id": r.id,
        "tenant": tenant,
        "release": r.release,
        "state": r.state,
        "priority": r.priority,
        "findings": r.findings["items"],
        "impact": r.impact,
        "causes": r.causes["items"],
        "summary": r.summary,
        "opened_at": r.opened_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
        "resolved_at": r.resolved_at.isoformat() if r.resolved_at else None,
    }
