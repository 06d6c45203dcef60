"""The TUF attack matrix, after python-tuf's tests/test_updater_top_level_update.py, run
against the coordinator's repository and the device's updater. Each attack is refused and
the device keeps serving its last known good release."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root

from consortia.coordinator.tufrepo import TufRepository
from consortia.edge.runtime import load_release
from consortia.edge.updater import CallableFetcher, SecureUpdater, sign_instruction, verify_instruction
from consortia.errors import ReleaseError
from consortia.store.blobs import BlobStore
from support import synthetic_release

ROW = {"x1": [0.3], "x2": [-1.0], "cat": ["b"]}


class Mirror:
    """Serves the repository, except what a test (the attacker) overrides."""

    def __init__(self, repo: TufRepository) -> None:
        self.repo = repo
        self.override: dict[str, bytes] = {}

    def get(self, url: str) -> tuple[int, bytes]:
        kind, _, name = url.split("/v1/tuf/", 1)[1].partition("/")
        if name in self.override:
            return 200, self.override[name]
        try:
            return 200, self.repo.metadata(name) if kind == "metadata" else self.repo.target(name)
        except Exception:
            return 404, b""


@pytest.fixture
def world(tmp_path):
    repo = TufRepository.open_or_create(tmp_path / "repo", BlobStore(tmp_path / "blobs"), tmp_path / "keys")
    v1, v2 = synthetic_release(tmp_path, 1, 0), synthetic_release(tmp_path, 2, 5)
    repo.publish_bundle(v1)
    mirror = Mirror(repo)
    fetcher = CallableFetcher(mirror.get)
    device = SecureUpdater(tmp_path / "device", fetcher, repo.trusted_root)
    current = tmp_path / "device" / "current"
    device.fetch_release("test-model", 1, current)
    lkg = load_release(current).predict(ROW)
    return repo, mirror, device, current, v2, lkg


def still_serving(current, lkg) -> None:
    rel = load_release(current)
    assert rel.ref == "test-model:1" and rel.predict(ROW) == pytest.approx(lkg)


def resign(repo: TufRepository, md: Metadata, signers) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def new_root(repo: TufRepository) -> Metadata[Root]:
    md = Metadata.from_bytes(repo.trusted_root)
    md.signed.version += 1
    return md


def test_a_clean_update_downloads_only_new_tensors(world):
    repo, _, device, current, v2, _ = world
    repo.publish_bundle(v2)
    before = device.fetcher.bytes_received
    device.fetch_release("test-model", 2, current)
    assert load_release(current).ref == "test-model:2"
    moved = device.fetcher.bytes_received - before
    tensors = sum(p.stat().st_size for p in (v2 / "tensors").iterdir())
    assert moved > tensors  # new weights (different seed) and the small files, nothing twice
    device.fetch_release("test-model", 2, current)  # again: metadata only, no target bytes
    assert device.fetcher.bytes_received - before - moved < 20_000


def test_root_with_too_few_signatures_is_refused(world):
    repo, mirror, device, current, v2, lkg = world
    md = new_root(repo)
    mirror.override["2.root.json"] = resign(repo, md, repo.signers["root"][:1])  # threshold is 2
    repo.publish_bundle(v2)
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)


def test_a_duplicated_key_is_counted_once(world):
    repo, mirror, device, current, v2, lkg = world
    md = new_root(repo)
    one = repo.signers["root"][0]
    # the attacker holds one root key and lists it twice (two key ids) to reach threshold 2
    from securesystemslib.signer import SSlibKey

    twin = SSlibKey("f" * 64, one.public_key.keytype, one.public_key.scheme, one.public_key.keyval)
    md.signed.keys[twin.keyid] = twin
    md.signed.roles["root"].keyids.append(twin.keyid)
    md.signatures.clear()
    sig = md.sign(one, append=True)
    md.signatures[twin.keyid] = type(sig)(twin.keyid, sig.signature)
    mirror.override["2.root.json"] = md.to_bytes()
    repo.publish_bundle(v2)
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)


def test_timestamp_and_snapshot_rollback_and_equal_root_version_are_refused(world):
    repo, mirror, device, current, v2, lkg = world
    old_ts = repo.metadata("timestamp.json")
    repo.publish_bundle(v2)
    device.refresh()  # the device now trusts the newer timestamp and snapshot
    mirror.override["timestamp.json"] = old_ts
    with pytest.raises(tuf_errors.BadVersionNumberError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)

    # snapshot rollback: a fresh timestamp that points at an older snapshot version
    del mirror.override["timestamp.json"]
    ts = Metadata.from_bytes(repo.metadata("timestamp.json"))
    ts.signed.version += 10
    ts.signed.snapshot_meta.version -= 1
    ts.signed.snapshot_meta.hashes = None
    ts.signed.snapshot_meta.length = None
    mirror.override["timestamp.json"] = resign(repo, ts, repo.signers["timestamp"])
    with pytest.raises(tuf_errors.BadVersionNumberError):
        device.refresh()
    still_serving(current, lkg)

    # a "new" root that repeats the trusted version
    del mirror.override["timestamp.json"]
    same = Metadata.from_bytes(repo.trusted_root)
    mirror.override["2.root.json"] = resign(repo, same, repo.signers["root"])
    with pytest.raises(tuf_errors.BadVersionNumberError):
        device.refresh()


def test_fast_forward_attack_recovers_after_key_rotation(world):
    repo, mirror, device, current, v2, _ = world
    ts = Metadata.from_bytes(repo.metadata("timestamp.json"))
    ts.signed.version = 99999  # an attacker with the timestamp key fast-forwards the device
    mirror.override["timestamp.json"] = resign(repo, ts, repo.signers["timestamp"])
    device.refresh()
    del mirror.override["timestamp.json"]
    with pytest.raises(tuf_errors.BadVersionNumberError):
        device.refresh()  # the honest timestamp now looks like a rollback ...
    # ... until the repository rotates the timestamp key in a new root
    root = Metadata.from_bytes(repo.trusted_root)
    from securesystemslib.signer import CryptoSigner, SSlibKey

    new_key = Ed25519PrivateKey.generate()
    signer = CryptoSigner(new_key, SSlibKey.from_crypto(new_key.public_key()))
    for kid in list(root.signed.roles["timestamp"].keyids):
        root.signed.revoke_key(kid, "timestamp")
    root.signed.add_key(signer.public_key, "timestamp")
    root.signed.version += 1
    repo.signers["timestamp"] = [signer]
    repo.root = root
    repo._sign(root)
    repo._write(root)
    repo.timestamp.signed.version = 0
    repo.publish_bundle(v2)
    device.fetch_release("test-model", 2, current)
    assert load_release(current).ref == "test-model:2"


def test_expired_metadata_blocks_installs_never_serving(world):
    repo, mirror, device, current, v2, lkg = world
    repo.publish_bundle(v2)
    ts = Metadata.from_bytes(repo.metadata("timestamp.json"))
    ts.signed.version += 1
    ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    mirror.override["timestamp.json"] = resign(repo, ts, repo.signers["timestamp"])
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)  # freeze: no install, but the device keeps answering


def test_snapshot_hash_mismatch_oversized_metadata_and_bad_targets_are_refused(world):
    repo, mirror, device, current, v2, lkg = world
    repo.publish_bundle(v2)
    version = repo.snapshot.signed.version
    snap = Metadata.from_bytes(repo.metadata(f"{version}.snapshot.json"))
    snap.signed.expires += timedelta(days=1)  # changed content, same version: timestamp's hash no longer fits
    mirror.override[f"{version}.snapshot.json"] = resign(repo, snap, repo.signers["snapshot"])
    with pytest.raises(tuf_errors.RepositoryError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)
    mirror.override.clear()

    mirror.override["timestamp.json"] = b"{" + b" " * (1 << 20) + b"}"  # endless data
    with pytest.raises(tuf_errors.DownloadError):
        device.fetch_release("test-model", 2, current)
    mirror.override.clear()

    held = {p["sha256"] for p in json.loads((current / "manifest.json").read_text())["parts"]}
    manifest = json.loads((v2 / "manifest.json").read_text())
    tensor = next(p for p in manifest["parts"] if p["role"] == "tensor" and p["sha256"] not in held)
    sha = tensor["sha256"]
    mirror.override[f"parts/{sha}.{sha}"] = b"\x00" * tensor["size"]  # same length, wrong hash
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        device.fetch_release("test-model", 2, current)
    mirror.override[f"parts/{sha}.{sha}"] = b"\x00" * (tensor["size"] + 4096)  # wrong length
    with pytest.raises(tuf_errors.DownloadError):
        device.fetch_release("test-model", 2, current)
    still_serving(current, lkg)


def test_mix_and_match_of_model_and_config_is_refused(world):
    repo, mirror, device, current, v2, lkg = world
    repo.publish_bundle(v2)
    v1_parts = {p["path"]: p for p in json.loads((current / "manifest.json").read_text())["parts"]}
    v2_parts = {p["path"]: p for p in json.loads((v2 / "manifest.json").read_text())["parts"]}
    path = next(
        p for p in v2_parts if v2_parts[p]["role"] == "tensor" and v2_parts[p]["sha256"] != v1_parts[p]["sha256"]
    )
    sha = v1_parts[path]["sha256"]
    mirror.override[f"parts/{sha}.{sha}"] = (v2 / path).read_bytes()  # v2's weights served as v1's
    fresh = SecureUpdater(current.parent.parent / "device-2", device.fetcher, repo.trusted_root)  # empty cache
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        fresh.fetch_release("test-model", 1, current.parent.parent / "device-2" / "current")
    # a manifest the repository signed under another release's path is refused too
    repo.publish({"releases/test-model/3/manifest.json": (v2 / "manifest.json").read_bytes()})
    with pytest.raises(ReleaseError, match="mix-and-match refused"):
        device.fetch_release("test-model", 3, current)
    still_serving(current, lkg)


def test_device_bound_instructions_are_refused_on_another_device_and_when_replayed():
    key = Ed25519PrivateKey.generate()
    later = datetime.now(UTC) + timedelta(hours=1)
    for_a = sign_instruction(key, "device-a", 7, {"model": "m", "version": 2}, later)
    assert verify_instruction(key.public_key(), for_a, "device-a", 6)["release"] == {"model": "m", "version": 2}
    with pytest.raises(ReleaseError, match="is for device 'device-a', not 'device-b'"):
        verify_instruction(key.public_key(), for_a, "device-b", 0)
    with pytest.raises(ReleaseError, match="replay"):
        verify_instruction(key.public_key(), for_a, "device-a", 7)
    forged = {**for_a, "instruction": {**for_a["instruction"], "device_id": "device-b"}}
    with pytest.raises(ReleaseError, match="does not verify"):
        verify_instruction(key.public_key(), forged, "device-b", 0)
    expired = sign_instruction(key, "device-a", 8, None, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ReleaseError, match="expired"):
        verify_instruction(key.public_key(), expired, "device-a", 7)
