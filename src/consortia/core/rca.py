"""Root-cause ranking of an incident and its plain-language summary. Pure.

Candidate causes, each with an effect estimate, its uncertainty and its evidence:

- ``feature_drift`` / ``data_quality`` with **interventional** evidence: the serving
  agents re-scored their own rows with the feature redrawn from its reference
  (:mod:`consortia.edge.attribution`); the effect is the share of the prediction shift
  that disappears (mean over the incident's windows, with the windows' 95% intervals
  averaged). A feature that only coincides with the shift recovers little.
- the same kinds with **detection** evidence only (the feature moved, but the model's
  output did not, or no agent could re-score): effect is the finding's own size (PSI, or
  the rise of a missing / out-of-range rate), no interval.
- ``performance`` when delayed labels show accuracy falling with no input explaining it
  (concept drift: the world changed under the model).
- ``version_skew`` when the windows come from a release the device was not told to run.
- ``release`` against ``infrastructure`` for a symptom that changed when a release
  reached part of the fleet (:func:`release_vs_infrastructure`): a canary is a natural
  experiment, so the release's effect is the difference-in-differences between the devices
  that received it and those that did not, before and after; what moved on every device
  alike is the infrastructure's. A release that merely coincides with the symptom gets
  close to nothing.

Ranking: interventional causes first, by effect; then the rest by their test's p-value.
:func:`summarize` turns the structured incident into two to four sentences naming the
tenant, the symptom, the top cause with its number and the recommended action, each
claim followed by its evidence reference (window ids). :func:`grounded` decides whether a
rephrasing (e.g. by an LLM) may replace it: every number and every identifier in it must
appear in the structured incident or in the template's own text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["grounded", "operational_causes", "rank_causes", "release_vs_infrastructure", "summarize"]

_QUALITY = ("missing_spike", "out_of_range")
_OPERATIONS = {"latency_rise": "latency_p99_ms", "error_rise": "error_rate"}
_SPLIT = {**_OPERATIONS, "performance_drop": "accuracy"}  # symptoms a release change may explain


def rank_causes(
    findings: Sequence[dict[str, Any]],
    windows: Sequence[dict[str, Any]],
    *,
    instructed: str | None = None,
    operational: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Ranked causes from an incident's persistent ``findings`` and its recent
    ``windows`` (each with ``id``, ``release``, optional ``attribution`` and ``findings``).
    ``operational``: release/infrastructure causes of latency or error findings
    (:func:`operational_causes`), ranked after the interventional ones and before
    detection-only ones."""
    causes: list[dict[str, Any]] = []
    by_target: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        by_target.setdefault(f["target"], []).append(f)
    attributed = [w for w in windows if w.get("attribution")]
    explained: set[str] = set()
    if attributed:
        names = sorted({n for w in attributed for n in w["attribution"]["features"]})
        for name in names:
            rec = [w["attribution"]["features"][name] for w in attributed if name in w["attribution"]["features"]]
            effect = sum(r["recovery"] for r in rec) / len(rec)
            lo = sum(r["ci"][0] for r in rec) / len(rec)
            hi = sum(r["ci"][1] for r in rec) / len(rec)
            own = by_target.get(name, [])
            # what the feature did in any recent window (persistence picks which findings
            # count, not what kind of change it was): a shift that also pushes values out of
            # range is a distribution change, not a broken feed
            seen = [x["kind"] for w in windows for x in w.get("findings", []) if x["target"] == name]
            seen += [f["kind"] for f in own]
            quality = any(k in _QUALITY for k in seen) and "covariate_drift" not in seen
            causes.append(
                {
                    "kind": "data_quality" if quality else "feature_drift",
                    "target": name,
                    "effect": round(effect, 4),
                    "ci": [round(lo, 4), round(hi, 4)],
                    "unit": "share of the prediction shift removed by redrawing it from its reference",
                    "method": "interventional",
                    "evidence": {
                        "windows": [w["id"] for w in attributed],
                        "prediction_psi": [w["attribution"]["prediction_psi"] for w in attributed],
                        "findings": [{k: f[k] for k in ("kind", "p_value", "effect")} for f in own],
                    },
                }
            )
            explained.add(name)
    detected = []
    for f in findings:
        if f["target"] in explained or f["kind"] in ("prediction_shift", *_OPERATIONS):
            continue
        if any(c.get("finding") == f["kind"] for c in operational):
            continue  # already split between a release and the rest
        if f["kind"] == "performance_drop":
            kind, unit = "performance", "fall in accuracy on delayed labels"
        elif f["kind"] == "group_decision_shift":
            kind, unit = "fairness", "change in the group's rate of positive decisions"
        elif f["kind"] in _QUALITY:
            kind, unit = "data_quality", f"rise in the {f['kind'].replace('_', ' ')} rate"
        else:
            kind, unit = "feature_drift", "PSI against the reference"
        detected.append(
            {
                "kind": kind,
                "target": f["target"],
                "effect": round(float(f["effect"]), 4),
                "ci": None,
                "unit": unit,
                "method": "detection",
                "p_value": f["p_value"],
                "evidence": {
                    "windows": [
                        w["id"] for w in windows if any(x["target"] == f["target"] for x in w.get("findings", []))
                    ],
                    "findings": [{"kind": f["kind"], "p_value": f["p_value"], "effect": f["effect"]}],
                },
            }
        )
    causes.sort(key=lambda c: -c["effect"])
    detected.sort(key=lambda c: (c["p_value"], -c["effect"]))
    out = causes + list(operational) + detected
    served = {w["release"] for w in windows}
    if instructed is not None and served - {instructed}:
        out.insert(
            0,
            {
                "kind": "version_skew",
                "target": ", ".join(sorted(served - {instructed})),
                "effect": 1.0,
                "ci": None,
                "unit": "the windows come from a release the device was not told to run",
                "method": "configuration",
                "evidence": {"windows": [w["id"] for w in windows], "instructed": instructed},
            },
        )
    return out


