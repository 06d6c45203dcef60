"""Edge devices: enrollment (pinning the TUF root and the director key), signed
per-device instructions (the director), and reports of what each device serves."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from consortia.coordinator.auth import check_tenant, hash_token, new_token
from consortia.coordinator.keys import CoordinatorKeys
from consortia.coordinator.settings import Settings
from consortia.coordinator.tufrepo import TufRepository
from consortia.edge.updater import sign_instruction
from consortia.errors import ConflictError, NotFoundError, PermissionDeniedError, ValidationError
from consortia.protocol.delivery import (
    AssignRequest,
    DeviceEnrolled,
    DeviceEnrollRequest,
    DeviceReport,
    MonitoringWindow,
)
from consortia.store.entities import Device, ModelVersion, Principal, utcnow
from consortia.store.sqlstore import SqlStore

__all__ = ["INSTRUCTION_TTL", "DeviceService", "check_delivery_scope"]

INSTRUCTION_TTL = timedelta(days=30)


def device_public(d: Device) -> dict[str, Any]:
    body = (d.instruction or {}).get("instruction") or {}
    release = body.get("release")
    return {
        "id": d.id,
        "name": d.name,
        "tenant": d.tenant,
        "labels": d.labels,
        "assigned": f"{release['model']}:{release['version']}" if release else None,
        "counter": d.counter,
        "report": d.report,
        "last_seen_at": d.last_seen_at.isoformat() if d.last_seen_at else None,
    }


def check_delivery_scope(v: ModelVersion, devices: list[Device]) -> None:
    """A composite release carries an adapter trained on one site's data: it may run only
    on devices of that site's tenant (it would otherwise carry what it learned from one
    institution's data to another)."""
    comp = v.lineage.get("composite")
    if not comp:
        return
    tenant = comp["adapter"]["tenant"]
    foreign = sorted({d.tenant for d in devices if d.tenant != tenant})
    if foreign:
        raise ConflictError(
            f"{v.ref} carries an adapter fine-tuned on {comp['adapter']['site']}'s data; it may run only on "
            f"devices of tenant {tenant!r}, and the selection includes devices of {foreign}. "
            f"Narrow the target (tenant: {tenant})."
        )


