"""``consortia``: coordinator, tenants, sites, jobs and the demo."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from consortia.cli import serving
from consortia.cli.automation import automation_app
from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, console, err
from consortia.cli.common import client as _client
from consortia.cli.edge import edge_app, rollout_app
from consortia.cli.governance import approver_app, audit_app, export_app, policy_app, registry_app
from consortia.cli.jobs import adapt, job_app
from consortia.cli.monitoring import incidents_app
from consortia.errors import ConsortiaError

app = typer.Typer(
    help="Consortia: federated MLOps across institutions.", no_args_is_help=True, pretty_exceptions_enable=False
)
coordinator_app = typer.Typer(help="Run the coordinator (control plane).", no_args_is_help=True)
tenant_app = typer.Typer(help="Manage tenants (institutions).", no_args_is_help=True)
site_app = typer.Typer(help="Run a site agent beside an institution's data.", no_args_is_help=True)
credential_app = typer.Typer(help="Issue credentials for people (operator, approver, auditor).", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(tenant_app, name="tenant")
app.add_typer(site_app, name="site")
app.add_typer(job_app, name="job")
app.command("adapt")(adapt)
app.add_typer(credential_app, name="credential")
app.add_typer(registry_app, name="registry")
app.add_typer(policy_app, name="policy")
app.add_typer(approver_app, name="approver")
app.add_typer(audit_app, name="audit")
app.add_typer(export_app, name="export")
app.add_typer(edge_app, name="edge")
app.add_typer(rollout_app, name="rollout")
app.add_typer(incidents_app, name="incidents")
app.add_typer(automation_app, name="automation")
app.command("predict")(serving.predict)
app.command("serve")(serving.serve)

# ---------------------------------------------------------------------------- coordinator


@coordinator_app.command("serve")
def coordinator_serve(
    home: Annotated[Path, typer.Option(help="state directory (database, blobs, admin.token)")],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8700,
    db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL (default: SQLite under --home)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
    llm_url: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible endpoint (e.g. local llama.cpp) to rephrase incident summaries"),
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="upper coordinator URL: run as a regional hub, one site of it")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="one-time enrollment token at the upper coordinator (first start only)")
    ] = None,
    upstream_name: Annotated[str, typer.Option(help="this hub's site name at the upper coordinator")] = "hub",
) -> None:
    """Start the coordinator API (OpenAPI at /docs); with --upstream, also a hub."""
    import uvicorn

    from consortia.coordinator import Settings, create_app

    settings = Settings(
        home=home, db_url=db, llm_url=llm_url, upstream_url=upstream, upstream_token=token, upstream_name=upstream_name
    )
    fresh = not settings.admin_credential_path.exists()
    application = create_app(settings)
    if fresh and settings.admin_credential_path.exists():
        err.print(f"admin credential created: {settings.admin_credential_path} (mode 0600)")
    else:
        err.print(f"admin credential: {settings.admin_credential_path}")
    err.print(f"coordinator listening on http://{host}:{port} (OpenAPI: /docs), db {settings.database_url}")
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)


# ---------------------------------------------------------------------------- tenants


@tenant_app.command("create")
def tenant_create(
    name: str,
    regulated: Annotated[bool, typer.Option("--regulated", help="mark as a regulated institution")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a tenant and print its one-time enrollment token."""
    with _client(coordinator, token, home) as c:
        out = c.post_json("/v1/tenants", {"name": name, "regulated": regulated})
    if as_json:
        console.print_json(data=out)
        return
    console.print(f"tenant [bold]{name}[/] created{' (regulated)' if regulated else ''}")
    console.print(f"enrollment token (one-time, expires {out['enrollment']['expires_at']}):")
    print(out["enrollment"]["token"])


@tenant_app.command("list")
def tenant_list(coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None) -> None:
    """List tenants visible to this credential."""
    with _client(coordinator, token, home) as c:
        tenants = c.get_json("/v1/tenants")
        sites = c.get_json("/v1/sites")
    table = Table("tenant", "regulated", "sites")
    for t in tenants:
        table.add_row(
            t["name"],
            "yes" if t["regulated"] else "no",
            ", ".join(s["name"] for s in sites if s["tenant"] == t["name"]),
        )
    console.print(table)


