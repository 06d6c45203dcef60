"""Store methods for tenants, sites, enrollment and credentials (mixed into
:class:`~consortia.store.sqlstore.SqlStore`); every change is audited in its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from consortia.errors import AuthError, ConflictError, NotFoundError
from consortia.store.entities import Principal, Site, Tenant, utcnow
from consortia.store.models import CredentialRow, EnrollmentTokenRow, SiteRow, TenantRow
from consortia.store.safeguards import SafeguardStore

__all__ = ["IdentityStore"]


def _tenant(r: TenantRow) -> Tenant:
    return Tenant(r.id, r.name, r.regulated, r.created_at)


class IdentityStore(SafeguardStore):
    """Tenants, sites and credentials; expects ``_tx()`` and ``_sign`` like its base."""

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
        self, tenant_id: int, tenant: str, token_hash: str, expires_at: datetime, actor: str, kind: str = "site"
    ) -> None:
        with self._tx() as s:
            self._audit(
                s,
                actor,
                tenant,
                "enrollment_token.issued",
                tenant,
                {"expires_at": expires_at.isoformat(), "kind": kind},
            )
            s.add(
                EnrollmentTokenRow(
                    token_hash=token_hash,
                    tenant_id=tenant_id,
                    created_at=utcnow(),
                    expires_at=expires_at,
                    kind=kind,
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
            if tok.kind != "site":
                raise AuthError(f"this enrollment token is for a {tok.kind}, not a site.")
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
                c.device_id,
            )
