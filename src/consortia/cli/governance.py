"""``consortia registry|policy|approver|audit``: governance from the command line."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from consortia.cli.common import DEFAULT_URL, CoordinatorOpt, HomeOpt, TokenOpt, client, console, err
from consortia.errors import ConsortiaError, ValidationError

__all__ = ["approver_app", "audit_app", "export_app", "policy_app", "print_promotion", "registry_app"]

registry_app = typer.Typer(
    help="Registered models: versions, lineage, cards, releases, approvals, promotion.", no_args_is_help=True
)
policy_app = typer.Typer(help="Promotion policies (policy as code).", no_args_is_help=True)
approver_app = typer.Typer(help="A tenant approver's signing key.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _ref(ref: str, need_version: bool = True) -> tuple[str, int | None]:
    from consortia.governance import parse_ref, parse_versioned_ref

    return parse_versioned_ref(ref) if need_version else parse_ref(ref)


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-"


# ---------------------------------------------------------------------------- registry


@registry_app.command("list")
def registry_list(
    coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Registered models with their latest version and who holds each stage."""
    with client(coordinator, token, home) as c:
        models = c.get_json("/v1/registry/models")
    if as_json:
        print(json.dumps(models, indent=2))
        return
    table = Table("model", "latest", "staging", "production")
    for m in models:
        table.add_row(
            m["name"], str(m["latest"]), str(m["stages"].get("staging", "-")), str(m["stages"].get("production", "-"))
        )
    console.print(table)


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")],
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A model's versions, or one version with its federated lineage."""
    name, version = _ref(ref, need_version=False)
    with client(coordinator, token, home) as c:
        data = (
            c.get_json(f"/v1/registry/models/{name}")
            if version is None
            else c.get_json(f"/v1/registry/models/{name}/versions/{version}")
        )
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if version is None:
        table = Table(
            "version", "stage", "job", "tenants", "pooled AUC", "signed", "params sha256", title=f"model {name}"
        )
        for v in data:
            table.add_row(
                str(v["version"]),
                v["stage"],
                str(v["job_id"]),
                ", ".join(v["tenants"]),
                _f(v["pooled"]["pooled_auc"]),
                "yes" if v["signed"] else "no",
                v["params_hash"][:16],
            )
        console.print(table)
        return
    lin = data["lineage"]
    console.print(
        f"[bold]{name}:{version}[/] stage {data['stage']} - job {data['job_id']} - params "
        f"{data['params_hash']} - release {data['release_digest']}"
    )
    console.print(
        f"recipe {lin['recipe']['name']}, strategy {lin['strategy']['name']} {lin['strategy']['options']}, "
        f"hyperparameters {lin['hyperparameters']}; spec sha256 {lin['job']['spec_hash']}; "
        f"consortia {lin['software']['consortia']} ({lin['software']['git_revision'] or 'no git revision'})"
    )
    table = Table(
        "round",
        "kind",
        "sites",
        "tenants",
        "rows per site (fingerprinted at the site)",
        title="which institutions' data went in, round by round",
    )
    for r in lin["rounds"]:
        rows = ", ".join(
            f"{s} {fp['row_count']} [{fp['content_hash'][:8]}]" for s, fp in r["fingerprints"].items() if fp
        )
        table.add_row(str(r["number"]), r["kind"], ", ".join(r["sites"]), ", ".join(r["tenants"]), rows)
    console.print(table)
    console.print(f"privacy: {lin['privacy']}")
    for h in data["stage_history"]:
        console.print(f"stage: {h['from']} -> {h['to']} by {h['actor']} at {h['at']}")
    for a in data["approvals"]:
        console.print(
            f"approval: {a['tenant']} {a['decision']} for {a['stage']} at {a['signed_at']} (key {a['key'][:16]})"
        )


