"""Secure aggregation cost: round time with SecAgg+ / without, and bytes on the wire.

A real coordinator process on loopback; N simulated sites (real HTTP, one asyncio process)
with no-op training: each train task is answered with the global model's parameters
plus a small fixed delta. Without secure aggregation a site uploads its parameters
(safetensors fp32); with it the site runs the four SecAgg+ stages (X25519 keys, Shamir
shares encrypted with AES-GCM to its neighbours, the masked fixed-point update, its
unmask shares) through the coordinator. The model is an MLP of about 66,000 parameters.

What is timed is the gap between consecutive train rounds closing (median over the job),
so it holds the coordinator's work and the sites' protocol work. All N sites' cryptography
runs here in one process on this machine's cores, one after another; in a deployment
each site does its share on its own machine, so the measured ratio is an upper bound.
Also reported: the site-side protocol CPU seconds per site and round, and the bytes a
site sends and receives per round (the communication expansion).

Run: ``.venv/bin/python benchmarks/secagg.py [--repeats R] [SITES ...]`` (default 10 50 100; writes
benchmarks/results/secagg.json)
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from _sim import EVAL, PROFILE, SPEC, enroll_sites  # noqa: E402
from consortia.cli.demo import Federation  # noqa: E402
from consortia.core.robust import flatten  # noqa: E402
from consortia.core.secagg import SecAggConfig, SiteSession  # noqa: E402
from consortia.protocol.tensors import decode, encode, encode_wire  # noqa: E402

ROUNDS = 8
RECIPE = {"name": "mlp", "options": {"hidden": [256, 256]}}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Meter:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.cpu = 0.0
        self.site_rounds = 0
        self.errors: list[str] = []

    async def call(self, client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
        for attempt in range(4):  # a pooled keep-alive connection the server closed: retry
            try:
                r = await client.request(method, url, **kw)
                break
            except httpx.TransportError:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        req = r.request
        self.sent += len(req.content or b"") + len(str(req.url)) + sum(len(k) + len(v) for k, v in req.headers.items())
        self.received += len(r.content) + sum(len(k) + len(v) for k, v in r.headers.items())
        return r


async def _view(m: Meter, client, headers, task_id: int, after: int, answer: httpx.Response | None = None) -> dict:
    view = answer.json().get("view") if answer is not None else None
    if view is not None and view["stage"] > after:  # the stage POST long-polled it for us
        if view.get("aborted") or view.get("dropped"):
            raise RuntimeError(view)
        return view
    while True:
        r = await m.call(
            client, "GET", f"/v1/tasks/{task_id}/secagg", params={"after": after, "wait": 20}, headers=headers
        )
        view = r.json()
        if view["stage"] > after:
            if view.get("aborted") or view.get("dropped"):
                raise RuntimeError(view)
            return view


async def secure_train(m: Meter, client, headers, t: dict, params: dict) -> None:
    cfg = t["payload"]["secagg"]
    config = SecAggConfig(
        tuple(cfg["sites"]),
        cfg["threshold"],
        cfg["clip_range"],
        base64.b64decode(cfg["context"]),
        cfg["graph_seed"],
        cfg["degree"],
    )
    t0 = time.process_time()
    session = SiteSession(config, cfg["site"])
    delta = np.full(int(cfg["size"]), 1e-3)
    c_pk, s_pk = session.advertise()
    m.cpu += time.process_time() - t0
    base = f"/v1/tasks/{t['id']}/secagg"
    body = {"c_public": _b64(c_pk), "s_public": _b64(s_pk), "num_examples": 100}
    r = await m.call(client, "POST", f"{base}/keys", json=body, headers=headers, params={"wait": 20})
    view = await _view(m, client, headers, t["id"], 1, r)
    t0 = time.process_time()
    keys = {int(j): (base64.b64decode(c), base64.b64decode(s)) for j, (c, s) in view["keys"].items()}
    cts = session.share_keys(keys)
    m.cpu += time.process_time() - t0
    body = {"ciphertexts": {str(j): _b64(ct) for j, ct in cts.items()}}
    r = await m.call(client, "POST", f"{base}/shares", json=body, headers=headers, params={"wait": 20})
    view = await _view(m, client, headers, t["id"], 2, r)
    t0 = time.process_time()
    received = {int(j): base64.b64decode(ct) for j, ct in view["ciphertexts"].items()}
    masked = session.masked_input(delta, 1.0, received, np.random.default_rng())
    wire = encode_wire({"masked": masked}, {"num_examples": "100", "encoding": "secagg/masked"})
    m.cpu += time.process_time() - t0
    r = await m.call(client, "POST", f"/v1/tasks/{t['id']}/update", content=wire, headers=headers, params={"wait": 20})
    view = await _view(m, client, headers, t["id"], 3, r)
    t0 = time.process_time()
    shares = session.unmask(view["unmask"]["active"], view["unmask"]["dropped"])
    m.cpu += time.process_time() - t0
    body = {"shares": {str(j): [k, str(v)] for j, (k, v) in shares.items()}}
    await m.call(client, "POST", f"{base}/unmask", json=body, headers=headers)
    m.site_rounds += 1


async def site(m: Meter, url: str, cred: str, stop: asyncio.Event) -> None:
    # Each simulated site has its own client (connection pool), as a real site agent does:
    # one pool shared by N sites costs O(N) per request in httpcore's pool bookkeeping,
    # which at 100 sites made the simulator, not the protocol, the bottleneck.
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await _site_loop(m, client, cred, stop)


async def _site_loop(m: Meter, client: httpx.AsyncClient, cred: str, stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {cred}"}
    cache: dict[str, dict] = {}
    while not stop.is_set():
        try:
            r = await m.call(client, "GET", "/v1/sites/me/tasks", params={"wait": 5}, headers=headers)
        except httpx.TransportError:
            await asyncio.sleep(0.1)
            continue
        for t in r.json().get("tasks", []):
            if t["kind"] == "profile":
                await m.call(client, "POST", f"/v1/tasks/{t['id']}/result", json=PROFILE, headers=headers)
            elif t["kind"] == "evaluate":
                await m.call(client, "POST", f"/v1/tasks/{t['id']}/result", json={"evaluation": EVAL}, headers=headers)
            elif t["kind"] == "train":
                h = t["global_hash"]
                if h not in cache:
                    blob = (await m.call(client, "GET", f"/v1/blobs/{h}", headers=headers)).content
                    cache[h] = decode(blob)[0]
                if "secagg" in t["payload"]:
                    try:
                        await secure_train(m, client, headers, t, cache[h])
                    except Exception as exc:  # a dropped simulated site: counted, never silent
                        m.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                else:
                    t0 = time.process_time()
                    names = sorted(cache[h])
                    moved = {k: (v + 1e-3).astype(np.float32) for k, v in cache[h].items()}
                    body = encode(moved, {"num_examples": "100"})
                    flatten(moved, names)
                    m.cpu += time.process_time() - t0
                    await m.call(client, "POST", f"/v1/tasks/{t['id']}/update", content=body, headers=headers)
                    m.site_rounds += 1


async def run_job(url: str, admin: str, creds: list[str], secure: bool) -> tuple[dict, Meter]:
    stop = asyncio.Event()
    meter = Meter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(site(meter, url, c, stop)) for c in creds]
        headers = {"Authorization": f"Bearer {admin}"}
        spec: dict[str, Any] = {
            **SPEC,
            "name": "secure" if secure else "plain",
            "recipe": RECIPE,
            "rounds": ROUNDS,
            "min_sites": len(creds),
        }
        if secure:
            spec["secure_aggregation"] = {"stage_seconds": 60, "clip_range": 0.1}
        admin = Meter()  # its retries, not its bytes
        job = (await admin.call(client, "POST", "/v1/jobs", json=spec, headers=headers)).json()
        while job["state"] not in ("completed", "failed"):
            await asyncio.sleep(0.5)
            job = (await admin.call(client, "GET", f"/v1/jobs/{job['id']}", headers=headers)).json()
        stop.set()
        for t in tasks:  # a site may be inside a long poll: stop it before the client closes
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return job, meter


def measure(n: int, secure: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        fed.start_coordinator()
        try:
            creds = enroll_sites(fed.url, fed.admin_token, n)
            job, meter = asyncio.run(run_job(fed.url, fed.admin_token, creds, secure))
        finally:
            fed.stop()
    if job["state"] != "completed":
        raise SystemExit(f"{n} sites, secure={secure}: job failed: {job['reason']}")
    closed = sorted(datetime.fromisoformat(r["closed_at"]) for r in job["rounds"] if r["kind"] in ("profile", "train"))
    gaps = [(b - a).total_seconds() for a, b in zip(closed, closed[1:], strict=False)]
    per = max(meter.site_rounds, 1)
    for e in sorted(set(meter.errors))[:5]:
        print(f"  site error ({meter.errors.count(e)}x): {e}", flush=True)
    return {
        "sites": n,
        "secure": secure,
        "median_round_seconds": statistics.median(gaps),
        "round_seconds": gaps,
        "site_cpu_seconds_per_round": meter.cpu / per,
        "bytes_sent_per_site_round": meter.sent / per,
        "bytes_received_per_site_round": meter.received / per,
        "site_errors": len(meter.errors),
        "survivors": [
            r["metrics"].get("secure_aggregation", {}).get("survivors") for r in job["rounds"] if r["kind"] == "train"
        ],
        "stage_seconds": [  # per train round: open -> keys, -> shares, -> masked inputs, -> unmask
            r["metrics"].get("secure_aggregation", {}).get("stage_seconds")
            for r in job["rounds"]
            if r["kind"] == "train"
        ],
    }


def main(sizes: list[int], repeats: int) -> None:
    rows, out = [], []
    for n in sizes:
        for rep in range(repeats):  # plain and secure back to back, so a pair shares the machine's state
            plain, secure = measure(n, False), measure(n, True)
            out += [plain, secure]
            rows.append(
                [
                    n,
                    rep + 1,
                    plain["median_round_seconds"],
                    secure["median_round_seconds"],
                    secure["median_round_seconds"] / plain["median_round_seconds"],
                    secure["site_cpu_seconds_per_round"],
                    secure["bytes_sent_per_site_round"] / plain["bytes_sent_per_site_round"],
                    secure["bytes_received_per_site_round"] / plain["bytes_received_per_site_round"],
                ]
            )
            stages = [st for st in secure["stage_seconds"] if st]
            per_stage = [round(statistics.median(x), 3) for x in zip(*stages, strict=True)] if stages else []
            print(f"{n} sites, run {rep + 1}: secure stage seconds (median) {per_stage}", flush=True)
    print_table(
        f"Secure aggregation (SecAgg+) vs plain rounds, no-op training, {ROUNDS} rounds, MLP 256-256",
        ["sites", "run", "plain s/round", "secure s/round", "ratio", "site protocol CPU s", "sent x", "received x"],
        rows,
    )
    print(f"wrote {write_result('secagg', {'rows': out})}")


if __name__ == "__main__":
    args = sys.argv[1:]
    reps = 1
    if args[:1] == ["--repeats"]:
        reps, args = int(args[1]), args[2:]
    main([int(x) for x in args] or [10, 50, 100], reps)
