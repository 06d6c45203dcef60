"""Client-side governance operations, used by the CLI and the demo: approver keys,
signed approvals, release verification and audit-log verification.

Everything here runs on the approver's or auditor's side and trusts the coordinator for
nothing it can check itself: approvals are signed with a private key that never leaves
this machine; releases and the audit log are verified locally against public keys
(pinned from a file when given).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from consortia.core.audit import AuditVerdict, head_message, verify_entries
from consortia.core.merkle import verify_inclusion
from consortia.errors import ValidationError
from consortia.protocol.automation import automation_approval_message, new_automation_approval
from consortia.protocol.governance import ApprovalRequest, approval_message, new_approval

__all__ = [
    "download_release",
    "parse_ref",
    "parse_versioned_ref",
    "statement_digest",
    "verify_release",
    "keygen",
    "load_private_key",
    "sign_approval",
    "sign_automation_approval",
    "verify_audit",
    "verify_proof",
]


def keygen(path: Path) -> tuple[Ed25519PrivateKey, str]:
    """Create an Ed25519 key at ``path`` (PEM, mode 0600; refuses to overwrite)."""
    if path.exists():
        raise ValidationError(f"{path} already exists; refusing to overwrite a private key.")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, raw.hex()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    if not path.is_file():
        raise ValidationError(f"key file {path} not found; create one with `consortia approver keygen --key FILE`.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValidationError(f"{path} is not an Ed25519 key; approvals are Ed25519 signatures.")
    return key


def sign_approval(
    client: Any, key: Ed25519PrivateKey, model: str, version: int, stage: str, decision: str = "approve"
) -> ApprovalRequest:
    """Build and sign an approval of ``model:version`` for ``stage`` as the caller's tenant,
    over the version's current release digest."""
    me = client.get_json("/v1/whoami")
    if not me.get("tenant"):
        raise ValidationError("approvals are per tenant: use an approver credential scoped to your tenant.")
    v = client.get_json(f"/v1/registry/models/{model}/versions/{version}")
    if not v["release_digest"]:
        raise ValidationError(f"{model}:{version} has no signed release yet; nothing to approve.")
    payload = new_approval(
        model=model,
        version=version,
        stage=stage,
        release_digest=v["release_digest"],
        decision=decision,
        tenant=me["tenant"],
    )
    signature = key.sign(approval_message(payload)).hex()
    return ApprovalRequest(payload=payload.model_dump(mode="json"), signature=signature)


def _audit_key(client: Any, pinned: Path | None) -> Ed25519PublicKey:
    pem = pinned.read_bytes() if pinned is not None else client.get_json("/v1/keys")["audit_ed25519"].encode()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValidationError("the audit public key is not an Ed25519 key.")
    return key


def verify_audit(client: Any, public_key: Path | None = None, head: dict[str, Any] | None = None) -> AuditVerdict:
    """Download the whole log page by page and verify it locally."""
    entries: list[dict[str, Any]] = []
    after = -1
    while True:
        page = client.get_json("/v1/audit/entries", params={"after": after, "limit": 5000})
        if not page:
            break
        entries.extend(page)
        after = page[-1]["seq"]
    return verify_entries(entries, _audit_key(client, public_key), head)


def verify_proof(client: Any, seq: int, size: int | None = None, public_key: Path | None = None) -> dict[str, Any]:
    """Fetch an inclusion proof and check it (and the head's signature) locally."""
    from datetime import datetime

    params = {"size": size} if size else {}
    p = client.get_json(f"/v1/audit/proof/{seq}", params=params)
    key = _audit_key(client, public_key)
    ok = verify_inclusion(
        bytes.fromhex(p["leaf_hash"]),
        p["seq"],
        p["size"],
        [bytes.fromhex(h) for h in p["proof"]],
        bytes.fromhex(p["root"]),
    )
    try:
        key.verify(bytes.fromhex(p["signature"]), head_message(p["size"], p["root"], datetime.fromisoformat(p["at"])))
        signed = True
    except Exception:
        signed = False
    return {**p, "verified": ok and signed, "inclusion_ok": ok, "head_signature_ok": signed}


def download_release(client: Any, model: str, version: int, directory: Path) -> tuple[Path, Path, Path, str]:
    """Fetch a release's files, its signature bundle and the coordinator's release key
    into ``directory``; returns (bundle dir, signature, public key, release digest)."""
    m = client.get_json(f"/v1/registry/models/{model}/versions/{version}/release")
    bundle = directory / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    for name in m["files"]:
        if name.startswith("/") or ".." in Path(name).parts:
            raise ValidationError(f"the release lists a file outside its bundle: {name!r}.")
        data = client.request("GET", f"/v1/registry/models/{model}/versions/{version}/release/files/{name}").content
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
    sig = directory / "model.sig"
    sig.write_text(json.dumps(m["signature"]))
    pub = directory / "release-p256.pub.pem"
    pub.write_text(m["public_key"])
    return bundle, sig, pub, m["release_digest"]


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` -> (name, version or None)."""
    name, _, version = ref.partition(":")
    if not name:
        raise ValidationError(f"{ref!r} is not NAME or NAME:VERSION.")
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValidationError(f"version in {ref!r} must be a positive integer, e.g. {name}:1.")
    return name, int(version)


def parse_versioned_ref(ref: str) -> tuple[str, int]:
    """``NAME:VERSION`` -> (name, version); a bare name is an error that shows the form."""
    name, version = parse_ref(ref)
    if version is None:
        raise ValidationError(f"give NAME:VERSION (e.g. {name}:1), not {ref!r}.")
    return name, version


def statement_digest(signature_bundle: bytes) -> tuple[str, dict[str, str]]:
    """The subject digest and per-file digests from a model-signing bundle."""
    bundle = json.loads(signature_bundle)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    files = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    return str(statement["subject"][0]["digest"]["sha256"]), files


def verify_release(directory: Path, signature: Path, public_key: Path) -> None:
    """Verify with the model-signing package; raises :class:`ValidationError` on failure."""
    import model_signing

    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(directory, signature)
    except Exception as exc:  # the package raises ValueError and friends
        raise ValidationError(f"release signature does not verify: {exc}") from exc


def sign_automation_approval(
    client: Any, key: Ed25519PrivateKey, run_id: int, decision: str = "approve"
) -> ApprovalRequest:
    """Build and sign a gate decision on automation run ``run_id`` as the caller's tenant,
    over the run's policy revision digest."""
    me = client.get_json("/v1/whoami")
    if not me.get("tenant"):
        raise ValidationError("gate approvals are per tenant: use an approver credential scoped to your tenant.")
    run = client.get_json(f"/v1/automation/runs/{run_id}")
    payload = new_automation_approval(run=run, decision=decision, tenant=me["tenant"])
    signature = key.sign(automation_approval_message(payload)).hex()
    return ApprovalRequest(payload=payload.model_dump(mode="json"), signature=signature)
