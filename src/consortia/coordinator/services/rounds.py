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
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np

from consortia.coordinator.faults import crash_point
from consortia.coordinator.services.closing import RoundClosing
from consortia.coordinator.services.fedbuff import BufferedRounds
from consortia.coordinator.services.relay import RelayRounds
from consortia.coordinator.services.results import (
    check_histograms,
    check_reference,
    read_update,
    update_metadata,
)
from consortia.coordinator.services.safeguards import (
    budget_check,
)
from consortia.coordinator.services.secure import SecureAggregator
from consortia.coordinator.services.submission import JobSubmission, parse_spec
from consortia.core.params import Params, check_compatible
from consortia.errors import (
    ConflictError,
    PermissionDeniedError,
    UpdateError,
    ValidationError,
)
from consortia.protocol.schemas import (
    JobSpec,
    PreprocessingPlan,
    RefusalRequest,
    TaskPublic,
    TaskResultPublic,
)
from consortia.protocol.tensors import decode, encode
from consortia.store.blobs import BlobStore
from consortia.store.entities import Job, ModelVersion, Principal, Round, Site, Task, utcnow
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


class RoundService(RoundClosing, JobSubmission, RelayRounds, BufferedRounds):
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
        # compressed downlink: model hash -> (base hash, delta blob), and delta blob -> (base, model)
        self._downlink: dict[str, tuple[str, str] | None] = {}
        self._downlink_blobs: dict[str, tuple[str, str]] = {}

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

    def remember_downlink(self, model_hash: str, base_hash: str, delta_hash: str) -> None:
        """Model ``model_hash`` is ``base_hash`` plus the compressed delta ``delta_hash``."""
        self._downlink[model_hash] = (base_hash, delta_hash)
        self._downlink_blobs[delta_hash] = (base_hash, model_hash)

    def downlink_for(self, job_id: int, spec: JobSpec, model_hash: str | None) -> tuple[str, str] | None:
        """``(base, delta)`` a site holding ``base`` can rebuild ``model_hash`` from, if the
        job compresses its downlink; found in the closed rounds' metrics after a restart."""
        if model_hash is None or spec.compression.downlink == "none":
            return None
        if model_hash not in self._downlink:
            self._downlink[model_hash] = None
            for r in self.store.job_rounds(job_id):
                d = (r.metrics or {}).get("downlink")
                if d and r.global_out == model_hash:
                    self.remember_downlink(model_hash, d["base"], d["delta"])
        return self._downlink[model_hash]

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
        downlink = self.downlink_for(task.job_id, spec, task.global_in)
        if downlink is not None:
            payload["global_delta"] = {"base": downlink[0], "blob": downlink[1]}
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
            if principal.site_id is None:
                return False
            if digest in self._downlink_blobs:  # a delta: only for a site that may read both ends
                base, model = self._downlink_blobs[digest]
                return self.store.site_may_read_blob(principal.site_id, base) and self.store.site_may_read_blob(
                    principal.site_id, model
                )
            return self.store.site_may_read_blob(principal.site_id, digest)
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


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if isinstance(exc, ConflictError):
            return  # another closer won the race: expected
        log.error("closing a round failed", exc_info=exc)
