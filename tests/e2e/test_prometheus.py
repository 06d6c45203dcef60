"""A real Prometheus server (Debian package `prometheus`, installed by .ci/run) scrapes a
running coordinator after a federated job: platform metrics arrive as Prometheus sees
them (jobs, updates, task latency, HTTP requests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest
from fedtools import enroll_all, finance_spec, wait_state

from consortia.cli.demo import free_port

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")


def query(url: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    resp.raise_for_status()
    return resp.json()["data"]["result"]  # type: ignore[no-any-return]


@pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CONSORTIA_CI"),
    reason="needs the Debian package prometheus (apt-get install --no-install-recommends prometheus; .ci/run does)",
)
def test_a_real_prometheus_scrapes_the_coordinator(federation, tmp_path):
    assert PROMETHEUS is not None, "CI installs prometheus in .ci/run; it is missing"
    fed, paths = federation(sites=2)
    fed.start_coordinator()
    enroll_all(fed, paths)
    _, spec = finance_spec(rounds=2)
    with fed.client() as c:
        job_id = c.post_json("/v1/jobs", spec)["id"]
    assert wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"))["state"] == "completed"

    port = free_port()
    target = fed.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: consortia\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        jobs: list[dict] = []
        while time.monotonic() < deadline:  # the first sample takes a few seconds: poll, never sleep blindly
            try:
                jobs = query(url, 'consortia_jobs{state="completed"}')
                if jobs:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert jobs, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(jobs[0]["value"][1]) == 1.0 and jobs[0]["metric"]["job"] == "consortia"
        accepted = query(url, 'consortia_updates{status="accepted"}')
        assert float(accepted[0]["value"][1]) == 4.0  # 2 sites x 2 rounds
        train = query(url, 'consortia_task_duration_seconds_count{kind="train"}')
        assert float(train[0]["value"][1]) == 4.0
        assert query(url, 'sum(consortia_http_requests_total{route="/v1/jobs/{job_id}"})')
        assert query(url, "up")[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
