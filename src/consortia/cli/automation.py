"""``consortia automation apply|list|history|approve``: policies that close the loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, client, console

__all__ = ["automation_app", "describe_step"]

automation_app = typer.Typer(help="Automation policies: detect -> decide -> act -> validate.", no_args_is_help=True)


@automation_app.command("apply")
def automation_apply(
    file: Path, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Load an automation policy (YAML); each apply is a new revision."""
    from consortia.cli.governance import read_yaml

    doc = read_yaml(file)
    with client(coordinator, token, home) as c:
        out = c.post_json("/v1/automation/policies", doc)
    console.print(
        f"automation policy {out['name']} for {out['model']} applied: revision {out['revision']}, "
        f"sha256 {out['digest'][:16]}"
    )


@automation_app.command("list")
def automation_list(coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None) -> None:
    """Current policies."""
    with client(coordinator, token, home) as c:
        items = c.get_json("/v1/automation/policies")
    table = Table("policy", "model", "revision", "triggers", "gate", "actions", "validation")
    for p in items:
        d = p["document"]
        table.add_row(
            p["name"],
            p["model"],
            str(p["revision"]),
            ", ".join(t["kind"] for t in d["triggers"]),
            d["gate"],
            ", ".join(a["kind"] for a in d["actions"]),
            "canary" + (f" -> {d['validation']['promote_to']}" if d["validation"]["promote_to"] else "")
            if d.get("validation")
            else "-",
        )
    console.print(table)


def describe_step(s: dict[str, Any]) -> str:
    """One line for a run's step."""
    stage = s["stage"]
    if stage == "detect":
        trig = s.get("trigger", {})
        inc = ", ".join(f"#{i['id']} {i['tenant']} ({i['priority']})" for i in s.get("incidents", []))
        cause = s.get("top_causes") or []
        top = f"; top cause {cause[0]['kind']} of {cause[0]['target']} ({cause[0]['effect']:.2f})" if cause else ""
        return f"{trig.get('kind')} trigger" + (f": incidents {inc}" if inc else "") + top
    if stage == "decide":
        if s["decision"] == "pending":
            return f"gate {s['gate']}: waiting for signed approvals of {', '.join(s['required'])}"
        who = f" by {', '.join(s['approved_by'])}" if s.get("approved_by") else f" ({s.get('reason')})"
        return f"gate {s['gate']}: {s['decision']}{who}"
    if stage == "approval":
        return f"{s['tenant']} signed '{s['decision']}' (key {s['key'][:16]})"
    if stage == "act":
        if not s.get("ok", True):
            return f"{s['action']} FAILED: {s.get('error')}"
        if s["action"] == "retrain":
            return f"retrain: job {s['job']}, warm-started from {s['warm_start']}, {s['rounds']} round(s)"
        if s["action"] == "rollback":
            return f"rollback of rollout {s['rollout']}"
        return f"webhook {s['url']}: HTTP {s['status']}"
    parts = [f"{k} {s[k]}" for k in ("job", "version", "rollout", "result", "promoted", "to", "error") if s.get(k)]
    if s.get("waiting_for"):
        parts.append(f"promotion waits for {', '.join(s['waiting_for'])}")
    return "; ".join(parts)


@automation_app.command("history")
def automation_history(
    policy: Annotated[str | None, typer.Option(help="one policy's runs")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Every run with its chain detect -> decide -> act -> validate."""
    with client(coordinator, token, home) as c:
        runs = c.get_json("/v1/automation/runs", params={"policy": policy} if policy else {})
    if as_json:
        print(json.dumps(runs, indent=2))
        return
    if not runs:
        console.print("no automation runs yet.")
    for r in runs:
        table = Table(title=f"run {r['id']} of {r['policy']} (rev {r['revision']}) on {r['model']}: {r['state']}")
        table.add_column("at")
        table.add_column("stage")
        table.add_column("what", overflow="fold")
        for s in r["steps"]:
            table.add_row(s["at"][11:19], s["stage"], describe_step(s))
        console.print(table)


@automation_app.command("approve")
def automation_approve(
    run: int,
    key: Annotated[Path, typer.Option(help="your tenant's Ed25519 private key (PEM)")],
    reject: Annotated[bool, typer.Option("--reject", help="sign a rejection instead")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Sign (locally) and submit your tenant's gate decision on a waiting run."""
    from consortia.governance import load_private_key, sign_automation_approval

    private = load_private_key(key)
    with client(coordinator, token, home) as c:
        req = sign_automation_approval(c, private, run, "reject" if reject else "approve")
        out = c.post_json(f"/v1/automation/runs/{run}/approvals", req.model_dump())
    console.print(f"run {out['id']}: {out['state']} ({describe_step(out['steps'][-1])})")
