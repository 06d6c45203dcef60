"""Model as a service: ``POST /v1/predict`` over a verified release (site and edge agents).

Request bodies (JSON): ``{"row": {col: value}}``, ``{"rows": [{col: value}, ...]}`` or
``{"columns": {col: [values]}}``. Answer: ``{"release": "model:version", "threshold": t,
"predictions": [{"probability": p, "decision": bool}, ...]}``. Every call needs
``Authorization: Bearer <serving token>`` (the token's SHA-256 is compared in constant
time). Latency of every call is recorded in a histogram: ``GET /v1/stats`` gives
p50/p95/p99 and counts, ``GET /metrics`` the Prometheus form. The release can be swapped
atomically while serving (:meth:`ServingState.activate`).

Delayed labels: a caller that sends its own record ids with a prediction (``"ids":
[...]`` beside ``rows``/``columns``, or ``"id"`` beside ``row``) can later post the
outcomes to ``POST /v1/labels`` (``{"labels": [{"id": ..., "label": 0 or 1}, ...]}``).
The agent joins them with the decisions it made (the last :data:`MAX_PENDING` ids are
kept, in memory, on the device) and counts labelled and correct decisions of the release
being served; only those two counts leave the device, in its report, for rollout analysis.

Blue-green preview: a release set with :meth:`ServingState.set_preview` scores every
request in shadow after the answer has gone out (it never answers); its own counters
(predictions, errors, model latency, prediction histogram, labelled/correct) are what a
pre-promotion analysis compares with the active release on the same traffic.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from consortia.edge.monitoring import PRED_BINS, WindowMonitor, load_reference
from consortia.edge.runtime import Release, load_release
from consortia.errors import AuthError, ConsortiaError, PayloadTooLargeError, ValidationError

__all__ = ["LatencyHistogram", "ServingState", "Signals", "create_serving_app"]

MAX_BODY = 8 * 1024 * 1024
MAX_ROWS = 100_000
MAX_PENDING = 100_000  # predictions kept for joining delayed labels (oldest dropped first)

# Log-spaced bucket upper bounds from 10 us to 10 s (about 8% apart).
_BOUNDS = [1e-5 * (1.08**i) for i in range(180)]


@dataclass
class LatencyHistogram:
    """Thread-safe latency histogram with quantiles (bucket upper bounds, ~8% resolution)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(_BOUNDS, seconds)
        with self._lock:
            self.counts[i] += 1
            self.total += 1

    def quantile(self, q: float) -> float | None:
        with self._lock:
            if self.total == 0:
                return None
            rank = q * self.total
            seen = 0
            for i, c in enumerate(self.counts):
                seen += c
                if seen >= rank:
                    return _BOUNDS[i] if i < len(_BOUNDS) else float("inf")
        return None

    def summary(self) -> dict[str, float | int | None]:
        return {"count": self.total, "p50": self.quantile(0.5), "p95": self.quantile(0.95), "p99": self.quantile(0.99)}


