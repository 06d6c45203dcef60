"""Store methods for automation policies and their runs (mixed into
:class:`~consortia.store.sqlstore.SqlStore`; every change is audited in its transaction)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from consortia.errors import NotFoundError
from consortia.store.delivery import DeliveryStore
from consortia.store.entities import utcnow
from consortia.store.models import AutomationPolicyRow, AutomationRunRow

__all__ = ["AutomationStore"]


def _policy(r: AutomationPolicyRow) -> dict[str, Any]:
    return {
        "name": r.name,
        "model": r.model,
        "revision": r.revision,
        "digest": r.digest,
        "document": r.document,
        "created_by": r.created_by,
        "created_by_id": r.created_by_id,
        "created_at": r.created_at.isoformat(),
    }


def _run(r: AutomationRunRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "policy": r.policy,
        "revision": r.revision,
        "model": r.model,
        "state": r.state,
        "trigger": r.trigger,
        "policy_digest": r.trigger.get("policy_digest"),
        "tenants": r.tenants["items"],
        "steps": r.steps["items"],
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }


class AutomationStore(DeliveryStore):
    """Automation policies (revisioned) and runs; expects ``_tx()`` and ``_sign``."""

    def add_automation_policy(
        self, name: str, model: str, document: dict[str, Any], digest: str, actor: str, actor_id: int
    ) -> dict[str, Any]:
        with self._tx() as s:
            last = s.scalar(select(func.max(AutomationPolicyRow.revision)).where(AutomationPolicyRow.name == name))
            row = AutomationPolicyRow(
                name=name,
                model=model,
                revision=(last or 0) + 1,
                document=document,
                digest=digest,
                created_by=actor,
                created_by_id=actor_id,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            self._audit(
                s, actor, None, "automation.applied", f"automation:{name}", {"revision": row.revision, "digest": digest}
            )
            return _policy(row)

    def automation_policies(self, model: str | None = None) -> list[dict[str, Any]]:
        """The current (latest) revision of every policy, optionally of one model."""
        with self._tx() as s:
            latest = (
                select(AutomationPolicyRow.name, func.max(AutomationPolicyRow.revision).label("rev"))
                .group_by(AutomationPolicyRow.name)
                .subquery()
            )
            q = (
                select(AutomationPolicyRow)
                .join(
                    latest,
                    (AutomationPolicyRow.name == latest.c.name) & (AutomationPolicyRow.revision == latest.c.rev),
                )
                .order_by(AutomationPolicyRow.name)
            )
            rows = [_policy(r) for r in s.scalars(q)]
            return [r for r in rows if model is None or r["model"] == model]

    def create_automation_run(
        self, policy: dict[str, Any], trigger: dict[str, Any], tenants: list[str], step: dict[str, Any]
    ) -> dict[str, Any]:
        now = utcnow()
        with self._tx() as s:
            row = AutomationRunRow(
                policy=policy["name"],
                revision=policy["revision"],
                model=policy["model"],
                state="detected",
                trigger=trigger,
                tenants={"items": tenants},
                steps={"items": [{**step, "at": now.isoformat()}]},
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            self._audit(
                s,
                "coordinator",
                None,
                "automation.detect",
                f"automation-run:{row.id}",
                {"policy": policy["name"], "revision": policy["revision"], **step},
            )
            return _run(row)

    def add_automation_step(
        self, run_id: int, state: str, step: dict[str, Any], actor: str = "coordinator", tenant: str | None = None
    ) -> dict[str, Any]:
        """Append a step to a run and move it to ``state``; the step is an audit entry
        ``automation.<stage>``."""
        now = utcnow()
        with self._tx() as s:
            row = s.get(AutomationRunRow, run_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"automation run {run_id} not found; see `consortia automation history`.")
            row.steps = {"items": [*row.steps["items"], {**step, "at": now.isoformat(), "actor": actor}]}
            row.state, row.updated_at = state, now
            self._audit(s, actor, tenant, f"automation.{step['stage']}", f"automation-run:{row.id}", step)
            s.flush()
            return _run(row)

    def get_automation_run(self, run_id: int) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(AutomationRunRow, run_id)
            if row is None:
                raise NotFoundError(f"automation run {run_id} not found; see `consortia automation history`.")
            return _run(row)

    def automation_runs(self, states: tuple[str, ...] | None = None, policy: str | None = None) -> list[dict]:
        with self._tx() as s:
            q = select(AutomationRunRow).order_by(AutomationRunRow.id)
            if states is not None:
                q = q.where(AutomationRunRow.state.in_(states))
            if policy is not None:
                q = q.where(AutomationRunRow.policy == policy)
            return [_run(r) for r in s.scalars(q)]
