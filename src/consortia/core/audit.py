"""The audit log's wire format and its verification, shared by coordinator and auditors.

An entry is hashed as an RFC 6962 leaf over its canonical JSON (sorted keys, no
whitespace). After each entry the coordinator signs the tree head
``consortia-audit-head/v1`` + size + root + time with its Ed25519 key. An auditor who
downloads the log recomputes every leaf and every root from the leaves alone, checks every
signature with the coordinator's public key, and (optionally) that the log still
contains a head it saved earlier, which catches a truncated log. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortia.core.merkle import append, leaf_hash, root_from_frontier

__all__ = ["AuditVerdict", "canonical", "entry_bytes", "head_message", "verify_entries"]

HEAD_DOMAIN = b"consortia-audit-head/v1\n"


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_bytes(
    seq: int, at: datetime, actor: str, tenant: str | None, action: str, subject: str, detail: Mapping[str, Any]
) -> bytes:
    """The bytes an audit entry's leaf hash is computed over."""
    return canonical(
        {
            "seq": seq,
            "at": at.isoformat(),
            "actor": actor,
            "tenant": tenant,
            "action": action,
            "subject": subject,
            "detail": detail,
        }
    )


def head_message(size: int, root_hex: str, at: datetime) -> bytes:
    """What the coordinator signs for the tree head after ``size`` entries."""
    return HEAD_DOMAIN + f"{size}\n{root_hex}\n{at.isoformat()}".encode()


@dataclass(frozen=True)
class AuditVerdict:
    """Result of :func:`verify_entries`: ``ok``, or the first bad entry and why."""

    ok: bool
    size: int
    root: str | None
    first_bad: int | None = None
    reason: str | None = None
    redacted: int = 0


def verify_entries(
    entries: Iterable[Mapping[str, Any]],
    public_key: Ed25519PublicKey,
    pinned: Mapping[str, Any] | None = None,
) -> AuditVerdict:
    """Check an audit log as served by ``GET /v1/audit/entries``.

    Each entry has ``seq``, ``leaf_hash``, ``root_hash``, ``at``, ``signature`` and, unless
    ``redacted``, its content (actor, tenant, action, subject, detail). The leaf is
    recomputed from the content, the root from all leaves so far, and the signature on
    each head is checked. ``pinned`` (``{"size", "root"}``), a head saved earlier, must
    still be in the log. Returns the first entry that fails.
    """
    frontier: list[bytes] = []
    size = 0
    root_hex: str | None = None
    redacted = 0
    roots: dict[int, str] = {}
    for e in entries:
        seq = int(e["seq"])
        if seq != size:
            missing = size if seq > size else seq
            return AuditVerdict(False, size, root_hex, missing, f"entry {missing} is missing (found entry {seq} next)")
        at = datetime.fromisoformat(str(e["at"]))
        if e.get("redacted"):
            leaf = bytes.fromhex(str(e["leaf_hash"]))
            redacted += 1
        else:
            leaf = leaf_hash(entry_bytes(seq, at, e["actor"], e["tenant"], e["action"], e["subject"], e["detail"]))
            if leaf.hex() != e["leaf_hash"]:
                return AuditVerdict(
                    False, size, root_hex, seq, f"entry {seq} was modified: its content no longer matches its leaf hash"
                )
        frontier = append(frontier, size, leaf)
        size += 1
        root_hex = root_from_frontier(frontier).hex()
        if root_hex != e["root_hash"]:
            return AuditVerdict(
                False,
                size - 1,
                root_hex,
                seq,
                f"entry {seq} was modified: the tree head after it does not match the recomputed root",
            )
        try:
            public_key.verify(bytes.fromhex(str(e["signature"])), head_message(size, root_hex, at))
        except (InvalidSignature, ValueError):
            return AuditVerdict(
                False,
                size - 1,
                root_hex,
                seq,
                f"entry {seq}: the signature on the tree head after it is not the coordinator's",
            )
        roots[size] = root_hex
    if pinned is not None:
        want_size, want_root = int(pinned["size"]), str(pinned["root"])
        if want_size > size:
            return AuditVerdict(
                False,
                size,
                root_hex,
                size,
                f"the log has {size} entries but a saved head covers "
                f"{want_size}: entries {size}..{want_size - 1} were deleted",
            )
        if want_size > 0 and roots.get(want_size) != want_root:
            return AuditVerdict(
                False,
                size,
                root_hex,
                None,
                f"the saved head for size {want_size} does not match the log: history was rewritten",
            )
    return AuditVerdict(True, size, root_hex, redacted=redacted)
