"""Aggregation safeguards: Byzantine-robust rules, central differential privacy with its
epsilon ledger, and quarantine of sites whose updates keep being flagged.

The round service calls in here at three points: when a train round opens (is there
privacy budget left for every tenant in the job? charge it), when it closes (aggregate
with the robust rule or with clipping and noise instead of the plain weighted mean), and
after it closed (quarantine the sites flagged ``quarantine_after`` rounds in a row).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from consortia.core.params import Params
from consortia.core.privacy import (
    AdaptiveClip,
    DpRound,
    bit_noise_std,
    clip,
    delta_noise_multiplier,
    epsilon,
    noised_mean,
)
from consortia.core.robust import flatten, make_rule, unflatten
from consortia.errors import ConsortiaError, SpecError
from consortia.protocol.schemas import JobSpec, PrivacySpec
from consortia.store.entities import Round, Site
from consortia.store.sqlstore import SqlStore

__all__ = [
    "budget_check",
    "check_spec",
    "current_clip_norm",
    "privacy_summary",
    "quarantine_flagged",
    "safeguarded_mean",
]

log = logging.getLogger(__name__)

CLIP_STATE = "privacy/clip_norm"


def current_clip_norm(privacy: PrivacySpec, state: Params) -> float:
    """The clipping norm a DP round uses: adaptive clipping's, kept in the job's server
    state, or the spec's fixed one."""
    return float(state[CLIP_STATE][0]) if CLIP_STATE in state else privacy.clip_norm


def check_spec(spec: JobSpec) -> None:
    """Build the robust rule once and check it against ``min_sites`` (raises SpecError)."""
    if spec.robust is None:
        return
    try:
        rule = make_rule(spec.robust.rule, spec.robust.options)
        rule.check(spec.min_sites)
    except ConsortiaError as exc:
        raise SpecError(f"robust: {exc.message}") from exc


def safeguarded_mean(
    spec: JobSpec,
    current: Params,
    state: Params,
    updates: list[tuple[Params, int, str]],
    expected_sites: int,
) -> tuple[Params, Params, dict[str, Any]]:
    """The robust or DP replacement of the weighted mean: ``(mean, state, info)``.

    ``updates`` are ``(params, num_examples, site)``; ``expected_sites`` is how many were
    sampled (the DP denominator). ``state`` carries the adaptive clipping norm across
    rounds; the returned state is the input with that norm updated.
    """
    names = sorted(current)
    base = flatten(current, names)
    deltas = np.stack([flatten(p, names) - base for p, _, _ in updates])
    weights = np.array([float(n) for _, n, _ in updates])
    sites = [s for _, _, s in updates]
    info: dict[str, Any] = {}
    new_state = dict(state)
    if spec.privacy is not None:
        p = spec.privacy
        norm = current_clip_norm(p, state)
        clipped, norms = zip(*(clip(d, norm) for d in deltas), strict=True)
        deltas = np.stack(clipped)
        z = p.noise_multiplier
        if p.adaptive_clipping is not None:  # the bits take part of the noise budget
            bit_std = bit_noise_std(expected_sites)
            z = delta_noise_multiplier(p.noise_multiplier, bit_std)
            ac = AdaptiveClip(p.adaptive_clipping.quantile, p.adaptive_clipping.learning_rate)
            nxt = ac.next_norm(norm, np.array(norms) <= norm, bit_std=bit_std)
            new_state[CLIP_STATE] = np.array([nxt], np.float32)
            info["next_clip_norm"] = nxt
        info["privacy"] = {
            "clip_norm": norm,
            "clipped_sites": [s for s, n in zip(sites, norms, strict=True) if n > norm],
            "noise_std_on_mean": z * norm / expected_sites,
        }
        if spec.robust is not None:  # only norm_bound may be combined with DP (spec validation)
            info["robust"] = {"rule": spec.robust.rule, "flagged": info["privacy"]["clipped_sites"]}
        delta = noised_mean(deltas.sum(axis=0), expected_sites, norm, z)
    else:
        assert spec.robust is not None
        rule = make_rule(spec.robust.rule, spec.robust.options)
        result = rule.combine(deltas, weights)
        delta = result.delta
        info["robust"] = {
            "rule": rule.name,
            "flagged": [sites[i] for i in result.flagged],
            "selected": None if result.selected is None else [sites[i] for i in result.selected],
        }
    return unflatten(base + delta, current, names), new_state, info


