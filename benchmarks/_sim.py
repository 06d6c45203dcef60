"""Simulated sites for benchmarks: real HTTP clients against a real coordinator process,
answering tasks with no-op work (the model comes back unchanged), so what is measured
is the platform's own overhead."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from consortia.core.metrics import SCORE_BINS
from consortia.protocol.tensors import decode, encode

PROFILE = {"profile": {"rows": 100, "numeric": {"x": {"count": 100, "sum": 0.0, "sumsq": 100.0}}, "categorical": {}}}
HIST = [0] * SCORE_BINS
EVAL = {"n": 100, "loss": 0.5, "accuracy": 0.5, "auc": 0.5, "neg_hist": [50] + HIST[1:], "pos_hist": HIST[:-1] + [50]}

SPEC: dict[str, Any] = {
    "name": "bench",
    "recipe": {"name": "logistic_regression"},
    "features": [{"name": "x", "type": "numeric"}],
    "label": {"column": "y", "positive": "1"},
    "round_deadline_seconds": 600,
}


def enroll_sites(url: str, admin: str, n: int, prefix: str = "s") -> list[str]:
    creds = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as c:
        for i in range(n):
            r = c.post("/v1/tenants", json={"name": f"{prefix}{i}"})
            r.raise_for_status()
            tok = r.json()["enrollment"]["token"]
            e = c.post("/v1/enroll", json={"enrollment_token": tok, "site_name": f"{prefix}{i}"})
            e.raise_for_status()
            creds.append(e.json()["credential"])
    return creds


async def noop_site(url: str, cred: str, stop: asyncio.Event, wait: float = 5.0) -> None:
    """A site that answers every task at once (the global model back, unchanged), with its
    own HTTP client as a real site agent has: one connection pool shared by N simulated
    sites costs O(N) per request in httpcore's pool bookkeeping and makes the simulator,
    not the coordinator, what a benchmark measures."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await _noop_loop(client, cred, stop, wait)


async def _noop_loop(client: httpx.AsyncClient, cred: str, stop: asyncio.Event, wait: float) -> None:
    headers = {"Authorization": f"Bearer {cred}"}
    cache: dict[str, bytes] = {}
    while not stop.is_set():
        try:
            r = await client.get("/v1/sites/me/tasks", params={"wait": wait}, headers=headers)
        except httpx.TransportError:
            await asyncio.sleep(0.1)
            continue
        for t in r.json().get("tasks", []):
            if t["kind"] == "profile":
                await client.post(f"/v1/tasks/{t['id']}/result", json=PROFILE, headers=headers)
            elif t["kind"] == "evaluate":
                await client.post(f"/v1/tasks/{t['id']}/result", json={"evaluation": EVAL}, headers=headers)
            elif t["kind"] == "train":
                h = t["global_hash"]
                if h not in cache:
                    blob = (await client.get(f"/v1/blobs/{h}", headers=headers)).content
                    cache[h] = encode(decode(blob)[0], {"num_examples": "100"})
                await client.post(f"/v1/tasks/{t['id']}/update", content=cache[h], headers=headers)
