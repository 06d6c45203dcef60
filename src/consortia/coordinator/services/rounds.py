"""Jobs and rounds: a persisted state machine driven by arrivals and a deadline ticker.

A job runs round 0 (``profile``: sites send sums and category counts, the coordinator
agrees the preprocessing plan and initialises the model), rounds 1..R (``train``), and
round R+1 (``evaluate``: every site scores the final model on its test split).

A round closes when ``min_sites`` sites have reported and either every sampled site has
answered or the deadline has passed. Below ``min_sites`` at the deadline it is abandoned
and retried with a fresh sample, at most ``max_round_retries`` times; then the job fails
with the reason. Closing is idempotent: aggregation reads the round's accepted updates
(unique per site, in site order) from the content-addressed store, so a coordinator
killed mid-aggregation recomputes the same bytes after restart, and the round's state,
the new global model's hash and the next round are committed in one transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np

from consortia.coordinator.faults import crash_point
from consortia.coordinator.services.fedbuff import BufferedRounds
from consortia.coordinator.services.lineage import build_lineage, contributors
from consortia.coordinator.services.relay import RelayRounds
from consortia.coordinator.services.results import (
    check_histograms,
    check_reference,
    merge_references,
    pool,
    read_update,
    round_metrics,
    update_metadata,
)
from consortia.coordinator.services.safeguards import (
    budget_check,
    privacy_summary,
    quarantine_flagged,
    safeguarded_mean,
)
from consortia.coordinator.services.secure import SecureAggregator
from consortia.coordinator.services.submission import JobSubmission, parse_spec
from consortia.core.aggregate import WeightedSum
from consortia.core.params import Params, check_compatible
from consortia.core.strategies import make_strategy
from consortia.errors import (
    ConflictError,
    PermissionDeniedError,
    UpdateError,
    ValidationError,
)
from consortia.ml.data import merge_profiles
from consortia.ml.recipes import init_params
from consortia.protocol.schemas import (
    EvaluationResult,
    JobSpec,
    PreprocessingPlan,
    ProfileResult,
    ReferenceProfile,
    RefusalRequest,
    TaskPublic,
    TaskResultPublic,
)
from consortia.protocol.tensors import decode, encode
from consortia.store.blobs import BlobStore
from consortia.store.entities import Job, ModelVersion, Principal, Round, Site, Task, Update, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["RoundService", "SiteNotifier", "parse_spec"]

log = logging.getLogger("consortia.coordinator.rounds")


class SiteNotifier:
    """Wakes a site's long poll when a task is created for it (no thread is held)."""

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}

    def event(self, site_id: int) -> asyncio.Event:
        ev = self._events.get(site_id)
        if ev is None:
            ev = self._events[site_id] = asyncio.Event()
        return ev

    def wake(self, site_ids: list[int]) -> None:
        for sid in site_ids:
            ev = self._events.get(sid)
            if ev is not None:
                ev.set()