@registry_app.command("card")
def registry_card(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    fmt: Annotated[str, typer.Option("--format", help="md or json")] = "md",
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Print a version's model card (Markdown or JSON)."""
    name, version = _ref(ref)
    if fmt not in ("md", "json"):
        raise ValidationError("--format must be md or json.")
    with client(coordinator, token, home) as c:
        resp = c.request("GET", f"/v1/registry/models/{name}/versions/{version}/card", params={"format": fmt})
    print(resp.text if fmt == "md" else json.dumps(resp.json(), indent=2))


@registry_app.command("verify")
def registry_verify(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    directory: Annotated[Path | None, typer.Option("--dir", help="download the release here")] = None,
    public_key: Annotated[Path | None, typer.Option(help="pinned release key (PEM)")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Download a release and verify its OpenSSF model-signing signature locally."""
    from consortia.governance import download_release, statement_digest, verify_release

    name, version = _ref(ref)
    target = directory or Path(tempfile.mkdtemp(prefix=f"consortia-release-{name}-{version}-"))
    with client(coordinator, token, home) as c:
        bundle, sig, pub, digest = download_release(c, name, version, target)
        recorded = c.get_json(f"/v1/registry/models/{name}/versions/{version}")["release_digest"]
    verify_release(bundle, sig, public_key or pub)
    signed_digest, _ = statement_digest(sig.read_bytes())
    if signed_digest != recorded:
        raise ValidationError(f"the signed release digest {signed_digest} is not the registry's {recorded}.")
    console.print(
        f"[green]verified[/] {name}:{version}: release digest {signed_digest}, "
        f"{len(list(bundle.iterdir()))} files, key {'pinned' if public_key else 'from the coordinator'}"
    )
    console.print(
        f"re-check with the package's own tool: model_signing verify key {bundle} "
        f"--public_key {public_key or pub} --signature {sig}"
    )


@registry_app.command("approve")
def registry_approve(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    stage: Annotated[str, typer.Option(help="staging or production")],
    key: Annotated[Path, typer.Option(help="your tenant's Ed25519 private key (PEM)")],
    reject: Annotated[bool, typer.Option("--reject", help="sign a rejection instead")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Sign (locally) and submit your tenant's approval of a version's release for a stage."""
    from consortia.governance import load_private_key, sign_approval

    name, version = _ref(ref)
    assert version is not None
    private = load_private_key(key)
    with client(coordinator, token, home) as c:
        req = sign_approval(c, private, name, version, stage, "reject" if reject else "approve")
        out = c.post_json(f"/v1/registry/models/{name}/versions/{version}/approvals", req.model_dump())
    console.print(f"{out['tenant']} {out['decision']}d {name}:{version} for {out['stage']} (key {out['key'][:16]})")


def print_promotion(out: dict[str, Any]) -> None:
    table = Table(
        "rule",
        "result",
        "evidence",
        title=f"{out['model']}:{out['version']} -> {out['to']} (policy revision {out['policy_revision']})",
    )
    for r in out["rules"]:
        table.add_row(r["rule"], "[green]pass[/]" if r["passed"] else "[red]FAIL[/]", r["evidence"])
    console.print(table)
    if out["promoted"]:
        console.print(f"[green]promoted[/] {out['model']}:{out['version']} to {out['to']}")
    elif out["dry_run"]:
        console.print("dry run: " + ("every rule passes" if out["passed"] else "not every rule passes"))
    else:
        console.print(f"[red]not promoted[/]: {sum(not r['passed'] for r in out['rules'])} rule(s) failed")


@registry_app.command("promote")
def registry_promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    to: Annotated[str, typer.Option("--to", help="staging or production")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="evaluate only")] = False,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the promotion policy rule by rule; promote only if all pass (exit 1 if not)."""
    name, version = _ref(ref)
    with client(coordinator, token, home) as c:
        out = c.post_json(f"/v1/registry/models/{name}/versions/{version}/promote", {"to": to, "dry_run": dry_run})
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print_promotion(out)
    if not out["passed"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- policy


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConsortiaError(f"file {path} not found.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConsortiaError(f"{path} is not valid YAML: {exc}") from exc


@policy_app.command("apply")
def policy_apply(
    file: Path, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Load a promotion policy (YAML) for a registered model; each apply is a new revision."""
    doc = read_yaml(file)
    with client(coordinator, token, home) as c:
        out = c.post_json("/v1/policies", doc)
    console.print(
        f"policy for {out['model']} applied: revision {out['revision']}, stages {out['stages']}, "
        f"sha256 {out['digest'][:16]}"
    )


@policy_app.command("show")
def policy_show(
    model: str, coordinator: CoordinatorOpt = DEFAULT_URL, token: TokenOpt = None, home: HomeOpt = None
) -> None:
    """Print the current promotion policy of a model (YAML)."""
    with client(coordinator, token, home) as c:
        out = c.get_json(f"/v1/policies/{model}")
    console.print(f"# revision {out['revision']} applied by {out['applied_by']} at {out['applied_at']}")
    print(yaml.safe_dump(out["document"], sort_keys=False))


# ---------------------------------------------------------------------------- approver


@approver_app.command("keygen")
def approver_keygen(
    key: Annotated[Path, typer.Option(help="where to write the private key (PEM, mode 0600)")],
    register: Annotated[bool, typer.Option(help="register the public key with the coordinator")] = True,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create your tenant's Ed25519 approval key; only the public half is sent."""
    from consortia.governance import keygen

    if register:
        with client(coordinator, token, home) as c:
            me = c.get_json("/v1/whoami")
            if me["role"] != "approver" or not me["tenant"]:
                raise ValidationError("use a tenant-scoped approver credential (--token) to register a key.")
            _, public = keygen(key)
            out = c.post_json(f"/v1/tenants/{me['tenant']}/approver-keys", {"public_key": public})
        console.print(f"key for tenant {out['tenant']} written to {key}; fingerprint {out['fingerprint']}")
    else:
        _, public = keygen(key)
        console.print(f"key written to {key}; public key {public}")


# ---------------------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    public_key: Annotated[Path | None, typer.Option(help="pinned audit key (PEM)")] = None,
    head: Annotated[Path | None, typer.Option(help="a head saved earlier with `audit head --out`")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Recompute every leaf and root, check every signed head; exit 1 naming the first bad entry."""
    from consortia.governance import verify_audit

    pinned = json.loads(head.read_text()) if head is not None else None
    with client(coordinator, token, home) as c:
        verdict = verify_audit(c, public_key, pinned)
    if verdict.ok:
        console.print(
            f"[green]audit log verified[/]: {verdict.size} entries, root {verdict.root}"
            + (f" ({verdict.redacted} other-tenant entries checked by hash only)" if verdict.redacted else "")
        )
        return
    err.print(f"[red]audit log verification FAILED[/] at entry {verdict.first_bad}: {verdict.reason}", soft_wrap=True)
    raise typer.Exit(1)


@audit_app.command("head")
def audit_head(
    out: Annotated[Path | None, typer.Option(help="save the signed head here")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Print (and optionally save) the latest signed tree head."""
    with client(coordinator, token, home) as c:
        h = c.get_json("/v1/audit/head")
    text = json.dumps(h, indent=2)
    if out is not None:
        out.write_text(text)
    print(text)


@audit_app.command("proof")
def audit_proof(
    seq: int,
    size: Annotated[int | None, typer.Option(help="tree size (default: latest)")] = None,
    public_key: Annotated[Path | None, typer.Option(help="pinned audit key (PEM)")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """An RFC 6962 inclusion proof of entry SEQ, verified locally."""
    from consortia.governance import verify_proof

    with client(coordinator, token, home) as c:
        p = verify_proof(c, seq, size, public_key)
    print(json.dumps(p, indent=2))
    if not p["verified"]:
        raise typer.Exit(1)


@audit_app.command("at")
def audit_at(
    time: Annotated[str, typer.Argument(help="ISO 8601 time, e.g. 2026-11-24T10:00:00Z")],
    tenant: Annotated[str | None, typer.Option(help="only versions trained with this tenant's data")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What was in which stage at TIME, replayed from the audit log."""
    try:
        when = datetime.fromisoformat(time.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValidationError(f"{time!r} is not an ISO 8601 time (e.g. 2026-11-24T10:00:00Z).") from exc
    if when.tzinfo is None:
        raise ValidationError("give the time with a zone, e.g. 2026-11-24T10:00:00Z.")
    params: dict[str, str] = {"time": when.isoformat()}
    if tenant:
        params["tenant"] = tenant
    with client(coordinator, token, home) as c:
        out = c.get_json("/v1/audit/at", params=params)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table("model", "version", "stage", "tenants", title=f"stages at {out['at']} (log size {out['log_size']})")
    for v in out["versions"]:
        table.add_row(v["model"], str(v["version"]), v["stage"], ", ".join(v["tenants"]))
    console.print(table)


# ---------------------------------------------------------------------------- export

export_app = typer.Typer(help="Export jobs and model versions to other tools.", no_args_is_help=True)


@export_app.command("mlflow")
def export_mlflow(
    job_id: int,
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking server URL")],
    experiment: Annotated[str | None, typer.Option(help="experiment (default consortia/MODEL)")] = None,
    coordinator: CoordinatorOpt = DEFAULT_URL,
    token: TokenOpt = None,
    home: HomeOpt = None,
) -> None:
    """Log a finished job as an MLflow run and register its model version with lineage tags."""
    from consortia.integrations.mlflow import export_job

    with client(coordinator, token, home) as c:
        out = export_job(c, job_id, tracking_uri, experiment)
    console.print(
        f"exported job {job_id} to MLflow run {out['run_id']} (experiment {out['experiment_id']}): "
        f"{out['params']} params, {out['metrics']} metric points, {len(out['artifacts'])} artifacts; "
        f"model {out['model']} version {out['mlflow_version']}"
    )
