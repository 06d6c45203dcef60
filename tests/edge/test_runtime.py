"""Release bundles at run time: a registered release loads and predicts like the trained
model; partial, mixed and tampered bundles are refused; precompute and the service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

import consortia
from consortia.edge.runtime import load_release, verify_bundle
from consortia.edge.serving import create_serving_app
from consortia.errors import ReleaseError, ValidationError
from consortia.governance import download_release
from consortia.site.tasks import SiteContext
from support import SPEC, synthetic_frame


@pytest.fixture
def bundles(coord, tmp_path):
    """Two registered versions of test-job, downloaded as bundles v1/ and v2/."""
    sites = []
    for i, name in enumerate(["bank-a", "bank-b"]):
        resp = coord.client(None).enroll(coord.tenant(name), name)
        sites.append(
            SiteContext(
                name=name, home=tmp_path / name, client=coord.client(resp.credential), frame=synthetic_frame(300, i)
            )
        )
    out = {}
    for v, seed in ((1, 0), (2, 7)):
        coord.wait_job(coord.admin.post_json("/v1/jobs", {**SPEC, "seed": seed})["id"], sites)
        out[v] = download_release(coord.admin, "test-job", v, tmp_path / f"v{v}")[0]
    return coord, out


def test_release_predicts_like_the_trained_model(bundles):
    coord, b = bundles
    from consortia.ml.data import transform
    from consortia.ml.recipes import predict
    from consortia.protocol.schemas import PreprocessingPlan
    from consortia.protocol.tensors import decode

    rel = consortia.load_release(b[1])
    assert rel.ref == "test-job:1" and rel.columns == {"x1": "numeric", "x2": "numeric", "cat": "categorical"}
    frame = synthetic_frame(200, 42)
    frame.loc[:4, "x1"] = np.nan
    frame.loc[5:9, "cat"] = None
    frame.loc[10:14, "cat"] = "never-seen"
    job = coord.admin.get_json("/v1/jobs/1")
    blob = coord.http.app.state.blobs.get(job["model_hash"])
    plan = PreprocessingPlan.model_validate(coord.http.app.state.store.get_job(1).preprocessing)
    want = predict("logistic_regression", {}, decode(blob)[0], transform(frame, plan))
    np.testing.assert_allclose(rel.predict(frame), want, atol=1e-6)
    # the same rows as a column mapping and as row dicts
    cols = {c: frame[c].tolist() for c in ("x1", "x2", "cat")}
    np.testing.assert_allclose(rel.predict(cols), want, atol=1e-6)
    np.testing.assert_allclose(rel.predict(frame[["x1", "x2", "cat"]].to_dict("records")), want, atol=1e-6)
    with pytest.raises(ValidationError, match="input lacks column 'cat'"):
        rel.predict({"x1": [1.0], "x2": [2.0]})


def test_partial_mixed_and_tampered_bundles_are_refused(bundles, tmp_path):
    _, b = bundles
    manifest = verify_bundle(b[1])
    tensor = next(p["path"] for p in manifest["parts"] if p["role"] == "tensor")

    partial = shutil.copytree(b[1], tmp_path / "partial")
    (partial / tensor).unlink()
    with pytest.raises(ReleaseError, match=f"partial bundle: tensor part {tensor} is missing"):
        load_release(partial)

    mixed = shutil.copytree(b[1], tmp_path / "mixed")
    shutil.copy(b[2] / "model.onnx", mixed / "model.onnx")  # v2's graph with v1's manifest
    with pytest.raises(ReleaseError, match="mixed or tampered bundle: model.onnx"):
        load_release(mixed)

    extra = shutil.copytree(b[1], tmp_path / "extra")
    v2_tensor = next(p["path"] for p in verify_bundle(b[2])["parts"] if p["role"] == "tensor")
    shutil.copy(b[2] / v2_tensor, extra / "tensors" / "999_extra.bin")
    with pytest.raises(ReleaseError, match="mixed bundle: .* are not parts of test-job:1"):
        load_release(extra)

    flipped = shutil.copytree(b[1], tmp_path / "flipped")
    data = bytearray((flipped / tensor).read_bytes())
    data[0] ^= 1
    (flipped / tensor).write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=f"mixed or tampered bundle: {tensor}"):
        load_release(flipped)


def test_a_bundle_that_fails_its_smoke_test_is_refused(bundles, tmp_path):
    _, b = bundles
    bad = shutil.copytree(b[1], tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())  # a consistent but wrong bundle
    manifest["sample"]["expected"] = [1.0 - x for x in manifest["sample"]["expected"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="failed its smoke test"):
        load_release(bad)
    del manifest["sample"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="no smoke-test outputs"):
        load_release(bad)


def test_precompute_cli_scores_csv_and_parquet(bundles, tmp_path):
    _, b = bundles
    frame = synthetic_frame(50, 3)
    for suffix in ("csv", "parquet"):
        src, dst = tmp_path / f"in.{suffix}", tmp_path / f"out.{suffix}"
        frame.to_csv(src, index=False) if suffix == "csv" else frame.to_parquet(src, index=False)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "consortia.cli.main",
                "predict",
                "--release",
                str(b[1]),
                "--input",
                str(src),
                "--output",
                str(dst),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        out = pd.read_csv(dst) if suffix == "csv" else pd.read_parquet(dst)
        np.testing.assert_allclose(out["probability"], load_release(b[1]).predict(frame), atol=1e-6)
        assert (out["decision"] == (out["probability"] >= 0.5)).all() and (out["release"] == "test-job:1").all()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "consortia.cli.main",
            "predict",
            "--release",
            str(tmp_path),
            "--input",
            str(src),
            "--output",
            str(dst),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr


def test_service_answers_rows_and_batches_with_auth_and_latency_stats(bundles):
    _, b = bundles
    app = create_serving_app(b[1], token="s3cret-token")
    rel = app.state.release
    with TestClient(app) as http:
        h = {"Authorization": "Bearer s3cret-token"}
        assert http.post("/v1/predict", json={"row": {"x1": 1.0, "x2": 0.0, "cat": "a"}}).status_code == 401
        one = http.post("/v1/predict", json={"row": {"x1": 1.0, "x2": 0.0, "cat": "a"}}, headers=h).json()
        assert one["release"] == "test-job:1" and len(one["predictions"]) == 1
        frame = synthetic_frame(30, 5)
        rows = frame[["x1", "x2", "cat"]].to_dict("records")
        many = http.post("/v1/predict", json={"rows": rows}, headers=h).json()["predictions"]
        np.testing.assert_allclose([p["probability"] for p in many], rel.predict(frame), atol=1e-6)
        bad = http.post("/v1/predict", json={"rows": [{"x1": 1.0}]}, headers=h)
        assert bad.status_code == 422 and "row 0 lacks input column(s)" in bad.json()["detail"]
        assert http.post("/v1/predict", content=b"{", headers=h).status_code == 422
        stats = http.get("/v1/stats", headers=h).json()
        assert stats["predictions"] == 31 and stats["errors"] == 2
        assert stats["latency_seconds"]["count"] == 2 and stats["latency_seconds"]["p99"] > 0
        assert 'consortia_serving_latency_seconds{quantile="0.99"}' in http.get("/metrics").text


def test_delayed_labels_join_the_decisions_they_judge(bundles):
    _, b = bundles
    app = create_serving_app(b[1], token="tok")
    with TestClient(app) as http:
        h = {"Authorization": "Bearer tok"}
        rows = synthetic_frame(20, 3)[["x1", "x2", "cat"]].to_dict("records")
        ids = [f"loan-{i}" for i in range(20)]
        out = http.post("/v1/predict", json={"rows": rows, "ids": ids}, headers=h).json()["predictions"]
        decisions = [p["decision"] for p in out]
        bad = http.post("/v1/predict", json={"rows": rows, "ids": ids[:3]}, headers=h)
        assert bad.status_code == 422 and "ids must be a list of 20" in bad.json()["detail"]
        # the truth agrees with the first 15 decisions and contradicts the last 5
        labels = [{"id": i, "label": int(d if n < 15 else not d)} for n, (i, d) in enumerate(zip(ids, decisions))]
        labels.append({"id": "never-predicted", "label": 1})
        got = http.post("/v1/labels", json={"labels": labels}, headers=h).json()
        assert (got["matched"], got["unknown"], got["accuracy"]) == (20, 1, 0.75)
        again = http.post("/v1/labels", json={"labels": labels[:2]}, headers=h).json()
        assert again["matched"] == 0 and again["unknown"] == 2  # a label counts once
        refused = http.post("/v1/labels", json={"labels": [{"id": "x", "label": "yes"}]}, headers=h)
        assert refused.status_code == 422 and "must be 0, 1, true or false" in refused.json()["detail"]
        assert http.post("/v1/labels", json={"labels": []}).status_code == 401
        stats = http.get("/v1/stats", headers=h).json()
        assert stats["labelled"] == 20 and stats["accuracy"] == 0.75
        # decisions of a release no longer served are not evidence about the new one
        http.post("/v1/predict", json={"row": rows[0], "id": "late"}, headers=h)
        app.state.serving.activate(load_release(b[2]))
        stale = http.post("/v1/labels", json={"labels": [{"id": "late", "label": 1}]}, headers=h).json()
        assert stale["stale"] == 1 and stale["accuracy"] is None


def test_site_labels_command_posts_outcomes_to_a_serving_endpoint(bundles, tmp_path):
    import subprocess
    import sys
    import threading
    import time

    import httpx
    import uvicorn

    from consortia.cli.demo import free_port

    _, b = bundles
    app = create_serving_app(b[1], token="lbl-token")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/healthz")
            break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        rows = synthetic_frame(30, 9)[["x1", "x2", "cat"]].to_dict("records")
        ids = [f"r{i}" for i in range(30)]
        out = httpx.post(
            f"{url}/v1/predict", json={"rows": rows, "ids": ids}, headers={"Authorization": "Bearer lbl-token"}
        )
        decisions = [p["decision"] for p in out.json()["predictions"]]
        labels = tmp_path / "outcomes.csv"
        outcome = ["default" if d else "repaid" for d in decisions[:24]] + [
            "repaid" if d else "default" for d in decisions[24:]
        ]
        pd.DataFrame({"loan_id": ids, "outcome": outcome}).to_csv(labels, index=False)

        def cli(*extra):
            return subprocess.run(
                [sys.executable, "-m", "consortia.cli.main", "site", "labels", str(labels), "--url", url, *extra],
                capture_output=True,
                text=True,
                env={"CONSORTIA_SERVING_TOKEN": "lbl-token", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
            )

        bad = cli("--id-column", "loan_id", "--label-column", "outcome")
        assert bad.returncode != 0 and "pass --positive VALUE" in bad.stderr
        ok = cli("--id-column", "loan_id", "--label-column", "outcome", "--positive", "default")
        assert ok.returncode == 0, ok.stderr
        assert (
            "30 joined with this release's decisions" in ok.stdout
            and "accuracy of the serving release so far: 0.8000" in ok.stdout
        )
    finally:
        server.should_exit = True
