"""Bearer credentials: generation, hashing and role checks.

Tokens are 256-bit values from :mod:`secrets` with a readable prefix (``cst_admin_``,
``cst_site_``, ``cst_enroll_``). Only their SHA-256 is stored: with that much entropy a
salted slow hash adds nothing, and lookups stay O(1).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from consortia.errors import AuthError, PermissionDeniedError
from consortia.store.entities import Principal, utcnow

__all__ = ["ROLES", "authorize", "check_tenant", "hash_token", "new_token"]

ROLES = ("admin", "operator", "approver", "auditor", "promoter", "site", "device")


def new_token(kind: str) -> str:
    """A fresh random bearer token, e.g. ``cst_site_Yx3...``."""
    return f"cst_{kind}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authorize(principal: Principal | None, roles: Iterable[str], admin: bool = True) -> Principal:
    """Raise unless ``principal`` is valid and holds one of ``roles`` (admin may too,
    unless ``admin`` is False: separated duties such as promotion)."""
    if principal is None:
        raise AuthError("missing or unknown credential: send 'Authorization: Bearer <token>'.")
    if principal.revoked:
        raise AuthError("this credential was revoked; ask the consortium admin for a new one.")
    if principal.expires_at < utcnow():
        raise AuthError("this credential has expired; ask the consortium admin for a new one.")
    allowed = set(roles) | ({"admin"} if admin else set())
    if principal.role not in allowed:
        raise PermissionDeniedError(f"role {principal.role!r} may not do this; it needs one of {sorted(allowed)}.")
    return principal


def check_tenant(principal: Principal, tenant_id: int) -> None:
    """Raise :class:`PermissionDeniedError` if a tenant-scoped principal reaches across."""
    if principal.tenant_id is not None and principal.tenant_id != tenant_id:
        raise PermissionDeniedError(
            f"credential {principal.name!r} belongs to tenant {principal.tenant!r} "
            "and cannot read or act for another tenant."
        )
