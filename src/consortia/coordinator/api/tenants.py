"""Tenants, enrollment tokens, credentials and sites. Routes that write are ``async`` so
store writes (and their audit-log appends) run one at a time on the event loop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from consortia.coordinator.api.deps import TenantsDep, principal_with
from consortia.protocol.schemas import (
    CredentialCreate,
    CredentialPublic,
    EnrollmentTokenPublic,
    EnrollRequest,
    EnrollResponse,
    SitePublic,
    SiteRelease,
    TenantCreate,
    TenantCreated,
    TenantPublic,
)
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1", tags=["tenants"])

Admin = Annotated[Principal, principal_with("admin")]
Reader = Annotated[Principal, principal_with("operator", "approver", "auditor")]
Operator = Annotated[Principal, principal_with("operator")]


@router.post("/tenants", status_code=201, response_model=TenantCreated)
async def create_tenant(body: TenantCreate, tenants: TenantsDep, who: Admin) -> TenantCreated:
    """Create a tenant; the answer holds its first one-time enrollment token."""
    return tenants.create_tenant(who, body.name, body.regulated)


@router.get("/tenants", response_model=list[TenantPublic])
def list_tenants(tenants: TenantsDep, who: Reader) -> list[TenantPublic]:
    return tenants.list_tenants(who)


@router.get("/tenants/{name}", response_model=TenantPublic)
def get_tenant(name: str, tenants: TenantsDep, who: Reader) -> TenantPublic:
    return tenants.get_tenant(who, name)


@router.post("/tenants/{name}/enrollment-tokens", status_code=201, response_model=EnrollmentTokenPublic)
async def new_enrollment(name: str, tenants: TenantsDep, who: Operator) -> EnrollmentTokenPublic:
    return tenants.new_enrollment(who, name)


@router.get("/sites", response_model=list[SitePublic])
def list_sites(tenants: TenantsDep, who: Reader, tenant: Annotated[str | None, Query()] = None) -> list[SitePublic]:
    return tenants.list_sites(who, tenant)


@router.post("/sites/{name}/release", response_model=SitePublic)
async def release_site(name: str, body: SiteRelease, tenants: TenantsDep, who: Operator) -> SitePublic:
    """Release a quarantined site (its updates were repeatedly flagged or rejected)."""
    return tenants.release_site(who, name, body.reason)


@router.post("/credentials", status_code=201, response_model=CredentialPublic)
async def create_credential(body: CredentialCreate, tenants: TenantsDep, who: Admin) -> CredentialPublic:
    return tenants.create_credential(who, body)


@router.post("/enroll", status_code=201, response_model=EnrollResponse)
async def enroll(body: EnrollRequest, tenants: TenantsDep) -> EnrollResponse:
    """Exchange a one-time enrollment token for a site credential (no bearer needed)."""
    return tenants.enroll(body.enrollment_token, body.site_name)


@router.get("/whoami")
def whoami(who: Annotated[Principal, principal_with("operator", "approver", "auditor", "promoter", "site")]) -> dict:
    """The caller's credential name, role and tenant (tools use it to fill approvals)."""
    return {"name": who.name, "role": who.role, "tenant": who.tenant, "site_id": who.site_id}
