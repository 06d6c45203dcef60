"""The site agent loop: enroll once, long-poll, run tasks, answer; never accept inbound
connections. Survives coordinator outages (exponential backoff) and its own restarts
(credential and model cache under ``--home``; an unanswered task is delivered again)."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path

from consortia.errors import AuthError, ConflictError, ConsortiaError, CoordinatorUnavailable
from consortia.ml.data import load_table
from consortia.protocol.schemas import TaskPublic
from consortia.site.client import CoordinatorClient
from consortia.site.policy import SitePolicy
from consortia.site.tasks import SiteContext, dispatch

__all__ = ["SiteAgent", "load_or_enroll"]

log = logging.getLogger("consortia.site")


def load_or_enroll(coordinator: str, token: str | None, home: Path, name: str) -> str:
    """The site credential from ``home/credential.json``, enrolling with ``token`` once."""
    path = home / "credential.json"
    if path.exists():
        return str(json.loads(path.read_text())["credential"])
    if not token:
        raise AuthError(f"no credential in {path} and no --token given; pass the enrollment token.")
    delay = 1.0
    while True:
        try:
            with CoordinatorClient(coordinator) as c:
                resp = c.enroll(token, name)
            break
        except CoordinatorUnavailable as exc:
            log.warning("enrollment: %s; retrying in %.0fs", exc.message, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"coordinator": coordinator, "site": resp.site_name, "tenant": resp.tenant, "credential": resp.credential},
            fh,
        )
    log.info("enrolled as site %r of tenant %r", resp.site_name, resp.tenant)
    return resp.credential


class SiteAgent:
    """Polls the coordinator and dispatches tasks to :data:`HANDLERS` by kind."""

    def __init__(
        self,
        coordinator: str,
        credential: str,
        data: str | Path,
        home: str | Path,
        name: str,
        *,
        poll_seconds: float = 20.0,
        max_backoff: float = 15.0,
        policy: SitePolicy | None = None,
    ) -> None:
        self.client = CoordinatorClient(coordinator, credential)
        self.ctx = SiteContext(
            name=name, home=Path(home), client=self.client, frame=load_table(data), policy=policy or SitePolicy()
        )
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff
        self.stop = threading.Event()
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.metrics = CollectorRegistry()
        self._tasks = Counter(
            "consortia_site_tasks", "Tasks handled by kind and outcome", ["kind", "outcome"], registry=self.metrics
        )
        self._task_seconds = Histogram(
            "consortia_site_task_duration_seconds",
            "Time to do a task and answer it",
            ["kind"],
            registry=self.metrics,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self._reconnects = Counter(
            "consortia_site_reconnects", "Times the coordinator could not be reached", registry=self.metrics
        )

    def _retrying(self, fn, *args):  # type: ignore[no-untyped-def]
        delay = 0.5
        while not self.stop.is_set():
            try:
                return fn(*args)
            except CoordinatorUnavailable as exc:
                log.warning("%s; retrying in %.1fs", exc.message, delay)
                self.stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_backoff)
        return None

    def handle(self, task: TaskPublic) -> None:
        """Run one task, retrying while the coordinator is unreachable."""
        log.info("task %s: %s round %s (job %s)", task.id, task.kind, task.round, task.job_id)
        outcome = "answered"
        with self._task_seconds.labels(task.kind).time():
            try:
                self._retrying(dispatch, self.ctx, task)  # an answer: a result, an update or a refusal
            except ConflictError as exc:
                outcome = "not_wanted"
                log.info("task %s no longer wanted: %s", task.id, exc.message)
            except ConsortiaError as exc:
                outcome = "failed"
                log.error("task %s failed: %s", task.id, exc.message)
        self._tasks.labels(task.kind, outcome).inc()

    def run(self) -> None:
        """Poll and work until :attr:`stop` is set."""
        delay = 0.5
        while not self.stop.is_set():
            try:
                tasks = self.client.poll(self.poll_seconds)
                delay = 0.5
            except CoordinatorUnavailable as exc:
                self._reconnects.inc()
                log.warning("%s; reconnecting in %.1fs", exc.message, delay)
                self.stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_backoff)
                continue
            for task in tasks:
                if self.stop.is_set():
                    break
                self.handle(task)
