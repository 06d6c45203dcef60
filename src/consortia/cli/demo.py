"""``consortia demo``: a whole federation on loopback, then a comparison table.

The harness partitions a real table into one file per institution, starts the
coordinator and one OS process per site (each is given only its own file), creates a
tenant per site, submits the scenario's job and follows it. The baselines (centralized,
local-only) are computed here, in the harness, clearly outside the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.errors import ConsortiaError

__all__ = ["Federation", "free_port", "run_demo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Federation:
    """Coordinator and site processes on loopback (used by the demo and e2e tests)."""

    def __init__(self, workdir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.coord_home = workdir / "coordinator"
        self.env = {**os.environ, **(env or {})}
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.sites: dict[str, subprocess.Popen[bytes]] = {}
        self.edges: dict[str, subprocess.Popen[bytes]] = {}
        self.edge_ports: dict[str, int] = {}
        self.serve_ports: dict[str, int] = {}
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.logs / log, "ab")  # noqa: SIM115 - owned by the child process
        return subprocess.Popen(
            [sys.executable, "-m", "consortia.cli.main", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )

    def start_coordinator(
        self, env: dict[str, str] | None = None, timeout: float = 60.0, extra: list[str] | None = None
    ) -> None:
        self.coordinator = self._spawn(
            ["coordinator", "serve", "--home", str(self.coord_home), "--port", str(self.port), *(extra or [])],
            "coordinator.log",
            env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise ConsortiaError(f"coordinator exited early; see {self.logs / 'coordinator.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise ConsortiaError(f"coordinator did not become healthy in {timeout:.0f}s")

    def kill_coordinator(self) -> None:
        """``kill -9`` the coordinator and reap it."""
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGKILL)
        if self.coordinator is not None:
            self.coordinator.wait(timeout=30)

    @property
    def admin_token(self) -> str:
        return (self.coord_home / "admin.token").read_text().strip()

    def client(self):  # type: ignore[no-untyped-def]
        from consortia.site.client import CoordinatorClient

        return CoordinatorClient(self.url, self.admin_token)

    def start_site(
        self,
        name: str,
        data: Path,
        token: str | None,
        poll_seconds: float = 5.0,
        policy: Path | None = None,
        serve_port: int | None = None,
    ) -> None:
        args = [
            "site",
            "run",
            "--coordinator",
            self.url,
            "--data",
            str(data),
            "--home",
            str(self.workdir / "sites" / name),
            "--name",
            name,
            "--poll-seconds",
            str(poll_seconds),
        ]
        if token:
            args += ["--token", token]
        if policy is not None:
            args += ["--policy", str(policy)]
        if serve_port is not None:
            args += ["--serve-port", str(serve_port)]
            self.serve_ports[name] = serve_port
        self.sites[name] = self._spawn(args, f"site-{name}.log")

    def start_edge(
        self,
        name: str,
        token: str | None,
        labels: str,
        port: int,
        poll_seconds: float = 1.0,
        extra: list[str] | None = None,
    ) -> None:
        """An edge agent process with its own home and serving port (``extra``: more flags)."""
        args = [
            "edge",
            "run",
            "--coordinator",
            self.url,
            "--home",
            str(self.workdir / "edges" / name),
            "--name",
            name,
            "--labels",
            labels,
            "--port",
            str(port),
            "--poll-seconds",
            str(poll_seconds),
        ]
        if token:
            args += ["--token", token]
        args += extra or []
        self.edges[name] = self._spawn(args, f"edge-{name}.log")
        self.edge_ports[name] = port

    def edge_token(self, name: str) -> str:
        return (self.workdir / "edges" / name / "serving.token").read_text().strip()

    def site_serving_token(self, name: str) -> str:
        return (self.workdir / "sites" / name / "serving" / "serving.token").read_text().strip()

    def kill_site(self, name: str) -> None:
        proc = self.sites[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        procs = [*self.edges.values(), *self.sites.values(), *([self.coordinator] if self.coordinator else [])]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def wait_sites(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if len(c.get_json("/v1/sites")) >= n:
                    return
                for name, p in self.sites.items():
                    if p.poll() is not None:
                        raise ConsortiaError(f"site {name} exited; see {self.logs / f'site-{name}.log'}")
                time.sleep(0.2)
        raise ConsortiaError(f"only some of {n} sites enrolled within {timeout:.0f}s")


def run_demo(
    *,
    scenario: str,
    n_sites: int | None,
    rounds: int | None,
    seed: int,
    workdir: Path | None,
    headless: bool,
    report: Path | None,
    port: int | None,
    console: Console,
) -> dict[str, Any]:
    from consortia.cli.jobs import watch_job
    from consortia.datasets.scenarios import load_scenario, write_partitions
    from consortia.ml.baselines import centralized_and_local

    started = time.monotonic()
    sc = load_scenario(scenario, n_sites, rounds, seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"consortia-demo-{scenario}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = write_partitions(sc, workdir / "data")
    console.print(f"[bold]Consortia demo[/] - scenario {scenario}, {len(paths)} sites, workspace {workdir}")
    for site, path in paths.items():
        console.print(f"  {site}: {len(sc.partitions[site])} rows -> {path.name} (read only by its own site process)")
    fed = Federation(workdir, port)
    try:
        fed.start_coordinator()
        console.print(
            f"coordinator up at {fed.url} (OpenAPI {fed.url}/docs); admin credential in "
            f"{fed.coord_home / 'admin.token'}"
        )
        from consortia.datasets.scenarios import POLICY_DIR

        with fed.client() as c:
            for site, path in paths.items():
                # Banks and hospitals are all regulated institutions.
                out = c.post_json("/v1/tenants", {"name": site, "regulated": True})
                fed.start_site(
                    site,
                    path,
                    out["enrollment"]["token"],
                    policy=POLICY_DIR / "site-policy.yaml",
                    serve_port=free_port(),
                )
            fed.wait_sites(len(paths))
            (workdir / "job.yaml").write_text(json.dumps(sc.spec, indent=2))
            job = c.post_json("/v1/jobs", sc.spec)
            console.print(
                f"job {job['id']} submitted: {sc.spec['rounds']} rounds of {sc.spec['strategy']['name']} "
                f"with {sc.spec['recipe']['name']}"
            )
            job = watch_job(c, job["id"], console)
            if job["state"] != "completed":
                raise ConsortiaError(f"job {job['id']} {job['state']}: {job['reason']}")
            registry = govern(fed, c, job, sc.promotion_policy, workdir, console)
            delivery = deliver(fed, c, registry, sc.partitions, sc.spec, console)
            adapter = adapt(c, registry, delivery, sc.partitions, console)
            incident = close_the_loop(fed, c, registry, delivery, adapter, sc, workdir, console)
        console.print("computing baselines (harness-side, outside the coordinator) ...")
        base = centralized_and_local(sc.spec, sc.partitions)
        fm = job["final_metrics"]
        result = {
            "scenario": scenario,
            "seed": seed,
            "rounds": sc.spec["rounds"],
            "sites": list(paths),
            "federated": {
                "pooled_auc": fm["pooled_auc"],
                "per_site": {
                    s: {"auc": v["auc"], "accuracy": v["accuracy"], "n": v["n"]} for s, v in fm["per_site"].items()
                },
            },
            "centralized": base["centralized"],
            "local_only": base["local_only"],
            "job_id": job["id"],
            "registry": registry,
            "delivery": delivery,
            "adapter": adapter,
            "incident": incident,
            "wall_seconds": round(time.monotonic() - started, 2),
        }
        _print_table(console, result)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2))
            console.print(f"report written to {report}")
        if not headless:
            console.print(f"federation still serving at {fed.url}; Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        fed.stop()


def govern(
    fed: Federation, admin: Any, job: dict[str, Any], policy: Path, workdir: Path, console: Console
) -> dict[str, Any]:
    """The governance epilogue: the registered version and its card, the shipped policy,
    promotion to staging, signed approvals by every regulated tenant's approver (each
    with its own key, created here on the approver's side), promotion to production, and
    local verification of the release signature and of the audit log."""
    from rich.markdown import Markdown

    from consortia.cli.governance import print_promotion, read_yaml
    from consortia.governance import keygen, sign_approval, verify_audit
    from consortia.site.client import CoordinatorClient

    model = job["spec"].get("model") or job["spec"]["name"]
    version = next(v for v in admin.get_json(f"/v1/registry/models/{model}") if v["job_id"] == job["id"])
    ref = f"{model}:{version['version']}"
    console.rule(f"registered {ref} (params {version['params_hash'][:16]}, release {version['release_digest'][:16]})")
    card = admin.request(
        "GET", f"/v1/registry/models/{model}/versions/{version['version']}/card", params={"format": "md"}
    ).text
    console.print(Markdown(card))
    applied = admin.post_json("/v1/policies", read_yaml(policy))
    console.print(f"applied promotion policy {policy.name} (revision {applied['revision']})")
    promoter_token = admin.post_json("/v1/credentials", {"name": "demo-promoter", "role": "promoter"})["token"]
    promote_path = f"/v1/registry/models/{model}/versions/{version['version']}/promote"
    approvals: list[str] = []
    with CoordinatorClient(fed.url, promoter_token) as promoter:
        staged = promoter.post_json(promote_path, {"to": "staging"})
        print_promotion(staged)
        dry = promoter.post_json(promote_path, {"to": "production", "dry_run": True}) if staged["promoted"] else None
        if dry is not None:
            print_promotion(dry)
        # Approvers sign only a version that meets every other rule of the policy.
        if dry is not None and all(r["passed"] for r in dry["rules"] if not r["rule"].startswith("approval")):
            regulated = [t["name"] for t in admin.get_json("/v1/tenants") if t["regulated"]]
            for tenant in [t for t in regulated if t in version["tenants"]]:
                token = admin.post_json(
                    "/v1/credentials", {"name": f"approver-{tenant}", "role": "approver", "tenant": tenant}
                )["token"]
                with CoordinatorClient(fed.url, token) as approver:
                    key, public = keygen(workdir / "approvers" / f"{tenant}.pem")
                    approver.post_json(f"/v1/tenants/{tenant}/approver-keys", {"public_key": public})
                    req = sign_approval(approver, key, model, version["version"], "production")
                    approver.post_json(
                        f"/v1/registry/models/{model}/versions/{version['version']}/approvals", req.model_dump()
                    )
                approvals.append(tenant)
            console.print(f"signed approvals for production from: {', '.join(approvals)}")
            print_promotion(promoter.post_json(promote_path, {"to": "production"}))
        elif dry is not None:
            console.print("production: rules other than approvals fail, so no approver is asked to sign.")
    final = admin.get_json(f"/v1/registry/models/{model}/versions/{version['version']}")
    verdict = verify_audit(admin)
    console.print(
        f"audit log: {verdict.size} entries, {'verified' if verdict.ok else 'FAILED: ' + str(verdict.reason)}"
        f", root {verdict.root}"
    )
    return {
        "model": model,
        "version": version["version"],
        "stage": final["stage"],
        "signed": final["signed"],
        "release_digest": final["release_digest"],
        "approvals": sorted({a["tenant"] for a in final["approvals"] if a["decision"] == "approve"}),
        "audit_verified": verdict.ok,
    }


class Traffic:
    """The harness's stand-in for each institution's own applications: batches of the
    site's own rows (up to ``per_site``, cycled) posted to its serving endpoint from a
    background thread. :meth:`inject` rewrites one site's rows from then on."""

    def __init__(self, fed: Federation, partitions: dict[str, Any], spec: dict[str, Any], per_site: int = 2000):
        self.fed = fed
        self.features = [f["name"] for f in spec["features"]]
        self.frames = {
            site: frame[self.features].sample(min(per_site, len(frame)), random_state=0).reset_index(drop=True)
            for site, frame in partitions.items()
        }
        self.rows = {site: self._records(frame) for site, frame in self.frames.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _records(frame: Any) -> list[dict[str, Any]]:
        return [
            {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in frame.to_dict("records")
        ]

    def inject(self, site: str, feature: str, scale: float) -> None:
        """From now on ``site``'s traffic carries ``feature`` multiplied by ``scale``."""
        frame = self.frames[site].copy()
        frame[feature] = frame[feature] * scale
        self.rows[site] = self._records(frame)

    def _run(self) -> None:
        i = 0
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                for site, port in self.fed.serve_ports.items():
                    rows = self.rows[site]
                    start = (i * 10) % max(1, len(rows) - 10)
                    with contextlib.suppress(httpx.TransportError):
                        c.post(
                            f"http://127.0.0.1:{port}/v1/predict",
                            json={"rows": rows[start : start + 10]},
                            headers={"Authorization": f"Bearer {self.fed.site_serving_token(site)}"},
                        )
                i += 1
                time.sleep(0.05)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


ROLLOUT_PLAN = {
    "target": {"selector": {"kind": "site"}},
    "steps": [
        {"set_weight": 50},
        {
            "analysis": {
                "interval_seconds": 1.0,
                "samples": 2,
                "failure_limit": 0,
                "min_predictions": 20,
                "metrics": [{"name": "error_rate", "max": 0.01}, {"name": "latency_p99", "max": 0.05}],
            }
        },
        {"set_weight": 100},
    ],
    "install_timeout_seconds": 120,
}


def deliver(
    fed: Federation,
    admin: Any,
    registry: dict[str, Any],
    partitions: dict[str, Any],
    spec: dict[str, Any],
    console: Console,
) -> dict[str, Any] | None:
    """After promotion: a canary rollout of the production release to the sites' serving
    endpoints, with each bank's own rows as traffic (the harness stands in for the bank's
    internal applications), then the table of what each site serves."""
    if registry["stage"] != "production":
        console.print(f"delivery: {registry['model']}:{registry['version']} is not in production; nothing to deploy.")
        return None
    ref = f"{registry['model']}:{registry['version']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every site's serving endpoint enrolled and reporting
        devices = admin.get_json("/v1/devices")
        if len([d for d in devices if d["labels"].get("kind") == "site" and d["report"]]) >= len(fed.serve_ports):
            break
        time.sleep(0.3)
    feeder = Traffic(fed, partitions, spec)
    feeder.start()
    try:
        r = admin.post_json(
            "/v1/rollouts", {"model": registry["model"], "version": registry["version"], "plan": ROLLOUT_PLAN}
        )
        console.print(f"rollout {r['id']}: canary of {ref} to the sites' serving endpoints (50% -> analysis -> 100%)")
        deadline = time.monotonic() + 180
        while r["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            r = admin.get_json(f"/v1/rollouts/{r['id']}")
        time.sleep(2.5)  # one more report from every site with traffic on the new release
    finally:
        feeder.stop()
    table = Table("site", "serving", "state", "predictions", "p99 ms", title=f"rollout {r['id']}: {r['state']}")
    serving: dict[str, Any] = {}
    for d in sorted(admin.get_json("/v1/devices"), key=lambda d: d["name"]):
        if d["labels"].get("kind") != "site":
            continue
        rep = d["report"] or {}
        serving[d["labels"]["site"]] = rep.get("serving")
        p99 = rep.get("latency_p99")
        table.add_row(
            d["labels"]["site"],
            rep.get("serving") or "-",
            rep.get("state") or "-",
            str(rep.get("predictions", 0)),
            f"{p99 * 1000:.2f}" if p99 else "-",
        )
    console.print(table)
    for h in r["progress"]["history"]:
        console.print(f"  step {h['step'] + 1}: {', '.join(f'{k} {v}' for k, v in h.items() if k != 'step')}")
    return {"rollout": r["id"], "state": r["state"], "reason": r["reason"], "serving": serving}


def adapt(
    admin: Any, registry: dict[str, Any], delivery: dict[str, Any] | None, partitions: dict[str, Any], console: Console
) -> dict[str, Any] | None:
    """A local adapter on the global base: the bank with the most loans re-fits the model's
    intercept (``0.bias``: a calibration to its own base rate) on its own data; the
    composite release goes to that bank's serving endpoint only."""
    if delivery is None or delivery["state"] != "succeeded":
        return None
    site = max(partitions, key=lambda s: len(partitions[s]))
    base = f"{registry['model']}:{registry['version']}"
    job = admin.post_json("/v1/jobs/adapt", {"base": base, "site": site, "params": ["0.bias"], "local_epochs": 5})
    console.print(f"job {job['id']}: {site} fine-tunes an adapter (0.bias) on {base} with its own loans")
    from consortia.cli.jobs import watch_job

    job = watch_job(admin, job["id"], console)
    if job["state"] != "completed":
        console.print(f"adapter job {job['id']} {job['state']}: {job['reason']}")
        return None
    model = job["spec"]["model"]
    version = admin.get_json(f"/v1/registry/models/{model}")[-1]["version"]
    comp = admin.get_json(f"/v1/registry/models/{model}/versions/{version}")
    lin = comp["lineage"]
    before = lin["composite"]["base"]["metrics_at_site"] or {}
    after = lin["metrics"]["per_tenant"][site]["sites"][site]
    ref = f"{model}:{comp['version']}"
    admin.post_json(
        "/v1/devices/assign", {"model": model, "version": comp["version"], "tenant": site, "selector": {"kind": "site"}}
    )
    deadline = time.monotonic() + 60
    serving = None
    while time.monotonic() < deadline and serving != ref:
        time.sleep(0.3)
        serving = next(
            (
                (d["report"] or {}).get("serving")
                for d in admin.get_json("/v1/devices")
                if d["labels"].get("site") == site
            ),
            None,
        )
    console.print(
        f"{ref} (global base {base} + {site}'s adapter, {lin['composite']['adapter']['bytes']} bytes) signed; "
        f"on {site}'s test rows: log loss {_f(before.get('loss'))} -> {_f(after['loss'])}, accuracy "
        f"{_f(before.get('accuracy'))} -> {_f(after['accuracy'])}; {site} now serves {serving}"
    )
    return {
        "site": site,
        "base": base,
        "release": ref,
        "params": lin["composite"]["adapter"]["params"],
        "before": {"loss": before.get("loss"), "accuracy": before.get("accuracy")},
        "after": {"loss": after["loss"], "accuracy": after["accuracy"]},
        "serving": serving,
    }


def _poll(fn: Any, timeout: float, every: float = 0.5) -> Any:
    """``fn()`` until it returns something truthy (returned), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(every)
    return None


def _with_interventional(incident: dict[str, Any]) -> dict[str, Any] | None:
    return incident if any(c.get("method") == "interventional" for c in incident["causes"]) else None


def close_the_loop(
    fed: Federation,
    admin: Any,
    registry: dict[str, Any],
    delivery: dict[str, Any] | None,
    adapter: dict[str, Any] | None,
    sc: Any,
    workdir: Path,
    console: Console,
) -> dict[str, Any] | None:
    """The monitoring epilogue: an automation policy on the model; drift injected into one
    site's serving traffic (the scenario's ``drift``); the incident it opens, with its
    summary and ranked causes; the run it starts: the gate (the affected regulated bank's
    approver signs), the warm-started federated retraining, the canary of the new version
    to the sites' serving endpoints and its promotion (production approvals signed by
    every regulated bank, as for the first version)."""
    import yaml

    from consortia.cli.automation import describe_step
    from consortia.cli.governance import read_yaml
    from consortia.cli.jobs import watch_job
    from consortia.governance import keygen, load_private_key, sign_approval, sign_automation_approval
    from consortia.site.client import CoordinatorClient

    if delivery is None or delivery["state"] != "succeeded":
        return None
    model = registry["model"]
    policy = {
        "name": f"{model}-drift",
        "model": model,
        "triggers": [{"kind": "drift", "min_tenants": 1}, {"kind": "performance_drop", "min_drop": 0.05}],
        "gate": "approval",
        "actions": [{"kind": "retrain"}],
        "validation": {"plan": ROLLOUT_PLAN, "promote_to": "production"},
        "cooldown_hours": 24,
    }
    path = workdir / "automation.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    applied = admin.post_json("/v1/automation/policies", read_yaml(path))
    console.rule(f"monitoring: automation policy {applied['name']} (revision {applied['revision']}) on {model}")

    others = [s for s in sc.partitions if adapter is None or s != adapter["site"]]
    site = max(others, key=lambda s: len(sc.partitions[s]))
    feature, scale = sc.drift["feature"], float(sc.drift["scale"])
    approvers: dict[str, tuple[Any, Any]] = {}

    def approver(tenant: str) -> tuple[Any, Any]:
        if tenant not in approvers:
            token = admin.post_json(
                "/v1/credentials", {"name": f"loop-approver-{tenant}", "role": "approver", "tenant": tenant}
            )["token"]
            c = CoordinatorClient(fed.url, token)
            pem = workdir / "approvers" / f"{tenant}.pem"
            if pem.exists():
                key = load_private_key(pem)
            else:
                key, public = keygen(pem)
                c.post_json(f"/v1/tenants/{tenant}/approver-keys", {"public_key": public})
            approvers[tenant] = (c, key)
        return approvers[tenant]

    feeder = Traffic(fed, sc.partitions, sc.spec)
    feeder.start()
    try:
        time.sleep(8.0)  # a few ordinary windows first: every device's own latency baseline
        quiet = admin.get_json("/v1/incidents", params={"state": "open"})
        console.print(
            f"before the injection: {len(quiet)} open incident(s) on ordinary traffic"
            + (f" ({', '.join(i['tenant'] + ': ' + i['findings'][0]['kind'] for i in quiet)})" if quiet else "")
        )
        feeder.inject(site, feature, scale)
        console.print(f"injected: {feature} x {scale} in {site}'s serving traffic (a numeric covariate shift)")
        incident = _poll(
            lambda: next(
                (i for i in admin.get_json("/v1/incidents", params={"state": "open"}) if i["tenant"] == site), None
            ),
            180,
        )
        if incident is None:
            raise ConsortiaError(f"no incident opened at {site} within 180 s of the injected drift.")
        run = _poll(lambda: next(iter(admin.get_json("/v1/automation/runs")), None), 30)
        # the incident is re-ranked on every window; an interventional estimate needs a window
        # with enough sampled rows, which a loaded machine may not have filled yet
        url = f"/v1/incidents/{incident['id']}"
        incident = _poll(lambda: _with_interventional(admin.get_json(url)), 60) or admin.get_json(url)
        console.print(f"[bold]incident {incident['id']}[/] ({incident['priority']}): {escape(incident['summary'])}")
        table = Table("rank", "cause", "target", "effect", "95% CI", "method", title="ranked causes")
        for k, c in enumerate(incident["causes"][:5], 1):
            ci = f"[{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c.get("ci") else "-"
            table.add_row(str(k), c["kind"], c["target"], f"{c['effect']:.3f}", ci, c["method"])
        console.print(table)
        if run is None:
            raise ConsortiaError("the incident started no automation run.")
        gate = next(s for s in run["steps"] if s["stage"] == "decide")
        console.print(f"automation run {run['id']}: {describe_step(gate)}")
        for tenant in gate.get("required", []):
            a, key = approver(tenant)
            req = sign_automation_approval(a, key, run["id"])
            run = a.post_json(f"/v1/automation/runs/{run['id']}/approvals", req.model_dump())
            console.print(f"  {describe_step(run['steps'][-1])}")
        act = next((s for s in run["steps"] if s["stage"] == "act" and s["action"] == "retrain"), None)
        if act is None or not act.get("ok"):
            raise ConsortiaError(f"automation run {run['id']} did not retrain: {run['steps'][-1]}")
        console.print(f"{describe_step(act)} (the sites retrain on their current data)")
        job = watch_job(admin, act["job"], console)
        if job["state"] != "completed":
            raise ConsortiaError(f"retraining job {job['id']} {job['state']}: {job['reason']}")

        def settled() -> Any:
            r = admin.get_json(f"/v1/automation/runs/{run['id']}")
            return r if r["state"] not in ("acting", "validating") else None

        run = _poll(settled, 240)
        if run is None:
            raise ConsortiaError("the retrained version's canary did not finish within 240 s.")
        new = next(s["version"] for s in run["steps"] if s.get("version"))
        if run["state"] == "awaiting_promotion":  # production needs every regulated bank's signature
            version = admin.get_json(f"/v1/registry/models/{model}/versions/{new.split(':')[1]}")
            regulated = [t["name"] for t in admin.get_json("/v1/tenants") if t["regulated"]]
            for tenant in [t for t in regulated if t in version["tenants"]]:
                a, key = approver(tenant)
                req = sign_approval(a, key, model, version["version"], "production")
                a.post_json(f"/v1/registry/models/{model}/versions/{version['version']}/approvals", req.model_dump())
            console.print(f"signed production approvals for {new} from every regulated bank")
            run = _poll(
                lambda: (
                    (r := admin.get_json(f"/v1/automation/runs/{run['id']}"))["state"] != "awaiting_promotion" and r
                ),
                60,
            ) or admin.get_json(f"/v1/automation/runs/{run['id']}")
    finally:
        feeder.stop()
        for a, _ in approvers.values():
            a.close()
    history = Table("stage", "what", title=f"automation run {run['id']}: {run['state']}")
    for s in run["steps"]:
        history.add_row(s["stage"], describe_step(s))
    console.print(history)
    return {
        "injected": {"site": site, "kind": "numeric covariate shift", "target": feature, "scale": scale},
        "incidents_before_injection": len(quiet),
        "incident_id": incident["id"],
        "priority": incident["priority"],
        "causes": [{k: c.get(k) for k in ("kind", "target", "effect", "ci", "method")} for c in incident["causes"]],
        "summary": incident["summary"],
        "run": run["id"],
        "state": run["state"],
        "retrained": new,
        "actions": [{"stage": s["stage"], "what": describe_step(s)} for s in run["steps"]],
    }


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-"


def _print_table(console: Console, r: dict[str, Any]) -> None:
    table = Table(
        "site",
        "test rows",
        "federated AUC",
        "centralized AUC",
        "local-only AUC",
        title=f"{r['scenario']}: test-split AUC per site and pooled (seed {r['seed']})",
    )
    for s in r["sites"]:
        fed = r["federated"]["per_site"].get(s, {})
        table.add_row(
            s,
            str(fed.get("n", "-")),
            _f(fed.get("auc")),
            _f(r["centralized"]["per_site"][s]["auc"]),
            _f(r["local_only"]["per_site"][s]["auc"]),
        )
    table.add_row(
        "[bold]pooled[/]",
        str(sum(v["n"] for v in r["federated"]["per_site"].values())),
        _f(r["federated"]["pooled_auc"]),
        _f(r["centralized"]["pooled_auc"]),
        _f(r["local_only"]["pooled_auc_mean"]) + " (mean)",
    )
    console.print(table)
