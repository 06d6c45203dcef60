"""``consortia incidents list|show|resolve``: incidents opened from monitoring windows."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, client, console

__all__ = ["incidents_app"]

incidents_app = typer.Typer(help="Incidents opened from monitoring windows.", no_args_is_help=True)


@incidents_app.command("list")
def incidents_list(
    state: Annotated[str | None, typer.Option(help="open or resolved")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Incidents you may see (a tenant's own, or all for consortium-wide roles)."""
    with client(coordinator, token, home) as c:
        items = c.get_json("/v1/incidents", params={"state": state} if state else {})
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("id", "priority", "state", "tenant", "release", "top finding", "devices", "traffic", "opened")
    for i in items:
        top = i["findings"][0] if i["findings"] else {}
        table.add_row(
            str(i["id"]),
            i["priority"],
            i["state"],
            i["tenant"],
            i["release"],
            f"{top.get('kind', '-')} of {top.get('target', '-')}",
            ", ".join(i["impact"].get("devices", [])),
            f"{i['impact'].get('traffic_share', 0):.0%}",
            i["opened_at"][:19],
        )
    console.print(table)


@incidents_app.command("show")
def incidents_show(
    incident_id: int,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """One incident: impact, priority, findings with their evidence, recent windows."""
    with client(coordinator, token, home) as c:
        i = c.get_json(f"/v1/incidents/{incident_id}")
    if as_json:
        print(json.dumps(i, indent=2))
        return
    imp = i["impact"]
    console.print(
        f"incident {i['id']} [{i['priority']}] {i['state']}: {i['tenant']} on {i['release']}, "
        f"{'regulated' if imp.get('regulated') else 'not regulated'}, devices {', '.join(imp.get('devices', []))}, "
        f"{imp.get('traffic_share', 0):.0%} of the release's traffic in the last hour"
    )
    console.print(escape(i["summary"]))
    if i.get("narrative") and i["narrative"]["source"] == "llm":
        text = escape(i["narrative"]["text"])
        console.print(f"[dim]rephrased (every figure checked against the incident):[/] {text}")
    elif i.get("narrative"):
        console.print(f"[dim]LLM rephrasing not used: {escape(i['narrative']['reason'])}[/]")
    causes = Table("rank", "cause", "target", "effect", "95% CI", "method", title="ranked causes")
    for n, c in enumerate(i.get("causes", []), 1):
        ci = f"{c['ci'][0]:.2f} to {c['ci'][1]:.2f}" if c.get("ci") else "-"
        causes.add_row(str(n), c["kind"], c["target"], f"{c['effect']:.3g}", ci, c["method"])
    console.print(causes)
    table = Table("kind", "target", "windows", "p-value", "effect", title="findings (strongest first)")
    for f in i["findings"]:
        table.add_row(f["kind"], f["target"], str(f["windows"]), f"{f['p_value']:.2e}", f"{f['effect']:.3f}")
    console.print(table)
    for a in i.get("automation", []):
        console.print(f"automation: run {a['run']} of policy {a['policy']} ({a['state']}); see `automation history`")
    for w in i.get("recent_windows", []):
        found = ", ".join(f"{k} of {t}" for k, t in w["findings"]) or "nothing"
        console.print(f"  window {w['id']} ending {w['ended_at'][:19]} ({w['rows']} rows): {found}")


@incidents_app.command("resolve")
def incidents_resolve(
    incident_id: int,
    note: Annotated[str, typer.Option(help="what was done (goes to the audit log)")],
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Close an incident with a note."""
    with client(coordinator, token, home) as c:
        i = c.post_json(f"/v1/incidents/{incident_id}/resolve", {"note": note})
    console.print(f"incident {i['id']} {i['state']}")
