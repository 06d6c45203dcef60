"""Registry reads, releases, promotion policies, signed approvals, promotion and the
audit log's read side.

Scoping: consortium-wide credentials see everything. A tenant-scoped credential (a
site, a tenant's approver or auditor) sees every version's summary (stage, hashes,
which tenants contributed, pooled metrics) but the lineage details (fingerprints, row
counts, per-tenant metrics) of its own tenant only; audit entries of other tenants reach
it as leaf hashes, which is still enough to verify the whole log.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError as PydanticValidationError

from consortia.coordinator.auth import check_tenant
from consortia.coordinator.keys import CoordinatorKeys
from consortia.coordinator.services.lineage import card_markdown, contributors, model_card
from consortia.coordinator.services.releases import ReleaseBuilder
from consortia.coordinator.tufrepo import TufRepository
from consortia.core.audit import canonical
from consortia.core.merkle import inclusion_proof, root
from consortia.core.promotion import Facts, PromotionPolicy, evaluate
from consortia.errors import ConflictError, NotFoundError, PermissionDeniedError, ValidationError
from consortia.protocol.governance import ApprovalPayload, ApprovalRequest, PromoteRequest, approval_message
from consortia.store.blobs import BlobStore
from consortia.store.entities import AuditEntry, ModelVersion, Principal, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["APPROVAL_MAX_SKEW", "RETAIN_PER_MODEL", "GovernanceService", "signing_key"]

log = logging.getLogger("consortia.coordinator.governance")

APPROVAL_MAX_SKEW = timedelta(minutes=10)


def _errors(exc: PydanticValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors()[:8])


RETAIN_PER_MODEL = 3  # newest signed versions per model kept in the TUF repository


class GovernanceService:
    def __init__(
        self, store: SqlStore, blobs: BlobStore, keys: CoordinatorKeys, release_root: Path, tuf: TufRepository
    ) -> None:
        self.store = store
        self.keys = keys
        self.releases = ReleaseBuilder(release_root, blobs, keys)
        self.tuf = tuf

    # ------------------------------------------------------------------ releases

    def ensure_release(self, v: ModelVersion) -> ModelVersion:
        """Build and sign the release, then publish it in the TUF repository for devices."""
        digest, files = self.releases.build(v)
        self.sync_tuf({(v.model, v.version)})
        self.store.set_release(v, digest, {"files": files, "tuf_targets_version": self.tuf.targets.signed.version})
        return self.store.get_version(v.model, v.version)

    def recover(self) -> None:
        """Sign (and publish) releases of versions registered just before a crash, and
        publish signed releases the TUF repository lacks."""
        for v in self.store.versions_without_release():
            log.warning("signing the release of %s (missing after a restart)", v.ref)
            self.ensure_release(v)
        self.sync_tuf()

    def live_releases(self, extra: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], Path]:
        """Releases devices may need, with their bundle directories: the newest
        :data:`RETAIN_PER_MODEL` signed versions of each model, every staging or
        production version, every release a device is instructed to run, and the
        releases of running or paused rollouts (target and previous), plus ``extra``."""
        live = set(extra or ())
        for name, _, _ in self.store.list_models():
            signed = [v for v in self.store.list_versions(name) if v.release_digest]
            signed.sort(key=lambda v: v.version)
            live |= {(v.model, v.version) for v in signed[-RETAIN_PER_MODEL:]}
            live |= {(v.model, v.version) for v in signed if v.stage in ("staging", "production")}
        for d in self.store.list_devices():
            rel = ((d.instruction or {}).get("instruction") or {}).get("release")
            if rel:
                live.add((rel["model"], int(rel["version"])))
        for r in self.store.list_rollouts():
            if r["state"] in ("running", "paused"):
                live.add((r["model"], int(r["version"])))
                prev = r["progress"].get("previous")
                if prev:
                    live.add((prev["model"], int(prev["version"])))
        out = {}
        for model, version in live:
            bundle = self.releases.root / model / str(version) / "bundle"
            if (bundle / "manifest.json").is_file():
                out[(model, version)] = bundle
        return out

    def sync_tuf(self, extra: set[tuple[str, int]] | None = None) -> None:
        """Publish the live releases (see :meth:`live_releases`) and retire the rest from
        the TUF repository."""
        published, retired = self.tuf.sync_releases(self.live_releases(extra))
        if retired:
            log.info("TUF repository: published %s, retired %s", published, retired)

    # ------------------------------------------------------------------ reads

    def _redact(self, principal: Principal, lineage: dict[str, Any]) -> dict[str, Any]:
        if principal.tenant is None:
            return lineage
        own = principal.tenant
        lin = copy.deepcopy(lineage)
        mine = set(lin["tenants"].get(own, {}).get("sites", []))
        for r in lin["rounds"]:
            r["fingerprints"] = {s: fp for s, fp in r["fingerprints"].items() if s in mine}
            r["examples"] = {s: n for s, n in r["examples"].items() if s in mine}
            r["sites"] = [s for s in r["sites"] if s in mine]
        lin["tenants"] = {t: (d if t == own else {"redacted": True}) for t, d in lin["tenants"].items()}
        per = lin["metrics"]["per_tenant"]
        lin["metrics"]["per_tenant"] = {t: (m if t == own else {"redacted": True}) for t, m in per.items()}
        lin["job"]["spec"] = {k: v for k, v in lin["job"]["spec"].items() if k != "tenants"}
        comp = lin.get("composite")
        if comp and comp["adapter"]["tenant"] != own:
            comp["base"]["metrics_at_site"] = {"redacted": True}
        lin["redacted_for"] = own
        return lin

    def list_models(self) -> list[dict[str, Any]]:
        return [{"name": n, "latest": latest, "stages": stages} for n, latest, stages in self.store.list_models()]

    def summary(self, v: ModelVersion) -> dict[str, Any]:
        return {
            "model": v.model,
            "version": v.version,
            "stage": v.stage,
            "job_id": v.job_id,
            "params_hash": v.params_hash,
            "release_digest": v.release_digest,
            "signed": v.release_digest is not None,
            "created_at": v.created_at.isoformat(),
            "tenants": sorted(v.lineage["tenants"]),
            "pooled": v.lineage["metrics"]["pooled"],
        }

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        return [self.summary(v) for v in self.store.list_versions(model)]

    def _approvals(self, v: ModelVersion) -> list[dict[str, Any]]:
        return [
            {
                "tenant": a.tenant,
                "stage": a.stage,
                "decision": a.decision,
                "signed_at": a.signed_at.isoformat(),
                "key": a.key_fingerprint,
                "actor": a.actor,
            }
            for a in self.store.approvals(v)
        ]

    def show(self, principal: Principal, model: str, version: int | None) -> dict[str, Any]:
        v = self.store.get_version(model, version)
        return {
            **self.summary(v),
            "lineage": self._redact(principal, v.lineage),
            "stage_history": self.store.stage_history(v),
            "approvals": self._approvals(v),
        }

    def card(self, principal: Principal, model: str, version: int | None) -> tuple[dict[str, Any], str]:
        v = self.store.get_version(model, version)
        redacted = ModelVersion(
            v.id,
            v.model,
            v.version,
            v.job_id,
            v.params_hash,
            self._redact(principal, v.lineage),
            v.stage,
            v.release_digest,
            v.created_at,
        )
        card = model_card(redacted, self._approvals(v))
        return card, card_markdown(card)

    # ------------------------------------------------------------------ policies

    def apply_policy(self, principal: Principal, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise ValidationError("a promotion policy must be a mapping with 'model' and 'stages'.")
        try:
            policy = PromotionPolicy.model_validate(raw)
        except PydanticValidationError as exc:
            raise ValidationError(f"invalid promotion policy: {_errors(exc)}") from exc
        doc = policy.model_dump(mode="json")
        digest = hashlib.sha256(canonical(doc)).hexdigest()
        p = self.store.apply_policy(policy.model, doc, digest, principal.name)
        return {"model": p.model, "revision": p.revision, "digest": p.digest, "stages": sorted(policy.stages)}

    def get_policy(self, model: str) -> dict[str, Any]:
        p = self.store.current_policy(model)
        if p is None:
            raise NotFoundError(f"no promotion policy for {model!r}; apply one with `consortia policy apply FILE`.")
        return {
            "model": p.model,
            "revision": p.revision,
            "digest": p.digest,
            "document": p.document,
            "applied_by": p.actor,
            "applied_at": p.created_at.isoformat(),
        }

    # ------------------------------------------------------------------ approver keys and approvals

    def register_key(self, principal: Principal, tenant: str, public_hex: str) -> dict[str, Any]:
        t = self.store.get_tenant(tenant)
        if principal.role != "approver" or principal.tenant_id is None:
            raise PermissionDeniedError("only a tenant's own approver credential registers that tenant's approval key.")
        check_tenant(principal, t.id)
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        except ValueError as exc:
            raise ValidationError("public_key is not a valid Ed25519 public key (32 bytes, hex).") from exc
        fp = hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()
        self.store.add_approver_key(t.id, t.name, public_hex, fp, principal.name)
        return {"tenant": t.name, "fingerprint": fp}

    def approve(self, principal: Principal, model: str, version: int, req: ApprovalRequest) -> dict[str, Any]:
        v = self.store.get_version(model, version)
        if principal.tenant_id is None or principal.tenant is None:
            raise PermissionDeniedError("approvals are per tenant: use an approver credential scoped to your tenant.")
        try:
            payload = ApprovalPayload.model_validate(req.payload)
        except PydanticValidationError as exc:
            raise ValidationError(f"invalid approval payload: {_errors(exc)}") from exc
        if payload.tenant != principal.tenant:
            raise PermissionDeniedError(
                f"credential {principal.name!r} approves for tenant {principal.tenant!r} only, "
                f"not for {payload.tenant!r}."
            )
        if (payload.model, payload.version) != (v.model, v.version):
            raise ConflictError(
                f"this approval was signed for {payload.model}:{payload.version}, not {v.ref}: a replay is refused."
            )
        if v.release_digest is None or payload.release_digest != v.release_digest:
            raise ConflictError(
                f"this approval signs release digest {payload.release_digest[:16]}..., but {v.ref}'s "
                f"signed release is {str(v.release_digest)[:16]}...: sign the current release."
            )
        now = utcnow()
        signed_at = payload.signed_at
        if signed_at.tzinfo is None:
            raise ValidationError("signed_at must carry a time zone.")
        if abs(now - signed_at) > APPROVAL_MAX_SKEW:
            raise ConflictError(
                f"approval signed at {signed_at.isoformat()} is not fresh (more than "
                f"{APPROVAL_MAX_SKEW} from the coordinator's clock): sign a new one."
            )
        keys = self.store.approver_keys(principal.tenant_id)
        if not keys:
            raise ConflictError(f"tenant {principal.tenant!r} has no approval key; run `consortia approver keygen`.")
        fp = signing_key(keys, approval_message(payload), req.signature)
        if fp is not None:
            self.store.record_approval(
                v,
                stage=payload.stage,
                tenant_id=principal.tenant_id,
                tenant=principal.tenant,
                decision=payload.decision,
                nonce=payload.nonce,
                signed_at=signed_at,
                payload=payload.model_dump(mode="json"),
                signature=req.signature,
                key_fingerprint=fp,
                actor=principal.name,
            )
            return {
                "model": v.model,
                "version": v.version,
                "stage": payload.stage,
                "tenant": principal.tenant,
                "decision": payload.decision,
                "key": fp,
            }
        raise PermissionDeniedError(
            f"the signature does not verify with any approval key of tenant {principal.tenant!r}: forged or "
            "signed with another key."
        )

    # ------------------------------------------------------------------ promotion

    def _facts(self, v: ModelVersion, stage: str) -> Facts:
        lin = v.lineage
        pooled = lin["metrics"]["pooled"]
        prod = self.store.production_version(v.model)
        prod_pooled = None
        if prod is not None and prod.id != v.id:
            pp = prod.lineage["metrics"]["pooled"]
            prod_pooled = {"auc": pp.get("pooled_auc"), "accuracy": pp.get("pooled_accuracy")}
        latest: dict[str, str] = {}
        for a in self.store.approvals(v, stage):
            latest[a.tenant] = a.decision
        regulated = {t.name for t in self.store.list_tenants() if t.regulated}
        return Facts(
            stage=v.stage,
            pooled={"auc": pooled.get("pooled_auc"), "accuracy": pooled.get("pooled_accuracy")},
            per_tenant=lin["metrics"]["per_tenant"],
            contributors=contributors(lin),
            regulated=regulated,
            fairness=lin["metrics"].get("fairness"),
            production_pooled=prod_pooled,
            epsilon_spent=lin["privacy"].get("epsilon_spent"),
            signed=v.release_digest is not None,
            approvals=latest,
        )

    def promote(self, principal: Principal, model: str, version: int, req: PromoteRequest) -> dict[str, Any]:
        v = self.store.get_version(model, version)
        policy = self.store.current_policy(model)
        if policy is None:
            raise ConflictError(f"no promotion policy for {model!r}; apply one with `consortia policy apply FILE`.")
        stages = PromotionPolicy.model_validate(policy.document).stages
        if req.to not in stages:
            raise ConflictError(
                f"policy revision {policy.revision} for {model!r} has no stage {req.to!r} "
                f"(it defines {sorted(stages)})."
            )
        results = evaluate(req.to, stages[req.to], self._facts(v, req.to))
        passed = all(r.passed for r in results)
        evaluation = {
            "policy_revision": policy.revision,
            "policy_digest": policy.digest,
            "rules": [r.as_dict() for r in results],
            "passed": passed,
        }
        self.store.audit(
            principal.name,
            None,
            "policy.evaluated",
            v.ref,
            {
                "to": req.to,
                "passed": passed,
                "dry_run": req.dry_run,
                "policy_revision": policy.revision,
                "failed": [r.rule for r in results if not r.passed],
            },
        )
        promoted = passed and not req.dry_run
        if promoted:
            v = self.store.promote(v, req.to, principal.name, evaluation)
        return {
            "model": model,
            "version": version,
            "to": req.to,
            "stage": v.stage,
            "promoted": promoted,
            "dry_run": req.dry_run,
            **evaluation,
        }

    # ------------------------------------------------------------------ audit log

    def audit_entries(self, principal: Principal, after: int, limit: int) -> list[dict[str, Any]]:
        out = []
        for e in self.store.audit_entries(after, limit):
            d: dict[str, Any] = {
                "seq": e.seq,
                "at": e.at.isoformat(),
                "leaf_hash": e.leaf_hash,
                "root_hash": e.root_hash,
                "signature": e.signature,
            }
            if principal.tenant is None or e.tenant == principal.tenant:
                d.update(actor=e.actor, tenant=e.tenant, action=e.action, subject=e.subject, detail=e.detail)
            else:
                d["redacted"] = True
            out.append(d)
        return out

    def head(self) -> dict[str, Any]:
        e = self.store.audit_head()
        if e is None:
            return {"size": 0, "root": None}
        return {
            "size": e.seq + 1,
            "root": e.root_hash,
            "at": e.at.isoformat(),
            "signature": e.signature,
            "public_key": self.keys.audit_public_pem,
        }

    def proof(self, principal: Principal, seq: int, size: int | None) -> dict[str, Any]:
        head = self.store.audit_head(size)
        if head is None or (size is not None and head.seq != size - 1):
            raise NotFoundError(f"no signed tree head of size {size}; see `consortia audit head`.")
        n = head.seq + 1
        if not 0 <= seq < n:
            raise ValidationError(f"entry {seq} is not in a log of {n} entries.")
        leaves = self.store.audit_leaves(n)
        if root(leaves).hex() != head.root_hash:
            raise ConflictError("the stored log does not match its signed head: run `consortia audit verify`.")
        entries = self.audit_entries(principal, seq - 1, 1)
        return {
            "seq": seq,
            "size": n,
            "leaf_hash": leaves[seq].hex(),
            "root": head.root_hash,
            "at": head.at.isoformat(),
            "signature": head.signature,
            "proof": [h.hex() for h in inclusion_proof(seq, leaves)],
            "entry": entries[0],
        }

    def stages_at(self, principal: Principal, when: datetime, tenant: str | None) -> dict[str, Any]:
        """Which version of each model was in which stage at ``when``, replayed from the
        audit log (``tenant``: only versions trained with that tenant's data)."""
        if tenant is not None:
            check_tenant(principal, self.store.get_tenant(tenant).id)
        stage: dict[str, str] = {}
        tenants_of: dict[str, list[str]] = {}
        last: AuditEntry | None = None
        for e in self.store.iter_audit():
            if e.at > when:
                break
            last = e
            if e.action == "model.registered":
                stage[e.subject] = "candidate"
                tenants_of[e.subject] = list(e.detail.get("tenants", []))
            elif e.action == "model.stage_changed":
                stage[e.subject] = str(e.detail["to"])
        rows = []
        for ref, st in sorted(stage.items()):
            if tenant is not None and tenant not in tenants_of.get(ref, []):
                continue
            model, _, ver = ref.partition(":")
            rows.append({"model": model, "version": int(ver), "stage": st, "tenants": tenants_of.get(ref, [])})
        return {
            "at": when.isoformat(),
            "tenant": tenant,
            "log_size": 0 if last is None else last.seq + 1,
            "versions": rows,
        }


def signing_key(keys: list[tuple[str, str]], message: bytes, signature_hex: str) -> str | None:
    """The fingerprint of the tenant approver key (``(public hex, fingerprint)`` pairs)
    whose Ed25519 signature over ``message`` verifies, or None."""
    signature = bytes.fromhex(signature_hex)
    for public_hex, fp in keys:
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, message)
        except InvalidSignature:
            continue
        return fp
    return None