@dataclass
class Signals:
    """What a release in preview did on live traffic, scored in shadow."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    predictions: int = 0
    errors: int = 0
    pred_hist: list[int] = field(default_factory=lambda: [0] * PRED_BINS)
    labelled: int = 0
    correct: int = 0


def _bin(hist: list[int], probs: Any) -> None:
    import numpy as np

    idx = np.minimum((np.asarray(probs) * PRED_BINS).astype(int), PRED_BINS - 1)
    for i, c in zip(*np.unique(idx, return_counts=True), strict=True):
        hist[int(i)] += int(c)


def _remember(
    pending: OrderedDict[str, tuple[str, bool, float]], ids: list[str], ref: str, decisions: Any, probs: Any
) -> None:
    for i, d, p in zip(ids, decisions, probs, strict=True):
        pending[i] = (ref, bool(d), float(p))
        pending.move_to_end(i)
    while len(pending) > MAX_PENDING:
        pending.popitem(last=False)


@dataclass
class ServingState:
    """The release being served and its counters since it was activated (so rollout
    analysis sees the new release's own signals); ``activate`` swaps it atomically."""

    release: Release | None
    token_hash: str
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    predictions: int = 0
    errors: int = 0
    pred_hist: list[int] = field(default_factory=lambda: [0] * PRED_BINS)
    labelled: int = 0
    correct: int = 0
    pending: OrderedDict[str, tuple[str, bool, float]] = field(default_factory=OrderedDict)
    preview: Release | None = None  # blue-green: scored in shadow, never answers
    shadow: Signals = field(default_factory=Signals)
    shadow_pending: OrderedDict[str, tuple[str, bool, float]] = field(default_factory=OrderedDict)
    monitoring: dict[str, Any] = field(default_factory=dict)  # WindowMonitor settings (min_count, ...)
    # and "references": a site's HOME/references, for attribution against its own reference
    monitor: WindowMonitor | None = None
    outbox: list[dict[str, Any]] = field(default_factory=list)  # closed windows of retired releases

    def __post_init__(self) -> None:
        if self.release is not None:
            self.monitor = self._new_monitor(self.release)

    def _new_monitor(self, release: Release) -> WindowMonitor:
        settings = dict(self.monitoring)
        local = settings.pop("references", None)
        reference = load_reference(release)
        if reference is not None and local is not None:
            # a site's serving endpoint: attribute against the site's own full-resolution
            # reference of this model when it has one (its population, not the consortium's)
            own = Path(local) / "by-params" / f"{release.manifest['params_hash']}.json"
            if own.is_file():
                reference = {**reference, "profile": json.loads(own.read_text())}
        return WindowMonitor(
            release.ref,
            reference["bins"] if reference else {},
            scorer=release.predict,
            reference=reference,
            sensitive=release.manifest.get("sensitive_attribute"),
            threshold=float(release.manifest.get("threshold", 0.5)),
            **settings,
        )

    def activate(self, release: Release) -> None:
        self.latency, self.predictions, self.errors = LatencyHistogram(), 0, 0
        self.pred_hist = [0] * PRED_BINS
        self.labelled = self.correct = 0
        old, self.monitor = self.monitor, self._new_monitor(release)
        if old is not None:  # the old release's last window closes with it
            old.flush()
            self.outbox.extend(old.drain())
        self.release = release  # one reference assignment: requests see the old or the new, never a mix

    def windows(self) -> list[dict[str, Any]]:
        """Closed monitoring windows to send (and forget); put back with :meth:`requeue`."""
        out, self.outbox = self.outbox, []
        if self.monitor is not None:
            self.monitor.tick()
            out += self.monitor.drain()
        return out

    def requeue(self, windows: list[dict[str, Any]]) -> None:
        self.outbox = (windows + self.outbox)[-1000:]

    def set_preview(self, release: Release | None) -> None:
        """Score ``release`` in shadow from now on (None stops); its counters start at zero."""
        self.shadow = Signals()
        self.preview = release

    def count(self, probs: Any) -> None:
        _bin(self.pred_hist, probs)


async def _observe(monitor: WindowMonitor, feeds: dict[str, Any], probs: Any, seconds: float) -> None:
    """On the event loop (a few microseconds for a small request), not in a thread pool."""
    monitor.observe(feeds, probs, seconds)


def _ids(body: dict[str, Any], n: int) -> list[str] | None:
    """The caller's record ids for the rows (for joining delayed labels), if given."""
    ids = [body["id"]] if "id" in body and "row" in body else body.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str | int) for i in ids):
        raise ValidationError(f"ids must be a list of {n} string or integer record ids, one per row.")
    return [str(i) for i in ids]


def _label(value: Any) -> bool:
    if value in (0, 1) or isinstance(value, bool):
        return bool(value)
    raise ValidationError(f"label {value!r} must be 0, 1, true or false.")


