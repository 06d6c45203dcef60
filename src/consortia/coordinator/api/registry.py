"""Registry, promotion policies, approvals and the audit log over REST.

Routes that change state are ``async`` so every store write runs on the event loop
thread, one at a time: the audit log is one sequence and its appends must not race.

Permissions: everyone authenticated reads (tenant-scoped callers get redacted lineage);
``operator`` applies policies; ``approver`` (tenant-scoped) registers keys and approves;
``promoter`` promotes; ``auditor`` reads everything and changes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from consortia.coordinator.api.deps import principal_with
from consortia.coordinator.services.governance import GovernanceService
from consortia.errors import PayloadTooLargeError, PermissionDeniedError, ValidationError
from consortia.protocol.governance import ApprovalRequest, ApproverKeyCreate, PromoteRequest
from consortia.store.entities import Principal

router = APIRouter(prefix="/v1", tags=["governance"])


async def _gov(request: Request) -> GovernanceService:
    return request.app.state.governance  # type: ignore[no-any-return]


Gov = Annotated[GovernanceService, Depends(_gov)]
Reader = Annotated[Principal, principal_with("operator", "approver", "auditor", "promoter", "site")]
Editor = Annotated[Principal, principal_with("operator")]
Approver = Annotated[Principal, principal_with("approver")]
Promoter = Annotated[Principal, principal_with("promoter", admin=False)]  # its own duty, not an admin's
Auditor = Annotated[Principal, principal_with("operator", "approver", "auditor", "promoter")]


@router.get("/keys")
def coordinator_keys(gov: Gov, _: Reader) -> dict[str, str]:
    """The coordinator's public keys: audit heads (Ed25519) and releases (EC P-256)."""
    return {"audit_ed25519": gov.keys.audit_public_pem, "release_p256": gov.keys.release_public_pem}


@router.get("/registry/models")
def list_models(gov: Gov, _: Reader) -> list[dict[str, Any]]:
    return gov.list_models()


@router.get("/registry/models/{model}")
def list_versions(model: str, gov: Gov, _: Reader) -> list[dict[str, Any]]:
    return gov.list_versions(model)


@router.get("/registry/models/{model}/versions/{version}")
def show_version(model: str, version: int, gov: Gov, who: Reader) -> dict[str, Any]:
    """A version with its lineage (redacted to the caller's tenant when tenant-scoped)."""
    return gov.show(who, model, version)


@router.get("/registry/models/{model}/versions/{version}/card")
def model_card(model: str, version: int, gov: Gov, who: Reader, format: str = "json") -> Response:
    card, md = gov.card(who, model, version)
    if format == "md":
        return PlainTextResponse(md, media_type="text/markdown")
    if format != "json":
        raise ValidationError("format must be 'json' or 'md'.")
    return Response(json.dumps(card), media_type="application/json")


@router.get("/registry/models/{model}/versions/{version}/release")
def release_manifest(model: str, version: int, gov: Gov, _: Reader) -> dict[str, Any]:
    """The signed release: file digests, the model-signing bundle and the public key."""
    return gov.releases.manifest(gov.store.get_version(model, version))


@router.get("/registry/models/{model}/versions/{version}/release/files/{name:path}")
def release_file(model: str, version: int, name: str, gov: Gov, _: Reader) -> Response:
    return Response(
        gov.releases.file(gov.store.get_version(model, version), name), media_type="application/octet-stream"
    )


@router.post("/registry/models/{model}/versions/{version}/approvals", status_code=201)
async def approve(model: str, version: int, body: ApprovalRequest, gov: Gov, who: Approver) -> dict[str, Any]:
    """Record a signed approval (or rejection) for the approver's own tenant."""
    return gov.approve(who, model, version, body)


@router.post("/registry/models/{model}/versions/{version}/promote")
async def promote(model: str, version: int, body: PromoteRequest, gov: Gov, who: Promoter) -> dict[str, Any]:
    """Evaluate the model's promotion policy; promote only if every rule passes."""
    if who.tenant_id is not None:
        raise PermissionDeniedError("promotion is consortium-wide: use a promoter credential without a tenant.")
    return gov.promote(who, model, version, body)


@router.post("/policies", status_code=201)
async def apply_policy(request: Request, gov: Gov, who: Editor) -> dict[str, Any]:
    """Apply a promotion policy (JSON of the YAML document); each apply is a new revision."""
    raw = await request.body()
    if len(raw) > request.app.state.settings.max_json_bytes:
        raise PayloadTooLargeError("policy document is too large.")
    if who.tenant_id is not None:
        raise PermissionDeniedError("promotion policies are consortium-wide: use an operator without a tenant.")
    try:
        doc = json.loads(raw or b"null")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"policy is not valid JSON: {exc.msg}.") from exc
    return gov.apply_policy(who, doc)


@router.get("/policies/{model}")
def get_policy(model: str, gov: Gov, _: Reader) -> dict[str, Any]:
    return gov.get_policy(model)


@router.post("/tenants/{tenant}/approver-keys", status_code=201)
async def register_key(tenant: str, body: ApproverKeyCreate, gov: Gov, who: Approver) -> dict[str, Any]:
    """Register the tenant approver's Ed25519 public key (the private key stays with them)."""
    return gov.register_key(who, tenant, body.public_key)


@router.get("/audit/entries")
def audit_entries(
    gov: Gov,
    who: Auditor,
    after: Annotated[int, Query(ge=-1)] = -1,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> list[dict[str, Any]]:
    """Entries after ``after`` in order; other tenants' entries reach tenant-scoped callers
    as leaf hashes only."""
    return gov.audit_entries(who, after, limit)


@router.get("/audit/head")
def audit_head(gov: Gov, _: Auditor) -> dict[str, Any]:
    """The latest signed tree head (save it: `audit verify --head` detects truncation)."""
    return gov.head()


@router.get("/audit/proof/{seq}")
def audit_proof(seq: int, gov: Gov, who: Auditor, size: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
    """RFC 6962 inclusion proof of entry ``seq`` in the signed tree of ``size`` entries."""
    return gov.proof(who, seq, size)


@router.get("/audit/at")
def audit_at(gov: Gov, who: Auditor, time: datetime, tenant: str | None = None) -> dict[str, Any]:
    """Which model version was in which stage at ``time`` (ISO 8601 with zone)."""
    if time.tzinfo is None:
        raise ValidationError("time must carry a time zone, e.g. 2026-11-24T10:00:00Z.")
    return gov.stages_at(who, time, tenant)
