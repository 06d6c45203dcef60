"""The coordinator's FastAPI application, built by :func:`create_app` from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from consortia import __version__
from consortia.coordinator.api import automation as automation_api
from consortia.coordinator.api import devices as devices_api
from consortia.coordinator.api import jobs, registry, tasks, tenants
from consortia.coordinator.api import monitoring as monitoring_api
from consortia.coordinator.keys import CoordinatorKeys
from consortia.coordinator.metrics import StateCollector
from consortia.coordinator.services.automation import AutomationService
from consortia.coordinator.services.devices import DeviceService
from consortia.coordinator.services.governance import GovernanceService
from consortia.coordinator.services.hub import HubAgent
from consortia.coordinator.services.monitoring import MonitoringService
from consortia.coordinator.services.rollouts import RolloutService
from consortia.coordinator.services.rounds import RoundService
from consortia.coordinator.services.tenants import TenantService
from consortia.coordinator.settings import Settings
from consortia.coordinator.tufrepo import TufRepository
from consortia.errors import ConsortiaError
from consortia.store.blobs import BlobStore
from consortia.store.db import make_engine, upgrade
from consortia.store.sqlstore import SqlStore

__all__ = ["create_app", "write_admin_credential"]

log = logging.getLogger("consortia.coordinator")


def write_admin_credential(path: Path, token: str) -> None:
    """Write the admin token readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "detail": detail})


def create_app(settings: Settings) -> FastAPI:
    """Build the coordinator: database (migrated), blob store, services, routes, ticker."""
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    keys = CoordinatorKeys.load_or_create(settings.key_dir)
    store = SqlStore(engine, sign=keys.sign_head)
    blobs = BlobStore(settings.blob_dir)
    tenant_service = TenantService(store, settings)
    rounds = RoundService(store, blobs, max_poll_seconds=settings.max_poll_seconds)
    tuf = TufRepository.open_or_create(settings.home / "tuf", blobs, settings.key_dir / "tuf")
    governance = GovernanceService(store, blobs, keys, settings.release_dir, tuf)
    rounds.on_registered = governance.ensure_release
    device_service = DeviceService(store, keys, tuf, settings)
    device_service.publish = lambda model, version: governance.sync_tuf({(model, version)})
    monitoring = MonitoringService(store, settings.llm_url, settings.llm_model, blobs)
    device_service.monitor = monitoring.on_window
    device_service.blobs = blobs
    rollout_service = RolloutService(store, device_service, governance)
    automation = AutomationService(store, rounds, rollout_service, governance)
    monitoring.on_incident = automation.on_incident
    token = tenant_service.ensure_admin()
    if token is not None:
        write_admin_credential(settings.admin_credential_path, token)
        log.warning("admin credential written to %s (mode 0600)", settings.admin_credential_path)

    metrics_registry = CollectorRegistry()
    metrics_registry.register(StateCollector(store))
    requests_total = Counter(
        "consortia_http_requests", "HTTP requests", ["method", "route", "status"], registry=metrics_registry
    )
    latency = Histogram(
        "consortia_http_request_duration_seconds",
        "HTTP request latency (long polls included)",
        ["method", "route"],
        registry=metrics_registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rounds.recover(settings.restart_grace_fraction)
        governance.recover()

        async def ticker() -> None:
            while True:
                try:
                    if tuf.timestamp_expires_within(timedelta(hours=12)):
                        tuf.refresh_timestamp()  # devices must never see it lapse while we run
                    await rounds.tick()
                    rollout_service.tick()
                    automation.tick()
                except ConsortiaError as exc:
                    log.warning("round tick: %s", exc.message)
                except Exception:
                    log.exception("round tick failed")
                await asyncio.sleep(settings.tick_seconds)

        task = asyncio.create_task(ticker())
        hub = None
        if settings.upstream_url:  # a regional hub: one site of the upper coordinator
            agent = HubAgent(
                rounds, settings.upstream_url, settings.upstream_token, settings.upstream_name, settings.home
            )
            rounds.upstream_url = settings.upstream_url
            hub = asyncio.create_task(agent.run())
        try:
            yield
        finally:
            for t in (task, hub):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            engine.dispose()

    app = FastAPI(
        title="Consortia coordinator",
        version=__version__,
        lifespan=lifespan,
        description="Control plane of a Consortia federation. Every call needs a bearer credential.",
    )
    app.state.settings = settings
    app.state.store = store
    app.state.blobs = blobs
    app.state.rounds = rounds
    app.state.tenants = tenant_service
    app.state.keys = keys
    app.state.governance = governance
    app.state.tuf = tuf
    app.state.devices = device_service
    app.state.rollouts = rollout_service
    app.state.monitoring = monitoring
    app.state.automation = automation

    @app.exception_handler(ConsortiaError)
    async def _consortia_error(request: Request, exc: ConsortiaError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:8]]
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error; the coordinator log has the details.")

    @app.middleware("http")
    async def _count(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests_total.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness (no credential needed, no data returned)."""
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        """Prometheus metrics of the coordinator process (no tenant data)."""
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(tenants.router)
    app.include_router(tasks.router)
    app.include_router(jobs.router)
    app.include_router(registry.router)
    app.include_router(devices_api.router)
    app.include_router(monitoring_api.router)
    app.include_router(automation_api.router)
    return app
