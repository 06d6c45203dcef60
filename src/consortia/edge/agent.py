"""The edge agent: enroll once, then follow signed instructions, install releases through
TUF, and serve ``POST /v1/predict`` from the last known good release, coordinator or not.

Home layout (``--home``): ``device.json`` (credential, mode 0600), ``tuf/`` (trusted
metadata: rollback protection lives here), ``targets/`` (downloaded files, shared by
releases), ``releases/<model>-<version>/`` (assembled, verified bundles),
``current.json`` (the last known good release and the last instruction counter applied,
replaced atomically), ``director.pub.pem``, ``serving.token``.

Installing: verify the instruction (director signature, this device, newer counter),
fetch the release through TUF (only missing files move), verify the bundle, load it and
run its signed smoke test, and only then switch serving to it and persist it as last
known good. Any failure leaves the device serving what it served and reports why.

An instruction may also name a *preview* release (blue-green pre-promotion analysis): it
is installed the same way but only scores traffic in shadow; it never answers and never
becomes last known good until an instruction names it as the release.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortia.edge.runtime import load_release
from consortia.edge.updater import CallableFetcher, SecureUpdater, verify_instruction
from consortia.errors import AuthError, ConsortiaError, CoordinatorUnavailable, ReleaseError

__all__ = ["EdgeAgent"]

log = logging.getLogger("consortia.edge")


def _write_private(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    tmp.replace(path)


class EdgeAgent:
    """One device. ``run()`` polls until :attr:`stop` is set; serving runs alongside."""

    def __init__(
        self,
        coordinator: str,
        home: Path,
        *,
        token: str | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        poll_seconds: float = 5.0,
        serving_token: str | None = None,
        enroll: Callable[[], dict[str, Any]] | None = None,
        require_local_approval: bool = False,
        monitoring: dict[str, Any] | None = None,
    ) -> None:
        from consortia.site.client import CoordinatorClient

        self.coordinator = coordinator.rstrip("/")
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.poll_seconds = poll_seconds
        self.require_local_approval = require_local_approval
        self.stop = threading.Event()
        ident = self._identity(token, name, labels or {}, enroll)
        self.device_id = f"{ident['tenant']}/{ident['name']}"
        self.client = CoordinatorClient(self.coordinator, ident["credential"], timeout=30.0)
        self.director = serialization.load_pem_public_key((home / "director.pub.pem").read_bytes())
        assert isinstance(self.director, Ed25519PublicKey)
        self.fetcher = CallableFetcher(self._get)
        self.updater = SecureUpdater(home, self.fetcher, base_url=f"{self.coordinator}/v1/tuf")
        token_path = home / "serving.token"
        if serving_token is None:
            if not token_path.exists():
                _write_private(token_path, secrets.token_urlsafe(32))
            serving_token = token_path.read_text().strip()
        self.serving_token = serving_token
        self.state = self._lkg()
        self.reason: str | None = None
        self.preview_reason: str | None = None
        self.attempted = 0
        self.status = "serving" if self.state["release"] else "idle"
        from consortia.edge.serving import create_serving_app

        self.release = None
        if self.state["release"]:
            try:
                self.release = load_release(self._dir(self.state["release"]))
            except ConsortiaError as exc:  # the last known good bundle was damaged on disk
                self.status, self.reason = "failed", f"last known good release unusable: {exc.message}"
        if monitoring is not None and "references" not in monitoring:
            # where the device keeps its tenant's own references (a site passes its own)
            monitoring = {**monitoring, "references": home / "references"}
        # fetched at install time, kept on disk: a restart offline still finds it
        self.references = Path(monitoring["references"]) if monitoring is not None else None
        self.app = create_serving_app(self.release, serving_token, monitoring)

    # ------------------------------------------------------------------ identity and state

    def _identity(
        self, token: str | None, name: str | None, labels: dict[str, str], enroll: Callable[[], dict[str, Any]] | None
    ) -> dict[str, Any]:
        path = self.home / "device.json"
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        if enroll is not None:  # e.g. a site enrolling its own serving endpoint with its site credential
            out = enroll()
        else:
            if not token or not name:
                raise AuthError(f"no credential in {path}: pass the device enrollment --token and a --name.")
            from consortia.site.client import CoordinatorClient

            with CoordinatorClient(self.coordinator) as c:
                out = c.post_json(
                    "/v1/devices/enroll", {"enrollment_token": token, "device_name": name, "labels": labels}
                )
        (self.home / "tuf").mkdir(parents=True, exist_ok=True)
        (self.home / "tuf" / "root.json").write_text(out["tuf_root"])
        (self.home / "director.pub.pem").write_text(out["director_public_key"])
        ident = {"tenant": out["tenant"], "name": out["device_name"], "credential": out["credential"], "labels": labels}
        _write_private(path, json.dumps(ident))
        log.info("enrolled as device %s/%s", out["tenant"], out["device_name"])
        return ident

    def _lkg(self) -> dict[str, Any]:
        path = self.home / "current.json"
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        return {"release": None, "counter": 0}

    def _save_lkg(self) -> None:
        tmp = self.home / "current.json.tmp"
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.home / "current.json")

    def _dir(self, release: dict[str, Any]) -> Path:
        return self.home / "releases" / f"{release['model']}-{release['version']}"

    def _get(self, url: str) -> tuple[int, bytes]:
        path = url[len(self.coordinator) :]
        try:
            return 200, self.client.request("GET", path).content
        except CoordinatorUnavailable:
            raise
        except ConsortiaError as exc:
            return getattr(exc, "status", 404), b""

    # ------------------------------------------------------------------ the loop

    def step(self) -> None:
        """One poll: fetch the instruction, install if it names a new release, report."""
        signed = self.client.get_json("/v1/devices/me/instruction")["signed"]
        if signed is not None and signed["instruction"].get("counter", 0) > self.state["counter"]:
            self.attempted = int(signed["instruction"]["counter"])
            try:
                body = verify_instruction(self.director, signed, self.device_id, self.state["counter"])
                self._apply(body)
            except ConsortiaError as exc:
                held = self.status == "held"
                self.status = "held" if held else ("serving" if self.release else "failed")
                self.reason = exc.message
                log.warning("instruction not applied: %s", exc.message)
            except Exception as exc:  # a TUF refusal (rollback, freeze, bad signature, hash mismatch)
                self.status, self.reason = ("serving" if self.release else "failed"), f"{type(exc).__name__}: {exc}"
                log.warning("update refused: %s", self.reason)
        self.report()

    def _check_version(self, release: dict[str, Any] | None) -> None:
        newest = self.state.get("max_versions", {})
        if release is not None and release["version"] < newest.get(release["model"], 0):
            raise ReleaseError(
                f"anti-rollback: {release['model']}:{release['version']} is older than version "
                f"{newest[release['model']]} already installed here; a rollback is issued as a new version."
            )

    def _check_approval(self, release: dict[str, Any]) -> None:
        if self.require_local_approval and not self.approval_path(release).exists():
            self.status = "held"
            raise ReleaseError(
                f"{release['model']}:{release['version']} waits for this site's local approval: "
                f"consortia site approve-release {release['model']}:{release['version']} --home ..."
            )

    def _apply(self, body: dict[str, Any]) -> None:
        release, preview = body["release"], body.get("preview")
        self._check_version(release)
        self._check_version(preview)
        current = self.state["release"]
        if release is not None and not (
            current and (release["model"], release["version"]) == (current["model"], current["version"])
        ):
            self._check_approval(release)
            self.status = "installing"
            target = self._dir(release)
            self.updater.fetch_release(release["model"], release["version"], target)
            new = load_release(target)  # verifies again and runs the signed smoke test
            self._fetch_reference(new)
            self.app.state.serving.activate(new)
            self.release = new
            newest = self.state.setdefault("max_versions", {})
            newest[release["model"]] = max(newest.get(release["model"], 0), release["version"])
            self.state["release"] = {"model": release["model"], "version": release["version"]}
            self.status, self.reason = "serving", None
            log.info("now serving %s", new.ref)
        self._set_preview(preview)
        self.state["counter"] = body["counter"]
        self._save_lkg()

    def _fetch_reference(self, release: Any) -> None:
        """Keep this tenant's own training reference of ``release`` (if its sites trained
        it) where the window monitor looks for it, so drift is attributed against the
        tenant's population rather than the consortium's. Best effort: without it the
        release's own reference applies."""
        if self.references is None:
            return
        path = self.references / "by-params" / f"{release.manifest['params_hash']}.json"
        if path.exists():
            return
        model, _, version = release.ref.rpartition(":")
        try:
            profile = self.client.get_json(f"/v1/devices/me/references/{model}/{version}")
        except ConsortiaError as exc:
            log.info("no tenant reference for %s: %s", release.ref, exc.message)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile, sort_keys=True))
        tmp.replace(path)

    def _set_preview(self, preview: dict[str, Any] | None) -> None:
        """Install (or drop) the release to score in shadow; failures are reported as the
        preview's reason and leave serving alone."""
        serving = self.app.state.serving
        ref = f"{preview['model']}:{preview['version']}" if preview else None
        if (serving.preview.ref if serving.preview else None) == ref:
            return
        self.preview_reason = None
        if preview is None:
            serving.set_preview(None)
            return
        try:
            self._check_approval(preview)
            target = self._dir(preview)
            self.updater.fetch_release(preview["model"], preview["version"], target)
            serving.set_preview(load_release(target))
            log.info("previewing %s in shadow", ref)
        except Exception as exc:  # ConsortiaError or a TUF refusal: the preview is what failed
            self.preview_reason = exc.message if isinstance(exc, ConsortiaError) else f"{type(exc).__name__}: {exc}"
            serving.set_preview(None)
            if self.status == "held":
                raise
            log.warning("preview %s not installed: %s", ref, self.preview_reason)

    def approval_path(self, release: dict[str, Any]) -> Path:
        return self.home / "approvals" / f"{release['model']}-{release['version']}"

    def report(self) -> None:
        serving = self.app.state.serving
        lat = serving.latency.summary()
        self.client.post_json(
            "/v1/devices/me/report",
            {
                "state": self.status,
                "serving": self.release.ref if self.release else None,
                "reason": self.reason,
                "counter": self.state["counter"],
                "attempted": self.attempted,
                "predictions": serving.predictions,
                "errors": serving.errors,
                "latency_p50": lat["p50"],
                "latency_p99": lat["p99"],
                "pred_hist": serving.pred_hist,
                "labelled": serving.labelled,
                "correct": serving.correct,
                "preview": self._preview_report(),
            },
        )
        self.send_windows()

    def send_windows(self) -> None:
        """Send closed monitoring windows; what cannot be sent now waits (bounded)."""
        serving = self.app.state.serving
        windows = serving.windows()
        for i, w in enumerate(windows):
            try:
                self.client.post_json("/v1/devices/me/monitoring", w)
            except CoordinatorUnavailable:
                serving.requeue(windows[i:])
                raise
            except ConsortiaError as exc:  # refused (e.g. a window about a retired release): drop it
                log.warning("monitoring window dropped: %s", exc.message)

    def _preview_report(self) -> dict[str, Any] | None:
        serving = self.app.state.serving
        pre, sig = serving.preview, serving.shadow
        if pre is None and self.preview_reason is None:
            return None
        return {
            "release": pre.ref if pre else None,
            "reason": self.preview_reason,
            "predictions": sig.predictions,
            "errors": sig.errors,
            "latency_p99": sig.latency.quantile(0.99),
            "pred_hist": sig.pred_hist,
            "labelled": sig.labelled,
            "correct": sig.correct,
        }

    def run(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                self.step()
                delay = 0.5
                self.stop.wait(self.poll_seconds)
            except CoordinatorUnavailable as exc:  # keep serving the last known good release
                log.warning("%s; still serving %s", exc.message, self.release.ref if self.release else "nothing")
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
