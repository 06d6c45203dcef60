"""Consortia's exception tree.

Every error a user can see derives from :class:`ConsortiaError` and carries a short
machine-readable ``code`` and a message that says what was wrong and what to do::

    ConsortiaError
    ├── ValidationError          input that does not meet its contract (spec, update, data)
    │   ├── SpecError            a job spec field is wrong (names the field)
    │   ├── UpdateError          a model update is malformed (shape, dtype, NaN/Inf, size)
    │   ├── SchemaMismatchError  a site's data does not match the job's declared schema
    │   └── ReleaseError         a release bundle is partial, mixed, tampered or fails its smoke test
    ├── AuthError                missing, malformed, expired or revoked credential (401)
    ├── PermissionDeniedError    authenticated but not allowed, e.g. another tenant (403)
    ├── NotFoundError            no such object, or not visible to the caller (404)
    ├── ConflictError            the request contradicts current state (409)
    ├── PayloadTooLargeError     body over the configured limit (413)
    ├── StrategyError            an aggregation strategy's precondition does not hold
    └── CoordinatorUnavailable   the site/CLI could not reach the coordinator
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConflictError",
    "ConsortiaError",
    "CoordinatorUnavailable",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ReleaseError",
    "SchemaMismatchError",
    "SpecError",
    "StrategyError",
    "UpdateError",
    "ValidationError",
]


class ConsortiaError(Exception):
    """Base of every Consortia error; ``status`` is the HTTP status it maps to."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(ConsortiaError):
    """Input does not meet its contract."""

    code = "invalid_input"
    status = 422


class SpecError(ValidationError):
    """A job spec is invalid; the message names the offending field."""

    code = "invalid_spec"


class UpdateError(ValidationError):
    """A model update is malformed: wrong names, shapes, dtype, non-finite values."""

    code = "invalid_update"


class SchemaMismatchError(ValidationError):
    """A site's local data does not match the job's declared feature schema."""

    code = "schema_mismatch"


class ReleaseError(ValidationError):
    """A release bundle cannot be trusted or run: a part is missing, extra, of the wrong
    hash or size, or the bundle fails its signed smoke test."""

    code = "bad_release"


class AuthError(ConsortiaError):
    """The credential is missing, malformed, unknown, expired or revoked."""

    code = "unauthenticated"
    status = 401


class PermissionDeniedError(ConsortiaError):
    """The caller is authenticated but may not do this (wrong role or tenant)."""

    code = "forbidden"
    status = 403


class NotFoundError(ConsortiaError):
    """The object does not exist or is not visible to the caller."""

    code = "not_found"
    status = 404


class ConflictError(ConsortiaError):
    """The request contradicts the current state (e.g. a closed round)."""

    code = "conflict"
    status = 409


class PayloadTooLargeError(ConsortiaError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"
    status = 413


class StrategyError(ConsortiaError):
    """An aggregation strategy was configured or called outside its preconditions."""

    code = "strategy_error"
    status = 422


class CoordinatorUnavailable(ConsortiaError):
    """The coordinator could not be reached (connection refused, timeout, 5xx)."""

    code = "coordinator_unavailable"
    status = 503
