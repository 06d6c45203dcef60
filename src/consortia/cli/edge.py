"""``consortia edge run|assign|list|token``: edge devices."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, client, console, err
from consortia.errors import ValidationError

__all__ = ["edge_app", "rollout_app"]

edge_app = typer.Typer(help="Edge devices: run an agent, assign releases, list the fleet.", no_args_is_help=True)


def _labels(text: str) -> dict[str, str]:
    from consortia.protocol.delivery import parse_labels

    try:
        return parse_labels(text)
    except ValueError as exc:
        raise ValidationError(f"--labels: {exc}") from exc


@edge_app.command("run")
def edge_run(
    coordinator: Annotated[str, typer.Option(help="coordinator URL")],
    home: Annotated[Path, typer.Option(help="device state: credential, TUF metadata, releases")],
    token: Annotated[str | None, typer.Option(help="one-time device enrollment token (first run)")] = None,
    name: Annotated[str | None, typer.Option(help="device name (first run)")] = None,
    labels: Annotated[str, typer.Option(help="region=eu,device=scanner (first run)")] = "",
    host: Annotated[str, typer.Option(help="serving bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="serving port (POST /v1/predict)")] = 8900,
    poll_seconds: Annotated[float, typer.Option(help="seconds between instruction polls")] = 5.0,
    serving_token: Annotated[
        str | None,
        typer.Option(envvar="CONSORTIA_SERVING_TOKEN", help="token callers send (default HOME/serving.token)"),
    ] = None,
    min_count: Annotated[
        int, typer.Option(min=1, help="monitoring: counts below this are zeroed before a window leaves")
    ] = 10,
    window_rows: Annotated[int, typer.Option(min=1, help="monitoring: a window closes after this many rows")] = 1000,
    window_seconds: Annotated[float, typer.Option(min=1.0, help="monitoring: ... or after this long")] = 60.0,
) -> None:
    """Enroll (first run), then follow signed instructions and serve the last known good release."""
    import uvicorn

    from consortia.edge.agent import EdgeAgent

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s edge[{name or home.name}] %(message)s")
    agent = EdgeAgent(
        coordinator,
        home,
        token=token,
        name=name,
        labels=_labels(labels),
        poll_seconds=poll_seconds,
        serving_token=serving_token,
        monitoring={"min_count": min_count, "max_rows": window_rows, "max_seconds": window_seconds},
    )
    server = uvicorn.Server(uvicorn.Config(agent.app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    err.print(
        f"device {agent.device_id} serving on http://{host}:{port}/v1/predict "
        f"({agent.release.ref if agent.release else 'no release yet'})"
    )
    try:
        agent.run()
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop.set()
        server.should_exit = True
        thread.join(timeout=5)


@edge_app.command("token")
def edge_token(
    tenant: str, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Issue a one-time enrollment token for one device of TENANT."""
    with client(coordinator, token, home) as c:
        print(c.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"])


@edge_app.command("assign")
def edge_assign(
    ref: Annotated[str, typer.Argument(help="MODEL:VERSION")],
    selector: Annotated[str, typer.Option(help="labels devices must carry, e.g. region=eu")] = "",
    tenant: Annotated[str | None, typer.Option(help="only this tenant's devices")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Sign instructions for every matching device to run MODEL:VERSION."""
    from consortia.governance import parse_versioned_ref

    model, version = parse_versioned_ref(ref)
    with client(coordinator, token, home) as c:
        out = c.post_json(
            "/v1/devices/assign", {"model": model, "version": version, "selector": _labels(selector), "tenant": tenant}
        )
    console.print(
        f"{len(out)} device(s) instructed to run {ref}: {', '.join(d['tenant'] + '/' + d['name'] for d in out)}"
    )


@edge_app.command("list")
def edge_list(
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The fleet: labels, assigned release, what each device reports serving."""
    with client(coordinator, token, home) as c:
        devices = c.get_json("/v1/devices")
    if as_json:
        print(json.dumps(devices, indent=2))
        return
    table = Table("device", "labels", "assigned", "serving", "state", "reason", "last seen")
    for d in devices:
        r = d["report"] or {}
        table.add_row(
            f"{d['tenant']}/{d['name']}",
            ",".join(f"{k}={v}" for k, v in d["labels"].items()),
            d["assigned"] or "-",
            r.get("serving") or "-",
            r.get("state") or "-",
            (r.get("reason") or "")[:60],
            d["last_seen_at"] or "-",
        )
    console.print(table)


rollout_app = typer.Typer(help="Progressive delivery: canary and blue-green rollouts.", no_args_is_help=True)


def _print_rollout(r: dict) -> None:
    p = r["progress"]
    steps = r["plan"]["steps"]
    console.print(
        f"rollout {r['id']}: {r['model']}:{r['version']} [bold]{r['state']}[/] "
        f"(step {min(p['step'] + 1, len(steps))}/{len(steps)}, {len(p['moved'])}/{len(p['cohort'])} devices"
        f" moved, previous {p['previous'] and str(p['previous']['model']) + ':' + str(p['previous']['version'])})"
    )
    if r["reason"]:
        console.print(f"reason: {r['reason']}")
    for h in p["history"]:
        console.print(f"  done: {h}")
    for s in p["samples"]:
        console.print(f"  sample: {s['verdict']} {s['values']} {'; '.join(s['reasons'])}")


@rollout_app.command("start")
def rollout_start(
    ref: Annotated[str, typer.Argument(help="MODEL:VERSION")],
    plan: Annotated[Path, typer.Option(help="rollout plan (YAML)")],
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Start rolling MODEL:VERSION out to the plan's cohort, step by step."""
    from consortia.cli.governance import read_yaml
    from consortia.governance import parse_versioned_ref

    model, version = parse_versioned_ref(ref)
    with client(coordinator, token, home) as c:
        r = c.post_json("/v1/rollouts", {"model": model, "version": version, "plan": read_yaml(plan)})
    _print_rollout(r)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[int | None, typer.Argument()] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One rollout in detail, or all of them."""
    with client(coordinator, token, home) as c:
        out = c.get_json(f"/v1/rollouts/{rollout_id}") if rollout_id else c.get_json("/v1/rollouts")
    if as_json:
        print(json.dumps(out, indent=2))
        return
    for r in [out] if rollout_id else out:
        _print_rollout(r)


def _action(action: str):  # type: ignore[no-untyped-def]
    def command(
        rollout_id: int, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
    ) -> None:
        with client(coordinator, token, home) as c:
            _print_rollout(c.post_json(f"/v1/rollouts/{rollout_id}/{action}", {}))

    command.__doc__ = {
        "pause": "Pause a running rollout where it is.",
        "resume": "Resume a paused rollout.",
        "abort": "Stop a rollout and return its devices to the previous release.",
        "rollback": "Return every device the rollout moved to the previous release.",
    }[action]
    return command


for _name in ("pause", "resume", "abort", "rollback"):
    rollout_app.command(_name)(_action(_name))
