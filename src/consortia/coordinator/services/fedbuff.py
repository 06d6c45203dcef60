"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022), mixed into
:class:`~consortia.coordinator.services.rounds.RoundService`.

A job with ``asynchronous`` has no synchronous rounds: each model version is a round row
whose tasks go to the sites that were idle when it was made. Every accepted update waits
in the buffer; when ``buffer_size`` are there, the next version is

    w_{v+1} = strategy(w_v, w_v + eta * sum_i s_i n_i d_i / sum_i s_i n_i),

with ``d_i`` the update's delta from the version it trained on, ``n_i`` its example count
and ``s_i = (1 + tau_i) ** -a`` its staleness weight (``tau_i`` = versions since). A slow
site is not dropped: its update is applied, down-weighted, when it arrives; updates staler
than ``max_staleness`` are recorded and not applied. Which updates made a version is
stored in that version's round metrics in the same transaction that opens it, so a
coordinator restarted at any point applies each update exactly once. Rounds stay open
until their tasks are answered or their deadline passes; sites left without a task (all
theirs expired) get a re-issued round at the same version, at most ``max_round_retries``
times per version.

Reference: Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np

from consortia.coordinator.services.downlink import strategy_state
from consortia.coordinator.services.results import round_metrics
from consortia.core.strategies import make_strategy
from consortia.protocol.schemas import JobSpec
from consortia.protocol.tensors import decode, encode
from consortia.store.entities import Job, Round, Update, utcnow

__all__ = ["BufferedRounds"]

OUTSTANDING = ("pending", "delivered")


