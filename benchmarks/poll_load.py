"""Long-poll load: N sites long-polling at once must not starve the API.

A real coordinator process; N enrolled sites (real HTTP connections from one asyncio
process) each hold a long poll open (wait=25 s, re-polled on return) while no task exists
for them. Meanwhile an operator issues sequential job-status requests; their latency is
reported as p50/p99 with 0 pollers and with N pollers, in the same run, along with the
coordinator's thread count (a waiting poll must not hold a thread).
Target: p99 < 200 ms with 1,000 pollers on loopback.

Run: ``.venv/bin/python benchmarks/poll_load.py [N]`` (writes benchmarks/results/poll_load.json)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from _sim import SPEC, enroll_sites  # noqa: E402
from consortia.cli.demo import Federation  # noqa: E402


async def poller(client: httpx.AsyncClient, cred: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await client.get("/v1/sites/me/tasks", params={"wait": 25}, headers={"Authorization": f"Bearer {cred}"})
        except httpx.HTTPError:
            await asyncio.sleep(0.1)


async def status_latency(url: str, admin: str, job_id: int, n: int = 300) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = await c.get(f"/v1/jobs/{job_id}")
            r.raise_for_status()
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)
    return out


def pct(xs: list[float], q: float) -> float:
    return 1000 * statistics.quantiles(xs, n=100)[int(q) - 1]


async def run(url: str, admin: str, creds: list[str], job_id: int, pid: int) -> dict:
    idle = await status_latency(url, admin, job_id)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=len(creds) + 10, max_keepalive_connections=len(creds) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(poller(client, c, stop)) for c in creds]
        await asyncio.sleep(5)  # let every poll reach its wait
        threads = psutil.Process(pid).num_threads()
        loaded = await status_latency(url, admin, job_id)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"idle": idle, "loaded": loaded, "threads": threads}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        fed.start_coordinator()
        try:
            creds = enroll_sites(fed.url, fed.admin_token, n)
            # a job for one extra site that never polls: the status request has real content,
            # and the N pollers get no task, so they stay waiting
            idle_cred = enroll_sites(fed.url, fed.admin_token, 1, prefix="idle")
            assert idle_cred
            spec = {**SPEC, "rounds": 1, "min_sites": 1, "tenants": ["idle0"], "round_deadline_seconds": 3600}
            with httpx.Client(base_url=fed.url, headers={"Authorization": f"Bearer {fed.admin_token}"}) as c:
                job_id = c.post("/v1/jobs", json=spec).json()["id"]
            res = asyncio.run(run(fed.url, fed.admin_token, creds, job_id, fed.coordinator.pid))
        finally:
            fed.stop()
    rows = [
        ["0 pollers", pct(res["idle"], 50), pct(res["idle"], 99)],
        [f"{n} pollers", pct(res["loaded"], 50), pct(res["loaded"], 99)],
    ]
    print_table("Job-status latency under long-poll load (ms)", ["load", "p50 ms", "p99 ms"], rows)
    print(f"coordinator threads with {n} polls waiting: {res['threads']}")
    summary = {
        "pollers": n,
        "p50_idle_ms": rows[0][1],
        "p99_idle_ms": rows[0][2],
        "p50_loaded_ms": rows[1][1],
        "p99_loaded_ms": rows[1][2],
        "coordinator_threads_under_load": res["threads"],
        "target": "p99 < 200 ms with 1000 pollers",
    }
    print(f"wrote {write_result('poll_load', summary)}")


if __name__ == "__main__":
    main()
