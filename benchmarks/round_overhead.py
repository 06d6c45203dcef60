"""Coordinator overhead per round vs number of sites, with no-op training.

A real coordinator process on loopback; N simulated sites (real HTTP long-polls, in one
asyncio process) answer each task at once and send the global model back unchanged.
The time between consecutive train rounds closing is therefore the platform's own cost
per round: handing out N tasks, N downloads, N uploads validated and stored, the
aggregation and the next round's transaction. Reported as median seconds per round and
milliseconds per site-round; the per-site cost staying flat means overhead is linear.

Run: ``.venv/bin/python benchmarks/round_overhead.py`` (writes benchmarks/results/round_overhead.json)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from _sim import SPEC, enroll_sites, noop_site  # noqa: E402
from consortia.cli.demo import Federation  # noqa: E402

ROUNDS = 6


async def run_job(url: str, admin: str, creds: list[str]) -> dict:
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        sites = [asyncio.create_task(noop_site(url, c, stop)) for c in creds]
        headers = {"Authorization": f"Bearer {admin}"}
        spec = {**SPEC, "rounds": ROUNDS, "min_sites": len(creds)}
        job = (await client.post("/v1/jobs", json=spec, headers=headers)).json()
        while job["state"] not in ("completed", "failed"):
            await asyncio.sleep(0.5)
            job = (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()
        stop.set()
        for t in sites:  # a site may be inside a long poll
            t.cancel()
        await asyncio.gather(*sites, return_exceptions=True)
    return job


def measure(n_sites: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        fed.start_coordinator()
        try:
            creds = enroll_sites(fed.url, fed.admin_token, n_sites)
            job = asyncio.run(run_job(fed.url, fed.admin_token, creds))
        finally:
            fed.stop()
    assert job["state"] == "completed", job["reason"]
    closed = sorted(datetime.fromisoformat(r["closed_at"]) for r in job["rounds"] if r["kind"] in ("profile", "train"))
    gaps = [(b - a).total_seconds() for a, b in zip(closed, closed[1:], strict=False)]
    med = statistics.median(gaps)
    return {
        "sites": n_sites,
        "rounds": ROUNDS,
        "median_round_seconds": med,
        "ms_per_site_round": 1000 * med / n_sites,
        "round_seconds": gaps,
    }


def main() -> None:
    rows = [measure(n) for n in (10, 50, 200)]
    base = rows[0]["ms_per_site_round"]
    print_table(
        f"Coordinator overhead per round, no-op training ({ROUNDS} rounds, median)",
        ["sites", "s / round", "ms / site-round", "per-site cost vs 10 sites"],
        [[r["sites"], r["median_round_seconds"], r["ms_per_site_round"], r["ms_per_site_round"] / base] for r in rows],
    )
    print(f"wrote {write_result('round_overhead', {'rows': rows})}")


if __name__ == "__main__":
    main()
