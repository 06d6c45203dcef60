"""Monitoring at the coordinator: findings per window, incidents when they persist.

Every window a serving agent sends is checked against its tenant's own reference profile
(the training histograms of the tenant's sites in the job, ``lineage.reference.per_tenant``;
the consortium's sum, ``lineage.reference.profile``, for a tenant without sites in it) by
:func:`consortia.core.detect.check_window` (chi-square and two-proportion tests, BH over
the window's tests, minimum effects). A finding opens an incident only if the same
``(kind, target)`` is found in at least :data:`PERSIST` of the tenant's last
:data:`LOOKBACK` windows of that release: one noisy window is not an incident. One
incident stays open per (tenant, release) and is updated as windows arrive.

Latency and errors are compared with the device's own earlier windows
(:func:`consortia.core.detect.check_operations`); when such a finding persists, its
causes are split between the most recent release change in the fleet and the
infrastructure by difference-in-differences across every device serving the model
(:func:`consortia.core.rca.operational_causes`; other tenants appear as counts only).

Impact: the tenant, whether it is regulated, the devices whose windows showed it, and
the share of the release's traffic (rows in the last hour, consortium-wide) those
windows carried. Priority: ``P1`` a regulated tenant whose model output moved
(``prediction_shift``) or whose decisions for a group of the sensitive attribute moved
(``group_decision_shift``), or any finding with PSI >= 0.25 at a regulated tenant; ``P2`` any
other incident at a regulated tenant or one carrying >= 25% of the release's traffic;
``P3`` the rest.

Summaries: a deterministic template (:func:`consortia.core.rca.summarize`). With
``--llm-url`` (an OpenAI-compatible endpoint, e.g. a local llama.cpp server) ``incidents
show`` also asks it to rephrase; the rephrasing is shown only if every number and name in
it is grounded in the incident, otherwise the template stands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from consortia.core.detect import check_fairness, check_operations, check_window
from consortia.core.rca import grounded, operational_causes, rank_causes, summarize
from consortia.errors import ConsortiaError, PermissionDeniedError
from consortia.protocol.delivery import MonitoringWindow
from consortia.store.blobs import BlobStore
from consortia.store.entities import Device, Principal, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["BASELINE", "FLEET_HORIZON", "LOOKBACK", "PERSIST", "MonitoringService"]

log = logging.getLogger("consortia.coordinator.monitoring")

PERSIST = 2
LOOKBACK = 3
BASELINE = 10
"""Earlier windows of the same device that latency and errors are compared with."""
FLEET_HORIZON = timedelta(hours=2)
"""How far back the release-vs-infrastructure comparison looks across the fleet."""


class MonitoringService:
    def __init__(
        self, store: SqlStore, llm_url: str | None = None, llm_model: str = "local", blobs: BlobStore | None = None
    ) -> None:
        self.store = store
        self.blobs = blobs
        self._tenant_refs: dict[str, dict[str, Any]] = {}
        self.llm_url = llm_url.rstrip("/") if llm_url else None
        self.llm_model = llm_model
        self._phrased: dict[tuple[int, str], dict[str, Any]] = {}
        self.on_incident: Callable[[dict[str, Any]], None] | None = None
        """Called with every opened or updated incident (the automation policies' triggers)."""

    def on_window(self, device: Device, window_id: int, window: MonitoringWindow) -> list[dict[str, Any]]:
        """Check one stored window; open or update the tenant's incident if findings persist."""
        model, _, version = window.release.rpartition(":")
        lineage = self.store.get_version(model, int(version)).lineage
        reference = self._reference(lineage.get("reference") or {}, device.tenant)
        payload = window.model_dump(mode="json")
        # a release without a reference profile: only latency and errors can be checked
        findings = [f.as_dict() for f in check_window(payload, reference)] if reference is not None else []
        baseline = self.store.device_windows(device.id, window_id, BASELINE)
        findings += [f.as_dict() for f in check_operations(payload, baseline)]
        findings += [f.as_dict() for f in check_fairness(payload, baseline)]
        self.store.set_window_findings(window_id, findings)
        recent = self.store.recent_windows(device.tenant_id, window.release, LOOKBACK)
        persistent = _persistent(recent)
        if persistent:
            impact, priority = self._impact(device, window.release, recent, persistent)
            told = ((device.instruction or {}).get("instruction") or {}).get("release")
            instructed = f"{told['model']}:{told['version']}" if told else None
            operational: list[dict[str, Any]] = []
            if any(f["kind"] in ("latency_rise", "error_rise", "performance_drop") for f in persistent):
                fleet = self.store.model_windows(model, utcnow() - FLEET_HORIZON)
                own = [w["id"] for w in recent if w.get("findings")]
                operational = operational_causes(persistent, fleet, tenant_id=device.tenant_id, own_windows=own)
            causes = rank_causes(persistent, recent, instructed=instructed, operational=operational)
            summary = summarize(
                {
                    "tenant": device.tenant,
                    "release": window.release,
                    "findings": persistent,
                    "impact": impact,
                    "causes": causes,
                }
            )
            incident, opened = self.store.upsert_incident(
                device.tenant_id, window.release, persistent, impact, priority, causes, summary
            )
            if self.on_incident is not None:
                try:
                    self.on_incident(incident)
                except ConsortiaError as exc:  # a policy that cannot act must not lose the window
                    log.warning("automation on incident %s: %s", incident["id"], exc.message)
            if opened:
                top = persistent[0]
                log.warning(
                    "incident %s (%s) opened at %s on %s: %s of %s",
                    incident["id"],
                    priority,
                    device.tenant,
                    window.release,
                    top["kind"],
                    top["target"],
                )
        return findings

    def _reference(self, ref: dict[str, Any], tenant: str) -> dict[str, Any] | None:
        """The tenant's own training reference if its sites contributed one, else the
        consortium's (a device of a tenant without sites in the job)."""
        digest = (ref.get("per_tenant") or {}).get(tenant)
        if digest is not None and self.blobs is not None:
            if digest not in self._tenant_refs:
                self._tenant_refs[digest] = json.loads(self.blobs.get(digest))
            return self._tenant_refs[digest]
        return ref.get("profile")

    def _impact(
        self, device: Device, release: str, recent: list[dict[str, Any]], persistent: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], str]:
        tenant = self.store.get_tenant(device.tenant)
        flagged = [w for w in recent if w.get("findings")]
        names = {d.id: d.name for d in self.store.list_devices(device.tenant_id)}
        rows = self.store.release_rows(release, utcnow() - timedelta(hours=1))
        total = sum(rows.values()) or 1
        share = sum(int(w["rows"]) for w in flagged) / total
        impact = {
            "tenants": [device.tenant],
            "regulated": tenant.regulated,
            "devices": sorted({names.get(w["device_id"], str(w["device_id"])) for w in flagged}),
            "traffic_share": round(min(share, 1.0), 4),
            "windows": len(flagged),
        }
        moved = any(f["kind"] in ("prediction_shift", "group_decision_shift") for f in persistent)
        strong = any(f["kind"] in ("covariate_drift", "prediction_shift") and f["effect"] >= 0.25 for f in persistent)
        if tenant.regulated and (moved or strong):
            priority = "P1"
        elif tenant.regulated or share >= 0.25:
            priority = "P2"
        else:
            priority = "P3"
        return impact, priority

    # ------------------------------------------------------------------ reads

    def _visible(self, principal: Principal, incident: dict[str, Any]) -> dict[str, Any]:
        if principal.tenant_id is not None and incident.get("tenant_id") != principal.tenant_id:
            raise PermissionDeniedError("this incident belongs to another tenant.")
        return {k: v for k, v in incident.items() if k != "tenant_id"}

    def list(self, principal: Principal, state: str | None) -> list[dict[str, Any]]:
        return self.store.list_incidents(principal.tenant_id, state)

    def show(self, principal: Principal, incident_id: int) -> dict[str, Any]:
        stored = self.store.get_incident(incident_id)
        incident = self._visible(principal, stored)
        windows = self.store.recent_windows(stored["tenant_id"], incident["release"], 10)
        if self.llm_url is not None:
            incident["narrative"] = self._narrative(incident)
        incident["automation"] = [
            {"run": r["id"], "policy": r["policy"], "state": r["state"]}
            for r in self.store.automation_runs()
            if any(i["id"] == incident_id for i in (r["steps"][0].get("incidents") or []))
        ]
        incident["recent_windows"] = [
            {
                "id": w["id"],
                "ended_at": w["ended_at"],
                "rows": w["rows"],
                "findings": [(f["kind"], f["target"]) for f in w.get("findings", [])],
            }
            for w in windows
        ]
        return incident

    def _narrative(self, incident: dict[str, Any]) -> dict[str, Any]:
        """The LLM's rephrasing of the template summary, if every number and name in it
        is grounded in the incident (:func:`consortia.core.rca.grounded`); otherwise the
        template stands, and the answer says why. Cached per incident version."""
        key = (incident["id"], incident["updated_at"])
        if key not in self._phrased:
            self._phrased[key] = self._ask_llm(incident)
        return self._phrased[key]

    def _ask_llm(self, incident: dict[str, Any]) -> dict[str, Any]:
        import httpx

        template = incident["summary"]
        facts = {k: incident[k] for k in ("tenant", "release", "priority", "findings", "impact", "causes")}
        body = {
            "model": self.llm_model,
            "temperature": 0,
            "messages": [
                {
                    "role": "system",
                    "content": "Rephrase the incident summary for an operator in 2-4 plain sentences. Use only "
                    "numbers and names that appear in the summary or the facts; do not add any.",
                },
                {"role": "user", "content": f"Summary: {template}\nFacts: {json.dumps(facts, default=str)}"},
            ],
        }
        try:
            resp = httpx.post(f"{self.llm_url}/v1/chat/completions", json=body, timeout=20.0)
            resp.raise_for_status()
            text = str(resp.json()["choices"][0]["message"]["content"]).strip()
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            return {"text": template, "source": "template", "reason": f"LLM endpoint unavailable: {exc}"}
        ok, bad = grounded(text, facts, template)
        if not ok:
            log.warning("LLM rephrasing of incident %s refused: ungrounded %s", incident["id"], bad[:5])
            return {"text": template, "source": "template", "reason": f"LLM text had ungrounded {bad[:5]}"}
        return {"text": text, "source": "llm", "reason": None}

    def resolve(self, principal: Principal, incident_id: int, note: str) -> dict[str, Any]:
        self._visible(principal, self.store.get_incident(incident_id))
        return self.store.resolve_incident(incident_id, principal.name, note)


def _persistent(recent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Findings seen in at least PERSIST of the recent windows, merged, strongest first."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for w in recent:
        for f in w.get("findings", []):
            key = (f["kind"], f["target"])
            m = merged.setdefault(
                key, {"kind": f["kind"], "target": f["target"], "windows": 0, "p_value": 1.0, "effect": 0.0}
            )
            m["windows"] += 1
            m["p_value"] = min(m["p_value"], f["p_value"])
            m["effect"] = max(m["effect"], f["effect"])
    out = [m for m in merged.values() if m["windows"] >= PERSIST]
    return sorted(out, key=lambda m: (m["p_value"], -m["effect"]))
