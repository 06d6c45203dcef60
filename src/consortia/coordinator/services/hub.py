"""Hierarchical aggregation: a coordinator that is also one site of an upper coordinator.

``consortia coordinator serve --upstream URL --token T`` starts a :class:`HubAgent` beside
the usual services. It long-polls the upper coordinator for tasks like any site; for each
it runs the same kind of round with its own sites (a *relay* job, one per upstream job)
and answers the upper coordinator with one result:

- profile: its sites' profiles combined (sums and category counts added, quantile
  sketches merged as a mixture), so the upper coordinator's plan is the one six sites
  flat would give (bin edges to sketch precision);
- train: the example-weighted mean of its sites' updated models, with their total example
  count, so FedAvg over hubs equals FedAvg over all their sites;
- evaluate: one evaluation with summed histograms and example-weighted loss and accuracy.

The hub enrolls at the upper coordinator with the one-time token on first start and keeps
the site credential under ``HOME/upstream.credential`` (mode 0600). A job with secure
aggregation is relayed as a secure round of the hub's own sites (at least three), whose
unmasked regional mean the hub then masks again as one site of the upper round.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from consortia.core.metrics import auc_from_histograms
from consortia.core.profile import SKETCH_PROBS, merge_sketches
from consortia.errors import ConsortiaError
from consortia.protocol.schemas import (
    CategoricalStats,
    EvaluationResult,
    GroupEvaluation,
    JobSpec,
    NumericStats,
    ProfileResult,
    TaskPublic,
)
from consortia.protocol.tensors import decode, encode
from consortia.site.client import CoordinatorClient
from consortia.site.secure import secure_update

if TYPE_CHECKING:
    from consortia.coordinator.services.rounds import RoundService

__all__ = ["HubAgent", "combine_evaluations", "combine_profiles"]

log = logging.getLogger(__name__)


def combine_profiles(profiles: list[ProfileResult]) -> ProfileResult:
    """One profile standing for several sites' (what a hub sends upstream)."""
    numeric: dict[str, NumericStats] = {}
    for name in sorted({k for p in profiles for k in p.numeric}):
        parts = [p.numeric[name] for p in profiles if name in p.numeric]
        sketches = [(s.quantiles, s.count) for s in parts if s.quantiles is not None and s.count > 0]
        numeric[name] = NumericStats(
            count=sum(s.count for s in parts),
            sum=float(sum(s.sum for s in parts)),
            sumsq=float(sum(s.sumsq for s in parts)),
            quantiles=merge_sketches(sketches, SKETCH_PROBS) if sketches else None,
        )
    categorical: dict[str, CategoricalStats] = {}
    for name in sorted({k for p in profiles for k in p.categorical}):
        counts: dict[str, int] = {}
        suppressed = 0
        for p in profiles:
            c = p.categorical.get(name)
            if c is None:
                continue
            suppressed += c.suppressed
            for k, v in c.counts.items():
                counts[k] = counts.get(k, 0) + v
        categorical[name] = CategoricalStats(counts=counts, suppressed=suppressed)
    return ProfileResult(rows=sum(p.rows for p in profiles), numeric=numeric, categorical=categorical)


def combine_evaluations(evals: list[EvaluationResult]) -> EvaluationResult:
    """One evaluation standing for several sites' (histograms summed, n-weighted means)."""
    n = sum(e.n for e in evals)
    with_hist = [e for e in evals if e.neg_hist]
    neg = np.sum([e.neg_hist for e in with_hist], axis=0).astype(int).tolist() if with_hist else []
    pos = np.sum([e.pos_hist for e in with_hist], axis=0).astype(int).tolist() if with_hist else []
    auc = auc_from_histograms(np.asarray(neg), np.asarray(pos)) if with_hist else float("nan")
    groups: dict[str, GroupEvaluation] = {}
    for e in evals:
        for g, ge in (e.groups or {}).items():
            old = groups.get(g)
            if old is None:
                groups[g] = ge
            else:
                groups[g] = GroupEvaluation(
                    n=old.n + ge.n,
                    neg_hist=(np.asarray(old.neg_hist) + np.asarray(ge.neg_hist)).astype(int).tolist(),
                    pos_hist=(np.asarray(old.pos_hist) + np.asarray(ge.pos_hist)).astype(int).tolist(),
                )
    return EvaluationResult(
        n=n,
        loss=sum(e.loss * e.n for e in evals) / n if n else 0.0,
        accuracy=sum(e.accuracy * e.n for e in evals) / n if n else 0.0,
        auc=None if np.isnan(auc) else float(auc),
        neg_hist=neg,
        pos_hist=pos,
        groups=groups or None,
        suppressed_groups=sum(e.suppressed_groups for e in evals),
    )


