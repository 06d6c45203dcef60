"""Store methods for governance: the audit log, the registry, policies and approvals.

Mixed into :class:`~consortia.store.sqlstore.SqlStore`. Every state change appends to the
audit log *in the same transaction*, so a change without its audit entry (or an entry
without its change) cannot be committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consortia.core.audit import canonical, entry_bytes, head_message
from consortia.core.merkle import append, leaf_hash, root_from_frontier
from consortia.errors import ConflictError, NotFoundError
from consortia.store.entities import Approval, AuditEntry, ModelVersion, Policy, utcnow
from consortia.store.models import (
    ApprovalRow,
    ApproverKeyRow,
    AuditRow,
    ModelVersionRow,
    PolicyRow,
    RegisteredModelRow,
    StageTransitionRow,
    TenantRow,
)

__all__ = ["STAGES", "GovernanceStore", "append_audit"]

STAGES = ("candidate", "staging", "production", "archived")

HeadSigner = Callable[[bytes], bytes]


def append_audit(
    s: Session,
    sign: HeadSigner,
    *,
    actor: str,
    tenant: str | None,
    action: str,
    subject: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append one entry to the Merkle audit log inside the caller's transaction; returns
    its sequence number. The next seq is dense, and the primary key makes two racing
    appends conflict instead of forking the log."""
    last = s.scalar(select(AuditRow).order_by(AuditRow.seq.desc()).limit(1))
    seq = 0 if last is None else last.seq + 1
    frontier = [] if last is None else [bytes.fromhex(h) for h in last.frontier]
    at = utcnow()
    clean = json.loads(canonical(detail or {}))  # exactly what a reader will get back
    leaf = leaf_hash(entry_bytes(seq, at, actor, tenant, action, subject, clean))
    frontier = append(frontier, seq, leaf)
    root = root_from_frontier(frontier).hex()
    s.add(
        AuditRow(
            seq=seq,
            at=at,
            actor=actor,
            tenant=tenant,
            action=action,
            subject=subject,
            detail=clean,
            leaf_hash=leaf.hex(),
            root_hash=root,
            frontier=[h.hex() for h in frontier],
            signature=sign(head_message(seq + 1, root, at)).hex(),
        )
    )
    s.flush()
    return seq


def _entry(r: AuditRow) -> AuditEntry:
    return AuditEntry(
        r.seq, r.at, r.actor, r.tenant, r.action, r.subject, r.detail, r.leaf_hash, r.root_hash, r.signature
    )


def _version(r: ModelVersionRow, model: str) -> ModelVersion:
    return ModelVersion(
        r.id, model, r.version, r.job_id, r.params_hash, r.lineage, r.stage, r.release_digest, r.created_at
    )