_ACTIONS = {
    "feature_drift": "check the source of {target} at {tenant}; if the new distribution is real, retrain with recent "
    "data (a federated job warm-started from {release}) and roll it out as a canary",
    "data_quality": "fix the data feed that fills {target} at {tenant}; no retraining is needed if the feed is "
    "repaired",
    "performance": "retrain with the labelled recent data, or roll back to the previous release if a release "
    "change preceded the drop",
    "infrastructure": "check the serving hosts, network and shared services behind {target} at {tenant}; the "
    "change is not the model's, so neither a rollback nor retraining will fix it",
    "release": "roll back {target} (`consortia rollout rollback`) and compare it with the previous release before "
    "rolling it out again",
    "fairness": "review the model's decisions for {target} at {tenant} with its compliance officer before the "
    "next release; compare with the card's fairness figures and retrain or recalibrate if the change is not "
    "explained by the population",
    "version_skew": "re-issue the assignment to the affected devices (`consortia edge assign`) and check their "
    "update logs",
}


_MEASURE = {
    "prediction_shift": "PSI",
    "covariate_drift": "PSI",
    "missing_spike": "rate up by",
    "out_of_range": "rate up by",
    "performance_drop": "accuracy down by",
    "latency_rise": "p99 up by a relative",
    "group_decision_shift": "positive-decision rate moved by",
    "error_rise": "error rate up by",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def summarize(incident: dict[str, Any]) -> str:
    """Two to four sentences from the structured incident (tenant, release, findings,
    impact, causes); every number and name comes from it, each claim cites its windows."""
    tenant, release = incident["tenant"], incident["release"]
    impact = incident["impact"]
    # the symptom users feel: the model's output or accuracy if either moved, else the strongest finding
    outputs = [f for f in incident["findings"] if f["kind"] in ("performance_drop", "prediction_shift")]
    top_finding = outputs[0] if outputs else incident["findings"][0]
    symptom = {
        "prediction_shift": "the model's predictions shifted",
        "covariate_drift": f"the input {top_finding['target']} drifted",
        "missing_spike": f"{top_finding['target']} went missing more often",
        "out_of_range": f"{top_finding['target']} went out of its expected range more often",
        "performance_drop": "accuracy on delayed labels fell",
        "latency_rise": "serving latency rose",
        "group_decision_shift": f"decisions for {top_finding['target']} changed",
        "error_rise": "serving errors rose",
    }.get(top_finding["kind"], top_finding["kind"])
    devices = ", ".join(impact.get("devices", [])) or "its devices"
    measure = _MEASURE.get(top_finding["kind"], "effect")
    first = (
        f"At {tenant} ({'regulated' if impact.get('regulated') else 'not regulated'}), on {release}, {symptom} "
        f"({measure} {top_finding['effect']:.3g}, p = {top_finding['p_value']:.2g}) "
        f"in {top_finding['windows']} of the "
        f"last windows from {devices}, {_pct(impact.get('traffic_share', 0.0))} of the release's recent traffic."
    )
    causes = incident.get("causes") or []
    if not causes:
        return first + " No cause could be ranked yet; the incident stays open for more evidence."
    c = causes[0]
    cite = "windows " + ", ".join(str(w) for w in c["evidence"].get("windows", [])[:5])
    if c["method"] == "interventional":
        why = (
            f"Top cause: {c['target']} ({c['kind'].replace('_', ' ')}): redrawing it from its reference removes "
            f"{_pct(c['effect'])} of the prediction shift (95% CI {_pct(c['ci'][0])} to {_pct(c['ci'][1])}) [{cite}]."
        )
    elif c["method"] == "difference-in-differences":
        other = next((x for x in causes[1:] if x["method"] == c["method"]), None)
        rest = f"; the other part, {other['kind']}, {other['effect']:.3g}" if other else ""
        why = (
            f"Top cause: {c['kind']} ({c['target']}): {c['unit']} {c['effect']:.3g} (95% CI {c['ci'][0]:.3g} to "
            f"{c['ci'][1]:.3g}){rest}, by difference-in-differences around {c['evidence']['switch_at']} [{cite}]."
        )
    elif c["kind"] == "version_skew":
        why = f"Top cause: version skew: the device served {c['target']}, not the instructed release [{cite}]."
    else:
        why = f"Top cause: {c['target']} ({c['kind'].replace('_', ' ')}), {c['unit']} {c['effect']:.3g} [{cite}]."
    action = _ACTIONS.get(c["kind"], "investigate").format(target=c["target"], tenant=tenant, release=release)
    return f"{first} {why} Recommended: {action}."


_NUMBER = re.compile(r"(?<![A-Za-z_0-9.])\d+(?:[.,]\d+)*(?:e[-+]?\d+)?%?")
_IDENT = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:[-_:./][A-Za-z0-9]+)+\b")