class BufferedRounds:
    """FedBuff methods of the round service (the caller holds the job's lock)."""

    def _buffered_state(self, job: Job) -> tuple[list[Round], set[int]]:
        rounds = self.store.job_rounds(job.id)  # type: ignore[attr-defined]
        used: set[int] = set()
        for r in rounds:
            fb = (r.metrics or {}).get("fedbuff") or {}
            used.update(fb.get("applied", []))
            used.update(fb.get("stale", []))
        return rounds, used

    async def _check_buffered(self, job: Job, spec: JobSpec) -> None:
        assert spec.asynchronous is not None
        rounds, used = self._buffered_state(job)
        if any(r.kind == "evaluate" for r in rounds) or job.state != "running":
            return
        train = [r for r in rounds if r.kind == "train"]
        if not train:
            return
        version = max(r.number for r in train)
        head = max((r for r in train if r.number == version), key=lambda r: r.attempt)
        now = utcnow()
        for r in train:  # a round ends when its tasks are answered or its deadline passed
            if r.state == "open" and (now >= r.deadline_at or all(t.state not in OUTSTANDING for t in r.tasks)):
                self.store.close_round(r, "closed", {})  # type: ignore[attr-defined]
        pending: list[tuple[Update, int]] = []
        for r in train:
            for u in self.store.round_updates(r.id):  # type: ignore[attr-defined]
                if u.id not in used:
                    pending.append((u, r.number))
        pending.sort(key=lambda x: x[0].id)
        if len(pending) >= spec.asynchronous.buffer_size:
            await self._apply_buffer(job, spec, version, head, pending[: spec.asynchronous.buffer_size])
            return
        busy = self._busy(job)
        idle = [s for s in self._eligible(spec) if s.id not in busy]  # type: ignore[attr-defined]
        if not idle:
            return
        # idle sites train on the current version at once (a site that just reported, or
        # one whose task expired); a version whose hand-outs all expired unanswered counts
        # as a failed attempt
        lost = sum(
            1
            for r in train
            if r.number == version and r.tasks and r.state == "closed" and not self.store.round_updates(r.id)  # type: ignore[attr-defined]
        )
        if lost > spec.max_round_retries:
            reason = (
                f"version {version}: {lost} hand-out(s) of it expired with no update, the buffer holds "
                f"{len(pending)} of {spec.asynchronous.buffer_size}; gave up."
            )
            self.store.finish_job(job.id, state="failed", reason=reason, close=None)  # type: ignore[attr-defined]
            return
        self._issue(job, spec, version, head.attempt + 1, head.global_in, [s.id for s in idle], None, {})

    def _busy(self, job: Job) -> set[int]:
        return {
            t.site_id
            for r in self.store.job_rounds(job.id)  # type: ignore[attr-defined]
            if r.state == "open"
            for t in r.tasks
            if t.state in OUTSTANDING
        }

    def _issue(
        self,
        job: Job,
        spec: JobSpec,
        number: int,
        attempt: int,
        global_in: str | None,
        site_ids: list[int],
        metrics: dict[str, Any] | None,
        job_fields: dict[str, Any],
        kind: str = "train",
    ) -> None:
        self.store.open_round(  # type: ignore[attr-defined]
            job_id=job.id,
            number=number,
            attempt=attempt,
            kind=kind,
            global_in=global_in,
            deadline_at=utcnow() + timedelta(seconds=spec.round_deadline_seconds),
            site_ids=site_ids,
            job_fields=job_fields or None,
            metrics=metrics,
        )
        self.notifier.wake(site_ids)  # type: ignore[attr-defined]

    async def _apply_buffer(
        self, job: Job, spec: JobSpec, version: int, head: Round, buffer: list[tuple[Update, int]]
    ) -> None:
        a = spec.asynchronous
        assert a is not None and head.global_in is not None
        current = self.params(head.global_in)  # type: ignore[attr-defined]
        state = decode(self.blobs.get(job.state_hash))[0] if job.state_hash else {}  # type: ignore[attr-defined]
        rounds = {r.id: r for r in self.store.job_rounds(job.id)}  # type: ignore[attr-defined]
        acc = {k: np.zeros(v.shape, np.float64) for k, v in current.items()}
        total = 0.0
        applied, stale, used = [], [], []
        staleness: dict[str, list[int]] = {}
        for u, number in buffer:
            tau = version - number
            if tau > a.max_staleness:
                stale.append(u.id)
                continue
            base = self.params(rounds[u.round_id].global_in)  # type: ignore[attr-defined]
            params = decode(self.blobs.get(u.blob_hash, verify=True))[0]  # type: ignore[attr-defined]
            w = float(u.num_examples) * (1.0 + tau) ** -a.staleness_exponent
            for k in acc:
                acc[k] += w * (params[k].astype(np.float64) - base[k].astype(np.float64))
            total += w
            applied.append(u.id)
            used.append(u)
            staleness.setdefault(u.site, []).append(tau)
        if total > 0:
            mean = {k: (current[k] + a.server_learning_rate * acc[k] / total).astype(np.float32) for k in current}
            strategy = make_strategy(spec.strategy.name, spec.strategy.options)
            new_params, new_state = strategy.apply(current, mean, strategy_state(state))
        else:  # the whole buffer was too stale: the model stays
            new_params, new_state = current, state
        global_hash = self.blobs.put(encode(new_params))  # type: ignore[attr-defined]
        state_hash = self.blobs.put(encode(new_state)) if new_state else None  # type: ignore[attr-defined]
        metrics = {
            **round_metrics(used),
            "fedbuff": {"applied": applied, "stale": stale, "staleness": staleness, "made_from_version": version},
        }
        job_fields = {"global_hash": global_hash, "state_hash": state_hash, "rounds_completed": version}
        if version >= spec.rounds:  # the last version: evaluate it; open rounds end here
            for r in self.store.job_rounds(job.id):  # type: ignore[attr-defined]
                if r.state == "open":
                    self.store.close_round(r, "closed", {})  # type: ignore[attr-defined]
            sites = [s.id for s in self._eligible(spec)]  # type: ignore[attr-defined]
            self._issue(job, spec, version + 1, 0, global_hash, sites, metrics, job_fields, kind="evaluate")
            return
        busy = self._busy(job)
        idle = [s.id for s in self._eligible(spec) if s.id not in busy]  # type: ignore[attr-defined]
        self._issue(job, spec, version + 1, 0, global_hash, idle, metrics, job_fields)
