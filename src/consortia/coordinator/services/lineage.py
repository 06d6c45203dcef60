"""Federated lineage of a finished job and the model card built from it.

Lineage answers: which institutions' data went into this model, in which rounds, under
what settings. Every fact comes from what the coordinator already holds: the job spec,
the rounds with their participating sites, each site's data fingerprint for the round
(schema hash, row count, content hash, all computed at the site) and the metrics. No raw
data is involved, because none ever arrived.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

from consortia import __version__
from consortia.store.entities import Job, ModelVersion, Round, Site, Tenant

__all__ = ["build_lineage", "card_markdown", "contributors", "git_revision", "model_card"]


@functools.cache
def git_revision() -> str | None:
    """The source tree's git commit, if Consortia runs from a checkout (or
    ``CONSORTIA_GIT_REVISION`` is set by a packager); else None."""
    if os.environ.get("CONSORTIA_GIT_REVISION"):
        return os.environ["CONSORTIA_GIT_REVISION"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_lineage(
    job: Job,
    rounds: list[Round],
    updates: dict[int, list[Any]],
    sites: list[Site],
    tenants: list[Tenant],
    final_metrics: dict[str, Any],
    params_hash: str,
) -> dict[str, Any]:
    """Lineage of ``job`` from its closed rounds (``updates`` maps round id to accepted
    updates, which carry the site's fingerprint in their metrics)."""
    spec = job.spec
    site_tenant = {s.name: s.tenant for s in sites}
    regulated = {t.name: t.regulated for t in tenants}
    out_rounds = []
    per_tenant: dict[str, dict[str, Any]] = {}
    for r in rounds:
        if r.state != "closed":
            continue
        fps: dict[str, Any] = {}
        examples: dict[str, int] = {}
        if r.kind == "train":
            for u in updates.get(r.id, []):
                fps[u.site] = (u.metrics or {}).get("fingerprint")
                examples[u.site] = u.num_examples
        else:
            for t in r.tasks:
                if t.state == "completed" and t.result:
                    fps[t.site] = t.result.get("fingerprint")
        participants = sorted(fps)
        out_rounds.append(
            {
                "number": r.number,
                "attempt": r.attempt,
                "kind": r.kind,
                "sites": participants,
                "tenants": sorted({site_tenant.get(s, "?") for s in participants}),
                "fingerprints": fps,
                "examples": examples,
                "global_in": r.global_in,
                "global_out": r.global_out,
                "closed_at": r.closed_at.isoformat() if r.closed_at else None,
            }
        )
        for s in participants:
            t = per_tenant.setdefault(
                site_tenant.get(s, "?"),
                {"sites": [], "regulated": regulated.get(site_tenant.get(s, "?"), False), "rounds": {}, "rows": {}},
            )
            if s not in t["sites"]:
                t["sites"].append(s)
            t["rounds"].setdefault(r.kind, []).append(r.number)
            fp = fps.get(s) or {}
            if r.kind == "evaluate" and "row_count" in fp:
                t["rows"]["test"] = t["rows"].get("test", 0) + int(fp["row_count"])
    # Training rows per tenant: the fingerprinted training split of each of its sites
    # (the same rows every round; the last train round each site joined counts).
    for t in per_tenant.values():
        rows = 0
        for s in t["sites"]:
            last = [r for r in out_rounds if r["kind"] == "train" and s in r["sites"]]
            if last:
                rows += int((last[-1]["fingerprints"].get(s) or {}).get("row_count", 0))
        t["rows"]["train"] = rows
        for kind in t["rounds"]:
            t["rounds"][kind] = sorted(set(t["rounds"][kind]))
    per_site = final_metrics.get("per_site", {})
    tenant_metrics: dict[str, dict[str, Any]] = {}
    for s, m in per_site.items():
        tm = tenant_metrics.setdefault(site_tenant.get(s, "?"), {"n": 0, "auc": None, "accuracy": 0.0, "sites": {}})
        tm["sites"][s] = m
        tm["n"] += m["n"]
        tm["accuracy"] += m["accuracy"] * m["n"]
    for tm in tenant_metrics.values():
        tm["accuracy"] = tm["accuracy"] / tm["n"] if tm["n"] else None
        aucs = [(m["auc"], m["n"]) for m in tm["sites"].values() if m["auc"] is not None]
        tm["auc"] = sum(a * n for a, n in aucs) / sum(n for _, n in aucs) if aucs else None
    return {
        "model": spec.get("model") or spec["name"],
        "params_hash": params_hash,
        "job": {"id": job.id, "name": job.name, "spec_hash": job.spec_hash, "spec": spec},
        "software": {"consortia": __version__, "git_revision": git_revision()},
        "strategy": spec["strategy"],
        "recipe": spec["recipe"],
        "hyperparameters": {
            k: spec[k]
            for k in ("rounds", "local_epochs", "batch_size", "learning_rate", "fraction", "min_sites", "seed", "split")
        },
        "preprocessing": job.preprocessing,
        "rounds": out_rounds,
        "tenants": dict(sorted(per_tenant.items())),
        "metrics": {
            "pooled": {k: final_metrics.get(k) for k in ("pooled_auc", "pooled_accuracy", "pooled_loss", "n")},
            "per_tenant": dict(sorted(tenant_metrics.items())),
            "fairness": final_metrics.get("fairness"),
        },
        "privacy": {"secure_aggregation": False, "differential_privacy": None, "epsilon_spent": None},
        "card": spec.get("card", {}),
    }


def model_card(v: ModelVersion, approvals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The model card of a version as JSON (the Markdown view is :func:`card_markdown`)."""
    lin = v.lineage
    card = lin.get("card", {})
    fairness = lin["metrics"].get("fairness")
    limitations = list(card.get("limitations", []))
    composite = lin.get("composite")
    n_tenants = len(contributors(lin))
    if composite is not None:
        a = composite["adapter"]
        limitations.append(
            f"composite release: the adapter ({', '.join(a['params'])}) was fine-tuned on {a['site']}'s data only; "
            f"it is meant for {a['tenant']}'s traffic and may be delivered only to its devices."
        )
    if n_tenants < 3:
        limitations.append(f"trained on data from only {n_tenants} institution(s).")
    if fairness is None:
        limitations.append("no sensitive attribute was declared: fairness across groups was not measured.")
    small = [t for t, m in lin["metrics"]["per_tenant"].items() if m["n"] < 100]
    if small:
        limitations.append(f"per-tenant metrics of {', '.join(small)} rest on fewer than 100 test rows.")
    if lin["privacy"]["differential_privacy"] is None:
        limitations.append("no differential privacy: model updates were not noised.")
    train_rounds = [r for r in lin["rounds"] if r["kind"] == "train"]
    return {
        "model": v.model,
        "version": v.version,
        "stage": v.stage,
        "params_hash": v.params_hash,
        "release_digest": v.release_digest,
        "created_at": v.created_at.isoformat(),
        "intended_use": card.get("intended_use") or "not stated in the job spec (card.intended_use).",
        "institutions": {
            t: {
                "regulated": d["regulated"],
                "sites": d["sites"],
                "train_rows": d["rows"].get("train", 0),
                "test_rows": d["rows"].get("test", 0),
            }
            for t, d in lin["tenants"].items()
        },
        "metrics": lin["metrics"],
        "fairness": fairness,
        "sensitive_attribute": card.get("sensitive_attribute"),
        "limitations": limitations,
        "lineage": {
            "job_id": lin["job"]["id"],
            "spec_hash": lin["job"]["spec_hash"],
            "recipe": lin["recipe"]["name"],
            "strategy": lin["strategy"]["name"],
            "train_rounds": len(train_rounds),
            "software": lin["software"],
            "privacy": lin["privacy"],
        },
        "composite": composite,
        "approvals": approvals or [],
    }


def contributors(lin: dict[str, Any]) -> list[str]:
    """Tenants whose data went into a version: its job's, plus its base's for a composite."""
    names = set(lin["tenants"])
    if lin.get("composite"):
        names |= set(lin["composite"]["base"]["tenants"])
    return sorted(names)


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-"


def card_markdown(card: dict[str, Any]) -> str:
    """Markdown rendering of :func:`model_card`."""
    lines = [
        f"# Model card: {card['model']} version {card['version']}",
        "",
        f"Stage: **{card['stage']}**. Parameters SHA-256 `{card['params_hash']}`; "
        f"release manifest digest `{card['release_digest'] or 'not signed yet'}`.",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Participating institutions",
        "",
        "| institution | regulated | sites | training rows | test rows |",
        "|---|---|---|---|---|",
    ]
    for t, d in card["institutions"].items():
        lines.append(
            f"| {t} | {'yes' if d['regulated'] else 'no'} | {', '.join(d['sites'])} | {d['train_rows']} |"
            f" {d['test_rows']} |"
        )
    m = card["metrics"]
    lines += ["", "## Metrics (test split of every site)", "", "| scope | n | AUC | accuracy |", "|---|---|---|---|"]
    for t, tm in m["per_tenant"].items():
        lines.append(f"| {t} | {tm['n']} | {_f(tm['auc'])} | {_f(tm['accuracy'])} |")
    p = m["pooled"]
    lines.append(f"| **pooled** | {p['n']} | {_f(p['pooled_auc'])} | {_f(p['pooled_accuracy'])} |")
    lines += ["", "## Fairness", ""]
    fair = card["fairness"]
    if fair:
        lines += [
            f"Sensitive attribute `{card['sensitive_attribute']}`; groups computed at each site and shared as score "
            f"histograms only (groups under a site's minimum count suppressed). Threshold {fair['threshold']}.",
            "",
            "| group | n | AUC | selection rate | TPR |",
            "|---|---|---|---|---|",
        ]
        for g, gm in fair["groups"].items():
            lines.append(f"| {g} | {gm['n']} | {_f(gm['auc'])} | {_f(gm['selection_rate'])} | {_f(gm['tpr'])} |")
        lines += [
            "",
            f"AUC gap {_f(fair['auc_gap'])}; demographic parity gap {_f(fair['demographic_parity_gap'])}; "
            f"equal opportunity gap {_f(fair['equal_opportunity_gap'])}.",
        ]
    else:
        lines.append("Not measured (no sensitive attribute declared).")
    comp = card.get("composite")
    if comp:
        a, b = comp["adapter"], comp["base"]
        before = (b.get("metrics_at_site") or {}).get("auc")
        after = (m["per_tenant"].get(a["tenant"], {}).get("sites", {}).get(a["site"]) or {}).get("auc")
        lines += [
            "",
            "## Composite release",
            "",
            f"Global base {b['ref']} (parameters `{b['params_hash']}`, release `{b['release_digest']}`, trained by "
            f"{', '.join(b['tenants'])}) plus an adapter fine-tuned at {a['site']} ({a['tenant']}): "
            f"{', '.join(a['params'])}, {a['bytes']} bytes. AUC on {a['site']}'s test split: base {_f(before)}, "
            f"composite {_f(after)}.",
        ]
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lin = card["lineage"]
    lines += [
        "",
        "## Lineage",
        "",
        f"Job {lin['job_id']} (spec SHA-256 `{lin['spec_hash']}`): {lin['recipe']} trained with {lin['strategy']} "
        f"over {lin['train_rounds']} rounds; Consortia {lin['software']['consortia']}"
        + (f" at `{lin['software']['git_revision']}`" if lin["software"]["git_revision"] else "")
        + f". Secure aggregation: {'yes' if lin['privacy']['secure_aggregation'] else 'no'}; "
        f"epsilon spent: {lin['privacy']['epsilon_spent'] if lin['privacy']['epsilon_spent'] is not None else 'n/a'}.",
    ]
    if card["approvals"]:
        lines += ["", "## Approvals", ""] + [
            f"- {a['tenant']}: {a['decision']} for {a['stage']} at {a['signed_at']} (key {a['key'][:16]})"
            for a in card["approvals"]
        ]
    return "\n".join(lines) + "\n"