class GovernanceStore:
    """Governance persistence; expects ``_tx()`` and ``_sign`` from the concrete store."""

    _sign: HeadSigner

    def _tx(self) -> AbstractContextManager[Session]:  # pragma: no cover - provided by SqlStore
        raise NotImplementedError

    def _audit(
        self,
        s: Session,
        actor: str,
        tenant: str | None,
        action: str,
        subject: str,
        detail: dict[str, Any] | None = None,
    ) -> int:
        return append_audit(s, self._sign, actor=actor, tenant=tenant, action=action, subject=subject, detail=detail)

    # ------------------------------------------------------------------ audit log

    def audit(
        self, actor: str, tenant: str | None, action: str, subject: str, detail: dict[str, Any] | None = None
    ) -> int:
        with self._tx() as s:
            return self._audit(s, actor, tenant, action, subject, detail)

    def audit_entries(self, after: int = -1, limit: int = 1000, until: datetime | None = None) -> list[AuditEntry]:
        with self._tx() as s:
            q = select(AuditRow).where(AuditRow.seq > after).order_by(AuditRow.seq).limit(limit)
            if until is not None:
                q = q.where(AuditRow.at <= until)
            return [_entry(r) for r in s.scalars(q)]

    def audit_leaves(self, size: int) -> list[bytes]:
        with self._tx() as s:
            q = select(AuditRow.leaf_hash).where(AuditRow.seq < size).order_by(AuditRow.seq)
            return [bytes.fromhex(h) for h in s.scalars(q)]

    def audit_head(self, size: int | None = None) -> AuditEntry | None:
        """The entry whose signed head covers ``size`` entries (default: the latest)."""
        with self._tx() as s:
            if size is None:
                row = s.scalar(select(AuditRow).order_by(AuditRow.seq.desc()).limit(1))
            else:
                row = s.get(AuditRow, size - 1)
            return None if row is None else _entry(row)

    # ------------------------------------------------------------------ registry

    def register_rollback(self, old: ModelVersion, reason: str, actor: str) -> ModelVersion:
        """A new version of ``old.model`` that re-issues ``old``'s artifact: a rollback
        moves forward in version numbers, so anti-rollback checks stay intact."""
        lineage = {**old.lineage, "rollback_of": old.version, "rollback_reason": reason}
        with self._tx() as s:
            v = self._register(s, model=old.model, job_id=None, params_hash=old.params_hash, lineage=lineage)
            self._audit(
                s, actor, None, "model.rollback_registered", v.ref, {"rollback_of": old.version, "reason": reason}
            )
            return v

    def _register(
        self, s: Session, *, model: str, job_id: int | None, params_hash: str, lineage: dict[str, Any]
    ) -> ModelVersion:
        m = s.scalar(select(RegisteredModelRow).where(RegisteredModelRow.name == model))
        if m is None:
            m = RegisteredModelRow(name=model, created_at=utcnow())
            s.add(m)
            s.flush()
            self._audit(s, "coordinator", None, "model.created", model)
        number = (s.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == m.id)) or 0) + 1
        row = ModelVersionRow(
            model_id=m.id,
            version=number,
            job_id=job_id,
            params_hash=params_hash,
            lineage=lineage,
            stage="candidate",
            created_at=utcnow(),
        )
        s.add(row)
        s.flush()
        self._audit(
            s,
            "coordinator",
            None,
            "model.registered",
            f"{model}:{number}",
            {
                "job_id": job_id,
                "params_hash": params_hash,
                "tenants": sorted(lineage.get("tenants", {})),
                "stage": "candidate",
            },
        )
        return _version(row, model)

    def list_models(self) -> list[tuple[str, int, dict[str, int | None]]]:
        """(name, latest version, {stage: version}) per registered model."""
        with self._tx() as s:
            out = []
            for m in s.scalars(select(RegisteredModelRow).order_by(RegisteredModelRow.name)):
                rows = list(s.scalars(select(ModelVersionRow).where(ModelVersionRow.model_id == m.id)))
                stages: dict[str, int | None] = {}
                for r in sorted(rows, key=lambda r: r.version):
                    if r.stage in ("staging", "production"):
                        stages[r.stage] = r.version
                out.append((m.name, max((r.version for r in rows), default=0), stages))
            return out

    def list_versions(self, model: str) -> list[ModelVersion]:
        with self._tx() as s:
            m = self._model(s, model)
            q = select(ModelVersionRow).where(ModelVersionRow.model_id == m.id).order_by(ModelVersionRow.version)
            return [_version(r, model) for r in s.scalars(q)]

    def _model(self, s: Session, model: str) -> RegisteredModelRow:
        m = s.scalar(select(RegisteredModelRow).where(RegisteredModelRow.name == model))
        if m is None:
            raise NotFoundError(f"registered model {model!r} not found; see `consortia registry list`.")
        return m

    def get_version(self, model: str, version: int | None = None) -> ModelVersion:
        """A version by number, or the latest when ``version`` is None."""
        with self._tx() as s:
            m = self._model(s, model)
            q = select(ModelVersionRow).where(ModelVersionRow.model_id == m.id)
            q = (
                q.where(ModelVersionRow.version == version)
                if version is not None
                else q.order_by(ModelVersionRow.version.desc()).limit(1)
            )
            row = s.scalar(q)
            if row is None:
                raise NotFoundError(f"{model}:{version} not found; see `consortia registry show {model}`.")
            return _version(row, model)

    def versions_without_release(self) -> list[ModelVersion]:
        with self._tx() as s:
            q = (
                select(ModelVersionRow, RegisteredModelRow.name)
                .join(RegisteredModelRow)
                .where(ModelVersionRow.release_digest.is_(None))
                .order_by(ModelVersionRow.id)
            )
            return [_version(r, n) for r, n in s.execute(q)]

    def set_release(self, v: ModelVersion, digest: str, detail: dict[str, Any]) -> None:
        with self._tx() as s:
            s.execute(update(ModelVersionRow).where(ModelVersionRow.id == v.id).values(release_digest=digest))
            self._audit(s, "coordinator", None, "release.signed", v.ref, {"manifest_digest": digest, **detail})

    def production_version(self, model: str) -> ModelVersion | None:
        with self._tx() as s:
            m = self._model(s, model)
            row = s.scalar(
                select(ModelVersionRow).where(ModelVersionRow.model_id == m.id, ModelVersionRow.stage == "production")
            )
            return None if row is None else _version(row, model)

    def promote(self, v: ModelVersion, to_stage: str, actor: str, evaluation: dict[str, Any]) -> ModelVersion:
        """Compare-and-set ``v``'s stage; moving to production archives the previous one."""
        now = utcnow()
        with self._tx() as s:
            done = s.execute(
                update(ModelVersionRow)
                .where(ModelVersionRow.id == v.id, ModelVersionRow.stage == v.stage)
                .values(stage=to_stage)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(f"{v.ref} changed stage while the policy was evaluated; run promote again.")
            if to_stage == "production":
                olds = s.scalars(
                    select(ModelVersionRow).where(
                        ModelVersionRow.model_id
                        == select(ModelVersionRow.model_id).where(ModelVersionRow.id == v.id).scalar_subquery(),
                        ModelVersionRow.stage == "production",
                        ModelVersionRow.id != v.id,
                    )
                )
                for old in olds:
                    old.stage = "archived"
                    s.add(
                        StageTransitionRow(
                            version_id=old.id,
                            from_stage="production",
                            to_stage="archived",
                            actor=actor,
                            evaluation={"replaced_by": v.version},
                            at=now,
                        )
                    )
                    self._audit(
                        s,
                        actor,
                        None,
                        "model.stage_changed",
                        f"{v.model}:{old.version}",
                        {"from": "production", "to": "archived", "replaced_by": v.version},
                    )
            s.add(
                StageTransitionRow(
                    version_id=v.id, from_stage=v.stage, to_stage=to_stage, actor=actor, evaluation=evaluation, at=now
                )
            )
            self._audit(
                s,
                actor,
                None,
                "model.stage_changed",
                v.ref,
                {
                    "from": v.stage,
                    "to": to_stage,
                    "policy_revision": evaluation.get("policy_revision"),
                    "tenants": sorted(v.lineage.get("tenants", {})),
                },
            )
        return self.get_version(v.model, v.version)

    def stage_history(self, v: ModelVersion) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = select(StageTransitionRow).where(StageTransitionRow.version_id == v.id).order_by(StageTransitionRow.id)
            return [
                {"from": r.from_stage, "to": r.to_stage, "actor": r.actor, "at": r.at.isoformat()} for r in s.scalars(q)
            ]

    # ------------------------------------------------------------------ policies

    def apply_policy(self, model: str, document: dict[str, Any], digest: str, actor: str) -> Policy:
        with self._tx() as s:
            rev = (s.scalar(select(func.max(PolicyRow.revision)).where(PolicyRow.model_name == model)) or 0) + 1
            row = PolicyRow(
                model_name=model, revision=rev, document=document, digest=digest, actor=actor, created_at=utcnow()
            )
            s.add(row)
            self._audit(s, actor, None, "policy.applied", model, {"revision": rev, "digest": digest})
            return Policy(model, rev, document, digest, actor, row.created_at)

    def current_policy(self, model: str) -> Policy | None:
        with self._tx() as s:
            row = s.scalar(
                select(PolicyRow).where(PolicyRow.model_name == model).order_by(PolicyRow.revision.desc()).limit(1)
            )
            return (
                None
                if row is None
                else Policy(row.model_name, row.revision, row.document, row.digest, row.actor, row.created_at)
            )

    # ------------------------------------------------------------------ approver keys and approvals

    def add_approver_key(self, tenant_id: int, tenant: str, public_hex: str, fp: str, actor: str) -> None:
        try:
            with self._tx() as s:
                s.add(
                    ApproverKeyRow(
                        tenant_id=tenant_id, public_key=public_hex, fingerprint=fp, actor=actor, created_at=utcnow()
                    )
                )
                s.flush()
                self._audit(s, actor, tenant, "approver_key.registered", tenant, {"fingerprint": fp})
        except IntegrityError as exc:
            raise ConflictError("this public key is already registered.") from exc

    def approver_keys(self, tenant_id: int) -> list[tuple[str, str]]:
        """(public key hex, fingerprint) of the tenant's active approver keys."""
        with self._tx() as s:
            q = select(ApproverKeyRow).where(ApproverKeyRow.tenant_id == tenant_id, ApproverKeyRow.revoked_at.is_(None))
            return [(r.public_key, r.fingerprint) for r in s.scalars(q)]

    def record_approval(
        self,
        v: ModelVersion,
        *,
        stage: str,
        tenant_id: int,
        tenant: str,
        decision: str,
        nonce: str,
        signed_at: datetime,
        payload: dict[str, Any],
        signature: str,
        key_fingerprint: str,
        actor: str,
    ) -> None:
        try:
            with self._tx() as s:
                s.add(
                    ApprovalRow(
                        version_id=v.id,
                        stage=stage,
                        tenant_id=tenant_id,
                        decision=decision,
                        nonce=nonce,
                        signed_at=signed_at,
                        payload=payload,
                        signature=signature,
                        key_fingerprint=key_fingerprint,
                        actor=actor,
                        created_at=utcnow(),
                    )
                )
                s.flush()
                self._audit(
                    s,
                    actor,
                    tenant,
                    "approval.recorded",
                    v.ref,
                    {"stage": stage, "decision": decision, "key": key_fingerprint, "signed_at": signed_at.isoformat()},
                )
        except IntegrityError as exc:
            raise ConflictError(
                "this signed approval was already submitted (its nonce is used): a replay "
                "is refused. Sign a new approval."
            ) from exc

    def approvals(self, v: ModelVersion, stage: str | None = None) -> list[Approval]:
        """Approvals of a version, latest decision per (tenant, stage) last."""
        with self._tx() as s:
            q = (
                select(ApprovalRow, TenantRow.name)
                .join(TenantRow, ApprovalRow.tenant_id == TenantRow.id)
                .where(ApprovalRow.version_id == v.id)
                .order_by(ApprovalRow.id)
            )
            if stage is not None:
                q = q.where(ApprovalRow.stage == stage)
            return [
                Approval(t, r.stage, r.decision, r.signed_at, r.key_fingerprint, r.actor, r.payload, r.signature)
                for r, t in s.execute(q)
            ]

    def iter_audit(self, batch: int = 1000) -> Iterator[AuditEntry]:
        after = -1
        while True:
            chunk = self.audit_entries(after, batch)
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].seq
