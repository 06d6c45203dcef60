"""The TUF repository the coordinator maintains for release files (``tuf`` package).

Four top-level roles: root (2 keys, threshold 2), targets, snapshot, timestamp (1 key
each), all Ed25519 keys created on first start under ``HOME/keys/tuf`` (mode 0600).
Consistent snapshots: versioned metadata (``N.root.json``, ``N.targets.json``,
``N.snapshot.json``, plus ``timestamp.json``), and targets served as
``<dir>/<sha256>.<name>``; target bytes live in the content-addressed blob store. A
release is its manifest (``releases/<model>/<version>/manifest.json``) plus its inference
parts as ``parts/<sha256>``, so a part shared by two releases (base tensors, graph,
config) is one target, downloaded once per device. Card and lineage are not targets:
devices do not need them and the registry serves them. Only live releases are listed
(:meth:`TufRepository.sync_releases`), so the targets metadata every device downloads on
every update stays the size of what is deployed.

Expiry is short where TUF wants it (timestamp 1 day, snapshot 7 days) and the coordinator
re-signs the timestamp well before it lapses; a device whose coordinator disappears keeps
its metadata, which expires, which blocks new installs (freeze protection) while the
device keeps serving what it has.

References
----------
The Update Framework specification v1.0 (theupdateframework.github.io/specification).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from consortia.coordinator.keys import write_private
from consortia.edge.runtime import release_target_paths, verify_bundle
from consortia.errors import NotFoundError, ValidationError
from consortia.store.blobs import BlobStore

__all__ = ["EXPIRY", "ROLES", "TufRepository"]

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
THRESHOLDS = {"root": 2, "targets": 1, "snapshot": 1, "timestamp": 1}
_META_NAME = re.compile(r"^(?:(\d+)\.)?(root|targets|snapshot|timestamp)\.json$")
_TARGET = re.compile(r"^(?:[A-Za-z0-9_.\-]+/)*([0-9a-f]{64})\.[A-Za-z0-9_.\-]+$")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _signer(path: Path) -> CryptoSigner:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = Ed25519PrivateKey.generate()
        write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    assert isinstance(key, Ed25519PrivateKey)
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


class TufRepository:
    """Publishes signed TUF metadata for the release files the coordinator serves."""

    def __init__(
        self,
        directory: Path,
        blobs: BlobStore,
        signers: Mapping[str, list[Signer]],
        thresholds: Mapping[str, int] | None = None,
    ) -> None:
        self.dir = directory
        self.blobs = blobs
        self.signers = {r: list(signers[r]) for r in ROLES}
        self.thresholds = dict(thresholds or THRESHOLDS)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._serializer = JSONSerializer(compact=False)
        if not (self.dir / "root.json").exists():
            self._bootstrap()
        self.root: Metadata[Root] = Metadata.from_file(str(self.dir / "root.json"))
        self.timestamp: Metadata[Timestamp] = Metadata.from_file(str(self.dir / "timestamp.json"))
        self.snapshot: Metadata[Snapshot] = Metadata.from_file(
            str(self.dir / f"{self.timestamp.signed.snapshot_meta.version}.snapshot.json")
        )
        self.targets: Metadata[Targets] = Metadata.from_file(
            str(self.dir / f"{self.snapshot.signed.meta['targets.json'].version}.targets.json")
        )

    @classmethod
    def open_or_create(cls, directory: Path, blobs: BlobStore, key_dir: Path) -> TufRepository:
        """Open the repository under ``directory`` with keys from ``key_dir`` (created on
        first use: two root keys, one key per other role)."""
        signers = {
            "root": [_signer(key_dir / "root-1.pem"), _signer(key_dir / "root-2.pem")],
            "targets": [_signer(key_dir / "targets.pem")],
            "snapshot": [_signer(key_dir / "snapshot.pem")],
            "timestamp": [_signer(key_dir / "timestamp.pem")],
        }
        return cls(directory, blobs, signers)

    # ------------------------------------------------------------------ writing

    def _sign(self, md: Metadata) -> None:  # type: ignore[type-arg]
        md.signatures.clear()
        for s in self.signers[md.signed.type]:
            md.sign(s, append=True)

    def _write(self, md: Metadata) -> None:  # type: ignore[type-arg]
        """Write atomically: versioned names (consistent snapshots), plus ``root.json``
        (the latest root) and ``timestamp.json``."""
        role = md.signed.type
        data = md.to_bytes(self._serializer)
        names = ["timestamp.json"] if role == "timestamp" else [f"{md.signed.version}.{role}.json"]
        if role == "root":
            names.append("root.json")
        for name in names:
            tmp = self.dir / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.dir / name)

    def _bootstrap(self) -> None:
        now = _now()
        root = Root(expires=now + EXPIRY["root"], consistent_snapshot=True)
        for role in ROLES:
            root.roles[role] = Role([], self.thresholds[role])
            for s in self.signers[role]:
                root.add_key(s.public_key, role)
        md_root = Metadata(root)
        self._sign(md_root)
        self._write(md_root)
        md_targets = Metadata(Targets(expires=now + EXPIRY["targets"]))
        self._sign(md_targets)
        self._write(md_targets)
        md_snapshot = Metadata(Snapshot(expires=now + EXPIRY["snapshot"]))
        self._sign(md_snapshot)
        self._write(md_snapshot)
        md_ts = Metadata(Timestamp(expires=now + EXPIRY["timestamp"]))
        self._hash_snapshot_into(md_ts, md_snapshot)
        self._sign(md_ts)
        self._write(md_ts)

    def _hash_snapshot_into(self, md_ts: Metadata, md_snapshot: Metadata) -> None:  # type: ignore[type-arg]
        data = md_snapshot.to_bytes(self._serializer)
        md_ts.signed.snapshot_meta = MetaFile(
            md_snapshot.signed.version, len(data), {"sha256": hashlib.sha256(data).hexdigest()}
        )

    def publish(self, files: Mapping[str, bytes], remove: Collection[str] = ()) -> list[str]:
        """Add (or replace) target files, drop the ``remove`` paths, and publish new
        targets, snapshot and timestamp metadata. Returns the added target paths. Bytes go
        to the blob store."""
        for path in remove:
            self.targets.signed.targets.pop(path, None)
        paths = []
        for path, data in files.items():
            if not re.fullmatch(r"(?:[A-Za-z0-9_.\-]+/)*[A-Za-z0-9_.\-]+", path) or ".." in path.split("/"):
                raise ValidationError(f"target path {path!r} is not a plain relative path.")
            self.blobs.put(data)
            self.targets.signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])
            paths.append(path)
        now = _now()
        self.targets.signed.version += 1
        self.targets.signed.expires = now + EXPIRY["targets"]
        self._sign(self.targets)
        self._write(self.targets)
        self.snapshot.signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
        self.snapshot.signed.version += 1
        self.snapshot.signed.expires = now + EXPIRY["snapshot"]
        self._sign(self.snapshot)
        self._write(self.snapshot)
        self.refresh_timestamp()
        return paths

    def publish_bundle(self, bundle: Path) -> dict[str, Any]:
        """Publish a verified release bundle: its manifest and its inference parts as
        shared content-addressed targets. Returns the manifest."""
        manifest = verify_bundle(bundle)
        targets = release_target_paths(manifest, documents=False)
        self.publish({target: (bundle / rel).read_bytes() for rel, target in targets.items()})
        return manifest

    def sync_releases(self, bundles: Mapping[tuple[str, int], Path]) -> tuple[list[str], list[str]]:
        """Make the repository list exactly these releases (``(model, version) -> bundle
        directory``): publish the missing ones and retire the others with the parts no
        listed release uses, in one metadata version. Targets metadata is what every device
        downloads on every update, so it holds live releases only, not history (the
        registry keeps every release; a retired one is published again when it is
        assigned). Returns (published, retired) manifest paths."""
        want = {f"releases/{m}/{v}/manifest.json": bundle for (m, v), bundle in bundles.items()}
        files: dict[str, bytes] = {}
        keep: set[str] = set()
        for path, bundle in want.items():
            manifest = verify_bundle(bundle)
            targets = release_target_paths(manifest, documents=False)
            keep.update(targets.values())
            if path not in self.targets.signed.targets:
                files.update({target: (bundle / rel).read_bytes() for rel, target in targets.items()})
        retired = [
            p
            for p in self.targets.signed.targets
            if (p.startswith("releases/") or p.startswith("parts/")) and p not in keep
        ]
        if files or retired:
            self.publish(files, retired)
        manifests = [p for p in files if p.endswith("/manifest.json")]
        return manifests, [p for p in retired if p.endswith("/manifest.json")]

    def refresh_timestamp(self) -> None:
        """A new timestamp (fresh expiry) over the current snapshot."""
        self.timestamp.signed.version += 1
        self.timestamp.signed.expires = _now() + EXPIRY["timestamp"]
        self._hash_snapshot_into(self.timestamp, self.snapshot)
        self._sign(self.timestamp)
        self._write(self.timestamp)

    def timestamp_expires_within(self, margin: timedelta) -> bool:
        return self.timestamp.signed.expires - _now() < margin

    # ------------------------------------------------------------------ reading (what devices fetch)

    @property
    def trusted_root(self) -> bytes:
        """The current root, which a device pins at enrollment."""
        return (self.dir / "root.json").read_bytes()

    def metadata(self, name: str) -> bytes:
        """``N.root.json``, ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``."""
        if not _META_NAME.fullmatch(name):
            raise NotFoundError(f"no TUF metadata {name!r}.")
        path = self.dir / name
        if not path.is_file():
            raise NotFoundError(f"no TUF metadata {name!r}.")
        return path.read_bytes()

    def target(self, path: str) -> bytes:
        """A target by its consistent-snapshot path ``<dir>/<sha256>.<name>``."""
        m = _TARGET.fullmatch(path)
        if m is None:
            raise NotFoundError(f"no target {path!r}: expected <dir>/<sha256>.<name>.")
        return self.blobs.get(m.group(1))
