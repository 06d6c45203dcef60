"""Rounds closed by a protocol rather than by counting updates: a hub's relay rounds
(driven by the upper coordinator) and secure-aggregation rounds (closed when SecAgg+
finishes or aborts). Mixed into :class:`~consortia.coordinator.services.rounds.RoundService`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from consortia.coordinator.services.downlink import strategy_state
from consortia.coordinator.services.hub import combine_evaluations, combine_profiles, relay_spec, spec_digest
from consortia.coordinator.services.results import round_metrics
from consortia.coordinator.services.safeguards import CLIP_STATE
from consortia.coordinator.services.secure import SecureRound
from consortia.coordinator.services.submission import parse_spec
from consortia.core.aggregate import WeightedSum
from consortia.core.strategies import make_strategy
from consortia.protocol.schemas import EvaluationResult, JobSpec, ProfileResult, TaskPublic
from consortia.protocol.tensors import decode, encode
from consortia.store.entities import Job, Round

__all__ = ["RelayRounds"]


class RelayRounds:
    """Relay and secure round methods of the round service."""

    def relay_round(self, task: TaskPublic, spec: JobSpec, global_in: str | None) -> Round:
        """The local round standing for an upstream task (found again after a restart)."""
        url = self.upstream_url or "upstream"
        job = next(
            (
                j
                for j in self.store.list_jobs()
                if (j.spec.get("relay") or {}).get("upstream_job") == task.job_id
                and j.spec["relay"].get("upstream") == url
            ),
            None,
        )
        if job is None:
            raw = relay_spec(spec, task.job_id, url)
            local = parse_spec(raw)
            canonical = local.model_dump(mode="json")
            job = self.store.create_job(local.name, canonical, spec_digest(canonical), None, f"upstream:{url}")
        local = JobSpec.model_validate(job.spec)
        for r in self.store.job_rounds(job.id):
            if (r.number, r.attempt, r.kind) == (task.round, task.attempt, task.kind):
                return r
        fields = (
            {"job_fields": {"preprocessing": task.payload["preprocessing"]}} if "preprocessing" in task.payload else {}
        )
        rnd = self._open(job.id, local, task.round, task.attempt, task.kind, global_in, **fields)
        assert rnd is not None
        return rnd

    async def _close_relay(self, job: Job, rnd: Round) -> None:
        """Close a relay round with the one result the hub forwards upstream."""
        done = [t for t in rnd.tasks if t.state == "completed" and t.result is not None]
        if rnd.kind == "profile":
            profiles = [ProfileResult.model_validate(t.result["profile"]) for t in done]  # type: ignore[index]
            fields: dict[str, Any] = {
                "metrics": {"relay": {"profile": combine_profiles(profiles).model_dump(mode="json")}}
            }
        elif rnd.kind == "train":
            updates = self.store.round_updates(rnd.id)
            assert rnd.global_in is not None
            acc = WeightedSum(self.params(rnd.global_in))
            for u in updates:
                acc.add(decode(self.blobs.get(u.blob_hash, verify=True))[0], float(u.num_examples), check=False)
            digest = self.blobs.put(encode(acc.mean()))
            examples = sum(u.num_examples for u in updates)
            fields = {"global_out": digest, "metrics": {**round_metrics(updates), "relay": {"examples": examples}}}
        else:
            evals = [EvaluationResult.model_validate(t.result["evaluation"]) for t in done]  # type: ignore[index]
            fields = {"metrics": {"relay": {"evaluation": combine_evaluations(evals).model_dump(mode="json")}}}
        if rnd.kind == "evaluate":  # the upper job's last round: the relay job is done
            self.store.finish_job(job.id, state="completed", reason=None, close=rnd, close_fields=fields)
        else:
            self.store.close_round(rnd, "closed", fields)

    async def abort_secure(self, round_id: int, why: str) -> None:
        """A secure round fell below its threshold (or lost its session): retry or fail."""
        rnd, _ = self.store.round_progress(round_id)
        if rnd.state != "open":
            return
        lock = self._lock(rnd.job_id)
        if lock.locked():  # called from inside the secure check, which holds it
            self._abort_secure_locked(round_id, why)
            return
        async with lock:
            self._abort_secure_locked(round_id, why)

    def _abort_secure_locked(self, round_id: int, why: str) -> None:
        rnd = self.store.get_round(round_id)
        if rnd.state != "open":
            return
        job = self.store.get_job(rnd.job_id)
        st = self.secure.sessions.get(round_id)
        if st is not None:
            self.secure._forget(st)
        self._retry_or_fail(job, JobSpec.model_validate(job.spec), rnd, f"secure aggregation aborted: {why}")

    async def close_secure(self, session: SecureRound) -> None:
        """Stage 4 closed: the unmasked sum becomes the round's model (caller holds the lock)."""
        rnd = self.store.get_round(session.round_id)
        job = self.store.get_job(rnd.job_id)
        if rnd.state != "open":
            return
        spec = JobSpec.model_validate(job.spec)
        assert rnd.global_in is not None
        current = self.params(rnd.global_in)
        mean, info = self.secure.mean(session, spec, current, len(rnd.tasks))
        if spec.relay is not None:  # a hub's secure round: the region's mean goes upstream, masked again
            digest = self.blobs.put(encode(mean))
            examples = sum(session.counts[j] for j in session.server.masked)
            metrics = {**round_metrics(self.store.round_updates(rnd.id)), **info, "relay": {"examples": examples}}
            self.store.close_round(rnd, "closed", {"global_out": digest, "metrics": metrics})
            return
        state = decode(self.blobs.get(job.state_hash))[0] if job.state_hash else {}
        strategy = make_strategy(spec.strategy.name, spec.strategy.options)
        new_params, new_state = strategy.apply(current, mean, strategy_state(state))
        new_state = {**new_state, **{k: v for k, v in state.items() if k.startswith("privacy/")}}
        if "next_clip_norm" in info:  # adaptive clipping: the sites clip with this next round
            new_state[CLIP_STATE] = np.array([info["next_clip_norm"]], np.float32)
        await self._close_train(job, spec, rnd, (new_params, new_state, info))
