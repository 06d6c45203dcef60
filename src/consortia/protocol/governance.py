"""Wire schemas for the registry, approvals, promotion and the audit log.

An approval is a signed statement: the approver's tool builds an :class:`ApprovalPayload`,
signs :func:`approval_message` of it with the tenant's Ed25519 key (the private key never
leaves the approver), and sends payload and signature. The coordinator checks that the
payload names the version, stage and release digest it is posted for, that it is fresh,
that its nonce is new, and that the signature verifies with a key registered for the
approver's own tenant.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from consortia.core.audit import canonical

__all__ = [
    "APPROVAL_TYPE",
    "ApprovalPayload",
    "ApprovalRequest",
    "ApproverKeyCreate",
    "PromoteRequest",
    "approval_message",
    "new_approval",
]

APPROVAL_TYPE = "consortia.approval/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApprovalPayload(_Strict):
    type: Literal["consortia.approval/v1"] = APPROVAL_TYPE
    model: str
    version: int = Field(ge=1)
    stage: Literal["staging", "production"]
    release_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    decision: Literal["approve", "reject"]
    tenant: str
    signed_at: datetime
    nonce: str = Field(pattern=r"^[0-9a-f]{32,64}$")


def approval_message(payload: ApprovalPayload) -> bytes:
    """The exact bytes an approver signs (domain-separated canonical JSON)."""
    return b"consortia-approval/v1\n" + canonical(payload.model_dump(mode="json"))


def new_approval(
    *, model: str, version: int, stage: str, release_digest: str, decision: str, tenant: str
) -> ApprovalPayload:
    """A fresh payload: now, and a 128-bit nonce from :mod:`secrets`."""
    return ApprovalPayload.model_validate(
        {
            "model": model,
            "version": version,
            "stage": stage,
            "release_digest": release_digest,
            "decision": decision,
            "tenant": tenant,
            "signed_at": datetime.now(UTC).isoformat(),
            "nonce": secrets.token_hex(16),
        }
    )


class ApprovalRequest(_Strict):
    payload: dict[str, Any]
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="Ed25519 signature, hex")


class ApproverKeyCreate(_Strict):
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw Ed25519 public key, hex")


class PromoteRequest(_Strict):
    to: Literal["staging", "production"]
    dry_run: bool = False
