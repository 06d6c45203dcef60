"""Dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from consortia.coordinator.auth import authorize, hash_token
from consortia.coordinator.services.rounds import RoundService
from consortia.coordinator.services.tenants import TenantService
from consortia.errors import AuthError
from consortia.store.entities import Principal

__all__ = ["CurrentPrincipal", "RoundsDep", "TenantsDep", "principal_with"]


def _principal(request: Request) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'.")
    return request.app.state.store.principal(hash_token(token.strip()))


def principal_with(*roles: str, admin: bool = True):  # type: ignore[no-untyped-def]
    """A dependency that authenticates the caller and requires one of ``roles`` (or
    admin, unless ``admin`` is False)."""

    async def dep(request: Request) -> Principal:
        # async: a plain def would send every request through the thread pool (a thread
        # hop per dependency); the lookup is one indexed SQLite read, on the loop like
        # every other store call
        return authorize(_principal(request), roles, admin)

    return Depends(dep)


async def _rounds(request: Request) -> RoundService:
    return request.app.state.rounds  # type: ignore[no-any-return]


async def _tenants(request: Request) -> TenantService:
    return request.app.state.tenants  # type: ignore[no-any-return]


RoundsDep = Annotated[RoundService, Depends(_rounds)]
TenantsDep = Annotated[TenantService, Depends(_tenants)]
CurrentPrincipal = Annotated[Principal, principal_with("operator", "approver", "auditor", "site")]
