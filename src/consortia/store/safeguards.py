"""Store methods for aggregation safeguards: the differential-privacy ledger and site
quarantine (mixed into :class:`~consortia.store.sqlstore.SqlStore`; every change is
audited in its transaction)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from consortia.errors import ConflictError, NotFoundError
from consortia.store.automation import AutomationStore
from consortia.store.entities import utcnow
from consortia.store.models import DpLedgerRow, SiteRow, TenantRow

__all__ = ["SafeguardStore"]

SITE_STATES = ("active", "quarantined")


class SafeguardStore(AutomationStore):
    def ledger(self, model: str, tenants: list[str] | None = None) -> list[dict[str, Any]]:
        """Every ledger entry for ``model`` (optionally only these tenants), oldest first."""
        with self._tx() as s:
            q = select(DpLedgerRow).where(DpLedgerRow.model == model).order_by(DpLedgerRow.id)
            if tenants is not None:
                q = q.where(DpLedgerRow.tenant.in_(tenants))
            return [
                {
                    "tenant": r.tenant,
                    "model": r.model,
                    "job_id": r.job_id,
                    "q": r.q,
                    "noise_multiplier": r.noise_multiplier,
                    "rounds": r.rounds,
                    "updated_at": r.updated_at.isoformat(),
                }
                for r in s.scalars(q)
            ]

    def charge_round(self, job_id: int, model: str, tenants: list[str], q: float, z: float, epsilon: dict) -> None:
        """Add one DP round of job ``job_id`` to each tenant's ledger for ``model``."""
        now = utcnow()
        with self._tx() as s:
            for tenant in tenants:
                row = s.scalar(
                    select(DpLedgerRow).where(
                        DpLedgerRow.tenant == tenant, DpLedgerRow.model == model, DpLedgerRow.job_id == job_id
                    )
                )
                if row is None:
                    row = DpLedgerRow(
                        tenant=tenant, model=model, job_id=job_id, q=q, noise_multiplier=z, rounds=0, updated_at=now
                    )
                    s.add(row)
                if (row.q, row.noise_multiplier) != (q, z):
                    raise ConflictError(f"job {job_id} changed its DP parameters mid-job; refusing to charge.")
                row.rounds += 1
                row.updated_at = now
                s.flush()
                self._audit(
                    s,
                    "coordinator",
                    tenant,
                    "privacy.round_charged",
                    f"job:{job_id}",
                    {"model": model, "rounds": row.rounds, "q": q, "noise_multiplier": z, "epsilon": epsilon[tenant]},
                )

    def set_site_status(self, site_id: int, status: str, actor: str, reason: str) -> bool:
        """Set a site's status (``active`` or ``quarantined``); False if it already was."""
        if status not in SITE_STATES:
            raise ConflictError(f"site status {status!r} is not one of {SITE_STATES}.")
        with self._tx() as s:
            row = s.get(SiteRow, site_id)
            if row is None:
                raise NotFoundError(f"site {site_id} not found.")
            if row.status == status:
                return False
            tenant = s.get(TenantRow, row.tenant_id)
            row.status = status
            event = "site.quarantined" if status == "quarantined" else "site.released"
            self._audit(s, actor, tenant.name if tenant else None, event, f"site:{row.name}", {"reason": reason})
            return True