class HubAgent:
    """Takes part in an upper coordinator's jobs as one site, relaying to this
    coordinator's own sites."""

    def __init__(
        self, rounds: RoundService, url: str, token: str | None, name: str, home: Path, poll_seconds: float = 10.0
    ) -> None:
        self.rounds = rounds
        self.url = url.rstrip("/")
        self.token = token
        self.name = name
        self.credential_path = home / "upstream.credential"
        self.poll_seconds = poll_seconds

    async def _credential(self, client: httpx.AsyncClient) -> str:
        if self.credential_path.exists():
            return self.credential_path.read_text().strip()
        if not self.token:
            raise ConsortiaError("no upstream credential yet: pass --token with a one-time enrollment token.")
        r = await client.post("/v1/enroll", json={"enrollment_token": self.token, "site_name": self.name})
        if r.status_code >= 400:
            raise ConsortiaError(f"enrolling at {self.url} failed: {r.text[:300]}")
        cred = r.json()["credential"]
        fd = os.open(self.credential_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cred)
        log.warning("enrolled at %s as site %r", self.url, self.name)
        return cred

    async def run(self) -> None:
        """Poll the upper coordinator forever (cancelled with the app)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=self.poll_seconds + 60) as client:
            while True:
                try:
                    cred = await self._credential(client)
                    client.headers["Authorization"] = f"Bearer {cred}"
                    r = await client.get("/v1/sites/me/tasks", params={"wait": self.poll_seconds})
                    r.raise_for_status()
                    for raw in r.json()["tasks"]:
                        await self.handle(client, TaskPublic.model_validate(raw))
                except asyncio.CancelledError:
                    raise
                except (httpx.HTTPError, ConsortiaError) as exc:
                    log.warning("upstream %s: %s", self.url, getattr(exc, "message", exc))
                    await asyncio.sleep(1.0)
                except Exception:
                    log.exception("upstream relay failed")
                    await asyncio.sleep(1.0)

    async def handle(self, client: httpx.AsyncClient, task: TaskPublic) -> None:
        spec = JobSpec.model_validate(task.payload["spec"])
        if spec.secure_aggregation is not None:
            active = [s for s in self.rounds.store.list_sites() if s.status == "active"]
            if len(active) < 3:
                reason = (
                    f"this hub has {len(active)} active site(s); it relays a secure round only as a secure round "
                    "of its own, which needs at least 3 (with fewer the hub could tell one site's update)"
                )
                await client.post(
                    f"/v1/tasks/{task.id}/refuse", json={"rule": "hub.secure_aggregation", "reason": reason}
                )
                return
        global_in = None
        if task.global_hash is not None:
            if not self.rounds.blobs.exists(task.global_hash):
                blob = (await client.get(f"/v1/blobs/{task.global_hash}")).content
                if hashlib.sha256(blob).hexdigest() != task.global_hash:
                    raise ConsortiaError(f"global model {task.global_hash[:12]} from upstream failed its hash check.")
                decode(blob)  # a malformed model is refused before any site sees it
                self.rounds.blobs.put(blob)
            global_in = task.global_hash
        rnd = self.rounds.relay_round(task, spec, global_in)
        while rnd.state == "open":
            await asyncio.sleep(0.2)
            rnd = self.rounds.store.get_round(rnd.id)
        if rnd.state != "closed":
            reason = rnd.reason or f"the hub's {task.kind} round was {rnd.state}"
            await client.post(f"/v1/tasks/{task.id}/refuse", json={"rule": "hub.round", "reason": reason[:2000]})
            return
        out = (rnd.metrics or {}).get("relay") or {}
        if task.kind == "train" and spec.secure_aggregation is not None:
            assert rnd.global_out is not None and global_in is not None
            await self._secure_upstream(client, task, spec, rnd.global_out, global_in, int(out["examples"]))
            return
        if task.kind == "train":
            assert rnd.global_out is not None
            params = decode(self.rounds.blobs.get(rnd.global_out))[0]
            meta = {"num_examples": str(out["examples"])}
            body = encode(params, meta)
            r = await client.post(f"/v1/tasks/{task.id}/update", content=body)
        else:
            key = "profile" if task.kind == "profile" else "evaluation"
            r = await client.post(f"/v1/tasks/{task.id}/result", json={key: out[key]})
        if r.status_code >= 400:
            log.warning("upstream refused the hub's %s result: %s", task.kind, r.text[:300])

    async def _secure_upstream(
        self, client: httpx.AsyncClient, task: TaskPublic, spec: JobSpec, mean: str, base: str, examples: int
    ) -> None:
        """Take part in the upper coordinator's secure round as one site, with the region's
        mean (itself from a secure round: the hub never saw a single site's update) and
        its total example count; the site's own protocol code runs in a worker thread."""
        token = str(client.headers["Authorization"]).removeprefix("Bearer ")
        trained = decode(self.rounds.blobs.get(mean))[0]
        params = decode(self.rounds.blobs.get(base))[0]
        with CoordinatorClient(self.url, token) as upstream:
            ctx = _UpstreamContext(upstream)
            await asyncio.to_thread(
                secure_update, ctx, task, spec, trained, params, {"num_examples": str(examples)}, examples
            )


class _UpstreamContext:
    """What the site's secure-round code needs of a site context: a coordinator client."""

    def __init__(self, client: Any) -> None:
        self.client = client


def relay_spec(spec: JobSpec, upstream_job: int, url: str) -> dict[str, Any]:
    """The hub's local job for an upstream job: the same model and data settings, plain
    FedAvg over all of the hub's sites."""
    raw = spec.model_dump(mode="json")
    raw.update(
        name=f"relay-{upstream_job}"[:63],
        tenants=None,
        fraction=1.0,
        min_sites=1,  # the hub forwards what its sites delivered by the deadline
        round_deadline_seconds=spec.round_deadline_seconds * 0.8,  # ahead of the upper deadline
        robust=None,
        privacy=None,  # DP applies upstream, the hub as the unit (its noise share added there if secure)
        compression={"method": "none", "topk_ratio": 0.01},
        strategy={"name": "fedprox" if spec.strategy.name == "fedprox" else "fedavg", "options": {}},
        relay={"upstream": url, "upstream_job": upstream_job},
    )
    if spec.strategy.name == "fedprox":
        raw["strategy"]["options"] = dict(spec.strategy.options)
    if spec.secure_aggregation is not None:  # the region's round is secure too
        raw.update(min_sites=3)
    return raw


def spec_digest(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