class RoundService(JobSubmission, RelayRounds, BufferedRounds):
    """Submits jobs, hands out tasks, receives answers and closes rounds."""

    def __init__(self, store: SqlStore, blobs: BlobStore, *, max_poll_seconds: float = 30.0) -> None:
        self.store = store
        self.blobs = blobs
        self.notifier = SiteNotifier()
        self.max_poll_seconds = max_poll_seconds
        self._locks: dict[int, asyncio.Lock] = {}
        self._cache: OrderedDict[str, Params] = OrderedDict()
        self._last_touch: dict[int, float] = {}
        self.on_registered: Callable[[ModelVersion], Any] | None = None  # e.g. sign the release
        self.secure = SecureAggregator(self)
        self.upstream_url: str | None = None  # set when this coordinator is a hub

    # ------------------------------------------------------------------ helpers

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def params(self, digest: str) -> Params:
        """Decoded parameters of a stored model (small LRU cache)."""
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest]
        params, _ = decode(self.blobs.get(digest))
        self._cache[digest] = params
        while len(self._cache) > 4:
            self._cache.popitem(last=False)
        return params

    def _eligible(self, spec: JobSpec) -> list[Site]:
        sites = [s for s in self.store.list_sites(names=spec.tenants) if s.status == "active"]
        if spec.adapter is not None:
            return [s for s in sites if s.name == spec.adapter.site]
        return sites

    @staticmethod
    def _sample(spec: JobSpec, sites: list[Site], number: int, attempt: int, kind: str) -> list[Site]:
        if kind != "train" or spec.fraction >= 1.0:
            return sites
        k = min(len(sites), max(spec.min_sites, math.ceil(spec.fraction * len(sites))))
        rng = np.random.default_rng([spec.seed, number, attempt])
        idx = np.sort(rng.choice(len(sites), size=k, replace=False))
        return [sites[i] for i in idx]

    def _open(
        self,
        job_id: int,
        spec: JobSpec,
        number: int,
        attempt: int,
        kind: str,
        global_in: str | None,
        **close: Any,
    ) -> Round | None:
        eligible = self._eligible(spec)
        sites = self._sample(spec, eligible, number, attempt, kind)
        if kind == "train" and spec.privacy is not None and sites:
            q = len(sites) / len(eligible)
            tenants = sorted({s.tenant for s in eligible})
            ok, detail = budget_check(self.store, spec, tenants, q)
            if not ok:
                return self._stop_at_budget(job_id, spec, number, global_in, detail, **close)
            epsilons = {t: d["after_round"] for t, d in detail["tenants"].items()}
            self.store.charge_round(job_id, spec.registered_model, tenants, q, spec.privacy.noise_multiplier, epsilons)
        rnd = self.store.open_round(
            job_id=job_id,
            number=number,
            attempt=attempt,
            kind=kind,
            global_in=global_in,
            deadline_at=utcnow() + timedelta(seconds=spec.round_deadline_seconds),
            site_ids=[s.id for s in sites],
            **close,
        )
        if kind == "train" and spec.secure_aggregation is not None and global_in is not None:
            rnd = self.store.get_round(rnd.id)
            self.secure.start(rnd, spec, self.params(global_in))
        self.notifier.wake([s.id for s in sites])
        return rnd

    def _stop_at_budget(
        self, job_id: int, spec: JobSpec, number: int, global_in: str | None, detail: dict[str, Any], **close: Any
    ) -> Round | None:
        """The next round would take a tenant past its privacy budget: evaluate and
        register what the rounds so far trained, or fail the job if there were none."""
        over = {t: d for t, d in detail["tenants"].items() if d["after_round"] > detail["budget"]}
        reason = (
            f"privacy budget: round {number} would take "
            + ", ".join(f"{t} from epsilon {d['spent']:.3f} to {d['after_round']:.3f}" for t, d in over.items())
            + f", over the budget {detail['budget']} (delta {detail['delta']}) for model {spec.registered_model!r}"
        )
        self.store.add_event(job_id, "privacy_budget_reached", {"reason": reason, **detail})
        log.warning("job %s: %s", job_id, reason)
        if number > 1 and global_in is not None:
            return self._open(job_id, spec, number, 0, "evaluate", global_in, **close)
        self.store.finish_job(job_id, state="failed", reason=f"{reason}; no round could run.", **close)
        return None

    def recover(self, grace_fraction: float) -> None:
        """After a restart: give open rounds back part of their deadline, since sites could
        not report while the coordinator was down."""
        now = utcnow()
        for round_id in self.store.open_round_ids():
            rnd, _ = self.store.round_progress(round_id)
            spec = JobSpec.model_validate(self.store.get_job(rnd.job_id).spec)
            floor = now + timedelta(seconds=grace_fraction * spec.round_deadline_seconds)
            if rnd.deadline_at < floor:
                self.store.extend_deadline(rnd.id, floor)
            self.store.add_event(rnd.job_id, "coordinator_restarted", {"round": rnd.number})

    # ------------------------------------------------------------------ tasks

    def task_public(self, task: Task, spec: JobSpec, preprocessing: dict[str, Any] | None) -> TaskPublic:
        payload: dict[str, Any] = {"spec": spec.model_dump(mode="json")}
        if preprocessing is not None:
            payload["preprocessing"] = preprocessing
        session = self.secure.sessions.get(task.round_id) if task.kind == "train" else None
        if session is not None:
            payload["secagg"] = session.public_config(task.site_id)
        return TaskPublic(
            id=task.id,
            job_id=task.job_id,
            kind=task.kind,
            round=task.round_number,
            attempt=task.attempt,
            deadline_at=task.deadline_at,
            global_hash=task.global_in,
            payload=payload,
        )

    def deliverable(self, site_id: int) -> list[TaskPublic]:
        tasks = self.store.deliverable_tasks(site_id)
        out = []
        for t in tasks:
            job = self.store.get_job(t.job_id)
            out.append(self.task_public(t, JobSpec.model_validate(job.spec), job.preprocessing))
        for t in tasks:
            if t.kind == "train":
                crash_point("tasks_handed_out", t.round_number)
        return out

    async def poll(self, principal: Principal, wait: float) -> list[TaskPublic]:
        """Long poll: answer at once if tasks are waiting, else wait on an event (no
        thread held) until one is created or ``wait`` seconds pass."""
        assert principal.site_id is not None
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_touch.get(principal.site_id, -1e9) > 15.0:  # bounded writes
            self._last_touch[principal.site_id] = loop.time()
            self.store.touch_site(principal.site_id)
        end = loop.time() + min(max(wait, 0.0), self.max_poll_seconds)
        while True:
            ev = self.notifier.event(principal.site_id)
            ev.clear()
            tasks = self.deliverable(principal.site_id)
            remaining = end - loop.time()
            if tasks or remaining <= 0:
                return tasks
            try:
                await asyncio.wait_for(ev.wait(), timeout=remaining)
            except TimeoutError:
                return []

    def _own_task(self, principal: Principal, task_id: int) -> Task:
        task = self.store.get_task(task_id)
        if principal.site_id != task.site_id:
            raise PermissionDeniedError(
                f"task {task_id} belongs to another site; a site may only answer its own tasks."
            )
        return task

    def may_read_blob(self, principal: Principal, digest: str) -> bool:
        if principal.role == "site":
            return principal.site_id is not None and self.store.site_may_read_blob(principal.site_id, digest)
        return principal.role in ("admin", "operator", "auditor") and principal.tenant_id is None

    async def receive_update(
        self, principal: Principal, task_id: int, body: bytes, wait: float = 0.0
    ) -> dict[str, Any]:
        """Validate and record a model update; malformed ones fail the site's task."""
        task = self.secure.task(principal, task_id)  # the store's, unless the task is in a secure round
        if task.kind != "train":
            raise ConflictError(f"task {task_id} is a {task.kind} task; send its result to /result.")
        if task.round_id in self.secure.sessions:  # stage 3 of a secure round: a masked input
            out = await self.secure.masked(principal, task, body)
            self._schedule_check(task.round_id)
            if wait > 0 and task.round_id in self.secure.sessions:
                out["view"] = await self.secure.poll(principal, task, 3, wait)
            return out
        try:
            spec = JobSpec.model_validate(self.store.get_job(task.job_id).spec)
            assert task.global_in is not None
            reference = self.params(task.global_in)
            if spec.adapter is not None:  # an adapter update carries the declared tensors only
                reference = {k: reference[k] for k in spec.adapter.params}
            params, meta, compressed = read_update(body, reference, spec.compression.method)
            check_compatible(reference, params)
            num_examples, metrics = update_metadata(meta)
        except UpdateError as exc:
            self.store.complete_task(task, state="failed", reason=exc.message, rule="update_validation")
            raise
        # a compressed delta is stored as the parameters it stands for; nbytes counts the wire
        digest = self.blobs.put(encode(params) if compressed else body)
        status = self.store.record_update(
            task, blob_hash=digest, num_examples=num_examples, nbytes=len(body), metrics=metrics
        )
        crash_point("update_stored", task.round_number)
        if status == "accepted":
            self._schedule_check(task.round_id)
        return {"status": status, "blob": digest, "round": task.round_number}

    async def receive_result(self, principal: Principal, task_id: int, result: TaskResultPublic) -> dict[str, Any]:
        task = self._own_task(principal, task_id)
        if task.kind == "profile" and result.profile is None:
            raise ValidationError("a profile task needs a 'profile' result.")
        if task.kind == "evaluate" and result.evaluation is None:
            raise ValidationError("an evaluate task needs an 'evaluation' result.")
        if task.kind == "train":
            raise ConflictError(f"task {task_id} is a train task; upload a safetensors update instead.")
        if result.evaluation is not None:
            check_histograms(result.evaluation)
        if result.reference is not None:
            job = self.store.get_job(task.job_id)
            check_reference(
                result.reference, JobSpec.model_validate(job.spec), PreprocessingPlan.model_validate(job.preprocessing)
            )
        status = self.store.complete_task(task, state="completed", result=result.model_dump(mode="json"))
        if status == "recorded":
            self._schedule_check(task.round_id)
        return {"status": status}

    async def refuse(self, principal: Principal, task_id: int, req: RefusalRequest) -> dict[str, Any]:
        task = self._own_task(principal, task_id)
        status = self.store.complete_task(task, state="refused", reason=req.reason, rule=req.rule)
        if status == "recorded":
            self._schedule_check(task.round_id)
        return {"status": status}

    # ------------------------------------------------------------------ closing rounds

    def _schedule_check(self, round_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self.check_round(round_id))
        task.add_done_callback(_log_failure)

    async def tick(self) -> None:
        for round_id in self.store.open_round_ids():
            await self.check_round(round_id)

    async def check_round(self, round_id: int) -> None:
        rnd, _ = self.store.round_progress(round_id)
        if rnd.state == "open" and rnd.kind == "train":
            spec = JobSpec.model_validate(self.store.get_job(rnd.job_id).spec)
            if spec.asynchronous is not None:  # FedBuff: the buffer decides, not the round
                async with self._lock(rnd.job_id):
                    await self._check_buffered(self.store.get_job(rnd.job_id), spec)
                return
            if spec.secure_aggregation is not None:  # the protocol's stages decide, not the update count
                if round_id in self.secure.sessions:
                    await self.secure.check(round_id)
                else:
                    await self.abort_secure(round_id, "the coordinator restarted during the secure round")
                return
        async with self._lock(rnd.job_id):
            rnd, counts = self.store.round_progress(round_id)
            if rnd.state != "open":
                return
            job = self.store.get_job(rnd.job_id)
            spec = JobSpec.model_validate(job.spec)
            total = sum(counts.values())
            completed = counts.get("completed", 0)
            answered = sum(counts.get(s, 0) for s in ("completed", "failed", "refused", "late"))
            expired = utcnow() >= rnd.deadline_at
            everyone = answered == total
            if completed >= spec.min_sites and (everyone or expired):
                await self._close(job, spec, self.store.get_round(round_id))
            elif expired or everyone:
                self._retry_or_fail(job, spec, self.store.get_round(round_id))

    def _retry_or_fail(self, job: Job, spec: JobSpec, rnd: Round, why_not: str | None = None) -> None:
        completed = [t for t in rnd.tasks if t.state == "completed"]
        why = [
            f"{t.site}: {t.state}" + (f" ({t.rule}: {t.reason})" if t.reason else "")
            for t in rnd.tasks
            if t.state != "completed"
        ]
        reason = why_not or (
            f"round {rnd.number} ({rnd.kind}, attempt {rnd.attempt + 1}): {len(completed)} of "
            f"{len(rnd.tasks)} sampled site(s) reported, min_sites is {spec.min_sites}"
            + (f"; {'; '.join(why)}" if why else "")
        )
        if why_not:
            reason = f"round {rnd.number} ({rnd.kind}, attempt {rnd.attempt + 1}): {why_not}"
        close = {"close": rnd, "close_state": "abandoned", "close_fields": {"reason": reason}}
        if spec.relay is not None:  # the upper coordinator decides about retries
            self.store.close_round(rnd, "abandoned", {"reason": reason})
            return
        if rnd.attempt < spec.max_round_retries:
            log.warning("job %s: %s; retrying with a fresh sample", job.id, reason)
            self._open(job.id, spec, rnd.number, rnd.attempt + 1, rnd.kind, rnd.global_in, **close)
        else:
            log.warning("job %s failed: %s", job.id, reason)
            self.store.finish_job(
                job.id,
                state="failed",
                reason=f"{reason}; gave up after {rnd.attempt + 1} attempt(s).",
                **close,
            )

    async def _close(self, job: Job, spec: JobSpec, rnd: Round) -> None:
        if spec.relay is not None:
            await self._close_relay(job, rnd)
        elif rnd.kind == "profile":
            await self._close_profile(job, spec, rnd)
        elif rnd.kind == "train":
            await self._close_train(job, spec, rnd)
        else:
            self._close_evaluate(job, spec, rnd)

    async def _close_profile(self, job: Job, spec: JobSpec, rnd: Round) -> None:
        done = [t for t in rnd.tasks if t.state == "completed"]
        profiles = [ProfileResult.model_validate(t.result["profile"]) for t in done if t.result]
        plan = merge_profiles(profiles, spec)
        params = await asyncio.to_thread(init_params, spec.recipe.name, plan.input_dim, spec.recipe.options, spec.seed)
        strategy = make_strategy(spec.strategy.name, spec.strategy.options)
        global_hash = self.blobs.put(encode(params))
        state = strategy.init_state(params)
        state_hash = self.blobs.put(encode(state)) if state else None
        metrics = {"sites": [t.site for t in done], "rows": sum(p.rows for p in profiles), "input_dim": plan.input_dim}
        self._open(
            job.id,
            spec,
            1,
            0,
            "train",
            global_hash,
            close=rnd,
            close_fields={"global_out": global_hash, "metrics": metrics},
            job_fields={
                "preprocessing": plan.model_dump(mode="json"),
                "global_hash": global_hash,
                "state_hash": state_hash,
            },
        )

    async def _close_train(
        self, job: Job, spec: JobSpec, rnd: Round, done: tuple[Params, Params, dict[str, Any]] | None = None
    ) -> None:
        updates = self.store.round_updates(rnd.id)
        assert rnd.global_in is not None
        current = self.params(rnd.global_in)
        if done is None:
            state = decode(self.blobs.get(job.state_hash))[0] if job.state_hash else {}
            new_params, new_state, info = await asyncio.to_thread(
                self._aggregate, spec, rnd.number, current, state, updates, len(rnd.tasks)
            )
        else:  # a secure round: the unmasked sum was turned into the model already
            new_params, new_state, info = done
        global_hash = self.blobs.put(encode(new_params))
        state_hash = self.blobs.put(encode(new_state)) if new_state else None
        crash_point("model_written", rnd.number)
        metrics = {**round_metrics(updates), **info}
        if updates:  # bytes on the wire against what fp32 parameters would have taken
            fp32 = 4 * sum(int(np.size(v)) for v in current.values()) * len(updates)
            if spec.adapter is not None:
                fp32 = 4 * sum(int(np.size(current[k])) for k in spec.adapter.params) * len(updates)
            payload = sum((u.metrics or {}).get("wire_bytes", u.nbytes) for u in updates)
            metrics["compression"] = {
                "method": spec.compression.method,
                "tensor_bytes": payload,
                "bytes_fp32": fp32,
                "ratio": payload / fp32,
            }
        if spec.robust is not None:  # before the next round is sampled, so it leaves them out
            rounds = [
                r if r.id != rnd.id else dataclasses.replace(_closed(r), metrics=metrics)
                for r in self.store.job_rounds(job.id)
            ]
            quarantined = quarantine_flagged(self.store, spec, job.id, rounds, self._eligible(spec))
            if quarantined:
                metrics["quarantined"] = quarantined
        close = {
            "close": rnd,
            "close_fields": {"global_out": global_hash, "state_out": state_hash, "metrics": metrics},
            "job_fields": {"global_hash": global_hash, "state_hash": state_hash, "rounds_completed": rnd.number},
        }
        if rnd.number < spec.rounds:
            self._open(job.id, spec, rnd.number + 1, 0, "train", global_hash, **close)
        else:
            self._open(job.id, spec, rnd.number + 1, 0, "evaluate", global_hash, **close)

    def _aggregate(
        self, spec: JobSpec, number: int, current: Params, state: Params, updates: list[Update], expected: int
    ) -> tuple[Params, Params, dict[str, Any]]:
        if spec.adapter is not None:  # aggregate the adapter; the base's tensors stay as they are
            names = spec.adapter.params
            new, new_state, info = self._aggregate(
                spec.model_copy(update={"adapter": None}),
                number,
                {k: current[k] for k in names},
                state,
                updates,
                expected,
            )
            return {**current, **new}, new_state, info
        strategy = make_strategy(spec.strategy.name, spec.strategy.options)
        strategy_state = {k: v for k, v in state.items() if not k.startswith("privacy/")}
        if spec.robust is not None or spec.privacy is not None:
            # robust rules and DP clipping need every update at once: O(model x sites) memory
            loaded = [(decode(self.blobs.get(u.blob_hash, verify=True))[0], u.num_examples, u.site) for u in updates]
            own = {k: v for k, v in state.items() if k.startswith("privacy/")}
            mean, own, info = safeguarded_mean(spec, current, own, loaded, expected)
            new, new_state = strategy.apply(current, mean, strategy_state)
            return new, {**new_state, **own}, info
        acc = WeightedSum(current)
        for i, u in enumerate(updates):
            params, _ = decode(self.blobs.get(u.blob_hash, verify=True))
            acc.add(params, float(u.num_examples), check=False)  # validated on arrival, hash re-verified
            if i == len(updates) // 2:
                crash_point("mid_aggregation", number)
        new, new_state = strategy.apply(current, acc.mean(), strategy_state)
        return new, new_state, {}

    def _close_evaluate(self, job: Job, spec: JobSpec, rnd: Round) -> None:
        done = [t for t in rnd.tasks if t.state == "completed" and t.result]
        evals = {t.site: EvaluationResult.model_validate(t.result["evaluation"]) for t in done}  # type: ignore[index]
        metrics = pool(evals)
        if (rnd.metrics or {}).get("fedbuff"):  # FedBuff: the buffer that made the evaluated model
            metrics["fedbuff"] = rnd.metrics["fedbuff"]  # type: ignore[index]
        assert rnd.global_in is not None
        rounds = [r if r.id != rnd.id else _closed(r) for r in self.store.job_rounds(job.id)]
        updates = {r.id: self.store.round_updates(r.id) for r in rounds if r.kind == "train" and r.state == "closed"}
        sites = self.store.list_sites()
        lineage = build_lineage(job, rounds, updates, sites, self.store.list_tenants(), metrics, rnd.global_in)
        refs = {
            t.site: ReferenceProfile.model_validate(t.result["reference"]) for t in done if t.result.get("reference")
        }
        if refs:  # the global reference for monitoring: the sites' coarsened histograms, summed
            tenant_of = {s.name: s.tenant for s in sites}
            # and each tenant's own, kept as a blob only the coordinator reads: a region's
            # traffic is judged against its own population, not the consortium's mixture
            per_tenant = {
                tenant: self.blobs.put(
                    merge_references([r for n, r in refs.items() if tenant_of.get(n) == tenant])
                    .model_dump_json()
                    .encode()
                )
                for tenant in sorted({tenant_of[n] for n in refs if n in tenant_of})
            }
            lineage["reference"] = {
                "sites": sorted(refs),
                "profile": merge_references(list(refs.values())).model_dump(mode="json"),
                "per_tenant": per_tenant,
            }
        if spec.adapter is not None:
            lineage["composite"] = self._composite_lineage(spec, sites, rnd.global_in)
        lineage["privacy"]["secure_aggregation"] = spec.secure_aggregation is not None
        privacy = privacy_summary(self.store, spec, job.id)
        if privacy is not None:  # the largest epsilon any contributing tenant has spent on this model
            spent = max((t["epsilon_total"] for t in privacy["tenants"].values()), default=0.0)
            lineage["privacy"] = {**lineage["privacy"], "differential_privacy": privacy, "epsilon_spent": spent}
        version = self.store.finish_job(
            job.id,
            state="completed",
            reason=None,
            close=rnd,
            close_fields={"metrics": metrics},
            job_fields={"final_metrics": metrics, "global_hash": rnd.global_in},
            register={"model": spec.registered_model, "params_hash": rnd.global_in, "lineage": lineage},
        )
        if version is not None and self.on_registered is not None:
            self.on_registered(version)

    def _composite_lineage(self, spec: JobSpec, sites: list[Site], params_hash: str) -> dict[str, Any]:
        """What a composite release is made of: the base version (by hash and release
        digest) and the adapter (site, parameters, the hash of each adapter tensor)."""
        assert spec.adapter is not None
        model, version = spec.adapter.base.split(":")
        base = self.store.get_version(model, int(version))
        params = self.params(params_hash)
        site = next(s for s in sites if s.name == spec.adapter.site)
        base_site = base.lineage["metrics"]["per_tenant"].get(site.tenant, {}).get("sites", {}).get(site.name)
        return {
            "base": {
                "ref": base.ref,
                "params_hash": base.params_hash,
                "release_digest": base.release_digest,
                "job_id": base.lineage["job"]["id"],
                "tenants": contributors(base.lineage),  # a composite's base may itself be one
                "metrics_at_site": base_site,
            },
            "adapter": {
                "site": site.name,
                "tenant": site.tenant,
                "params": list(spec.adapter.params),
                "tensors": {
                    k: {"shape": list(params[k].shape), "sha256": hashlib.sha256(params[k].tobytes()).hexdigest()}
                    for k in spec.adapter.params
                },
                "bytes": int(sum(params[k].nbytes for k in spec.adapter.params)),
            },
        }


def _closed(rnd: Round) -> Round:
    """``rnd`` as it will be once closed in the registering transaction."""
    return dataclasses.replace(rnd, state="closed", closed_at=utcnow())


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if isinstance(exc, ConflictError):
            return  # another closer won the race: expected
        log.error("closing a round failed", exc_info=exc)