class DeviceService:
    def __init__(self, store: SqlStore, keys: CoordinatorKeys, tuf: TufRepository, settings: Settings) -> None:
        self.store = store
        self.keys = keys
        self.tuf = tuf
        self.settings = settings
        # publishes a (possibly retired) release in the TUF repository before devices are
        # told to fetch it; the app wires GovernanceService.sync_tuf here
        self.publish: Callable[[str, int], None] | None = None
        # checks a stored monitoring window (findings, incidents); the app wires MonitoringService.on_window
        self.monitor: Callable[[Device, int, MonitoringWindow], Any] | None = None
        # reads tenants' reference profiles (blobs); the app wires its BlobStore here
        self.blobs: Any = None

    def enrollment_token(self, principal: Principal, tenant: str) -> dict[str, Any]:
        t = self.store.get_tenant(tenant)
        check_tenant(principal, t.id)
        token = new_token("enroll")
        expires = utcnow() + timedelta(hours=self.settings.enrollment_ttl_hours)
        self.store.add_enrollment_token(t.id, t.name, hash_token(token), expires, principal.name, kind="device")
        return {"tenant": t.name, "token": token, "expires_at": expires.isoformat(), "kind": "device"}

    def enroll(self, req: DeviceEnrollRequest) -> DeviceEnrolled:
        credential = new_token("device")
        expires = utcnow() + timedelta(days=self.settings.site_credential_ttl_days)
        d = self.store.enroll_device(
            hash_token(req.enrollment_token), req.device_name, req.labels, hash_token(credential), expires
        )
        return DeviceEnrolled(
            device_id=d.id,
            device_name=d.name,
            tenant=d.tenant,
            credential=credential,
            tuf_root=self.tuf.trusted_root.decode(),
            director_public_key=self.keys.director_public_pem,
        )

    def site_serving_device(self, principal: Principal) -> DeviceEnrolled:
        """Enroll the calling site's own serving endpoint as a device of its tenant, labelled
        ``kind=site, site=<name>``, so rollouts can target sites like any cohort."""
        if principal.role != "site" or principal.site_id is None or principal.tenant is None:
            raise PermissionDeniedError("only a site credential enrolls its serving endpoint.")
        site = next(s for s in self.store.list_sites(principal.tenant_id) if s.id == principal.site_id)
        token = new_token("enroll")
        expires = utcnow() + timedelta(minutes=5)
        self.store.add_enrollment_token(
            site.tenant_id, site.tenant, hash_token(token), expires, principal.name, kind="device"
        )
        return self.enroll(
            DeviceEnrollRequest(
                enrollment_token=token, device_name=f"{site.name}-serving", labels={"kind": "site", "site": site.name}
            )
        )

    def _me(self, principal: Principal) -> Device:
        if principal.role != "device" or principal.device_id is None:
            raise PermissionDeniedError("only a device credential may do this.")
        return self.store.get_device(principal.device_id)

    def reference(self, principal: Principal, model: str, version: int) -> dict[str, Any]:
        """The calling device's own tenant's training reference of ``model:version`` (the
        histograms its sites sent, coarsened), for attributing drift against its own
        population; never another tenant's."""
        d = self._me(principal)
        v = self.store.get_version(model, version)
        digest = ((v.lineage.get("reference") or {}).get("per_tenant") or {}).get(d.tenant)
        if digest is None or self.blobs is None:
            raise NotFoundError(
                f"tenant {d.tenant!r} has no reference of its own for {v.ref} (no site of it trained the model); "
                "the release's consortium reference applies."
            )
        return json.loads(self.blobs.get(digest))  # type: ignore[no-any-return]

    def instruction(self, principal: Principal) -> dict[str, Any] | None:
        return self._me(principal).instruction

    def report(self, principal: Principal, report: DeviceReport) -> dict[str, Any]:
        d = self._me(principal)
        self.store.report_device(d.id, report.model_dump(mode="json"))
        return {"status": "recorded", "counter": d.counter}

    def add_window(self, principal: Principal, window: MonitoringWindow) -> dict[str, Any]:
        """Record a monitoring window; it must be about a release this device was told to run."""
        d = self._me(principal)
        told = {
            f"{r['model']}:{r['version']}"
            for r in (_current(d), ((d.instruction or {}).get("instruction") or {}).get("preview"))
            if r
        }
        served = (d.report or {}).get("serving")
        if window.release not in told and window.release != served:
            raise ValidationError(
                f"window is about {window.release}, which this device was not told to run ({sorted(told)})."
            )
        model, _, version = window.release.rpartition(":")
        plan = self.store.get_version(model, int(version)).lineage.get("preprocessing") or {}
        for name, fp in window.features.items():
            if name in plan.get("numeric", {}):
                want = len(plan.get("cuts", {}).get(name, [])) + 1
            elif name in plan.get("categorical", {}):
                want = len(plan["categorical"][name]) + 1
            else:
                raise ValidationError(f"window has feature {name!r}, which {window.release} does not use.")
            if fp.bins != want:
                raise ValidationError(f"window bins of {name!r}: {fp.bins}, the release's agreed bins: {want}.")
        pred_bins = len(window.prediction_groups) if window.prediction_groups is not None else len(window.predictions)
        if pred_bins != 10 or (
            window.prediction_groups is not None
            and sorted(set(window.prediction_groups)) != list(range(len(window.predictions)))
        ):
            raise ValidationError("window predictions must cover the 10 score bins (grouped or not).")
        wid = self.store.add_window(d.id, window.model_dump(mode="json"))
        findings = self.monitor(d, wid, window) if self.monitor is not None else []
        return {"status": "recorded", "id": wid, "findings": len(findings)}

    def windows(
        self, principal: Principal, tenant: str | None, release: str | None, after: int
    ) -> list[dict[str, Any]]:
        tenant_id = principal.tenant_id
        if tenant is not None:
            t = self.store.get_tenant(tenant)
            check_tenant(principal, t.id)
            tenant_id = t.id
        return self.store.list_windows(tenant_id, release, after)

    def list(self, principal: Principal) -> list[dict[str, Any]]:
        return [device_public(d) for d in self.store.list_devices(principal.tenant_id)]

    def assign(self, principal: Principal, req: AssignRequest) -> list[dict[str, Any]]:
        """Sign an instruction to run ``model:version`` for every matching device."""
        v = self.store.get_version(req.model, req.version)
        if v.release_digest is None:
            raise ConflictError(f"{v.ref} has no signed release yet; nothing to deliver.")
        tenant_id = None
        if req.tenant is not None:
            tenant_id = self.store.get_tenant(req.tenant).id
            check_tenant(principal, tenant_id)
        elif principal.tenant_id is not None:
            tenant_id = principal.tenant_id
        devices = [
            d
            for d in self.store.list_devices(tenant_id)
            if d.status == "active"
            and all(d.labels.get(k) == val for k, val in req.selector.items())
            and (req.devices is None or d.name in req.devices)
        ]
        if not devices:
            raise ValidationError("no active device matches that selector; see `consortia edge list`.")
        check_delivery_scope(v, devices)
        return self.assign_to([d.id for d in devices], v.model, v.version, principal.name)

    def assign_to(
        self, device_ids: list[int], model: str, version: int, actor: str, *, preview: bool = False
    ) -> list[dict[str, Any]]:
        """Sign and store, for each device, an instruction to run ``model:version``; with
        ``preview`` the device keeps running what it runs and installs ``model:version``
        beside it to score live traffic in shadow (blue-green pre-promotion analysis)."""
        v = self.store.get_version(model, version)
        published = f"releases/{model}/{version}/manifest.json" in self.tuf.targets.signed.targets
        if self.publish is not None and not published:
            self.publish(model, version)
        release = {"model": v.model, "version": v.version, "release_digest": v.release_digest}
        out = []
        for d in (self.store.get_device(i) for i in device_ids):
            if preview:
                out.append(self._instruct(d, _current(d), release, actor))
            else:
                out.append(self._instruct(d, release, None, actor))
        return out

    def clear_preview(self, device_ids: list[int], actor: str) -> None:
        """Drop the preview from these devices' instructions (they keep what they run)."""
        for d in (self.store.get_device(i) for i in device_ids):
            body = (d.instruction or {}).get("instruction") or {}
            if body.get("preview") is not None:
                self._instruct(d, body.get("release"), None, actor)

    def _instruct(
        self, d: Device, release: dict[str, Any] | None, preview: dict[str, Any] | None, actor: str
    ) -> dict[str, Any]:
        device_id = f"{d.tenant}/{d.name}"
        updated = self.store.instruct(
            d.id,
            lambda counter: sign_instruction(
                self.keys.director, device_id, counter, release, utcnow() + INSTRUCTION_TTL, preview
            ),
            actor,
        )
        return device_public(updated)


def _current(d: Device) -> dict[str, Any] | None:
    """The release a device is instructed to run now (None if it was never told)."""
    return ((d.instruction or {}).get("instruction") or {}).get("release")