@tenant_app.command("enroll-token")
def tenant_enroll_token(
    name: str, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Issue another one-time enrollment token for a tenant."""
    with _client(coordinator, token, home) as c:
        print(c.post_json(f"/v1/tenants/{name}/enrollment-tokens", {})["token"])


@credential_app.command("create")
def credential_create(
    name: str,
    role: Annotated[str, typer.Option(help="operator, approver, auditor, promoter or admin")],
    tenant: Annotated[str | None, typer.Option(help="scope to one tenant")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Issue a credential (admin only); prints the token once."""
    with _client(coordinator, token, home) as c:
        out = c.post_json("/v1/credentials", {"name": name, "role": role, "tenant": tenant})
    print(out["token"])


# ---------------------------------------------------------------------------- site


@site_app.command("run")
def site_run(
    coordinator: Annotated[str, typer.Option(help="coordinator URL")],
    data: Annotated[Path, typer.Option(help="local CSV or Parquet file (never leaves the site)")],
    home: Annotated[Path, typer.Option(help="site state: credential, model cache")],
    token: Annotated[str | None, typer.Option(help="one-time enrollment token (first run)")] = None,
    name: Annotated[str | None, typer.Option(help="site name (default: data file stem)")] = None,
    poll_seconds: Annotated[float, typer.Option(help="long-poll duration")] = 20.0,
    policy: Annotated[
        Path | None, typer.Option(help="the site's own policy (YAML); only this site controls it")
    ] = None,
    serve_port: Annotated[
        int | None, typer.Option(help="also serve deployed releases on this port (POST /v1/predict)")
    ] = None,
    serve_host: Annotated[str, typer.Option(help="bind address for serving (inside the institution)")] = "127.0.0.1",
    metrics_port: Annotated[
        int | None, typer.Option(help="expose the agent's Prometheus /metrics on this port (on --serve-host)")
    ] = None,
) -> None:
    """Enroll (first run), then long-poll for tasks and run them on local data; with
    --serve-port, also serve the releases deployed to this site."""
    import torch

    from consortia.site.agent import SiteAgent, load_or_enroll
    from consortia.site.policy import load_policy

    site_policy = load_policy(policy)  # fail before enrolling if the file is bad

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s site[{name or data.stem}] %(message)s")
    site_name = name or data.stem
    credential = load_or_enroll(coordinator, token, home, site_name)
    agent = SiteAgent(coordinator, credential, data, home, site_name, poll_seconds=poll_seconds, policy=site_policy)
    if serve_port is not None:
        _serve_site(coordinator, home, agent, serve_host, serve_port, site_policy)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=serve_host, registry=agent.metrics)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.stop.set()


