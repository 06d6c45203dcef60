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

from consortia.errors import ConflictError, NotFoundError
from consortia.store.entities import Job, ModelVersion, Round, Task, Update, utcnow
from consortia.store.identity import IdentityStore
from consortia.store.models import (
    JobEventRow,
    JobRow,
    RoundRow,
    SiteRow,
    TaskRow,
    UpdateRow,
)

__all__ = ["SqlStore"]

OPEN = "open"
CLOSED = "closed"
ABANDONED = "abandoned"


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


class SqlStore(IdentityStore):
    """Persistence for jobs, rounds, tasks and updates; tenants, sites and credentials
    come from :class:`~consortia.store.identity.IdentityStore`, the audit log, registry,
    policies and approvals from :class:`~consortia.store.governance.GovernanceStore`.

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
        metrics: dict[str, Any] | None = None,
    ) -> Round:
        """Atomically: close/abandon ``close`` (if given, and only if still open), update
        the job, and open the next round with one pending task per site (``metrics`` are
        the new round's own from the start, e.g. which buffered updates made its model)."""
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
                metrics=metrics,
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

    def close_round(self, rnd: Round, state: str, fields: dict[str, Any]) -> None:
        """Close ``rnd`` (``closed`` or ``abandoned``) without opening another: a hub's
        relay rounds, driven by the upper coordinator, end this way."""
        with self._tx() as s:
            self._finish_round(s, rnd, state, fields)

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

    # ------------------------------------------------------------------ platform metrics

    def metrics_snapshot(self, recent_tasks: int = 10_000) -> dict[str, Any]:
        """Counts for the coordinator's Prometheus ``/metrics`` (no tenant data beyond
        names and counts): jobs, rounds and tasks by state, updates by status, devices and
        how many serve something other than what they were told, open incidents by
        priority, monitoring windows, and the durations of the last ``recent_tasks``
        completed tasks (delivered -> answered)."""
        from consortia.store.models import DeviceRow, IncidentRow, MonitoringWindowRow

        def by(s: Session, *cols: Any) -> dict[tuple[Any, ...], int]:
            q = select(*cols, func.count()).group_by(*cols)
            return {tuple(r[:-1]): int(r[-1]) for r in s.execute(q)}

        with self._tx() as s:
            out: dict[str, Any] = {
                "jobs": by(s, JobRow.state),
                "rounds": by(s, RoundRow.kind, RoundRow.state),
                "tasks": {
                    tuple(r[:-1]): int(r[-1])
                    for r in s.execute(
                        select(RoundRow.kind, TaskRow.state, func.count())
                        .join(RoundRow, TaskRow.round_id == RoundRow.id)
                        .group_by(RoundRow.kind, TaskRow.state)
                    )
                },
                "updates": by(s, UpdateRow.status),
                "incidents": by(s, IncidentRow.state, IncidentRow.priority),
                "windows": int(s.scalar(select(func.count()).select_from(MonitoringWindowRow)) or 0),
            }
            q_dev = select(DeviceRow.status, DeviceRow.instruction, DeviceRow.report, DeviceRow.last_seen_at)
            devices = list(s.execute(q_dev))
            out["devices"] = {}
            out_of_sync = 0
            oldest = 0.0
            now = utcnow()
            for status, instruction, report, seen in devices:
                out["devices"][(status,)] = out["devices"].get((status,), 0) + 1
                told = ((instruction or {}).get("instruction") or {}).get("release")
                serving = (report or {}).get("serving")
                if told and serving != f"{told['model']}:{told['version']}":
                    out_of_sync += 1
                if status == "active" and seen is not None:
                    oldest = max(oldest, (now - seen).total_seconds())
            out["devices_out_of_sync"] = out_of_sync
            out["device_report_age_max"] = oldest
            q = (
                select(RoundRow.kind, TaskRow.delivered_at, TaskRow.completed_at)
                .join(RoundRow, TaskRow.round_id == RoundRow.id)
                .where(TaskRow.completed_at.is_not(None), TaskRow.delivered_at.is_not(None))
                .order_by(TaskRow.id.desc())
                .limit(recent_tasks)
            )
            out["task_seconds"] = [(k, (c - d).total_seconds()) for k, d, c in s.execute(q)]
            return out
