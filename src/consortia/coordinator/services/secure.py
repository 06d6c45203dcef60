"""Secure aggregation rounds: the coordinator side of SecAgg+ over HTTP.

A train round of a job with ``secure_aggregation`` runs the four stages of
:mod:`consortia.core.secagg` with the sampled sites. Each site trains first, then:
advertises its keys (``POST .../secagg/keys``), shares its secrets with its neighbours
(``POST .../secagg/shares``), uploads its masked update (``POST .../update``) and answers
the unmask request (``POST .../secagg/unmask``); between stages it long-polls
``GET .../secagg?after=STAGE`` for what the next stage needs. A stage closes when every
expected site answered or at its deadline (stage 1 at the round's deadline, later ones
``stage_seconds`` after the previous closed); a stage that leaves fewer than the
threshold aborts the round, which is retried with fresh keys like any failed round.

Sessions live in memory only: a coordinator restarted mid-round abandons the round and
retries it (the masks and shares of a half-finished round are useless anyway). The
coordinator never holds an individual update: masked inputs are folded into a running
sum on arrival and are not written to the blob store (the update row keeps the SHA-256 of
what the site sent).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from consortia.coordinator.services.safeguards import current_clip_norm
from consortia.core.params import Params
from consortia.core.privacy import AdaptiveClip, secure_bit_encoding
from consortia.core.robust import flatten, unflatten
from consortia.core.secagg import SecAggConfig, SecAggError, ServerSession
from consortia.errors import ConflictError, PermissionDeniedError, UpdateError, ValidationError
from consortia.protocol.schemas import JobSpec
from consortia.protocol.tensors import decode, decode_wire
from consortia.store.entities import Principal, Round, Task, utcnow

if TYPE_CHECKING:
    from consortia.coordinator.services.rounds import RoundService

__all__ = ["SecureAggregator", "SecureRound", "b64d", "b64e"]

log = logging.getLogger(__name__)

DONE = 5


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def b64d(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValidationError(f"{what} must be a base64 string.")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValidationError(f"{what} is not valid base64.") from exc


@dataclass
class SecureRound:
    """One round's protocol state (in memory)."""

    round_id: int
    job_id: int
    config: SecAggConfig
    server: ServerSession
    names: list[str]
    site_names: dict[int, str]
    stage: int
    deadline: datetime
    stage_seconds: float
    expected: set[int]
    answered: set[int] = field(default_factory=set)
    counts: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, list[str]] = field(default_factory=dict)
    result: tuple[np.ndarray, int] | None = None
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: dict[int, Task] = field(default_factory=dict)
    opened: datetime = field(default_factory=utcnow)
    stage_seconds_taken: list[float] = field(default_factory=list)
    clip_norm: float | None = None  # DP: this round's clipping norm (adaptive: from the job's state)
    extra: int = 0  # values after the model's: 1 with adaptive clipping (the sites' noised bits)

    def public_config(self, site_id: int) -> dict[str, Any]:
        """What a site needs to build its :class:`SiteSession` (all public)."""
        c = self.config
        return {
            "site": site_id,
            "sites": list(c.sites),
            "threshold": c.threshold,
            "degree": c.k,
            "clip_range": c.clip_range,
            "context": b64e(c.context),
            "graph_seed": c.graph_seed,
            "size": self.server.size,
            "names": self.names,
            "clip_norm": self.clip_norm,
            "extra": self.extra,
        }


