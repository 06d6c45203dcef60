"""The device side of delivery: TUF-verified downloads and device-bound instructions.

:class:`SecureUpdater` wraps ``tuf.ngclient.Updater``: it refreshes the top-level
metadata from the coordinator's repository (root rotation, rollback, freeze and
mix-and-match checks, size caps), then downloads only the release parts the device does
not already hold (parts are targets named by their hash, so a base shared by two releases
is downloaded once; card and lineage are left to the registry) into its cache and
assembles the bundle, which :func:`~consortia.edge.runtime.verify_bundle` checks before anything
runs. Metadata stays in ``HOME/tuf`` between runs: that is what makes rollback
protection work.

Director instructions (:func:`sign_instruction` / :func:`verify_instruction`) tell one
device which release to run. They are signed by the coordinator's director key and name
the device and a counter, so an instruction for device A is refused on device B, and an
old one replayed is refused too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from consortia.core.audit import canonical
from consortia.edge.runtime import release_target_paths, verify_bundle
from consortia.errors import ReleaseError

__all__ = [
    "CONFIG",
    "CallableFetcher",
    "SecureUpdater",
    "sign_instruction",
    "verify_instruction",
]

# Size caps (endless-data protection): far above what our metadata needs, far below harm.
CONFIG = UpdaterConfig(
    max_root_rotations=32,
    root_max_length=64 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=1024 * 1024,
    targets_max_length=8 * 1024 * 1024,
)


class CallableFetcher(FetcherInterface):
    """Fetch with a function ``get(url) -> (status, bytes)``; counts bytes received."""

    def __init__(self, get: Callable[[str], tuple[int, bytes]]) -> None:
        self.get = get
        self.bytes_received = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        status, data = self.get(url)
        if status != 200:
            raise tuf_errors.DownloadHTTPError(f"GET {url} answered {status}", status)
        self.bytes_received += len(data)
        yield data


class SecureUpdater:
    """TUF client for one device home (metadata, target cache, assembled bundles)."""

    def __init__(
        self,
        home: Path,
        fetcher: CallableFetcher,
        trusted_root: bytes | None = None,
        base_url: str = "https://coordinator/v1/tuf",
    ) -> None:
        self.home = home
        self.meta_dir = home / "tuf"
        self.cache = home / "targets"
        self.fetcher = fetcher
        self.base_url = base_url.rstrip("/")
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        if not (self.meta_dir / "root.json").exists():
            if trusted_root is None:
                raise ReleaseError(f"no trusted TUF root in {self.meta_dir}; provision the device with one.")
            (self.meta_dir / "root.json").write_bytes(trusted_root)

    def _updater(self) -> Updater:
        return Updater(
            str(self.meta_dir),
            f"{self.base_url}/metadata/",
            str(self.cache),
            f"{self.base_url}/targets/",
            self.fetcher,
            CONFIG,
            bootstrap=None,
        )

    def refresh(self) -> Updater:
        """Refresh top-level metadata; raises a ``tuf.api.exceptions`` error on any attack."""
        updater = self._updater()
        updater.refresh()
        return updater

    def _get(self, updater: Updater, target_path: str) -> Path:
        info = updater.get_targetinfo(target_path)
        if info is None:
            raise ReleaseError(f"{target_path} is not a target the repository signed.")
        local = self.cache / target_path
        local.parent.mkdir(parents=True, exist_ok=True)
        cached = updater.find_cached_target(info, str(local))
        if cached is None:
            cached = updater.download_target(info, str(local))
        return Path(cached)

    def fetch_release(self, model: str, version: int, into: Path) -> dict[str, Any]:
        """Refresh, download what is missing, and assemble a verified bundle at ``into``
        (replaced atomically). Returns the manifest."""
        updater = self.refresh()
        manifest_file = self._get(updater, f"releases/{model}/{version}/manifest.json")
        manifest = json.loads(manifest_file.read_bytes())
        if (manifest.get("model"), manifest.get("version")) != (model, version):
            raise ReleaseError(
                f"the manifest served for {model}:{version} names "
                f"{manifest.get('model')}:{manifest.get('version')}: mix-and-match refused."
            )
        staging = into.with_name(into.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        for bundle_path, target_path in release_target_paths(manifest, documents=False).items():
            src = self._get(updater, target_path)
            dst = staging / bundle_path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)  # the cache keeps one copy; bundles are hard links
        verify_bundle(staging, documents=False)
        old = into.with_name(into.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if into.exists():
            into.rename(old)
        staging.rename(into)
        shutil.rmtree(old, ignore_errors=True)
        return manifest  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- director instructions

_DOMAIN = b"consortia-instruction/v1\n"


def sign_instruction(
    key: Ed25519PrivateKey,
    device_id: str,
    counter: int,
    release: dict[str, Any] | None,
    expires: datetime,
    preview: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A signed instruction for one device: run ``release`` (``{"model", "version"}``;
    None keeps what it runs), and optionally install ``preview`` to score live traffic in
    shadow (blue-green pre-promotion analysis) while ``release`` keeps answering; valid
    until ``expires``; ``counter`` must grow."""
    body = {
        "device_id": device_id,
        "counter": counter,
        "release": release,
        "preview": preview,
        "expires": expires.isoformat(),
    }
    return {"instruction": body, "signature": key.sign(_DOMAIN + canonical(body)).hex()}


def verify_instruction(
    public: Ed25519PublicKey, signed: dict[str, Any], device_id: str, last_counter: int
) -> dict[str, Any]:
    """The instruction if it is signed by the director, names this device, is newer than
    the last one applied and not expired; otherwise :class:`ReleaseError` saying why."""
    try:
        body = signed["instruction"]
        public.verify(bytes.fromhex(signed["signature"]), _DOMAIN + canonical(body))
    except (KeyError, TypeError, ValueError, InvalidSignature) as exc:
        raise ReleaseError("instruction signature does not verify with the director key.") from exc
    if body.get("device_id") != device_id:
        raise ReleaseError(f"instruction is for device {body.get('device_id')!r}, not {device_id!r}: refused.")
    if not isinstance(body.get("counter"), int) or body["counter"] <= last_counter:
        raise ReleaseError(
            f"instruction counter {body.get('counter')} is not newer than {last_counter}: a replay is refused."
        )
    if datetime.fromisoformat(body["expires"]) < datetime.now(UTC):
        raise ReleaseError("instruction has expired; waiting for a fresh one.")
    return body  # type: ignore[no-any-return]