def _epsilon(spec: JobSpec, entries: list[dict[str, Any]], extra: int = 0, q: float = 1.0) -> float:
    assert spec.privacy is not None
    rounds = [DpRound(e["q"], e["noise_multiplier"], e["rounds"]) for e in entries]
    if extra:
        rounds.append(DpRound(q, spec.privacy.noise_multiplier, extra))
    return epsilon(rounds, spec.privacy.delta, spec.privacy.accountant)


def budget_check(store: SqlStore, spec: JobSpec, tenants: list[str], q: float) -> tuple[bool, dict[str, Any]]:
    """Would one more round (sampling rate ``q``) keep every tenant within budget?

    Returns ``(ok, detail)``: ``detail`` names each tenant's epsilon spent so far and
    after the round, and the budget.
    """
    assert spec.privacy is not None
    model = spec.registered_model
    out: dict[str, Any] = {"budget": spec.privacy.epsilon_budget, "delta": spec.privacy.delta, "tenants": {}}
    ok = True
    for tenant in sorted(set(tenants)):
        entries = store.ledger(model, [tenant])
        spent = _epsilon(spec, entries)
        after = _epsilon(spec, entries, 1, q)
        out["tenants"][tenant] = {"spent": spent, "after_round": after}
        ok = ok and after <= spec.privacy.epsilon_budget
    return ok, out


def privacy_summary(store: SqlStore, spec: JobSpec, job_id: int) -> dict[str, Any] | None:
    """What goes into lineage and the model card: epsilon per tenant after this job."""
    if spec.privacy is None:
        return None
    entries = store.ledger(spec.registered_model)
    per_tenant = {}
    for tenant in sorted({e["tenant"] for e in entries}):
        mine = [e for e in entries if e["tenant"] == tenant]
        job = [e for e in mine if e["job_id"] == job_id]
        per_tenant[tenant] = {
            "epsilon_this_job": _epsilon(spec, job),
            "epsilon_total": _epsilon(spec, mine),
            "rounds_this_job": sum(e["rounds"] for e in job),
        }
    p = spec.privacy
    where = "distributed (each site adds its share before masking)" if spec.secure_aggregation else "central"
    return {
        "mechanism": f"DP-FedAvg, client-level, {where} Gaussian noise",
        "noise_multiplier": p.noise_multiplier,
        "clip_norm": p.clip_norm,
        "adaptive_clipping": p.adaptive_clipping is not None,
        "delta": p.delta,
        "accountant": f"dp-accounting {p.accountant.upper()}",
        "epsilon_budget": p.epsilon_budget,
        "tenants": per_tenant,
    }


def quarantine_flagged(
    store: SqlStore, spec: JobSpec, job_id: int, rounds: list[Round], sites: list[Site]
) -> list[str]:
    """Quarantine sites flagged or rejected in each of their last ``quarantine_after``
    train rounds of this job; returns the names newly quarantined."""
    if spec.robust is None:
        return []
    need = spec.robust.quarantine_after
    closed = [r for r in rounds if r.kind == "train" and r.state in ("closed", "abandoned")]
    out = []
    for site in sites:
        if site.status != "active":
            continue
        history = []
        for r in reversed(closed):
            task = next((t for t in r.tasks if t.site == site.name), None)
            if task is None:
                continue
            flagged = site.name in ((r.metrics or {}).get("robust") or {}).get("flagged", [])
            rejected = task.state == "failed" and task.rule == "update_validation"
            history.append(flagged or rejected)
            if len(history) == need:
                break
        if len(history) == need and all(history):
            reason = (
                f"job {job_id}: its update was flagged as an outlier or rejected in each of its last {need} "
                f"round(s) ({spec.robust.rule}); release with `consortia site release {site.name}`"
            )
            if store.set_site_status(site.id, "quarantined", "coordinator", reason):
                log.warning("quarantined site %s: %s", site.name, reason)
                out.append(site.name)
    return out
