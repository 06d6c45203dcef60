"""Tenants, enrollment and credentials."""

from __future__ import annotations

from datetime import timedelta

from consortia.coordinator.auth import check_tenant, hash_token, new_token
from consortia.coordinator.settings import Settings
from consortia.errors import ConflictError, NotFoundError, PermissionDeniedError
from consortia.protocol.schemas import (
    CredentialCreate,
    CredentialPublic,
    EnrollmentTokenPublic,
    EnrollResponse,
    SitePublic,
    TenantCreated,
    TenantPublic,
)
from consortia.store.entities import Principal, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["TenantService"]


class TenantService:
    def __init__(self, store: SqlStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def ensure_admin(self) -> str | None:
        """Create the first admin credential if none exists; returns the token or None."""
        if self.store.has_admin():
            return None
        token = new_token("admin")
        self.store.add_credential(
            token_hash=hash_token(token),
            name="admin",
            role="admin",
            tenant_id=None,
            site_id=None,
            expires_at=utcnow() + timedelta(days=3650),
            actor="coordinator",
        )
        return token

    def create_tenant(self, principal: Principal, name: str, regulated: bool) -> TenantCreated:
        t = self.store.create_tenant(name, regulated, principal.name)
        return TenantCreated(
            tenant=TenantPublic(name=t.name, regulated=t.regulated, created_at=t.created_at),
            enrollment=self._enrollment(principal, t.id, t.name),
        )

    def _enrollment(self, principal: Principal, tenant_id: int, tenant: str) -> EnrollmentTokenPublic:
        token = new_token("enroll")
        expires = utcnow() + timedelta(hours=self.settings.enrollment_ttl_hours)
        self.store.add_enrollment_token(tenant_id, tenant, hash_token(token), expires, principal.name)
        return EnrollmentTokenPublic(tenant=tenant, token=token, expires_at=expires)

    def new_enrollment(self, principal: Principal, tenant_name: str) -> EnrollmentTokenPublic:
        t = self.store.get_tenant(tenant_name)
        check_tenant(principal, t.id)
        return self._enrollment(principal, t.id, t.name)

    def list_tenants(self, principal: Principal) -> list[TenantPublic]:
        return [
            TenantPublic(name=t.name, regulated=t.regulated, created_at=t.created_at)
            for t in self.store.list_tenants(principal.tenant_id)
        ]

    def get_tenant(self, principal: Principal, name: str) -> TenantPublic:
        t = self.store.get_tenant(name)
        check_tenant(principal, t.id)
        return TenantPublic(name=t.name, regulated=t.regulated, created_at=t.created_at)

    def release_site(self, principal: Principal, name: str, reason: str) -> SitePublic:
        """Return a quarantined site to the active pool (consortium operators only)."""
        if principal.tenant_id is not None:
            raise PermissionDeniedError("only a consortium-wide operator or admin may release a quarantined site.")
        matches = [s for s in self.store.list_sites() if s.name == name]
        if not matches:
            raise NotFoundError(f"site {name!r} not found; see `consortia tenant list`.")
        site = matches[0]
        if site.status != "quarantined":
            raise ConflictError(f"site {name!r} is {site.status}, not quarantined; nothing to release.")
        self.store.set_site_status(site.id, "active", principal.name, reason)
        return next(s for s in self.list_sites(principal, None) if s.id == site.id)

    def list_sites(self, principal: Principal, tenant_name: str | None) -> list[SitePublic]:
        tenant_id = None
        if tenant_name is not None:
            t = self.store.get_tenant(tenant_name)
            check_tenant(principal, t.id)
            tenant_id = t.id
        elif principal.tenant_id is not None:
            tenant_id = principal.tenant_id
        return [
            SitePublic(
                id=s.id,
                name=s.name,
                tenant=s.tenant,
                status=s.status,
                created_at=s.created_at,
                last_seen_at=s.last_seen_at,
            )
            for s in self.store.list_sites(tenant_id)
        ]

    def enroll(self, enrollment_token: str, site_name: str) -> EnrollResponse:
        credential = new_token("site")
        expires = utcnow() + timedelta(days=self.settings.site_credential_ttl_days)
        site, tenant = self.store.enroll(hash_token(enrollment_token), site_name, hash_token(credential), expires)
        return EnrollResponse(site_id=site.id, site_name=site.name, tenant=tenant, credential=credential)

    def create_credential(self, principal: Principal, req: CredentialCreate) -> CredentialPublic:
        tenant_id = None
        if req.tenant is not None:
            tenant_id = self.store.get_tenant(req.tenant).id
        if req.role == "admin" and req.tenant is not None:
            raise PermissionDeniedError("admin credentials are consortium-wide; omit 'tenant'.")
        token = new_token(req.role)
        expires = utcnow() + timedelta(days=req.ttl_days)
        self.store.add_credential(
            token_hash=hash_token(token),
            name=req.name,
            role=req.role,
            tenant_id=tenant_id,
            site_id=None,
            expires_at=expires,
            actor=principal.name,
            tenant=req.tenant,
        )
        return CredentialPublic(name=req.name, role=req.role, tenant=req.tenant, token=token, expires_at=expires)
