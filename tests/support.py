"""Shared test helpers: an in-process coordinator (real app, real SQLite, real blob store)
and small synthetic data. Imported as ``support`` (a unique name: every directory's
``conftest`` is a module called ``conftest``)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from fastapi.testclient import TestClient

from consortia.edge.monitoring import MISSING, WindowMonitor
from consortia.site.client import CoordinatorClient
from consortia.site.tasks import SiteContext, dispatch


def synthetic_frame(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """A small tabular data set with a learnable label (for fast in-process tests)."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(shift, 1.0, n)
    x2 = rng.normal(0.0, 2.0, n)
    cat = rng.choice(["a", "b", "c"], n)
    logit = 1.5 * x1 - 0.5 * x2 + (cat == "a") * 1.0
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "cat": cat, "label": y})


SPEC = {
    "name": "test-job",
    "recipe": {"name": "logistic_regression"},
    "features": [
        {"name": "x1", "type": "numeric"},
        {"name": "x2", "type": "numeric"},
        {"name": "cat", "type": "categorical", "vocabulary": "agreed"},
    ],
    "label": {"column": "label", "positive": "yes"},
    "rounds": 2,
    "min_sites": 2,
    "round_deadline_seconds": 30,
    "batch_size": 16,
    "learning_rate": 0.1,
}


@dataclass
class Coord:
    http: TestClient
    home: Path

    @property
    def admin_token(self) -> str:
        return (self.home / "admin.token").read_text().strip()

    def client(self, token: str | None) -> CoordinatorClient:
        # Share the TestClient's transport, so every call runs on the app's one event loop.
        return CoordinatorClient("http://testserver", token, transport=self.http._transport)

    @property
    def admin(self) -> CoordinatorClient:
        return self.client(self.admin_token)

    def tenant(self, name: str, regulated: bool = False) -> str:
        return self.admin.post_json("/v1/tenants", {"name": name, "regulated": regulated})["enrollment"]["token"]

    def site(self, tenant: str, name: str | None = None, frame: pd.DataFrame | None = None, tmp: Path | None = None):
        token = self.tenant(tenant)
        resp = self.client(None).enroll(token, name or tenant)
        c = self.client(resp.credential)
        ctx = SiteContext(
            name=resp.site_name,
            home=(tmp or self.home) / f"site-{resp.site_name}",
            client=c,
            frame=frame
            if frame is not None
            else synthetic_frame(300, zlib.crc32(tenant.encode()) % 1000),  # str hash() is salted per run,
        )
        return ctx

    def wait_job(self, job_id: int, sites: list[SiteContext], timeout: float = 60, states=("completed", "failed")):
        """Drive in-process sites (real handlers) until the job finishes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.admin.get_json(f"/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            for ctx in sites:
                for task in ctx.client.poll(0):
                    dispatch(ctx, task)
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {self.admin.get_json(f'/v1/jobs/{job_id}')['state']}")


def synthetic_release(directory: Path, version: int, seed: int, model: str = "test-model") -> Path:
    """A real release bundle (ONNX + tensors + manifest) for the synthetic schema, written
    by the coordinator's release writer without running a job (fast, for delivery tests)."""
    from datetime import UTC, datetime

    from consortia.coordinator.services.releases import write_bundle
    from consortia.ml.recipes import init_params
    from consortia.protocol.schemas import PreprocessingPlan
    from consortia.store.entities import ModelVersion

    plan = PreprocessingPlan(
        numeric={"x1": (0.0, 1.0), "x2": (0.0, 2.0)},
        categorical={"cat": ["a", "b", "c"]},
        feature_order=["x1", "x2", "cat"],
    )
    spec = {**SPEC, "name": model}
    lineage = {
        "job": {"id": version, "spec_hash": "0" * 64, "spec": spec},
        "preprocessing": plan.model_dump(mode="json"),
        "tenants": {"t": {"sites": ["t"], "regulated": False, "rounds": {}, "rows": {}}},
        "metrics": {
            "pooled": {"pooled_auc": None, "pooled_accuracy": None, "pooled_loss": None, "n": 0},
            "per_tenant": {},
            "fairness": None,
        },
        "privacy": {"secure_aggregation": False, "differential_privacy": None, "epsilon_spent": None},
        "rounds": [],
        "recipe": spec["recipe"],
        "strategy": {"name": "fedavg", "options": {}},
        "software": {"consortia": "test", "git_revision": None},
        "card": {},
    }
    v = ModelVersion(
        version,
        model,
        version,
        version,
        f"{version:064d}",
        lineage,
        "candidate",
        None,
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    out = directory / f"{model}-{version}"
    out.mkdir(parents=True)
    write_bundle(out, v, init_params("logistic_regression", plan.input_dim, {}, seed))
    return out


def enroll_device(coord, tenant: str, name: str) -> str:
    """Enroll a device under ``tenant``; its bearer credential."""
    token = coord.admin.post_json(f"/v1/tenants/{tenant}/device-enrollment-tokens", {})["token"]
    resp = coord.http.post("/v1/devices/enroll", json={"enrollment_token": token, "device_name": name, "labels": {}})
    assert resp.status_code in (200, 201), resp.text
    return resp.json()["credential"]


def serving_windows(release, reference, frame, rows=300, n=1, sensitive=None):
    """Windows as the device's serving agent makes them: the real release scores the rows
    and re-scores its own sample for attribution."""
    m = WindowMonitor(
        release.ref,
        reference["bins"],
        min_count=10,
        max_rows=rows,
        max_seconds=1e9,
        scorer=release.predict,
        reference=reference,
        sensitive=sensitive,
    )
    for k in range(n):
        part = frame.iloc[k * rows : (k + 1) * rows]
        feeds = {c: part[c].to_numpy(np.float64).reshape(-1, 1) for c in ("x1", "x2")}
        feeds["cat"] = part["cat"].astype("string").fillna(MISSING).to_numpy(object).reshape(-1, 1)
        m.observe(feeds, release.predict(feeds), 0.001)
    return m.drain()


def run_concurrently(coord, sites, job_id, timeout=120.0, handlers=None):
    """Drive each in-process site in its own thread (secure rounds block a site until
    its peers answer); ``handlers[name](ctx, task)`` replaces dispatch for that site."""
    import threading

    stop = threading.Event()
    errors: list[str] = []

    def loop(ctx):
        handle = (handlers or {}).get(ctx.name, dispatch)
        while not stop.is_set():
            try:
                for task in ctx.client.poll(0):
                    handle(ctx, task)
            except Exception as exc:  # a site's own failure is part of what tests look at
                errors.append(f"{ctx.name}: {exc}")
            time.sleep(0.05)

    threads = [threading.Thread(target=loop, args=(ctx,), daemon=True) for ctx in sites]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = coord.admin.get_json(f"/v1/jobs/{job_id}")
            if job["state"] in ("completed", "failed"):
                return job, errors
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish; site errors: {errors[:5]}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
