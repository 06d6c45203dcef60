"""Automation: the monitoring loop closed, detect -> decide -> act -> validate.

A policy (:class:`consortia.protocol.automation.AutomationPolicy`, applied with
``consortia automation apply FILE``) watches one model. Its triggers are checked when an
incident opens or changes (drift at >= k tenants, a performance drop) and on every tick
(schedule, new delayed labels). A trigger that fires outside the policy's cooldown, with
no run of the policy still in progress, starts a *run* that affects the tenants of the
incidents that fired it (a schedule: the tenants whose data is in the model; new labels:
the tenants that sent them):

1. **detect**: the trigger, the incidents and the tenants affected;
2. **decide**: ``automatic``, or ``approval``: every affected *regulated* tenant's approver
   signs an :class:`~consortia.protocol.automation.AutomationApproval` for the run with the
   tenant's registered Ed25519 key (as promotion approvals); one rejection ends the run.
   With no regulated tenant affected, the gate is automatic and says so;
3. **act**: the actions in order: ``retrain`` (a federated job from the production
   version's spec, warm-started from its weights; the newest released version if none is
   in production yet), ``rollback`` (the model's latest
   succeeded rollout is rolled back, as ``consortia rollout rollback``), ``webhook`` (a JSON
   POST signed with HMAC-SHA256 in ``X-Consortia-Signature``; the key comes from the
   coordinator's environment, never from the policy);
4. **validate**: when the retraining job completes, its version goes out as a rollout with
   the policy's plan (its analysis judges it on live traffic); if the rollout succeeds, the
   version is promoted under the model's promotion policy (retried each tick while the
   promotion policy still needs, e.g., approvals).

Every step is appended to the run and written to the audit log (``automation.<stage>``);
``consortia automation history`` shows the chain per run.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from datetime import datetime, timedelta
from typing import Any

import httpx
import yaml
from pydantic import ValidationError as PydanticValidationError

from consortia.coordinator.services.governance import signing_key
from consortia.core.audit import canonical
from consortia.core.rollout import RolloutPlan
from consortia.errors import ConflictError, ConsortiaError, NotFoundError, PermissionDeniedError, ValidationError
from consortia.protocol.automation import (
    AutomationApproval,
    AutomationPolicy,
    automation_approval_message,
)
from consortia.protocol.governance import ApprovalRequest, PromoteRequest
from consortia.store.entities import Principal, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["ACTIVE", "AutomationService"]

log = logging.getLogger("consortia.coordinator.automation")

ACTIVE = ("detected", "awaiting_approval", "acting", "validating", "awaiting_promotion")
"""Run states still in progress (a policy has at most one)."""
APPROVAL_MAX_SKEW = timedelta(minutes=10)
WEBHOOK_TIMEOUT = 10.0


def _errors(exc: PydanticValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors()[:8])


class AutomationService:
    """Policies, runs and their driver. ``rounds``, ``rollouts`` and ``governance`` are the
    coordinator's services the actions use."""

    def __init__(self, store: SqlStore, rounds: Any, rollouts: Any, governance: Any) -> None:
        self.store = store
        self.rounds = rounds
        self.rollouts = rollouts
        self.governance = governance

    # ------------------------------------------------------------------ policies

    def apply(self, principal: Principal, raw: Any) -> dict[str, Any]:
        """Validate and store a new revision of a policy (consortium operators only)."""
        if principal.tenant_id is not None:
            raise PermissionDeniedError("automation policies act for the consortium: use a consortium-wide operator.")
        if isinstance(raw, str):
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ValidationError(f"the automation policy is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValidationError("an automation policy is a mapping with name, model, triggers, gate and actions.")
        try:
            policy = AutomationPolicy.model_validate(raw)
        except PydanticValidationError as exc:
            raise ValidationError(f"invalid automation policy: {_errors(exc)}") from exc
        try:
            known = bool(self.store.list_versions(policy.model))
        except NotFoundError:
            known = False
        if not known:
            raise ValidationError(f"no registered model {policy.model!r}; see `consortia registry list`.")
        if policy.validation is not None:
            try:
                RolloutPlan.model_validate(policy.validation.plan)
            except PydanticValidationError as exc:
                raise ValidationError(f"invalid validation.plan: {_errors(exc)}") from exc
        for action in policy.actions:
            if action.kind == "webhook" and not os.environ.get(action.secret_env):
                raise ValidationError(
                    f"webhook secret {action.secret_env} is not set in the coordinator's environment; set it "
                    "(at least 32 random bytes) and restart the coordinator, then apply again."
                )
        document = policy.model_dump(mode="json")
        digest = hashlib.sha256(canonical(document)).hexdigest()
        return self.store.add_automation_policy(
            policy.name, policy.model, document, digest, principal.name, principal.credential_id
        )

    def policies(self) -> list[dict[str, Any]]:
        return self.store.automation_policies()

    # ------------------------------------------------------------------ runs: reads

    def _visible(self, principal: Principal, run: dict[str, Any]) -> bool:
        return principal.tenant is None or principal.tenant in run["tenants"]

    def history(self, principal: Principal, policy: str | None = None) -> list[dict[str, Any]]:
        """Runs with their steps; a tenant's credential sees the runs that affected it."""
        return [r for r in self.store.automation_runs(policy=policy) if self._visible(principal, r)]

    def get(self, principal: Principal, run_id: int) -> dict[str, Any]:
        run = self.store.get_automation_run(run_id)
        if not self._visible(principal, run):
            raise PermissionDeniedError(f"automation run {run_id} did not affect tenant {principal.tenant!r}.")
        return run

    # ------------------------------------------------------------------ detect

    def _policy(self, name: str) -> tuple[dict[str, Any], AutomationPolicy]:
        for p in self.store.automation_policies():
            if p["name"] == name:
                return p, AutomationPolicy.model_validate(p["document"])
        raise NotFoundError(f"automation policy {name!r} not found.")

    def _may_start(self, stored: dict[str, Any], policy: AutomationPolicy) -> bool:
        runs = self.store.automation_runs(policy=stored["name"])
        if any(r["state"] in ACTIVE for r in runs):
            return False
        if runs:
            last = datetime.fromisoformat(runs[-1]["created_at"])
            if utcnow() - last < timedelta(hours=policy.cooldown_hours):
                return False
        return True

    def on_incident(self, incident: dict[str, Any]) -> None:
        """Check the incident-driven triggers of every policy on the incident's model."""
        model = incident["release"].rpartition(":")[0]
        open_incidents = [
            i for i in self.store.list_incidents(state="open") if i["release"].rpartition(":")[0] == model
        ]
        for stored in self.store.automation_policies(model):
            policy = AutomationPolicy.model_validate(stored["document"])
            for trigger in policy.triggers:
                fired = None
                if trigger.kind == "drift":
                    hit = [i for i in open_incidents if any(f["kind"] in trigger.kinds for f in i["findings"])]
                    tenants = sorted({i["tenant"] for i in hit})
                    if len(tenants) >= trigger.min_tenants:
                        fired = (hit, tenants)
                elif trigger.kind == "performance_drop":
                    hit = [
                        i
                        for i in open_incidents
                        if any(
                            f["kind"] == "performance_drop" and f["effect"] >= trigger.min_drop for f in i["findings"]
                        )
                    ]
                    if hit:
                        fired = (hit, sorted({i["tenant"] for i in hit}))
                if fired is not None and self._may_start(stored, policy):
                    hit, tenants = fired
                    detail = {
                        "trigger": trigger.model_dump(mode="json"),
                        "incidents": [
                            {"id": i["id"], "tenant": i["tenant"], "release": i["release"], "priority": i["priority"]}
                            for i in hit
                        ],
                        "top_causes": [
                            {k: c[k] for k in ("kind", "target", "effect")} for i in hit for c in i["causes"][:1]
                        ],
                    }
                    self._start(stored, policy, detail, tenants)
                    break

    def _contributors(self, model: str) -> list[str]:
        """Who a scheduled run affects: the tenants whose data is in the model's production
        (else newest) version."""
        versions = self.store.list_versions(model)
        base = self.store.production_version(model) or (versions[-1] if versions else None)
        return sorted((base.lineage.get("tenants") or {}) if base is not None else [])

    def _start(
        self, stored: dict[str, Any], policy: AutomationPolicy, detail: dict[str, Any], tenants: list[str]
    ) -> dict[str, Any]:
        trigger = {**detail["trigger"], "policy_digest": stored["digest"]}
        run = self.store.create_automation_run(stored, trigger, tenants, {"stage": "detect", **detail})
        log.warning("automation run %s of %s started: %s", run["id"], stored["name"], detail["trigger"]["kind"])
        return self._decide(run, stored, policy)

    # ------------------------------------------------------------------ decide

    def _decide(self, run: dict[str, Any], stored: dict[str, Any], policy: AutomationPolicy) -> dict[str, Any]:
        regulated = sorted(t.name for t in self.store.list_tenants() if t.regulated and t.name in run["tenants"])
        if policy.gate == "approval" and regulated:
            return self.store.add_automation_step(
                run["id"],
                "awaiting_approval",
                {"stage": "decide", "gate": "approval", "required": regulated, "decision": "pending"},
            )
        why = "policy gate is automatic" if policy.gate == "automatic" else "no regulated tenant is affected"
        run = self.store.add_automation_step(
            run["id"], "acting", {"stage": "decide", "gate": "automatic", "decision": "approved", "reason": why}
        )
        return self._act(run, stored, policy)

    def approve(self, principal: Principal, run_id: int, req: ApprovalRequest) -> dict[str, Any]:
        """A regulated tenant's signed decision on a run waiting at its gate."""
        run = self.store.get_automation_run(run_id)
        if principal.tenant_id is None or principal.tenant is None:
            raise PermissionDeniedError("gate approvals are per tenant: use an approver credential of your tenant.")
        try:
            payload = AutomationApproval.model_validate(req.payload)
        except PydanticValidationError as exc:
            raise ValidationError(f"invalid automation approval: {_errors(exc)}") from exc
        if payload.tenant != principal.tenant:
            raise PermissionDeniedError(
                f"credential {principal.name!r} approves for tenant {principal.tenant!r} only, not {payload.tenant!r}."
            )
        if payload.run != run["id"] or payload.policy_digest != run["policy_digest"]:
            raise ConflictError(
                f"this approval was signed for run {payload.run} of policy digest {payload.policy_digest[:16]}..., "
                f"not run {run['id']} ({str(run['policy_digest'])[:16]}...): a replay is refused."
            )
        if run["state"] != "awaiting_approval":
            raise ConflictError(f"automation run {run_id} is {run['state']}, not waiting for approvals.")
        gate = next(s for s in reversed(run["steps"]) if s["stage"] == "decide")
        if principal.tenant not in gate["required"]:
            raise PermissionDeniedError(
                f"tenant {principal.tenant!r} is not among the regulated tenants this run needs ({gate['required']})."
            )
        if payload.signed_at.tzinfo is None or abs(utcnow() - payload.signed_at) > APPROVAL_MAX_SKEW:
            raise ConflictError("the approval is not fresh (or has no time zone): sign a new one.")
        if any(s.get("nonce") == payload.nonce for s in run["steps"]):
            raise ConflictError("this approval's nonce was already used: a replay is refused.")
        keys = self.store.approver_keys(principal.tenant_id)
        if not keys:
            raise ConflictError(f"tenant {principal.tenant!r} has no approval key; run `consortia approver keygen`.")
        fingerprint = signing_key(keys, automation_approval_message(payload), req.signature)
        if fingerprint is None:
            raise PermissionDeniedError(
                f"the signature does not verify with any approval key of tenant {principal.tenant!r}."
            )
        step = {
            "stage": "approval",
            "tenant": principal.tenant,
            "decision": payload.decision,
            "key": fingerprint,
            "nonce": payload.nonce,
            "signature": req.signature,
        }
        stored, policy = self._policy(run["policy"])
        if payload.decision == "reject":
            return self.store.add_automation_step(run_id, "rejected", step, principal.name, principal.tenant)
        run = self.store.add_automation_step(run_id, "awaiting_approval", step, principal.name, principal.tenant)
        approved = {s["tenant"] for s in run["steps"] if s["stage"] == "approval" and s["decision"] == "approve"}
        if set(gate["required"]) <= approved:
            run = self.store.add_automation_step(
                run_id,
                "acting",
                {"stage": "decide", "gate": "approval", "decision": "approved", "approved_by": sorted(approved)},
            )
            return self._act(run, stored, policy)
        return run

    # ------------------------------------------------------------------ act

    def _system(self, stored: dict[str, Any]) -> Principal:
        """Who acts: the policy's author's credential, named for the policy."""
        return Principal(
            credential_id=stored["created_by_id"],
            name=f"automation:{stored['name']}",
            role="operator",
            tenant_id=None,
            tenant=None,
            site_id=None,
            expires_at=utcnow() + timedelta(hours=1),
            revoked=False,
        )

    def _act(self, run: dict[str, Any], stored: dict[str, Any], policy: AutomationPolicy) -> dict[str, Any]:
        pending = False
        for action in policy.actions:
            step: dict[str, Any] = {"stage": "act", "action": action.kind}
            try:
                if action.kind == "retrain":
                    base = self.store.production_version(policy.model) or next(
                        (v for v in reversed(self.store.list_versions(policy.model)) if v.release_digest), None
                    )
                    if base is None:
                        raise ConflictError(f"{policy.model} has no released version to retrain from.")
                    job = self.rounds.submit_retrain(base.ref, self._system(stored), action.rounds)
                    step |= {"job": job.id, "warm_start": base.ref, "rounds": job.spec["rounds"]}
                    pending = True
                elif action.kind == "rollback":
                    done = [
                        r
                        for r in self.store.list_rollouts()
                        if r["model"] == policy.model and r["state"] == "succeeded"
                    ]
                    if not done:
                        raise ConflictError(f"{policy.model} has no succeeded rollout to roll back.")
                    latest = done[-1]
                    after = self.rollouts.abort(self._system(stored), latest["id"], rollback=True)
                    step |= {"rollout": latest["id"], "to": (after["progress"].get("rollback_release"))}
                else:
                    step |= self._webhook(action.url, action.secret_env, run)
            except ConsortiaError as exc:
                step |= {"ok": False, "error": exc.message}
                run = self.store.add_automation_step(run["id"], "failed", step, f"automation:{stored['name']}")
                return run
            step["ok"] = True
            run = self.store.add_automation_step(
                run["id"], "acting" if pending else run["state"], step, f"automation:{stored['name']}"
            )
        if not pending:
            run = self.store.add_automation_step(
                run["id"], "done", {"stage": "validate", "result": "nothing to validate"}
            )
        return run

    def _webhook(self, url: str, secret_env: str, run: dict[str, Any]) -> dict[str, Any]:
        secret = os.environ.get(secret_env)
        if not secret:
            raise ConflictError(f"webhook secret {secret_env} is not set in the coordinator's environment.")
        body = canonical(
            {
                "type": "consortia.automation/v1",
                "run": run["id"],
                "policy": run["policy"],
                "model": run["model"],
                "state": run["state"],
                "tenants": run["tenants"],
                "steps": [{k: v for k, v in s.items() if k not in ("signature", "nonce")} for s in run["steps"]],
            }
        )
        signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            resp = httpx.post(
                url,
                content=body,
                headers={"Content-Type": "application/json", "X-Consortia-Signature": f"sha256={signature}"},
                timeout=WEBHOOK_TIMEOUT,
            )
        except httpx.HTTPError as exc:
            raise ConflictError(f"webhook {url} unreachable: {exc}") from exc
        if resp.status_code >= 300:
            raise ConflictError(f"webhook {url} answered {resp.status_code}.")
        return {"url": url, "status": resp.status_code, "body_sha256": hashlib.sha256(body).hexdigest()}

    # ------------------------------------------------------------------ the driver

    def tick(self) -> None:
        """Time- and volume-driven triggers, then advance every run in progress."""
        for stored in self.store.automation_policies():
            policy = AutomationPolicy.model_validate(stored["document"])
            for trigger in policy.triggers:
                if trigger.kind not in ("schedule", "labels") or not self._may_start(stored, policy):
                    continue
                runs = self.store.automation_runs(policy=stored["name"])
                since = datetime.fromisoformat(runs[-1]["created_at"] if runs else stored["created_at"])
                if trigger.kind == "schedule":
                    if utcnow() - since >= timedelta(hours=trigger.every_hours):
                        detail = {"trigger": trigger.model_dump(mode="json"), "since": since.isoformat()}
                        self._start(stored, policy, detail, self._contributors(policy.model))
                        break
                else:
                    labelled = self.store.labelled_since(policy.model, since)
                    if sum(labelled.values()) >= trigger.min_labelled:
                        detail = {
                            "trigger": trigger.model_dump(mode="json"),
                            "since": since.isoformat(),
                            "labelled": sum(labelled.values()),
                        }
                        self._start(stored, policy, detail, sorted(labelled))
                        break
        for run in self.store.automation_runs(states=("acting", "validating", "awaiting_promotion")):
            try:
                self._advance(run)
            except ConsortiaError as exc:
                self.store.add_automation_step(run["id"], "failed", {"stage": "validate", "error": exc.message})

    def _advance(self, run: dict[str, Any]) -> None:
        stored, policy = self._policy(run["policy"])
        acts = [s for s in run["steps"] if s["stage"] == "act" and s.get("action") == "retrain"]
        if run["state"] == "acting" and acts:
            job = self.store.get_job(acts[-1]["job"])
            if job.state in ("failed", "cancelled"):
                self.store.add_automation_step(
                    run["id"], "failed", {"stage": "validate", "job": job.id, "error": job.reason or job.state}
                )
            elif job.state == "completed":
                version = next(
                    (v for v in self.store.list_versions(policy.model) if v.lineage.get("job", {}).get("id") == job.id),
                    None,
                )
                if version is None:
                    return  # registered on the next tick
                if version.release_digest is None:
                    return  # its release is being built
                step: dict[str, Any] = {"stage": "validate", "job": job.id, "version": version.ref}
                if policy.validation is None:
                    self.store.add_automation_step(run["id"], "done", {**step, "result": "retrained, not rolled out"})
                    return
                plan = policy.validation.plan
                rollout = self.rollouts.start(self._system(stored), version.model, version.version, plan)
                self.store.add_automation_step(run["id"], "validating", {**step, "rollout": rollout["id"]})
        elif run["state"] == "validating":
            step = next(s for s in reversed(run["steps"]) if s["stage"] == "validate" and "rollout" in s)
            r = self.store.get_rollout(step["rollout"])
            if r["state"] == "succeeded":
                base = {"stage": "validate", "rollout": r["id"], "version": step["version"], "result": "canary passed"}
                if policy.validation is not None and policy.validation.promote_to is not None:
                    self.store.add_automation_step(run["id"], "awaiting_promotion", base)
                    self._promote(self.store.get_automation_run(run["id"]), stored, policy)
                else:
                    self.store.add_automation_step(run["id"], "done", base)
            elif r["state"] in ("rolled_back", "aborted", "failed"):
                self.store.add_automation_step(
                    run["id"],
                    "failed_validation",
                    {"stage": "validate", "rollout": r["id"], "result": r["state"], "reason": r.get("reason")},
                )
        elif run["state"] == "awaiting_promotion":
            self._promote(run, stored, policy)

    def _promote(self, run: dict[str, Any], stored: dict[str, Any], policy: AutomationPolicy) -> None:
        assert policy.validation is not None and policy.validation.promote_to is not None
        ref = next(s["version"] for s in reversed(run["steps"]) if s.get("version"))
        model, _, version = ref.rpartition(":")
        to = policy.validation.promote_to
        stage = self.store.get_version(model, int(version)).stage
        if stage == to:
            self.store.add_automation_step(run["id"], "done", {"stage": "validate", "promoted": ref, "to": to})
            return
        if to == "production" and stage not in ("staging", "production"):  # stages in order, each judged
            staged = self.governance.promote(self._system(stored), model, int(version), PromoteRequest(to="staging"))
            if not staged["promoted"]:
                failed = [r["rule"] for r in staged["rules"] if not r["passed"]]
                if not any(s.get("waiting_for") == failed for s in run["steps"]):
                    self.store.add_automation_step(
                        run["id"],
                        "awaiting_promotion",
                        {"stage": "validate", "promotion": "staging", "waiting_for": failed},
                    )
                return
            self.store.add_automation_step(
                run["id"], "awaiting_promotion", {"stage": "validate", "promoted": ref, "to": "staging"}
            )
        out = self.governance.promote(self._system(stored), model, int(version), PromoteRequest(to=to))
        failed = [r["rule"] for r in out["rules"] if not r["passed"]]
        if out["promoted"]:
            self.store.add_automation_step(
                run["id"], "done", {"stage": "validate", "promoted": ref, "to": to, "policy": out["policy_revision"]}
            )
        elif not any(s.get("waiting_for") == failed for s in run["steps"]):  # say once what it waits for
            self.store.add_automation_step(
                run["id"], "awaiting_promotion", {"stage": "validate", "promotion": to, "waiting_for": failed}
            )
