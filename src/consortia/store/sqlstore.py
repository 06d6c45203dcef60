"""The SQLAlchemy store: every query lives here; callers get frozen entities.

Each public method is one transaction. Methods that change a round's or task's state
check that state inside the transaction, so two racing requests (a resent update, a
deadline tick and a final update arriving together) cannot both win.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from consortia.errors import AuthError, ConflictError, NotFoundError
from consortia.store.entities import Job, ModelVersion, Principal, Round, Site, Task, Tenant, Update, utcnow
from consortia.store.governance import GovernanceStore
from consortia.store.models import (
    CredentialRow,
    EnrollmentTokenRow,
    JobEventRow,
    JobRow,
    RoundRow,
    SiteRow,
    TaskRow,
    TenantRow,
    UpdateRow,
)

__all__ = ["SqlStore"]

OPEN = "open"
CLOSED = "closed"
ABANDONED = "abandoned"


def _tenant(r: TenantRow) -> Tenant:
    return Tenant(r.id, r.name, r.regulated, r.created_at)


def _job(r: JobRow) -> Job:
    return Job(
        r.id,
        r.name,
        r.state,
        r.reason,
        r.spec,
        r.spec_hash,
        r.preprocessing,
        r.global_hash,
        r.state_hash,
        r.rounds_completed,
        r.final_metrics,
        r.created_at,
        r.finished_at,
    )


def _task(t: TaskRow, r: RoundRow, site_name: str) -> Task:
    return Task(
        t.id,
        t.round_id,
        t.site_id,
        site_name,
        t.state,
        t.reason,
        t.rule,
        t.result,
        r.job_id,
        r.number,
        r.attempt,
        r.kind,
        r.state,
        r.global_in,
        r.deadline_at,
    )


def _round(r: RoundRow, tasks: Sequence[Task] = ()) -> Round:
    return Round(
        r.id,
        r.job_id,
        r.number,
        r.attempt,
        r.kind,
        r.state,
        r.global_in,
        r.global_out,
        r.state_out,
        r.metrics,
        r.reason,
        r.deadline_at,
        r.created_at,
        r.closed_at,
        tuple(tasks),
    )


def _event(s: Session, job_id: int, kind: str, detail: dict[str, Any]) -> None:
    """Append to the job's event log inside the caller's transaction."""
    s.add(JobEventRow(job_id=job_id, at=utcnow(), kind=kind, detail=detail))


class SqlStore(GovernanceStore):
    """Persistence for tenants, credentials, sites, jobs, rounds, tasks and updates, plus
    governance (:class:`~consortia.store.governance.GovernanceStore`).

    ``sign`` signs audit-log tree heads (the coordinator's Ed25519 key).
    """

    def __init__(self, engine: Engine, sign: Callable[[bytes], bytes]) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._sign = sign

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------ tenants and sites

    def create_tenant(self, name: str, regulated: bool, actor: str) -> Tenant:
        try:
            with self._tx() as s:
                row = TenantRow(name=name, regulated=regulated, created_at=utcnow())
                s.add(row)
                s.flush()
                self._audit(s, actor, name, "tenant.created", name, {"regulated": regulated})
                return _tenant(row)
        except IntegrityError as exc:
            raise ConflictError(f"tenant {name!r} already exists; pick another name.") from exc

    def get_tenant(self, name: str) -> Tenant:
        with self._tx() as s:
            row = s.scalar(select(TenantRow).where(TenantRow.name == name))
            if row is None:
                raise NotFoundError(f"tenant {name!r} not found; see `consortia tenant list`.")
            return _tenant(row)

    def list_tenants(self, tenant_id: int | None = None) -> list[Tenant]:
        with self._tx() as s:
            q = select(TenantRow).order_by(TenantRow.id)
            if tenant_id is not None:
                q = q.where(TenantRow.id == tenant_id)
            return [_tenant(r) for r in s.scalars(q)]

    def list_sites(self, tenant_id: int | None = None, names: Sequence[str] | None = None) -> list[Site]:
        with self._tx() as s:
            q = select(SiteRow, TenantRow.name).join(TenantRow).order_by(SiteRow.id)
            if tenant_id is not None:
                q = q.where(SiteRow.tenant_id == tenant_id)
            if names is not None:
                q = q.where(TenantRow.name.in_(list(names)))
            return [Site(r.id, r.name, r.tenant_id, t, r.status, r.created_at, r.last_seen_at) for r, t in s.execute(q)]

    def touch_site(self, site_id: int) -> None:
        with self._tx() as s:
            s.execute(update(SiteRow).where(SiteRow.id == site_id).values(last_seen_at=utcnow()))

    # ------------------------------------------------------------------ credentials

    def add_enrollment_token(
        self, tenant_id: int, tenant: str, token_hash: str, expires_at: datetime, actor: str
    ) -> None:
        with self._tx() as s:
            self._audit(s, actor, tenant, "enrollment_token.issued", tenant, {"expires_at": expires_at.isoformat()})
            s.add(
                EnrollmentTokenRow(
                    token_hash=token_hash,
                    tenant_id=tenant_id,
                    created_at=utcnow(),
                    expires_at=expires_at,
                )
            )

    def add_credential(
        self,
        *,
        token_hash: str,
        name: str,
        role: str,
        tenant_id: int | None,
        site_id: int | None,
        expires_at: datetime,
        actor: str,
        tenant: str | None = None,
    ) -> None:
        with self._tx() as s:
            self._audit(s, actor, tenant, "credential.created", name, {"role": role})
            s.add(
                CredentialRow(
                    token_hash=token_hash,
                    name=name,
                    role=role,
                    tenant_id=tenant_id,
                    site_id=site_id,
                    created_at=utcnow(),
                    expires_at=expires_at,
                )
            )

    def has_admin(self) -> bool:
        with self._tx() as s:
            return bool(s.scalar(select(func.count()).where(CredentialRow.role == "admin")))

    def enroll(
        self, enrollment_hash: str, site_name: str, credential_hash: str, expires_at: datetime
    ) -> tuple[Site, str]:
        """Consume a one-time enrollment token and create the site and its credential."""
        now = utcnow()
        with self._tx() as s:
            tok = s.scalar(
                select(EnrollmentTokenRow).where(EnrollmentTokenRow.token_hash == enrollment_hash).with_for_update()
            )
            if tok is None:
                raise AuthError("enrollment token is not valid; ask the consortium admin for one.")
            if tok.used_at is not None:
                raise AuthError("enrollment token was already used; each token enrolls one site.")
            if tok.expires_at < now:
                raise AuthError("enrollment token has expired; ask for a new one.")
            tenant = s.get(TenantRow, tok.tenant_id)
            assert tenant is not None
            exists = s.scalar(select(SiteRow).where(SiteRow.tenant_id == tenant.id, SiteRow.name == site_name))
            if exists is not None:
                raise ConflictError(
                    f"site {site_name!r} already exists in tenant {tenant.name!r}; choose another name."
                )
            site = SiteRow(tenant_id=tenant.id, name=site_name, status="active", created_at=now)
            s.add(site)
            s.flush()
            # Compare-and-set: a racing enrollment with the same token loses here.
            done = s.execute(
                update(EnrollmentTokenRow)
                .where(EnrollmentTokenRow.id == tok.id, EnrollmentTokenRow.used_at.is_(None))
                .values(used_at=now, site_id=site.id)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise AuthError("enrollment token was already used; each token enrolls one site.")
            s.add(
                CredentialRow(
                    token_hash=credential_hash,
                    name=f"site:{site_name}",
                    role="site",
                    tenant_id=tenant.id,
                    site_id=site.id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            self._audit(s, f"site:{site_name}", tenant.name, "site.enrolled", site_name, {"site_id": site.id})
            return Site(site.id, site.name, tenant.id, tenant.name, "active", now, None), tenant.name

    def principal(self, token_hash: str) -> Principal | None:
        with self._tx() as s:
            row = s.execute(
                select(CredentialRow, TenantRow.name)
                .outerjoin(TenantRow, CredentialRow.tenant_id == TenantRow.id)
                .where(CredentialRow.token_hash == token_hash)
            ).first()
            if row is None:
                return None
            c, tenant_name = row
            return Principal(
                c.id,
                c.name,
                c.role,
                c.tenant_id,
                tenant_name,
                c.site_id,
                c.expires_at,
                c.revoked_at is not None,
            )

    # ------------------------------------------------------------------ jobs

    def create_job(self, name: str, spec: dict[str, Any], spec_hash: str, submitted_by: int, actor: str) -> Job:
        with self._tx() as s:
            row = JobRow(
                name=name,
                state="running",
                spec=spec,
                spec_hash=spec_hash,
                submitted_by=submitted_by,
                created_at=utcnow(),
                rounds_completed=0,
            )
            s.add(row)
            s.flush()
            _event(s, row.id, "job_submitted", {"name": name})
            self._audit(s, actor, None, "job.submitted", f"job:{row.id}", {"name": name, "spec_hash": spec_hash})
            return _job(row)

    def get_job(self, job_id: int) -> Job:
        with self._tx() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"job {job_id} not found; see `consortia job list`.")
            return _job(row)

    def list_jobs(self, state: str | None = None) -> list[Job]:
        with self._tx() as s:
            q = select(JobRow).order_by(JobRow.id)
            if state is not None:
                q = q.where(JobRow.state == state)
            return [_job(r) for r in s.scalars(q)]

    def add_event(self, job_id: int, kind: str, detail: dict[str, Any]) -> None:
        with self._tx() as s:
            _event(s, job_id, kind, detail)

    def events(self, job_id: int) -> list[tuple[datetime, str, dict[str, Any]]]:
        with self._tx() as s:
            q = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
            return [(e.at, e.kind, e.detail) for e in s.scalars(q)]

    # ------------------------------------------------------------------ rounds

    def open_round(
        self,
        *,
        job_id: int,
        number: int,
        attempt: int,
        kind: str,
        global_in: str | None,
        deadline_at: datetime,
        site_ids: Sequence[int],
        close: Round | None = None,
        close_state: str = CLOSED,
        close_fields: dict[str, Any] | None = None,
        job_fields: dict[str, Any] | None = None,
    ) -> Round:
        """Atomically: close/abandon ``close`` (if given, and only if still open), update
        the job, and open the next round with one pending task per site."""
        now = utcnow()
        with self._tx() as s:
            if close is not None:
                self._finish_round(s, close, close_state, close_fields or {})
            if job_fields:
                s.execute(update(JobRow).where(JobRow.id == job_id).values(**job_fields))
            row = RoundRow(
                job_id=job_id,
                number=number,
                attempt=attempt,
                kind=kind,
                state=OPEN,
                global_in=global_in,
                deadline_at=deadline_at,
                created_at=now,
            )
            s.add(row)
            s.flush()
            for sid in site_ids:
                s.add(TaskRow(round_id=row.id, site_id=sid, state="pending", created_at=now))
            _event(
                s,
                job_id,
                "round_opened",
                {
                    "round": number,
                    "attempt": attempt,
                    "kind": kind,
                    "sites": list(site_ids),
                },
            )
            return _round(row)

    def _finish_round(self, s: Session, rnd: Round, state: str, fields: dict[str, Any]) -> None:
        done = s.execute(
            update(RoundRow)
            .where(RoundRow.id == rnd.id, RoundRow.state == OPEN)
            .values(state=state, closed_at=utcnow(), **fields)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise ConflictError(f"round {rnd.number} (attempt {rnd.attempt}) is no longer open.")
        s.execute(
            update(TaskRow)
            .where(TaskRow.round_id == rnd.id, TaskRow.state.in_(("pending", "delivered")))
            .values(state="expired", reason="the round closed before this site reported")
        )
        detail = {"round": rnd.number, "attempt": rnd.attempt, "kind": rnd.kind, "reason": fields.get("reason")}
        _event(s, rnd.job_id, f"round_{state}", detail)
        self._audit(
            s,
            "coordinator",
            None,
            f"round.{state}",
            f"job:{rnd.job_id}",
            {**detail, "global_out": fields.get("global_out")},
        )

    def finish_job(
        self,
        job_id: int,
        *,
        state: str,
        reason: str | None,
        close: Round | None,
        close_state: str = CLOSED,
        close_fields: dict[str, Any] | None = None,
        job_fields: dict[str, Any] | None = None,
        register: dict[str, Any] | None = None,
    ) -> ModelVersion | None:
        """Atomically close the last round, mark the job completed or failed and (when
        ``register`` holds model, params_hash and lineage) register the model version."""
        with self._tx() as s:
            if close is not None:
                self._finish_round(s, close, close_state, close_fields or {})
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(state=state, reason=reason, finished_at=utcnow(), **(job_fields or {}))
            )
            _event(s, job_id, f"job_{state}", {"reason": reason})
            self._audit(s, "coordinator", None, f"job.{state}", f"job:{job_id}", {"reason": reason})
            if register is not None:
                return self._register(s, job_id=job_id, **register)
            return None

    def open_round_ids(self) -> list[int]:
        with self._tx() as s:
            return list(s.scalars(select(RoundRow.id).where(RoundRow.state == OPEN).order_by(RoundRow.id)))

    def round_progress(self, round_id: int) -> tuple[Round, dict[str, int]]:
        """The round (without its tasks) and its task counts by state: one cheap query,
        so checking a round after each arrival costs O(1) rows, not O(sites)."""
        with self._tx() as s:
            row = s.get(RoundRow, round_id)
            if row is None:
                raise NotFoundError(f"round {round_id} not found.")
            q = select(TaskRow.state, func.count()).where(TaskRow.round_id == round_id).group_by(TaskRow.state)
            return _round(row), {state: int(n) for state, n in s.execute(q)}

    def get_round(self, round_id: int) -> Round:
        with self._tx() as s:
            row = s.get(RoundRow, round_id)
            if row is None:
                raise NotFoundError(f"round {round_id} not found.")
            return self._round_with_tasks(s, row)

    def extend_deadline(self, round_id: int, deadline_at: datetime) -> None:
        with self._tx() as s:
            s.execute(update(RoundRow).where(RoundRow.id == round_id).values(deadline_at=deadline_at))

    def job_rounds(self, job_id: int) -> list[Round]:
        with self._tx() as s:
            q = select(RoundRow).where(RoundRow.job_id == job_id).order_by(RoundRow.id)
            return [self._round_with_tasks(s, r) for r in s.scalars(q)]

    def _round_with_tasks(self, s: Session, r: RoundRow) -> Round:
        q = (
            select(TaskRow, SiteRow.name)
            .join(SiteRow, TaskRow.site_id == SiteRow.id)
            .where(TaskRow.round_id == r.id)
            .order_by(TaskRow.site_id)
        )
        return _round(r, [_task(t, r, name) for t, name in s.execute(q)])

    # ------------------------------------------------------------------ tasks

    def deliverable_tasks(self, site_id: int) -> list[Task]:
        """Tasks of open rounds not yet answered by this site; marks them delivered."""
        with self._tx() as s:
            q = (
                select(TaskRow, RoundRow, SiteRow.name)
                .join(RoundRow, TaskRow.round_id == RoundRow.id)
                .join(SiteRow, TaskRow.site_id == SiteRow.id)
                .where(
                    TaskRow.site_id == site_id,
                    TaskRow.state.in_(("pending", "delivered")),
                    RoundRow.state == OPEN,
                )
                .order_by(TaskRow.id)
            )
            out = []
            for t, r, name in s.execute(q).all():
                if t.state == "pending":
                    t.state = "delivered"
                    t.delivered_at = utcnow()
                out.append(_task(t, r, name))
            return out

    def get_task(self, task_id: int) -> Task:
        with self._tx() as s:
            row = s.execute(
                select(TaskRow, RoundRow, SiteRow.name)
                .join(RoundRow, TaskRow.round_id == RoundRow.id)
                .join(SiteRow, TaskRow.site_id == SiteRow.id)
                .where(TaskRow.id == task_id)
            ).first()
            if row is None:
                raise NotFoundError(f"task {task_id} not found.")
            return _task(*row)

    def complete_task(
        self,
        task: Task,
        *,
        state: str,
        reason: str | None = None,
        rule: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> str:
        """Record a site's answer to a task. Returns ``"recorded"``, ``"duplicate"`` (the
        same answer was already recorded) or ``"late"`` (the round had closed)."""
        now = utcnow()
        with self._tx() as s:
            r = s.get(RoundRow, task.round_id)
            t = s.get(TaskRow, task.id)
            assert r is not None and t is not None
            if t.state in ("completed", "failed", "refused"):
                return "duplicate"
            if r.state != OPEN:
                t.state, t.reason = "late", "answered after the round closed"
                t.completed_at = now
                status = "late"
            else:
                t.state, t.reason, t.rule, t.result, t.completed_at = state, reason, rule, result, now
                status = "recorded"
            _event(
                s,
                r.job_id,
                f"task_{t.state}",
                {
                    "round": r.number,
                    "attempt": r.attempt,
                    "site_id": t.site_id,
                    "reason": reason,
                    "rule": rule,
                },
            )
            return status

    def record_update(
        self,
        task: Task,
        *,
        blob_hash: str,
        num_examples: int,
        nbytes: int,
        metrics: dict[str, Any] | None,
    ) -> str:
        """Record a model update exactly once per (round, site).

        Returns ``"accepted"``, ``"duplicate"`` (already recorded: nothing changes) or
        ``"late"`` (round closed: recorded, never applied).
        """
        now = utcnow()
        with self._tx() as s:
            existing = s.scalar(
                select(UpdateRow).where(UpdateRow.round_id == task.round_id, UpdateRow.site_id == task.site_id)
            )
            if existing is not None:
                return "duplicate"
            r = s.get(RoundRow, task.round_id)
            t = s.get(TaskRow, task.id)
            assert r is not None and t is not None
            if t.state in ("failed", "refused"):
                raise ConflictError(
                    f"task {task.id} was already answered ({t.state}: {t.reason}); "
                    "the site will get a new task next round."
                )
            status = "accepted" if r.state == OPEN and t.state != "late" else "late"
            s.add(
                UpdateRow(
                    round_id=task.round_id,
                    task_id=task.id,
                    site_id=task.site_id,
                    blob_hash=blob_hash,
                    num_examples=num_examples,
                    nbytes=nbytes,
                    metrics=metrics,
                    status=status,
                    received_at=now,
                )
            )
            t.state = "completed" if status == "accepted" else "late"
            t.completed_at = now
            if status == "late":
                t.reason = "update arrived after the round closed; recorded, not applied"
            _event(
                s,
                r.job_id,
                f"update_{status}",
                {
                    "round": r.number,
                    "attempt": r.attempt,
                    "site_id": task.site_id,
                    "examples": num_examples,
                    "bytes": nbytes,
                },
            )
            try:
                s.flush()
            except IntegrityError:  # a concurrent resend won the unique constraint
                s.rollback()
                return "duplicate"
            return status

    def round_updates(self, round_id: int, status: str = "accepted") -> list[Update]:
        """Updates of a round in a fixed order (by site id), so aggregation is
        deterministic and a recomputation after a crash gives identical bytes."""
        with self._tx() as s:
            q = (
                select(UpdateRow, SiteRow.name)
                .join(SiteRow, UpdateRow.site_id == SiteRow.id)
                .where(UpdateRow.round_id == round_id, UpdateRow.status == status)
                .order_by(UpdateRow.site_id)
            )
            return [
                Update(
                    u.id,
                    u.round_id,
                    u.task_id,
                    u.site_id,
                    name,
                    u.blob_hash,
                    u.num_examples,
                    u.nbytes,
                    u.metrics,
                    u.status,
                    u.received_at,
                )
                for u, name in s.execute(q)
            ]

    def site_may_read_blob(self, site_id: int, digest: str) -> bool:
        """A site may download a global model only if one of its tasks refers to it."""
        with self._tx() as s:
            q = (
                select(func.count())
                .select_from(TaskRow)
                .join(RoundRow, TaskRow.round_id == RoundRow.id)
                .where(TaskRow.site_id == site_id, RoundRow.global_in == digest)
            )
            return bool(s.scalar(q))
