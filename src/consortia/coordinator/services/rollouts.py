"""Progressive delivery: drive a rollout plan over a device cohort from the coordinator's
ticker, judge live signals, and roll back by itself.

Each tick advances running rollouts by at most one step: ``set_weight`` instructs the
first ceil(w% x N) cohort devices (by name) to run the new release and waits until they
report serving it (a device that reports a failed install, or the install timeout,
fails the rollout); ``hold_seconds`` waits; ``analysis`` takes a sample every interval
from the canary devices' reports (signals since they activated the release) against the
cohort devices still on other releases (the baseline). Too many failed samples: every device
moved so far is instructed back to the previous release and the rollout ends
``rolled_back``. No conclusive sample at all: the rollout pauses and the audit log asks
the approvers of the affected regulated tenants to decide (``consortia rollout resume``
or ``abort``). Every transition is an audit entry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from consortia.coordinator.services.devices import DeviceService, check_delivery_scope
from consortia.coordinator.services.governance import GovernanceService
from consortia.core.rollout import RolloutPlan, evaluate_sample
from consortia.errors import ConflictError, ValidationError
from consortia.store.entities import Device, Principal
from consortia.store.sqlstore import SqlStore

__all__ = ["RolloutService"]

log = logging.getLogger("consortia.coordinator.rollouts")


def _ref(r: dict[str, Any] | None) -> str | None:
    return f"{r['model']}:{r['version']}" if r else None


class RolloutService:
    def __init__(self, store: SqlStore, devices: DeviceService, governance: GovernanceService) -> None:
        self.store = store
        self.devices = devices
        self.governance = governance

    # ------------------------------------------------------------------ commands

    def start(self, principal: Principal, model: str, version: int, raw_plan: Any) -> dict[str, Any]:
        if not isinstance(raw_plan, dict):
            raise ValidationError("a rollout plan must be a mapping with 'target' and 'steps'.")
        try:
            plan = RolloutPlan.model_validate(raw_plan)
        except PydanticValidationError as exc:
            parts = [f"{'.'.join(str(p) for p in e['loc']) or 'plan'}: {e['msg']}" for e in exc.errors()[:8]]
            raise ValidationError("invalid rollout plan: " + "; ".join(parts)) from exc
        v = self.store.get_version(model, version)
        if v.release_digest is None:
            raise ConflictError(f"{v.ref} has no signed release; nothing to roll out.")
        cohort = self._cohort(plan)
        if not cohort:
            raise ValidationError("the plan's target selects no active device; see `consortia edge list`.")
        check_delivery_scope(v, cohort)
        if any(
            r["state"] in ("running", "paused")
            for r in self.store.list_rollouts()
            if set(r["progress"]["cohort"]) & {d.id for d in cohort}
        ):
            raise ConflictError("another rollout is running on some of these devices; finish or abort it first.")
        serving = [((d.report or {}).get("serving")) for d in cohort]
        previous = max(set(serving) - {None}, key=serving.count, default=None)
        if previous == v.ref:
            raise ConflictError(f"the cohort already serves {v.ref}.")
        progress = {
            "step": 0,
            "step_started": time.time(),
            "cohort": [d.id for d in cohort],
            "moved": [],
            "previous": (
                {"model": previous.split(":")[0], "version": int(previous.split(":")[1])} if previous else None
            ),
            "samples": [],
            "last_sample": 0.0,
            "history": [],
        }
        rid = self.store.create_rollout(model, version, plan.model_dump(mode="json"), progress, principal.name)
        return self.store.get_rollout(rid)

    def _cohort(self, plan: RolloutPlan) -> list[Device]:
        tenant_id = self.store.get_tenant(plan.target.tenant).id if plan.target.tenant else None
        return sorted(
            (
                d
                for d in self.store.list_devices(tenant_id)
                if d.status == "active" and all(d.labels.get(k) == v for k, v in plan.target.selector.items())
            ),
            key=lambda d: (d.tenant, d.name),
        )

    def pause(self, principal: Principal, rid: int) -> dict[str, Any]:
        r = self.store.get_rollout(rid)
        self.store.update_rollout(
            rid,
            expect="running",
            state="paused",
            progress=r["progress"],
            reason=f"paused by {principal.name}",
            action="rollout.paused",
            actor=principal.name,
        )
        return self.store.get_rollout(rid)

    def resume(self, principal: Principal, rid: int) -> dict[str, Any]:
        r = self.store.get_rollout(rid)
        p = r["progress"]
        p["samples"], p["step_started"], p["last_sample"] = [], time.time(), 0.0
        self.store.update_rollout(
            rid, expect="paused", state="running", progress=p, action="rollout.resumed", actor=principal.name
        )
        return self.store.get_rollout(rid)

    def abort(self, principal: Principal, rid: int, rollback: bool = True) -> dict[str, Any]:
        r = self.store.get_rollout(rid)
        if r["state"] not in ("running", "paused", "succeeded"):
            raise ConflictError(f"rollout {rid} is {r['state']}; nothing to abort.")
        self._rollback(r, f"{'rolled back' if rollback else 'aborted'} by {principal.name}", principal.name)
        return self.store.get_rollout(rid)

    # ------------------------------------------------------------------ the driver

    def tick(self) -> None:
        for r in self.store.list_rollouts("running"):
            with contextlib.suppress(ConflictError):  # changed under us (paused/aborted): next tick sees it
                self._advance(r)

    def _devices(self, ids: list[int]) -> dict[int, Device]:
        wanted = set(ids)
        return {d.id: d for d in self.store.list_devices() if d.id in wanted}

    def _advance(self, r: dict[str, Any]) -> None:
        plan = RolloutPlan.model_validate(r["plan"])
        p = r["progress"]
        ref = f"{r['model']}:{r['version']}"
        if p["step"] >= len(plan.steps):
            self.store.update_rollout(
                r["id"],
                expect="running",
                state="succeeded",
                progress=p,
                action="rollout.succeeded",
                detail={"release": ref, "devices": len(p["moved"])},
            )
            return
        step = plan.steps[p["step"]]
        now = time.time()
        devices = self._devices(p["cohort"])
        reports = {i: d.report or {} for i, d in devices.items()}
        if step.set_weight is not None:
            want = math.ceil(step.set_weight / 100 * len(p["cohort"]))
            targets = sorted(p["cohort"], key=lambda i: (devices[i].tenant, devices[i].name))[:want]
            new = [i for i in targets if i not in p["moved"]]
            if new:
                names = [devices[i].name for i in new]
                self.devices.assign_to(new, r["model"], r["version"], f"rollout:{r['id']}")
                p["moved"] = sorted(set(p["moved"]) | set(new))
                self.store.update_rollout(
                    r["id"],
                    expect="running",
                    state="running",
                    progress=p,
                    action="rollout.step",
                    detail={"step": p["step"], "set_weight": step.set_weight, "devices": names},
                )
                return
            failed = [  # a failure reported for *our* instruction (not a stale one)
                devices[i]
                for i in targets
                if reports[i].get("attempted", 0) >= devices[i].counter
                and reports[i].get("state") != "held"  # a site waiting for local approval: wait
                and reports[i].get("reason")
                and reports[i].get("serving") != ref
            ]
            if failed:
                d = failed[0]
                self._rollback(r, f"device {d.tenant}/{d.name} did not install {ref}: {reports[d.id].get('reason')}")
                return
            if all(reports[i].get("serving") == ref for i in targets):
                self._next(
                    r, p, {"set_weight": step.set_weight, "converged_seconds": round(now - p["step_started"], 2)}
                )
            elif now - p["step_started"] > plan.install_timeout_seconds:
                late = [devices[i].name for i in targets if reports[i].get("serving") != ref]
                self._rollback(r, f"devices {late} did not serve {ref} within {plan.install_timeout_seconds:.0f}s")
            return
        if step.hold_seconds is not None:
            if now - p["step_started"] >= step.hold_seconds:
                self._next(r, p, {"hold_seconds": step.hold_seconds})
            return
        analysis = step.analysis
        assert analysis is not None
        if not p["moved"]:
            # Blue-green pre-promotion analysis: nothing is switched yet, so the cohort
            # installs the release as a preview and scores live traffic in shadow; the
            # canary is the preview, the baseline the active release on the same requests.
            if not self._previewing(r, p, plan, devices, reports, ref, now):
                return
            if now - p["last_sample"] < analysis.interval_seconds:
                return
            canary = [reports[i]["preview"] for i in p["cohort"]]
            baseline = [reports[i] for i in p["cohort"]]
        else:
            if now - p["last_sample"] < analysis.interval_seconds:
                return
            canary = [reports[i] for i in p["moved"] if reports[i].get("serving") == ref]
            # baseline: the cohort devices still on another release (the fleet the canary is compared with)
            baseline = [rep for rep in reports.values() if rep.get("serving") not in (None, ref)]
        sample = evaluate_sample(analysis, canary, baseline)
        p["last_sample"] = now
        patience = 10 * analysis.samples * analysis.interval_seconds
        if sample.insufficient and now - p["step_started"] < patience:
            return  # not enough canary traffic yet: wait for it rather than count an empty sample
        p["samples"].append(sample.as_dict())
        fails = sum(s["verdict"] == "fail" for s in p["samples"])
        self.store.update_rollout(
            r["id"],
            expect="running",
            state="running",
            progress=p,
            action="rollout.analysis",
            detail={"step": p["step"], "sample": len(p["samples"]), **sample.as_dict()},
        )
        if fails > analysis.failure_limit:
            self._rollback(
                r, f"analysis failed {fails} time(s) (limit {analysis.failure_limit}): " + "; ".join(sample.reasons)
            )
        elif len(p["samples"]) >= analysis.samples:
            if any(s["verdict"] == "pass" for s in p["samples"]):
                self._next(r, p, {"analysis": [s["verdict"] for s in p["samples"]]})
            else:
                regulated = sorted(
                    {d.tenant for d in devices.values()} & {t.name for t in self.store.list_tenants() if t.regulated}
                )
                self.store.update_rollout(
                    r["id"],
                    expect="running",
                    state="paused",
                    progress=p,
                    reason=f"analysis inconclusive: {'; '.join(sample.reasons)}; approvers of {regulated} decide "
                    "(`consortia rollout resume` or `abort`)",
                    action="rollout.inconclusive",
                    detail={"ask_approvers_of": regulated},
                )

    def _previewing(
        self,
        r: dict[str, Any],
        p: dict[str, Any],
        plan: RolloutPlan,
        devices: dict[int, Device],
        reports: dict[int, dict[str, Any]],
        ref: str,
        now: float,
    ) -> bool:
        """Issue the preview to the cohort once, then wait until every device scores it in
        shadow; True when the preview analysis can sample. Rolls back (drops the previews)
        when a device cannot install it or does not in time."""
        if not p.get("previewing"):
            self.devices.assign_to(p["cohort"], r["model"], r["version"], f"rollout:{r['id']}", preview=True)
            p["previewing"], p["step_started"] = True, now
            names = [devices[i].name for i in p["cohort"]]
            self.store.update_rollout(
                r["id"],
                expect="running",
                state="running",
                progress=p,
                action="rollout.preview",
                detail={"step": p["step"], "devices": names},
            )
            return False
        pending = []
        for i in p["cohort"]:
            rep, d = reports[i], devices[i]
            pre = rep.get("preview") or {}
            if pre.get("release") == ref:
                continue
            if rep.get("attempted", 0) >= d.counter and pre.get("reason") and rep.get("state") != "held":
                self._rollback(r, f"device {d.tenant}/{d.name} could not preview {ref}: {pre['reason']}")
                return False
            pending.append(d.name)
        if pending and now - p["step_started"] > plan.install_timeout_seconds:
            self._rollback(r, f"devices {pending} did not preview {ref} within {plan.install_timeout_seconds:.0f}s")
            return False
        return not pending

    def _next(self, r: dict[str, Any], p: dict[str, Any], detail: dict[str, Any]) -> None:
        p["history"].append({"step": p["step"], **detail})
        p["step"] += 1
        p["step_started"], p["samples"], p["last_sample"] = time.time(), [], 0.0
        self.store.update_rollout(
            r["id"],
            expect="running",
            state="running",
            progress=p,
            action="rollout.step_done",
            detail={"step": p["step"] - 1, **detail},
        )

    def _rollback(self, r: dict[str, Any], reason: str, actor: str = "coordinator") -> None:
        """Return every device moved so far to the previous release's artifact, issued as
        a new signed release version (so versions only move forward on every device)."""
        p = r["progress"]
        prev = p["previous"]
        to = None
        if p.get("previewing"):  # nothing was switched: the cohort just stops scoring the preview
            self.devices.clear_preview(p["cohort"], f"rollout:{r['id']}:rollback")
        if prev is not None and p["moved"]:
            old = self.store.get_version(prev["model"], prev["version"])
            rb = self.store.register_rollback(old, f"rollout {r['id']}: {reason}", actor)
            rb = self.governance.ensure_release(rb)
            self.devices.assign_to(p["moved"], rb.model, rb.version, f"rollout:{r['id']}:rollback")
            to = {"model": rb.model, "version": rb.version, "rollback_of": old.version}
            p["rollback_release"] = to
        log.warning("rollout %s rolled back: %s", r["id"], reason)
        self.store.update_rollout(
            r["id"],
            expect=r["state"],
            state="rolled_back",
            progress=p,
            reason=reason,
            action="rollout.rolled_back",
            actor=actor,
            detail={"reason": reason, "to": _ref(to), "artifact_of": _ref(prev), "devices": len(p["moved"])},
        )
