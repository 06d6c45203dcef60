"""Export a Consortia job to an MLflow tracking server, over MLflow's REST API.

One MLflow run per job: parameters (recipe, strategy, hyperparameters, spec hash),
per-round metrics per tenant (validation AUC of the incoming global model, train loss),
final test metrics per tenant and pooled, and as artifacts the model card (Markdown and
JSON), the lineage, the signed release (its files, the model-signing bundle and the
manifest). The registered version becomes an MLflow model version whose source is the
signed release bundle, tagged with its lineage.

Why REST and not the ``mlflow`` package: the package (about 800 MB with its
dependencies) pins ``pyarrow<26`` against our pinned 26.0.1, and a coordinator or an
operator's laptop should not carry a tracking server's dependencies to *send* to one.
The REST API is MLflow's public, versioned contract; any MLflow 2.x/3.x server that
proxies artifacts (``mlflow server --artifacts-destination DIR``) accepts this export.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from consortia.errors import ConsortiaError, ValidationError

__all__ = ["export_job"]

API = "/api/2.0/mlflow"


class _Mlflow:
    def __init__(self, uri: str, transport: httpx.BaseTransport | None = None) -> None:
        if not uri.startswith(("http://", "https://")):
            raise ValidationError(f"--tracking-uri must be an http(s) URL of an MLflow server, not {uri!r}.")
        self.http = httpx.Client(base_url=uri.rstrip("/"), timeout=60.0, transport=transport)

    def call(self, method: str, path: str, ok: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ConsortiaError(f"cannot reach the MLflow server at {self.http.base_url}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"message": resp.text[:300]}
            if body.get("error_code") in ok:
                return body
            raise ConsortiaError(f"MLflow {method} {path} failed ({resp.status_code}): {body.get('message', body)}")
        return resp.json() if resp.content else {}

    def upload(self, artifact_uri: str, name: str, data: bytes) -> None:
        prefix = "mlflow-artifacts:"
        if not artifact_uri.startswith(prefix):
            raise ConsortiaError(
                f"the MLflow server stores artifacts at {artifact_uri!r}, which it does not proxy; start it with "
                "--artifacts-destination DIR (artifact serving) so exports can upload."
            )
        rest = artifact_uri[len(prefix) :]
        if rest.startswith("//"):  # mlflow-artifacts://host:port/path: drop the authority
            rest = rest[2:].partition("/")[2]
        path = rest.lstrip("/")
        self.call("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{path}/{name}", content=data)


def _tags(d: dict[str, Any]) -> list[dict[str, str]]:
    return [{"key": k, "value": str(v)[:5000]} for k, v in d.items() if v is not None]


def export_job(
    consortia: Any,
    job_id: int,
    tracking_uri: str,
    experiment: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """Log job ``job_id`` (fetched with the ``consortia`` API client) as an MLflow run and
    register its model version. Returns the run id, the model version and the counts."""
    job = consortia.get_json(f"/v1/jobs/{job_id}")
    if job["state"] != "completed":
        raise ValidationError(f"job {job_id} is {job['state']}; only completed jobs have a model to export.")
    model = job["spec"].get("model") or job["spec"]["name"]
    version = next((v for v in consortia.get_json(f"/v1/registry/models/{model}") if v["job_id"] == job_id), None)
    if version is None:
        raise ValidationError(f"job {job_id} has no registered model version.")
    vnum = version["version"]
    full = consortia.get_json(f"/v1/registry/models/{model}/versions/{vnum}")
    lineage = full["lineage"]
    site_tenant = {s: t for t, d in lineage["tenants"].items() for s in d.get("sites", [])}
    ml = _Mlflow(tracking_uri, transport)

    name = experiment or f"consortia/{model}"
    got = ml.call(
        "GET", f"{API}/experiments/get-by-name", ok=("RESOURCE_DOES_NOT_EXIST",), params={"experiment_name": name}
    )
    exp_id = (
        got["experiment"]["experiment_id"]
        if "experiment" in got
        else ml.call("POST", f"{API}/experiments/create", json={"name": name})["experiment_id"]
    )
    start = int(time.time() * 1000)
    run = ml.call(
        "POST",
        f"{API}/runs/create",
        json={
            "experiment_id": exp_id,
            "run_name": f"job-{job_id}-{model}-v{vnum}",
            "start_time": start,
            "tags": _tags(
                {
                    "consortia.job_id": job_id,
                    "consortia.model": model,
                    "consortia.version": vnum,
                    "consortia.params_hash": version["params_hash"],
                    "consortia.release_digest": version["release_digest"],
                    "consortia.tenants": ",".join(version["tenants"]),
                    "consortia.git_revision": lineage["software"]["git_revision"],
                    "mlflow.source.name": "consortia",
                }
            ),
        },
    )["run"]
    run_id, artifact_uri = run["info"]["run_id"], run["info"]["artifact_uri"]

    spec = lineage["job"]["spec"]
    params = {
        "recipe": spec["recipe"]["name"],
        "strategy": spec["strategy"]["name"],
        "spec_hash": lineage["job"]["spec_hash"],
        "features": len(spec["features"]),
        **{f"recipe.{k}": v for k, v in spec["recipe"].get("options", {}).items()},
        **{f"strategy.{k}": v for k, v in spec["strategy"].get("options", {}).items()},
        **{k: v for k, v in lineage["hyperparameters"].items()},
    }
    metrics: list[dict[str, Any]] = []
    for r in job["rounds"]:
        if r["kind"] != "train" or r["state"] != "closed":
            continue
        m = r["metrics"]
        val = m.get("validation_of_incoming_model") or {}
        ts = start
        if val.get("pooled_auc") is not None:
            metrics.append({"key": "val_auc.pooled", "value": val["pooled_auc"], "timestamp": ts, "step": r["number"]})
        for site, sm in (val.get("per_site") or {}).items():
            if sm.get("auc") is not None:
                key = f"val_auc.{site_tenant.get(site, site)}"
                metrics.append({"key": key, "value": sm["auc"], "timestamp": ts, "step": r["number"]})
        if m.get("train_loss") is not None:
            metrics.append({"key": "train_loss", "value": m["train_loss"], "timestamp": ts, "step": r["number"]})
    fm = job["final_metrics"]
    last = job["rounds_completed"] + 1
    for key in ("pooled_auc", "pooled_accuracy", "pooled_loss"):
        if fm.get(key) is not None:
            metrics.append(
                {"key": f"test_{key.split('_', 1)[1]}.pooled", "value": fm[key], "timestamp": start, "step": last}
            )
    for tenant, tm in lineage["metrics"]["per_tenant"].items():
        for key in ("auc", "accuracy"):
            if tm.get(key) is not None:
                metrics.append({"key": f"test_{key}.{tenant}", "value": tm[key], "timestamp": start, "step": last})
    plist = [{"key": k, "value": str(v)[:6000]} for k, v in params.items()]
    for i in range(0, max(len(metrics), len(plist), 1), 100):
        ml.call(
            "POST",
            f"{API}/runs/log-batch",
            json={"run_id": run_id, "metrics": metrics[i : i + 100], "params": plist[i : i + 100]},
        )

    base = f"/v1/registry/models/{model}/versions/{vnum}"
    card_md = consortia.request("GET", f"{base}/card", params={"format": "md"}).content
    card_json = consortia.request("GET", f"{base}/card", params={"format": "json"}).content
    manifest = consortia.get_json(f"{base}/release")
    uploads = {
        "model-card.md": card_md,
        "model-card.json": card_json,
        "lineage.json": json.dumps(lineage, indent=2).encode(),
        "release/manifest.json": json.dumps({k: v for k, v in manifest.items() if k != "signature"}, indent=2).encode(),
        "release/model.sig": json.dumps(manifest["signature"]).encode(),
    }
    for fname in manifest["files"]:
        uploads[f"release/bundle/{fname}"] = consortia.request("GET", f"{base}/release/files/{fname}").content
    for path, data in uploads.items():
        ml.upload(artifact_uri, path, data)
    ml.call(
        "POST", f"{API}/runs/update", json={"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)}
    )

    ml.call(
        "POST",
        f"{API}/registered-models/create",
        ok=("RESOURCE_ALREADY_EXISTS",),
        json={"name": model, "description": "Registered by Consortia (federated training across institutions)."},
    )
    mv = ml.call(
        "POST",
        f"{API}/model-versions/create",
        json={
            "name": model,
            "source": f"{artifact_uri}/release/bundle",
            "run_id": run_id,
            "description": f"Consortia {model}:{vnum} from job {job_id}; signed release {version['release_digest']}",
            "tags": _tags(
                {
                    "consortia.version": vnum,
                    "consortia.job_id": job_id,
                    "consortia.stage": full["stage"],
                    "consortia.params_hash": version["params_hash"],
                    "consortia.release_digest": version["release_digest"],
                    "consortia.spec_hash": lineage["job"]["spec_hash"],
                    "consortia.tenants": ",".join(version["tenants"]),
                    "consortia.train_rounds": sum(r["kind"] == "train" for r in lineage["rounds"]),
                    "consortia.approvals": ",".join(sorted({a["tenant"] for a in full["approvals"]})),
                }
            ),
        },
    )
    return {
        "run_id": run_id,
        "experiment_id": exp_id,
        "model": model,
        "mlflow_version": mv["model_version"]["version"],
        "metrics": len(metrics),
        "params": len(plist),
        "artifacts": sorted(uploads),
    }
