"""Serving latency of a release: in-process ``load_release(...).predict`` against raw ONNX
Runtime on the same model and rows, and HTTP latency of ``POST /v1/predict`` for one row.

The release is a real bundle (finance schema: 19 numeric + 4 categorical columns, the
agreed preprocessing inside the ONNX graph) written by the coordinator's release writer
with a logistic regression and an MLP. Raw ONNX Runtime gets typed ``[rows, 1]`` column
arrays and calls ``session.run``; ``predict`` gets the very same arrays (and, in a
separate column, the same rows as a pandas DataFrame, which it converts as training did). Ratios of medians, one run,
interleaved. HTTP: ``consortia serve`` in its own process, 2,000 sequential one-row
requests over a keep-alive connection (stdlib ``http.client``, so the client adds little),
client-side p50/p99 and the server's own histogram.

Run: ``.venv/bin/python benchmarks/edge_latency.py`` (writes benchmarks/results/edge_latency.json)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.cli.demo import free_port  # noqa: E402

REPEATS = 2000


def make_bundle(
    directory: Path, recipe: str, options: dict, version: int = 1, params: dict | None = None, model: str | None = None
) -> Path:
    """A real release bundle for the finance schema, written without a job (benchmarks)."""
    import pandas as pd

    from consortia.coordinator.services.releases import write_bundle
    from consortia.core.profile import bins_from_quantiles, merge_sketches, quantile_sketch
    from consortia.datasets.scenarios import load_scenario
    from consortia.ml.data import transform
    from consortia.ml.recipes import init_params, predict
    from consortia.protocol.schemas import JobSpec, PreprocessingPlan
    from consortia.site.monitor import build_reference, suppressed
    from consortia.store.entities import ModelVersion

    sc = load_scenario("finance")
    frame = next(iter(sc.partitions.values()))
    spec = {**sc.spec, "recipe": {"name": recipe, "options": options}}
    num = [f["name"] for f in spec["features"] if f["type"] == "numeric"]
    cat = [f["name"] for f in spec["features"] if f["type"] == "categorical"]
    sketches = {c: quantile_sketch(pd.to_numeric(frame[c], errors="coerce").to_numpy(), 10) for c in num}
    plan = PreprocessingPlan(
        numeric={c: (float(frame[c].mean()), float(frame[c].std() or 1.0)) for c in num},
        categorical={c: sorted(frame[c].dropna().astype(str).unique().tolist()) for c in cat},
        feature_order=num + cat,
        cuts={c: bins_from_quantiles(merge_sketches([(q, len(frame))])) for c, q in sketches.items() if q},
        bounds={c: tuple(merge_sketches([(q, len(frame))], (0.01, 0.99))) for c, q in sketches.items() if q},
    )
    params = params if params is not None else init_params(recipe, plan.input_dim, options, 0)
    job_spec = JobSpec.model_validate(spec)
    scores = predict(recipe, options, params, transform(frame, plan))
    y = (frame["Class"] == "bad").to_numpy()
    reference = build_reference(frame, job_spec, plan, scores, y)  # monitoring windows use its bins
    lineage = {
        "job": {"id": 1, "spec_hash": "0" * 64, "spec": spec},
        "preprocessing": plan.model_dump(mode="json"),
        "tenants": {"bench": {"sites": ["bench"], "regulated": False, "rounds": {}, "rows": {}}},
        "metrics": {
            "pooled": {"pooled_auc": None, "pooled_accuracy": None, "pooled_loss": None, "n": 0},
            "per_tenant": {},
            "fairness": None,
        },
        "privacy": {"secure_aggregation": False, "differential_privacy": None, "epsilon_spent": None},
        "rounds": [],
        "recipe": spec["recipe"],
        "strategy": spec["strategy"],
        "software": {"consortia": "bench", "git_revision": None},
        "card": {},
        "reference": {"sites": ["bench"], "profile": suppressed(reference, 10).model_dump(mode="json")},
    }
    name = model or f"bench-{recipe}"
    v = ModelVersion(version, name, version, version, "0" * 64, lineage, "candidate", None, datetime.now(UTC))
    out = directory / f"{name}-{version}"
    out.mkdir(parents=True)
    write_bundle(out, v, params)
    return out


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def in_process(bundle: Path, rows: int) -> dict:
    import onnxruntime as ort

    from consortia.datasets.scenarios import load_scenario
    from consortia.edge.runtime import load_release

    rel = load_release(bundle)
    frame = next(iter(load_scenario("finance").partitions.values())).head(rows).reset_index(drop=True)
    feeds = rel.inputs(frame)  # typed [rows, 1] columns, built once; both sides get these very arrays
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    raw = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(raw.run(["probability"], feeds)[0], rel.predict(feeds), atol=1e-6)
    reps = max(50, REPEATS // max(1, rows // 50))
    raw_t, typed_t, frame_t = [], [], []
    for _ in range(5):  # interleave to share the machine's noise
        raw_t += timed(lambda: raw.run(["probability"], feeds), reps // 5)
        typed_t += timed(lambda: rel.predict(feeds), reps // 5)
        frame_t += timed(lambda: rel.predict(frame), reps // 5)
    med = statistics.median
    return {
        "rows": rows,
        "raw_p50_us": med(raw_t) * 1e6,
        "predict_p50_us": med(typed_t) * 1e6,
        "frame_p50_us": med(frame_t) * 1e6,
        "ratio": med(typed_t) / med(raw_t),
        "frame_ratio": med(frame_t) / med(raw_t),
    }


def http_latency(bundle: Path) -> dict:
    port, token = free_port(), "bench-token"
    env = {**os.environ, "CONSORTIA_SERVING_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortia.cli.main", "serve", "--release", str(bundle), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        from consortia.datasets.scenarios import load_scenario

        row = next(iter(load_scenario("finance").partitions.values())).head(1).to_dict("records")[0]
        row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        import http.client
        import json

        body = json.dumps({"row": row})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", port)  # stdlib keep-alive client: little overhead

        def call() -> None:
            conn.request("POST", "/v1/predict", body, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"predict answered {resp.status}")

        for _ in range(200):  # warm up
            call()
        lat = timed(call, REPEATS)
        conn.close()
        server = httpx.get(f"{url}/v1/stats", headers=headers).json()["latency_seconds"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    q = np.quantile(lat, [0.5, 0.99])
    return {
        "requests": REPEATS,
        "client_p50_ms": q[0] * 1e3,
        "client_p99_ms": q[1] * 1e3,
        "server_p50_ms": server["p50"] * 1e3,
        "server_p99_ms": server["p99"] * 1e3,
    }


def main() -> None:
    rows_out, http_out = [], []
    with tempfile.TemporaryDirectory() as d:
        for recipe, options in (("logistic_regression", {}), ("mlp", {"hidden": [64, 32]})):
            bundle = make_bundle(Path(d), recipe, options)
            for rows in (1, 1000):
                rows_out.append({"recipe": recipe, **in_process(bundle, rows)})
            http_out.append({"recipe": recipe, **http_latency(bundle)})
    print_table(
        "in-process predict vs raw ONNX Runtime (p50, same model and rows)",
        ["recipe", "rows", "raw us", "predict us", "predict/raw (target <= 1.1)", "DataFrame us", "DataFrame/raw"],
        [
            [
                r["recipe"],
                r["rows"],
                r["raw_p50_us"],
                r["predict_p50_us"],
                r["ratio"],
                r["frame_p50_us"],
                r["frame_ratio"],
            ]
            for r in rows_out
        ],
    )
    print_table(
        "POST /v1/predict, one row, loopback (target p99 <= 2 ms)",
        ["recipe", "client p50 ms", "client p99 ms", "server p50 ms", "server p99 ms"],
        [
            [h["recipe"], h["client_p50_ms"], h["client_p99_ms"], h["server_p50_ms"], h["server_p99_ms"]]
            for h in http_out
        ],
    )
    print(f"wrote {write_result('edge_latency', {'in_process': rows_out, 'http': http_out})}")


if __name__ == "__main__":
    main()
