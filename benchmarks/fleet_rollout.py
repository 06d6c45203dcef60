"""A staged rollout over a fleet: N real edge agent processes plus M simulated devices.

A real coordinator process registers two releases (two no-op jobs with different seeds),
assigns the first to the whole fleet and waits until every device serves it, then rolls
the second out with a staged plan (10% -> 50% -> 100%) and reports how long each step
took to converge (every device of the step reporting the new release).

Real agents are ``consortia edge run`` processes (TUF updates, bundle verification, ONNX
Runtime load and smoke test, serving). Simulated devices run in this process, in a thread
pool: they enroll, poll their signed instruction, verify it, refresh TUF metadata and
download the release's targets into their own cache, verify the bundle, and report; they
skip loading ONNX Runtime and serving (that is what the real agents measure).

Run: ``.venv/bin/python benchmarks/fleet_rollout.py [REAL] [SIMULATED]`` (default 50 1000;
writes benchmarks/results/fleet_rollout.json). Needs ~8 GB of memory for 50 agents.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from _sim import SPEC, enroll_sites, noop_site  # noqa: E402
from consortia.cli.demo import Federation, free_port  # noqa: E402
from consortia.edge.updater import CallableFetcher, SecureUpdater, verify_instruction  # noqa: E402

PLAN = {
    "target": {"selector": {"bench": "fleet"}},
    "steps": [{"set_weight": 10}, {"set_weight": 50}, {"set_weight": 100}],
    "install_timeout_seconds": 1800,
}


async def _job(url: str, admin: str, creds: list[str], seed: int) -> dict:
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        sites = [asyncio.create_task(noop_site(url, c, stop)) for c in creds]
        headers = {"Authorization": f"Bearer {admin}"}
        job = (
            await client.post("/v1/jobs", json={**SPEC, "rounds": 1, "min_sites": 2, "seed": seed}, headers=headers)
        ).json()
        while job["state"] not in ("completed", "failed"):
            await asyncio.sleep(0.3)
            job = (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()
        stop.set()
        for t in sites:  # a site may be inside a long poll
            t.cancel()
        await asyncio.gather(*sites, return_exceptions=True)
    return job


class SimDevice:
    """The delivery protocol of one device without a model runtime."""

    def __init__(self, url: str, home: Path, enrolled: dict) -> None:
        self.url, self.home = url, home
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {enrolled['credential']}"}, timeout=120
        )
        self.device_id = f"{enrolled['tenant']}/{enrolled['device_name']}"
        self.director = serialization.load_pem_public_key(enrolled["director_public_key"].encode())
        self.counter, self.serving = 0, None

        def get(u: str) -> tuple[int, bytes]:
            r = self.http.get(u[len(url) :])
            return r.status_code, r.content

        self.updater = SecureUpdater(
            home, CallableFetcher(get), enrolled["tuf_root"].encode(), base_url=f"{url}/v1/tuf"
        )

    def step(self) -> None:
        signed = self.http.get("/v1/devices/me/instruction").json()["signed"]
        if signed and signed["instruction"]["counter"] > self.counter:
            body = verify_instruction(self.director, signed, self.device_id, self.counter)
            rel = body["release"]
            self.updater.fetch_release(rel["model"], rel["version"], self.home / f"r{rel['version']}")
            self.counter, self.serving = body["counter"], f"{rel['model']}:{rel['version']}"
        self.http.post(
            "/v1/devices/me/report",
            json={
                "state": "serving" if self.serving else "idle",
                "serving": self.serving,
                "counter": self.counter,
                "attempted": self.counter,
            },
        )


def main(n_real: int, n_sim: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        fed.start_coordinator()
        stop = threading.Event()
        try:
            creds = enroll_sites(fed.url, fed.admin_token, 2)
            for seed in (0, 1):
                assert asyncio.run(_job(fed.url, fed.admin_token, creds, seed))["state"] == "completed"
            admin = httpx.Client(base_url=fed.url, headers={"Authorization": f"Bearer {fed.admin_token}"}, timeout=120)
            admin.post("/v1/tenants", json={"name": "fleet"}).raise_for_status()

            def token() -> str:
                return admin.post("/v1/tenants/fleet/device-enrollment-tokens", json={}).json()["token"]

            t0 = time.monotonic()
            for i in range(n_real):
                fed.start_edge(f"agent-{i:03d}", token(), "bench=fleet,kind=agent", free_port(), poll_seconds=2.0)
            sims = []
            for i in range(n_sim):
                e = httpx.post(
                    f"{fed.url}/v1/devices/enroll",
                    json={"enrollment_token": token(), "device_name": f"sim-{i:04d}", "labels": {"bench": "fleet"}},
                    timeout=60,
                ).json()
                sims.append(SimDevice(fed.url, Path(tmp) / "sims" / str(i), e))
            pool = ThreadPoolExecutor(16)

            def drive() -> None:
                while not stop.is_set():
                    try:
                        list(pool.map(lambda d: d.step(), sims))
                    except httpx.TransportError:
                        if stop.is_set():
                            return  # the coordinator was stopped at the end of the run
                        raise
                    stop.wait(1.0)

            threading.Thread(target=drive, daemon=True).start()

            def fleet() -> list[dict]:
                return [d for d in admin.get("/v1/devices").json() if d["labels"].get("bench") == "fleet"]

            while len([d for d in fleet() if d["report"]]) < n_real + n_sim:
                time.sleep(1.0)
            enrolled_s = time.monotonic() - t0
            t1 = time.monotonic()
            admin.post(
                "/v1/devices/assign", json={"model": "bench", "version": 1, "selector": {"bench": "fleet"}}
            ).raise_for_status()
            while not all((d["report"] or {}).get("serving") == "bench:1" for d in fleet()):
                time.sleep(1.0)
            initial_s = time.monotonic() - t1
            r = admin.post("/v1/rollouts", json={"model": "bench", "version": 2, "plan": PLAN}).json()
            t2 = time.monotonic()
            while r["state"] == "running":
                time.sleep(1.0)
                r = admin.get(f"/v1/rollouts/{r['id']}").json()
            total_s = time.monotonic() - t2
        finally:
            stop.set()
            fed.stop()
    assert r["state"] == "succeeded", r
    steps = r["progress"]["history"]
    n = n_real + n_sim
    rows = [[f"set_weight {h['set_weight']}", -(-h["set_weight"] * n // 100), h["converged_seconds"]] for h in steps]
    print_table(
        f"staged rollout over {n_real} agent processes + {n_sim} simulated devices",
        ["step", "devices on the new release", "seconds to converge"],
        rows,
    )
    print(
        f"enrollment {enrolled_s:.1f} s; initial install of v1 on all {n} devices {initial_s:.1f} s; "
        f"whole rollout {total_s:.1f} s"
    )
    result = {
        "real_agents": n_real,
        "simulated": n_sim,
        "steps": steps,
        "enrolled_seconds": enrolled_s,
        "initial_install_seconds": initial_s,
        "rollout_seconds": total_s,
    }
    print(f"wrote {write_result('fleet_rollout', result)}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [50, 1000][len(args) :]))