def _value(token: str) -> float | None:
    try:
        return float(token.rstrip("%").replace(",", ""))
    except ValueError:
        return None


def _spellings(token: str) -> set[str]:
    """A source figure, and the same figure as a percentage or a fraction (0.4 <-> 40%),
    at four significant digits."""
    x = _value(token)
    return set() if x is None else {f"{v:.4g}" for v in (x, x * 100, x / 100)}


def grounded(text: str, incident: dict[str, Any], template: str) -> tuple[bool, list[str]]:
    """Whether ``text`` states only figures and names found in ``incident`` (its JSON)
    or in ``template``; returns (ok, the offending tokens)."""
    source = json.dumps(incident, default=str) + " " + template
    allowed_numbers: set[str] = set()
    for tok in _NUMBER.findall(source):
        allowed_numbers |= _spellings(tok)
    allowed_idents = set(_IDENT.findall(source)) | {str(v) for v in _strings(incident)}
    bad = []
    for tok in _NUMBER.findall(text):
        x = _value(tok)
        if x is None or f"{x:.4g}" not in allowed_numbers:
            bad.append(tok)
    for tok in _IDENT.findall(text):
        if tok not in allowed_idents:
            bad.append(tok)
    return not bad, bad


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (str(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [str(obj)]


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, (var / n) ** 0.5


def release_vs_infrastructure(
    windows: Sequence[dict[str, Any]], metric: str, release: str, switch_at: str
) -> list[dict[str, Any]] | None:
    """Split the change of ``metric`` around ``switch_at`` (ISO time the release reached
    the canaries) into the release's effect and a common (infrastructure) effect.

    ``windows``: ``{"id", "device", "release", "ended_at", metric: value}``. Treated
    devices served ``release`` after the switch; controls never did. Release effect =
    (treated after - treated before) - (control after - control before), with a 95%
    interval from the four groups' standard errors; infrastructure effect = the controls'
    change. None without windows on both sides of the switch in both groups."""
    treated = {w["device"] for w in windows if w["release"] == release and w["ended_at"] > switch_at}
    groups: dict[tuple[bool, bool], list[float]] = {(t, a): [] for t in (True, False) for a in (True, False)}
    ids: dict[tuple[bool, bool], list[int]] = {k: [] for k in groups}
    for w in windows:
        if w.get(metric) is None:
            continue
        key = (w["device"] in treated, w["ended_at"] > switch_at)
        if key[0] is False and w["release"] == release:
            continue  # a control device cannot have served the release
        groups[key].append(float(w[metric]))
        ids[key].append(w["id"])
    if any(not v for v in groups.values()):
        return None
    (tb, tb_se), (ta, ta_se) = _mean_se(groups[(True, False)]), _mean_se(groups[(True, True)])
    (cb, cb_se), (ca, ca_se) = _mean_se(groups[(False, False)]), _mean_se(groups[(False, True)])
    did = (ta - tb) - (ca - cb)
    did_se = (tb_se**2 + ta_se**2 + cb_se**2 + ca_se**2) ** 0.5
    common = ca - cb
    common_se = (cb_se**2 + ca_se**2) ** 0.5
    evidence = {
        "treated_devices": sorted(treated),
        "windows": {f"{'treated' if t else 'control'}_{'after' if a else 'before'}": ids[(t, a)] for t, a in ids},
        "means": {"treated": [tb, ta], "control": [cb, ca]},
        "switch_at": switch_at,
    }
    return sorted(
        [
            {
                "kind": "release",
                "target": release,
                "effect": round(did, 6),
                "ci": [round(did - 1.96 * did_se, 6), round(did + 1.96 * did_se, 6)],
                "unit": f"change of {metric} on devices that received it, beyond the others'",
                "method": "difference-in-differences",
                "evidence": evidence,
            },
            {
                "kind": "infrastructure",
                "target": metric,
                "effect": round(common, 6),
                "ci": [round(common - 1.96 * common_se, 6), round(common + 1.96 * common_se, 6)],
                "unit": f"change of {metric} on devices that did not receive the release",
                "method": "difference-in-differences",
                "evidence": evidence,
            },
        ],
        key=lambda c: -abs(c["effect"]),
    )


def _latest_change(fleet: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """(release, first time it served) of the newest release to appear while another
    was already serving within ``fleet``; None if nothing changed in view."""
    first: dict[str, str] = {}
    for w in fleet:
        if w["release"] not in first or w["started_at"] < first[w["release"]]:
            first[w["release"]] = w["started_at"]
    earliest = min((w["ended_at"] for w in fleet), default=None)
    changes = [(t, r) for r, t in first.items() if earliest is not None and t > earliest]
    if not changes:
        return None
    at, release = max(changes)
    return release, at


def operational_causes(
    findings: Sequence[dict[str, Any]],
    fleet: Sequence[dict[str, Any]],
    *,
    tenant_id: int,
    own_windows: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Release and infrastructure causes of an incident's latency or error findings, and
    release vs a fleet-wide change for an accuracy drop on delayed labels.

    ``fleet``: operational summaries of every recent window of the model's releases,
    consortium-wide (``{"id", "device_id", "tenant_id", "release", "started_at",
    "ended_at", "latency_p99_ms", "error_rate"}``). If a release reached part of the fleet
    in view, :func:`release_vs_infrastructure` splits the metric's change at that moment
    into the release's effect and the common (infrastructure) one; otherwise the
    finding's own relative rise is an ``infrastructure`` cause with detection evidence
    (``own_windows``). Other tenants' devices and windows appear only as counts."""
    out: list[dict[str, Any]] = []
    change = _latest_change(fleet)
    for f in findings:
        metric = _SPLIT.get(f["kind"])
        if metric is None:
            continue
        split = None
        if change is not None:
            rows = [{**w, "device": w["device_id"]} for w in fleet]
            split = release_vs_infrastructure(rows, metric, change[0], change[1])
        if split is None and f["kind"] == "performance_drop":
            continue  # no release change in view: the ranking's own performance cause stands
        if split is None:
            out.append(
                {
                    "kind": "infrastructure",
                    "target": metric,
                    "effect": round(float(f["effect"]), 4),
                    "ci": None,
                    "unit": "rise against the devices' own earlier windows"
                    + (" (relative)" if f["kind"] == "latency_rise" else ""),
                    "method": "detection",
                    "evidence": {"windows": list(own_windows), "finding": {k: f[k] for k in ("p_value", "effect")}},
                }
            )
            continue
        own = {w["id"] for w in fleet if w["tenant_id"] == tenant_id}
        owners = {w["device_id"]: w["tenant_id"] for w in fleet}
        for c in split:
            ev = c["evidence"]
            treated = ev["treated_devices"]
            c["evidence"] = {
                "windows": sorted(i for ids in ev["windows"].values() for i in ids if i in own),
                "window_counts": {g: len(ids) for g, ids in ev["windows"].items()},
                "devices": {
                    "treated": len(treated),
                    "control": len({w["device_id"] for w in fleet} - set(treated)),
                    "treated_here": sum(1 for d in treated if owners.get(d) == tenant_id),
                },
                "means": {k: [round(x, 4) for x in v] for k, v in ev["means"].items()},
                "switch_at": ev["switch_at"],
            }
            c["finding"] = f["kind"]
            if c["kind"] == "infrastructure" and f["kind"] == "performance_drop":
                # what moved on every cohort alike is the world, not the serving hosts
                c["kind"], c["unit"] = "performance", "change of accuracy on devices that did not receive the release"
            out.append(c)
    return out