def _rows(body: Any) -> Any:
    if not isinstance(body, dict):
        raise ValidationError('body must be a JSON object: {"row": {...}}, {"rows": [...]} or {"columns": {...}}.')
    if "row" in body and isinstance(body["row"], dict):
        return [body["row"]]
    if "rows" in body and isinstance(body["rows"], list) and all(isinstance(r, dict) for r in body["rows"]):
        if len(body["rows"]) > MAX_ROWS:
            raise PayloadTooLargeError(f"at most {MAX_ROWS} rows per call.")
        return body["rows"]
    if "columns" in body and isinstance(body["columns"], dict):
        return body["columns"]
    raise ValidationError('expected {"row": {col: value}}, {"rows": [{...}, ...]} or {"columns": {col: [...]}}.')


def create_serving_app(
    release: str | Path | Release | None, token: str | None = None, monitoring: dict[str, Any] | None = None
) -> FastAPI:
    """A serving app over ``release`` (a bundle path or a loaded release; None until a
    release is activated). ``token`` defaults to ``CONSORTIA_SERVING_TOKEN``;
    ``monitoring`` sets the windows (``min_count``, ``max_rows``, ``max_seconds``)."""
    import os

    token = token or os.environ.get("CONSORTIA_SERVING_TOKEN")
    if not token:
        raise ValidationError("serving needs a bearer token: pass one or set CONSORTIA_SERVING_TOKEN.")
    loaded = load_release(release) if isinstance(release, str | Path) else release
    state = ServingState(loaded, hashlib.sha256(token.encode()).hexdigest(), monitoring=dict(monitoring or {}))
    app = FastAPI(title="Consortia serving", description="POST /v1/predict with a bearer token.")
    app.state.serving = state
    app.state.release = loaded

    def check(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(value.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, state.token_hash):
            raise AuthError("missing or wrong serving token: send 'Authorization: Bearer <token>'.")

    @app.exception_handler(ConsortiaError)
    async def _error(request: Request, exc: ConsortiaError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.code, "detail": exc.message})

    async def shadow(rows: Any, ids: list[str] | None) -> None:
        """Score a request with the release in preview, after the answer has gone out."""
        pre, sig = state.preview, state.shadow
        if pre is None:
            return
        start = time.perf_counter()
        try:
            probs, decisions = pre.decide(rows)
        except Exception:  # the preview's failures are evidence, never the caller's problem
            sig.errors += 1
            return
        sig.latency.observe(time.perf_counter() - start)
        sig.predictions += len(probs)
        _bin(sig.pred_hist, probs)
        if ids is not None:
            _remember(state.shadow_pending, ids, pre.ref, decisions, probs)

    @app.post("/v1/predict")
    async def predict(request: Request, background: BackgroundTasks) -> Response:
        start = time.perf_counter()
        check(request)
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY:
                raise PayloadTooLargeError(f"body over {MAX_BODY} bytes; split the batch.")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ValidationError(f"body is not valid JSON: {exc}") from exc
            rel = state.release
            if rel is None:
                raise ConsortiaError("no release is active here yet.")
            rows = _rows(body)
            feeds = rel.inputs(rows)
            probs = rel.predict(feeds)
            decisions = probs >= rel.threshold
            ids = _ids(body, len(probs))
        except ConsortiaError:
            state.errors += 1
            if state.monitor is not None:
                state.monitor.error()
            raise
        out = {
            "release": rel.ref,
            "threshold": rel.threshold,
            "predictions": [
                {"probability": float(p), "decision": bool(d)} for p, d in zip(probs, decisions, strict=True)
            ],
        }
        state.predictions += len(probs)
        state.count(probs)
        if ids is not None:
            _remember(state.pending, ids, rel.ref, decisions, probs)
        if state.preview is not None:
            background.add_task(shadow, feeds, ids)
        seconds = time.perf_counter() - start
        state.latency.observe(seconds)
        monitor = state.monitor
        if monitor is not None and monitor.release == rel.ref:  # windows: after the answer has gone out
            background.add_task(_observe, monitor, feeds, probs, seconds)
        return Response(json.dumps(out), media_type="application/json")

    @app.post("/v1/labels")
    async def labels(request: Request) -> dict[str, Any]:
        """Delayed outcomes for earlier predictions, by the caller's record ids."""
        check(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise PayloadTooLargeError(f"body over {MAX_BODY} bytes; split the labels.")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ValidationError(f"body is not valid JSON: {exc}") from exc
        items = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(x, dict) and "id" in x and "label" in x for x in items):
            raise ValidationError('expected {"labels": [{"id": record id, "label": 0 or 1}, ...]}.')
        parsed = [(str(x["id"]), _label(x["label"])) for x in items]  # validate all before counting any
        rel, pre = state.release, state.preview
        matched = stale = unknown = 0
        for rid, label in parsed:
            shadowed = state.shadow_pending.pop(rid, None)
            if shadowed is not None and pre is not None and shadowed[0] == pre.ref:
                state.shadow.labelled += 1
                state.shadow.correct += int(shadowed[1] == label)
            hit = state.pending.pop(rid, None)
            if hit is None:
                unknown += 1
            elif rel is None or hit[0] != rel.ref:
                stale += 1  # decided by a release no longer served: not evidence about this one
            else:
                matched += 1
                state.labelled += 1
                state.correct += int(hit[1] == label)
                if state.monitor is not None and state.monitor.release == hit[0]:
                    state.monitor.label(hit[2], label, hit[1] == label)
        return {
            "matched": matched,
            "stale": stale,
            "unknown": unknown,
            "release": rel.ref if rel else None,
            "accuracy": state.correct / state.labelled if state.labelled else None,
        }

    @app.get("/v1/stats")
    def stats(request: Request) -> dict[str, Any]:
        check(request)
        rel = state.release
        return {
            "release": rel.ref if rel else None,
            "predictions": state.predictions,
            "errors": state.errors,
            "labelled": state.labelled,
            "accuracy": state.correct / state.labelled if state.labelled else None,
            "latency_seconds": state.latency.summary(),
            "preview": None
            if state.preview is None
            else {
                "release": state.preview.ref,
                "predictions": state.shadow.predictions,
                "errors": state.shadow.errors,
                "labelled": state.shadow.labelled,
                "accuracy": state.shadow.correct / state.shadow.labelled if state.shadow.labelled else None,
                "model_latency_seconds": state.shadow.latency.summary(),
            },
        }

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        rel = state.release
        return {"status": "ok" if rel else "no-release", "release": rel.ref if rel else None}

    @app.get("/metrics")
    def metrics() -> Response:
        rel = state.release
        lines = [
            "# TYPE consortia_serving_predictions_total counter",
            f"consortia_serving_predictions_total {state.predictions}",
            "# TYPE consortia_serving_errors_total counter",
            f"consortia_serving_errors_total {state.errors}",
            "# TYPE consortia_serving_latency_seconds summary",
        ]
        for q, v in (
            ("0.5", state.latency.quantile(0.5)),
            ("0.95", state.latency.quantile(0.95)),
            ("0.99", state.latency.quantile(0.99)),
        ):
            if v is not None:
                lines.append(f'consortia_serving_latency_seconds{{quantile="{q}"}} {v}')
        lines.append(f"consortia_serving_latency_seconds_count {state.latency.total}")
        pending = len(state.outbox) + (len(state.monitor.closed) if state.monitor else 0)
        lines += [
            "# TYPE consortia_serving_labelled_total counter",
            f"consortia_serving_labelled_total {state.labelled}",
            "# TYPE consortia_serving_correct_total counter",
            f"consortia_serving_correct_total {state.correct}",
            "# TYPE consortia_serving_windows_pending gauge",
            f"consortia_serving_windows_pending {pending}",
            "# TYPE consortia_serving_release_info gauge",
        ]
        if rel is not None:
            lines.append(f'consortia_serving_release_info{{release="{rel.ref}"}} 1')
        if state.preview is not None:
            lines.append(f'consortia_serving_preview_info{{release="{state.preview.ref}"}} 1')
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