class SecureAggregator:
    """Runs the SecAgg+ stages of secure rounds for a :class:`RoundService`."""

    def __init__(self, rounds: RoundService) -> None:
        self.rounds = rounds
        self.sessions: dict[int, SecureRound] = {}
        self._tasks: dict[int, Task] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, rnd: Round, spec: JobSpec, current: Params) -> SecureRound:
        """Create the session for a newly opened secure train round."""
        assert spec.secure_aggregation is not None
        sa = spec.secure_aggregation
        sites = tuple(sorted(t.site_id for t in rnd.tasks))
        context = f"job-{rnd.job_id}/round-{rnd.number}/attempt-{rnd.attempt}".encode()
        seed = secrets.randbits(63)
        probe = SecAggConfig(sites, 2, sa.clip_range, context, seed, sa.degree)
        threshold = max(2, math.ceil(sa.threshold * (probe.k + 1)))
        config = SecAggConfig(sites, threshold, sa.clip_range, context, seed, sa.degree)
        names = sorted(current)
        extra = 1 if spec.privacy is not None and spec.privacy.adaptive_clipping is not None else 0
        size = int(sum(np.size(current[k]) for k in names)) + extra
        st = SecureRound(
            round_id=rnd.id,
            job_id=rnd.job_id,
            config=config,
            server=ServerSession(config, size),
            names=names,
            site_names={t.site_id: t.site for t in rnd.tasks},
            stage=1,
            deadline=rnd.deadline_at,
            stage_seconds=sa.stage_seconds,
            expected=set(sites),
            tasks={t.id: t for t in rnd.tasks},
            clip_norm=self._clip_norm(rnd.job_id, spec),
            extra=extra,
        )
        self.sessions[rnd.id] = st
        self._tasks.update(st.tasks)
        return st

    def _clip_norm(self, job_id: int, spec: JobSpec) -> float | None:
        if spec.privacy is None:
            return None
        job = self.rounds.store.get_job(job_id)
        return current_clip_norm(
            spec.privacy, decode(self.rounds.blobs.get(job.state_hash))[0] if job.state_hash else {}
        )

    def task(self, principal: Principal, task_id: int) -> Task:
        """The caller's task for a stage call: from the open sessions (no database read:
        a secure round makes four calls per site), else the store's answer and errors."""
        task = self._tasks.get(task_id)
        if task is None or task.round_id not in self.sessions:
            return self.rounds._own_task(principal, task_id)
        if principal.site_id != task.site_id:
            raise PermissionDeniedError(
                f"task {task_id} belongs to another site; a site may only answer its own tasks."
            )
        return task

    def _forget(self, st: SecureRound) -> None:
        self.sessions.pop(st.round_id, None)
        for task_id in st.tasks:
            self._tasks.pop(task_id, None)

    def _session(self, principal: Principal, task: Task) -> SecureRound:
        st = self.sessions.get(task.round_id)
        if st is None:
            raise ConflictError(
                f"round of task {task.id} has no secure-aggregation session (the coordinator restarted or the "
                "round closed); drop this task, a retry will come as a new task."
            )
        if principal.site_id not in st.config.sites:
            raise ConflictError(f"this site is not part of the secure round of task {task.id}.")
        return st

    def _expect(self, st: SecureRound, stage: int, site_id: int) -> None:
        if st.error is not None:
            raise ConflictError(f"the secure round was aborted: {st.error}")
        if st.stage != stage:
            raise ConflictError(
                f"secure aggregation is at stage {st.stage}, not {stage}; this site missed its deadline and the "
                "round continues without it."
            )
        if site_id not in st.expected:
            raise ConflictError(f"this site dropped out before stage {stage}; the round continues without it.")

    # ------------------------------------------------------------------ site calls

    async def advertise(self, principal: Principal, task: Task, body: dict[str, Any]) -> dict[str, Any]:
        st = self._session(principal, task)
        site = int(principal.site_id)  # type: ignore[arg-type]
        self._expect(st, 1, site)
        n = body.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValidationError("num_examples must be an integer > 0.")
        try:
            st.server.add_keys(site, b64d(body.get("c_public"), "c_public"), b64d(body.get("s_public"), "s_public"))
        except SecAggError as exc:
            raise ValidationError(exc.message) from exc
        st.counts.setdefault(site, n)
        return await self._answered(st, site)

    async def share(self, principal: Principal, task: Task, body: dict[str, Any]) -> dict[str, Any]:
        st = self._session(principal, task)
        site = int(principal.site_id)  # type: ignore[arg-type]
        self._expect(st, 2, site)
        raw = body.get("ciphertexts")
        if not isinstance(raw, dict):
            raise ValidationError("ciphertexts must map neighbour site ids to base64 strings.")
        try:
            cts = {int(k): b64d(v, f"ciphertext for {k}") for k, v in raw.items()}
            st.server.add_ciphertexts(site, cts)
        except (ValueError, SecAggError) as exc:
            raise ValidationError(getattr(exc, "message", str(exc))) from exc
        return await self._answered(st, site)

    async def masked(self, principal: Principal, task: Task, body: bytes) -> dict[str, Any]:
        """Stage 3: fold the masked input into the running sum and record the update row
        (its hash and metadata; the body itself is not stored)."""
        st = self._session(principal, task)
        site = int(principal.site_id)  # type: ignore[arg-type]
        self._expect(st, 3, site)
        try:
            wire, meta = decode_wire(body)
            if meta.get("encoding") != "secagg/masked" or set(wire) != {"masked"}:
                raise UpdateError("a secure round takes one 'masked' uint32 tensor with encoding 'secagg/masked'.")
            st.server.add_masked(site, wire["masked"])
            from consortia.coordinator.services.results import update_metadata

            num_examples, metrics = update_metadata(meta)
        except (UpdateError, SecAggError) as exc:
            self.rounds.store.complete_task(task, state="failed", reason=exc.message, rule="update_validation")
            raise UpdateError(exc.message) from exc
        metrics["wire_bytes"] = len(body)
        status = self.rounds.store.record_update(
            task,
            blob_hash=hashlib.sha256(body).hexdigest(),
            num_examples=num_examples,
            nbytes=len(body),
            metrics=metrics,
        )
        await self._answered(st, site)
        return {"status": status, "round": task.round_number}

    async def unmask(self, principal: Principal, task: Task, body: dict[str, Any]) -> dict[str, Any]:
        st = self._session(principal, task)
        site = int(principal.site_id)  # type: ignore[arg-type]
        self._expect(st, 4, site)
        raw = body.get("shares")
        if not isinstance(raw, dict):
            raise ValidationError("shares must map site ids to [kind, share] pairs.")
        try:
            shares = {}
            for k, v in raw.items():
                kind, value = v
                if kind not in ("b", "s"):
                    raise ValueError(f"share kind {kind!r}")
                shares[int(k)] = (kind, int(value))
            st.server.add_unmask(site, shares)
        except (ValueError, TypeError, SecAggError) as exc:
            raise ValidationError(f"unmask shares are malformed: {getattr(exc, 'message', exc)}") from exc
        return await self._answered(st, site)

    def view(self, st: SecureRound, site_id: int) -> dict[str, Any]:
        """What the site needs for the current stage."""
        out: dict[str, Any] = {"stage": st.stage, "aborted": st.error}
        if st.error is not None or site_id not in st.expected and st.stage < DONE:
            out["stage"] = DONE
            out["dropped"] = site_id not in st.expected
            return out
        if st.stage == 2:
            keys = st.server.keys_for(site_id)
            out["keys"] = {str(j): [b64e(c), b64e(s)] for j, (c, s) in keys.items()}
            # one denominator for every site (a_k = n_k / max n), so the weights stay comparable
            out["max_examples"] = max(st.counts.values())
        elif st.stage == 3:
            out["ciphertexts"] = {str(j): b64e(ct) for j, ct in st.server.ciphertexts_for(site_id).items()}
        elif st.stage == 4:
            active, dropped = st.server.unmask_request(site_id)
            out["unmask"] = {"active": active, "dropped": dropped}
        return out

    async def poll(self, principal: Principal, task: Task, after: int, wait: float) -> dict[str, Any]:
        """Long poll: the site's view once the protocol is past stage ``after``."""
        st = self._session(principal, task)
        site = int(principal.site_id)  # type: ignore[arg-type]
        end = asyncio.get_running_loop().time() + wait
        while st.stage <= after and st.error is None and site in st.expected:
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(st.changed.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                await self.check(st.round_id)  # a stage's deadline may have passed
        return self.view(st, site)

    # ------------------------------------------------------------------ stage transitions

    async def _answered(self, st: SecureRound, site: int) -> dict[str, Any]:
        st.answered.add(site)
        await self.check(st.round_id)
        return {"status": "accepted", "stage": st.stage}

    async def check(self, round_id: int) -> None:
        """Advance the round's stage when everyone expected answered or the deadline
        passed; on the last stage remove the masks and close the round."""
        st = self.sessions.get(round_id)
        if st is None or st.stage >= DONE or st.error is not None:
            return
        async with self.rounds._lock(st.job_id):
            if st.stage >= DONE or st.error is not None:
                return
            if not (st.answered >= st.expected or utcnow() >= st.deadline):
                return
            stage = st.stage
            now = utcnow()
            st.stage_seconds_taken.append(round((now - st.opened).total_seconds() - sum(st.stage_seconds_taken), 3))
            missing = sorted(st.site_names[s] for s in st.expected - st.answered)
            if missing:
                st.dropped[stage] = missing
            if len(st.answered) < st.config.threshold:
                await self._abort(
                    st,
                    f"stage {stage}: {len(st.answered)} site(s) answered, threshold is {st.config.threshold}"
                    + (f" (dropped: {', '.join(missing)})" if missing else ""),
                )
                return
            if stage == 4:
                try:
                    st.result = st.server.finish()
                except SecAggError as exc:
                    await self._abort(st, f"unmasking failed: {exc.message}")
                    return
                st.stage = DONE
                self._notify(st)
                await self.rounds.close_secure(st)
                self._forget(st)
                return
            st.stage += 1
            st.expected, st.answered = set(st.answered), set()
            st.deadline = utcnow() + timedelta(seconds=st.stage_seconds)
            self._notify(st)

    def _notify(self, st: SecureRound) -> None:
        old, st.changed = st.changed, asyncio.Event()
        old.set()

    async def _abort(self, st: SecureRound, reason: str) -> None:
        st.error = reason
        self._notify(st)
        log.warning("secure round %s aborted: %s", st.round_id, reason)
        self._forget(st)
        await self.rounds.abort_secure(st.round_id, reason)

    def mean(self, st: SecureRound, spec: JobSpec, current: Params, expected: int) -> tuple[Params, dict[str, Any]]:
        """The round's mean model from the unmasked sum: weighted by ``a_k = n_k / max n``
        without DP; with DP every site weighs 1 and the sum is divided by the number
        sampled (the distributed noise is already in it)."""
        assert st.result is not None
        total, count = st.result
        c = st.config
        weight_sum, values = c.decode(total, count)
        base = flatten(current, st.names)
        divisor = expected if spec.privacy is not None else max(weight_sum, 1e-12)
        adaptive = None
        if st.extra:  # the last value is the sum of the survivors' noised, shifted, scaled bits
            values, bits = values[: -st.extra], float(values[-1])
            adaptive = self._next_clip(spec, st, bits, count, expected)
        delta = values / divisor
        info = {
            "secure_aggregation": {
                "sites": len(c.sites),
                "threshold": c.threshold,
                "degree": c.k,
                "bits": c.bits,
                "survivors": count,
                "dropped_by_stage": {str(k): v for k, v in st.dropped.items()},
                "weight_sum": weight_sum,
                "stage_seconds": st.stage_seconds_taken,
            }
        }
        if st.clip_norm is not None:
            info["privacy"] = {"clip_norm": st.clip_norm, "noise": "distributed"}
        if adaptive is not None:
            info["privacy"]["within_share"] = adaptive[0]
            info["next_clip_norm"] = adaptive[1]
        return unflatten(base + delta, current, st.names), info

    @staticmethod
    def _next_clip(spec: JobSpec, st: SecureRound, bits: float, count: int, expected: int) -> tuple[float, float]:
        """``(noised share of sites within the norm, next norm)`` from the bits' sum: each
        survivor sent ``(b - 1/2 + noise) * scale``; the share's denominator is the number
        sampled, as in the central case (Andrew et al. 2021)."""
        assert spec.privacy is not None and spec.privacy.adaptive_clipping is not None and st.clip_norm is not None
        _, scale = secure_bit_encoding(expected, st.config.threshold, st.config.clip_range)
        within = bits / scale + 0.5 * count
        share = within / max(expected, 1)
        ac = AdaptiveClip(spec.privacy.adaptive_clipping.quantile, spec.privacy.adaptive_clipping.learning_rate)
        return share, ac.from_share(st.clip_norm, share)