def _serve_site(coordinator: str, home: Path, agent: Any, host: str, port: int, policy: Any) -> None:
    """The site's serving endpoint: an edge agent enrolled with the site's own credential,
    under the site's policy (local approval of deployments, minimum count of monitoring)."""
    import threading

    import uvicorn

    from consortia.edge.agent import EdgeAgent

    edge = EdgeAgent(
        coordinator,
        home / "serving",
        poll_seconds=2.0,
        enroll=lambda: agent.client.post_json("/v1/sites/me/serving-device", {}),
        require_local_approval=policy.deployments_require_local_approval,
        monitoring={"min_count": policy.min_count, "references": home / "references"},
    )
    server = uvicorn.Server(uvicorn.Config(edge.app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    threading.Thread(target=edge.run, daemon=True).start()
    err.print(f"site serving on http://{host}:{port}/v1/predict (token in {home / 'serving' / 'serving.token'})")


@site_app.command("approve-release")
def site_approve_release(
    ref: Annotated[str, typer.Argument(help="MODEL:VERSION")],
    home: Annotated[Path, typer.Option(help="the site's home (as given to `site run`)")],
) -> None:
    """Approve, locally, a release deployed to this site (policy: deployments_require_local_approval)."""
    from consortia.governance import parse_versioned_ref

    model, version = parse_versioned_ref(ref)
    path = home / "serving" / "approvals" / f"{model}-{version}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"approved": ref, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    console.print(f"{ref} approved locally for this site; its serving agent installs it on its next poll.")


@site_app.command("list")
def site_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's sites")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """List sites with their status (active, or quarantined by a robust job)."""
    with _client(coordinator, token, home) as c:
        sites = c.get_json("/v1/sites" + (f"?tenant={tenant}" if tenant else ""))
    table = Table("site", "tenant", "status", "last seen")
    for s in sites:
        status = f"[red]{s['status']}[/]" if s["status"] != "active" else s["status"]
        table.add_row(s["name"], s["tenant"], status, s["last_seen_at"] or "-")
    console.print(table)


@site_app.command("release")
def site_release(
    name: str,
    reason: Annotated[str, typer.Option(help="why the site is trusted again (goes to the audit log)")],
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Release a quarantined site so the next rounds sample it again."""
    with _client(coordinator, token, home) as c:
        out = c.post_json(f"/v1/sites/{name}/release", {"reason": reason})
    console.print(f"site [bold]{escape(out['name'])}[/] ({escape(out['tenant'])}) is {out['status']} again.")


@site_app.command("labels")
def site_labels(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet with a record id and the outcome per row")],
    home: Annotated[Path | None, typer.Option(help="the site's home (its serving token is read from it)")] = None,
    url: Annotated[str, typer.Option(help="the serving endpoint (site run --serve-port, or an edge agent)")] = (
        "http://127.0.0.1:8810"
    ),
    token: Annotated[str | None, typer.Option(envvar="CONSORTIA_SERVING_TOKEN", help="serving token")] = None,
    id_column: Annotated[str, typer.Option(help="column with the record ids sent with the predictions")] = "id",
    label_column: Annotated[str, typer.Option(help="column with the outcome")] = "label",
    positive: Annotated[
        str | None, typer.Option(help="the outcome value that means positive (default: the column is 0/1)")
    ] = None,
) -> None:
    """Post delayed labels to a serving endpoint: it joins them with the decisions it made
    for those record ids (monitoring: accuracy per window; rollouts: accuracy in analysis).
    Only counts leave the site."""
    import httpx

    from consortia.ml.data import load_table

    frame = load_table(file)
    missing = [c for c in (id_column, label_column) if c not in frame.columns]
    if missing:
        raise ConsortiaError(f"{file} lacks column(s) {missing}; name them with --id-column / --label-column.")
    if token is None:
        if home is None:
            raise ConsortiaError("give --token (or CONSORTIA_SERVING_TOKEN) or the site's --home.")
        token = (home / "serving" / "serving.token").read_text().strip()
    values = frame[label_column]
    if positive is not None:
        labels = (values.astype(str) == positive).astype(int).tolist()
    else:
        bad = sorted({str(v) for v in values.dropna().unique()} - {"0", "1", "0.0", "1.0", "True", "False"})
        if bad or values.isna().any():
            raise ConsortiaError(
                f"column {label_column!r} holds {bad[:5] or 'missing values'}; pass --positive VALUE to map outcomes."
            )
        labels = values.astype(float).astype(int).tolist()
    ids = frame[id_column].astype(str).tolist()
    totals = {"matched": 0, "stale": 0, "unknown": 0}
    accuracy = None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        for start in range(0, len(ids), 5000):
            body = {
                "labels": [
                    {"id": i, "label": y}
                    for i, y in zip(ids[start : start + 5000], labels[start : start + 5000], strict=True)
                ]
            }
            try:
                resp = c.post("/v1/labels", json=body)
            except httpx.TransportError as exc:
                raise ConsortiaError(f"cannot reach the serving endpoint at {url}: {exc}") from exc
            if resp.status_code != 200:
                raise ConsortiaError(f"{url} refused the labels ({resp.status_code}): {resp.text[:300]}")
            out = resp.json()
            for k in totals:
                totals[k] += int(out[k])
            accuracy = out.get("accuracy")
    console.print(
        f"{len(ids)} labels: {totals['matched']} joined with this release's decisions, {totals['stale']} for an "
        f"earlier release, {totals['unknown']} unknown ids; accuracy of the serving release so far: "
        + (f"{accuracy:.4f}" if accuracy is not None else "n/a")
    )


# ---------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    scenario: Annotated[str, typer.Option(help="finance or healthcare")] = "finance",
    sites: Annotated[int | None, typer.Option(help="number of sites (default: all of the scenario's)")] = None,
    rounds: Annotated[int | None, typer.Option(help="training rounds (default per scenario)")] = None,
    seed: Annotated[int, typer.Option(help="seed for splits, sampling and init")] = 0,
    workdir: Annotated[Path | None, typer.Option(help="workspace (default: a new temp dir)")] = None,
    headless: Annotated[bool, typer.Option(help="exit when done instead of serving until Ctrl-C")] = False,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    port: Annotated[int | None, typer.Option(help="coordinator port (default: a free one)")] = None,
) -> None:
    """Run a whole federation on loopback: coordinator + one process per site."""
    from consortia.cli.demo import run_demo

    run_demo(
        scenario=scenario,
        n_sites=sites,
        rounds=rounds,
        seed=seed,
        workdir=workdir,
        headless=headless,
        report=report,
        port=port,
        console=console,
    )


def main() -> None:
    """Entry point: one-line errors, never a traceback, for anything we anticipated."""
    logging.basicConfig(level=os.environ.get("CONSORTIA_LOG", "WARNING"))
    try:
        app()
    except ConsortiaError as exc:
        err.print(f"[red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # a light install running a server command
        extra = "edge" if exc.name in ("onnxruntime", "pandas", "pyarrow", "fastapi", "uvicorn") else "server"
        err.print(
            f"[red]error:[/] this command needs {exc.name!r}, which the installed extras lack: "
            + escape(f"pip install 'consortia[{extra}]'."),
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
