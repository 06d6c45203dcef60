"""`consortia export mlflow` against a real `mlflow server` started here (MLflow 3.17.2,
from its own environment: see the Makefile's .venv-mlflow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from consortia.cli.demo import free_port
from consortia.integrations.mlflow import export_job
from consortia.site.tasks import SiteContext
from support import SPEC, synthetic_frame

REPO = Path(__file__).resolve().parents[2]


def mlflow_executable() -> str | None:
    for candidate in (
        os.environ.get("CONSORTIA_MLFLOW"),
        str(REPO / ".venv-mlflow" / "bin" / "mlflow"),
        shutil.which("mlflow"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    exe = mlflow_executable()
    if exe is None:
        pytest.skip("no MLflow server executable: run `make test` (it builds .venv-mlflow) or set CONSORTIA_MLFLOW")
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(d / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start in 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_export_logs_run_metrics_artifacts_and_a_model_version_with_lineage(coord, tmp_path, mlflow_server):
    sites = []
    for i, name in enumerate(["bank-a", "bank-b"]):
        resp = coord.client(None).enroll(coord.tenant(name, regulated=True), name)
        sites.append(
            SiteContext(
                name=name, home=tmp_path / name, client=coord.client(resp.credential), frame=synthetic_frame(300, i)
            )
        )
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)
    out = export_job(coord.admin, job["id"], mlflow_server)

    api = httpx.Client(base_url=mlflow_server, timeout=30)
    run = api.get("/api/2.0/mlflow/runs/get", params={"run_id": out["run_id"]}).json()["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["recipe"] == "logistic_regression" and params["rounds"] == "2" and len(params["spec_hash"]) == 64
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["consortia.job_id"] == str(job["id"]) and tags["consortia.tenants"] == "bank-a,bank-b"
    assert run["info"]["status"] == "FINISHED"
    history = api.get(
        "/api/2.0/mlflow/metrics/get-history", params={"run_id": out["run_id"], "metric_key": "val_auc.bank-a"}
    ).json()["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    final = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert final["test_auc.pooled"] == pytest.approx(job["final_metrics"]["pooled_auc"])
    assert {"test_auc.bank-a", "test_auc.bank-b"} <= set(final)

    prefix = run["info"]["artifact_uri"].split("mlflow-artifacts:", 1)[1].lstrip("/")
    card = api.get(f"/api/2.0/mlflow-artifacts/artifacts/{prefix}/model-card.md")
    assert card.status_code == 200 and card.text.startswith("# Model card: test-job version 1")
    listing = api.get("/api/2.0/mlflow-artifacts/artifacts", params={"path": f"{prefix}/release"}).json()
    assert {f["path"] for f in listing["files"]} >= {"manifest.json", "model.sig", "bundle"}

    mv = api.get(
        "/api/2.0/mlflow/model-versions/get", params={"name": "test-job", "version": out["mlflow_version"]}
    ).json()["model_version"]
    mtags = {t["key"]: t["value"] for t in mv["tags"]}
    registry = coord.admin.get_json("/v1/registry/models/test-job/versions/1")
    assert mv["run_id"] == out["run_id"] and mv["source"].endswith("/release/bundle")
    assert mtags["consortia.release_digest"] == registry["release_digest"]
    assert mtags["consortia.params_hash"] == registry["params_hash"] and mtags["consortia.train_rounds"] == "2"
    from consortia.errors import ConsortiaError, ValidationError

    with pytest.raises(ValidationError, match="must be an http"):
        export_job(coord.admin, job["id"], "ftp://mlflow.example")
    with pytest.raises(ConsortiaError, match="cannot reach the MLflow server"):
        export_job(coord.admin, job["id"], f"http://127.0.0.1:{free_port()}")
