"""``consortia job submit|status|watch|list`` and ``consortia adapt``: submit federated
jobs and follow them round by round."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, console
from consortia.cli.common import client as _client
from consortia.errors import ConsortiaError

__all__ = ["adapt", "job_app", "watch_job"]

job_app = typer.Typer(help="Submit and follow federated jobs.", no_args_is_help=True)


def _read_spec(path: Path) -> Any:
    if not path.is_file():
        raise ConsortiaError(f"spec file {path} not found.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConsortiaError(f"{path} is not valid YAML: {exc}") from exc


@job_app.command("submit")
def job_submit(
    spec: Path,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate and submit SPEC.yaml; prints the job id."""
    raw = _read_spec(spec)
    with _client(coordinator, token, home) as c:
        job = c.post_json("/v1/jobs", raw)
    if as_json:
        console.print_json(data=job)
    else:
        print(job["id"])


def _bytes(m: dict[str, Any], key: str = "compression") -> str:
    c = m.get(key)
    if not c:
        return ""
    return f"{c['tensor_bytes'] / 1024:.1f} KiB ({c['ratio']:.3f}, {c['method']})"


def _job_table(job: dict[str, Any]) -> Table:
    table = Table(
        "round",
        "kind",
        "attempt",
        "state",
        "reported",
        "pooled AUC (val)",
        "train loss",
        "bytes in; out per site (vs fp32)",
        "failed / refused",
        title=f"job {job['id']} {job['name']}: {job['state']}",
    )
    for r in job["rounds"]:
        m = r["metrics"] or {}
        val = (m.get("validation_of_incoming_model") or {}).get("pooled_auc")
        if r["kind"] == "evaluate":
            val = m.get("pooled_auc")
        loss = m.get("train_loss")
        table.add_row(
            str(r["number"]),
            r["kind"],
            str(r["attempt"]),
            r["state"],
            f"{len(r['reported'])}/{len(r['sampled'])}",
            f"{val:.4f}" if isinstance(val, float) else "",
            f"{loss:.4f}" if isinstance(loss, float) else "",
            _bytes(m) + (f"; out {_bytes(m, 'downlink')}" if m.get("downlink") else ""),
            "; ".join(f"{k}: {v}" for k, v in r["failed"].items())[:120],
        )
    return table


def _secure_lines(job: dict[str, Any]) -> list[str]:
    """One line per secure round: survivors, who dropped where, and what each stage took."""
    out = []
    for r in job["rounds"]:
        sa = (r["metrics"] or {}).get("secure_aggregation")
        if not sa:
            continue
        dropped = "; ".join(f"stage {k}: {', '.join(v)}" for k, v in sa.get("dropped_by_stage", {}).items())
        stages = "/".join(f"{x:.2f}" for x in sa.get("stage_seconds", []))
        out.append(
            f"round {r['number']} secure aggregation: {sa['survivors']}/{sa['sites']} survived "
            f"(threshold {sa['threshold']}, degree {sa['degree']})"
            + (f", dropped {dropped}" if dropped else "")
            + (f", stages {stages} s" if stages else "")
        )
    return out


@job_app.command("status")
def job_status(
    job_id: int,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a job: state, rounds, metrics, refusals."""
    with _client(coordinator, token, home) as c:
        job = c.get_json(f"/v1/jobs/{job_id}")
    if as_json:
        print(json.dumps(job, indent=2))
        return
    console.print(_job_table(job))
    for line in _secure_lines(job):
        console.print(line)
    if job["reason"]:
        console.print(f"[red]reason:[/] {job['reason']}")
    if job["final_metrics"]:
        console.print(f"final pooled AUC (test): {job['final_metrics']['pooled_auc']:.4f}")


def watch_job(client: Any, job_id: int, out: Console = console, poll: float = 0.5) -> dict[str, Any]:
    """Follow a job with a progress bar per round until it finishes; returns the job."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} sites"),
        TextColumn("{task.fields[info]}"),
        console=out,
        transient=False,
    ) as progress:
        bars: dict[tuple[int, int], Any] = {}
        while True:
            job = client.get_json(f"/v1/jobs/{job_id}")
            for r in job["rounds"]:
                key = (r["number"], r["attempt"])
                m = r["metrics"] or {}
                val = (m.get("validation_of_incoming_model") or {}).get("pooled_auc") or m.get("pooled_auc")
                info = r["state"] + (f"  AUC {val:.4f}" if isinstance(val, float) else "")
                if key not in bars:
                    label = f"round {r['number']:>3} {r['kind']:<8}" + (
                        f" retry {r['attempt']}" if r["attempt"] else ""
                    )
                    bars[key] = progress.add_task(label, total=max(len(r["sampled"]), 1), info=info)
                progress.update(bars[key], completed=len(r["reported"]), info=info)
            if job["state"] in ("completed", "failed", "cancelled"):
                return job  # type: ignore[no-any-return]
            time.sleep(poll)


@job_app.command("watch")
def job_watch(
    job_id: int, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Follow a job live: a progress bar per round (sites reported, metrics)."""
    with _client(coordinator, token, home) as c:
        job = watch_job(c, job_id)
    console.print(f"job {job_id}: {job['state']}" + (f" ({job['reason']})" if job["reason"] else ""))
    if job["state"] != "completed":
        raise typer.Exit(1)


def adapt(
    base: Annotated[str, typer.Argument(help="NAME:VERSION of the released base model")],
    site: Annotated[str, typer.Option("--site", help="the site that fine-tunes on its own data")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="adapter parameter name or pattern (repeatable); default '@last' (final layer)"),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="registered model of the composite")] = None,
    rounds: Annotated[int, typer.Option("--rounds")] = 1,
    epochs: Annotated[int, typer.Option("--epochs", help="local epochs per round")] = 5,
    lr: Annotated[float | None, typer.Option("--lr", help="learning rate (default: the base's)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="follow the job until it finishes")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Fine-tune a declared subset of BASE's parameters (e.g. the last layer) at one site on
    its own data; the result is a composite release (base + adapter) of its own model
    (default BASE-SITE), versioned, signed and deliverable like any other. Prints the job id."""
    body: dict[str, Any] = {"base": base, "site": site, "rounds": rounds, "local_epochs": epochs}
    if param:
        body["params"] = param
    if model:
        body["model"] = model
    if lr is not None:
        body["learning_rate"] = lr
    with _client(coordinator, token, home) as c:
        job = c.post_json("/v1/jobs/adapt", body)
        if not watch:
            print(job["id"])
            return
        job = watch_job(c, job["id"])
    console.print(f"job {job['id']} ({job['name']}): {job['state']}" + (f" ({job['reason']})" if job["reason"] else ""))
    if job["state"] != "completed":
        raise typer.Exit(1)


@job_app.command("list")
def job_list(coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None) -> None:
    """List jobs."""
    with _client(coordinator, token, home) as c:
        jobs = c.get_json("/v1/jobs")["jobs"]
    table = Table("id", "name", "state", "rounds", "pooled AUC")
    for j in jobs:
        auc = (j["final_metrics"] or {}).get("pooled_auc")
        table.add_row(
            str(j["id"]),
            j["name"],
            j["state"],
            f"{j['rounds_completed']}/{j['rounds_requested']}",
            f"{auc:.4f}" if auc else "",
        )
    console.print(table)
