"""The TUF repository lists live releases only: retiring a release drops its manifest and
the parts no live release shares, so the targets metadata every device downloads on every
update stays the size of what is deployed, not of the history."""

from __future__ import annotations

import pytest

from consortia.coordinator.tufrepo import TufRepository
from consortia.edge.runtime import load_release
from consortia.edge.updater import CallableFetcher, SecureUpdater
from consortia.errors import ReleaseError
from consortia.store.blobs import BlobStore
from support import synthetic_release


def test_retired_releases_leave_the_metadata_and_come_back_when_needed(tmp_path):
    repo = TufRepository.open_or_create(tmp_path / "repo", BlobStore(tmp_path / "blobs"), tmp_path / "keys")
    bundles = {("test-model", v): synthetic_release(tmp_path, v, v) for v in range(1, 6)}

    def get(url: str) -> tuple[int, bytes]:
        kind, _, name = url.split("/v1/tuf/", 1)[1].partition("/")
        try:
            return 200, repo.metadata(name) if kind == "metadata" else repo.target(name)
        except Exception:
            return 404, b""

    published, retired = repo.sync_releases(bundles)
    assert len(published) == 5 and retired == []
    full = len(repo.metadata(f"{repo.targets.signed.version}.targets.json"))
    device = SecureUpdater(tmp_path / "device", CallableFetcher(get), repo.trusted_root)
    device.fetch_release("test-model", 1, tmp_path / "device" / "v1")

    live = {k: b for k, b in bundles.items() if k[1] >= 4}
    published, retired = repo.sync_releases(live)
    assert published == [] and sorted(retired) == [f"releases/test-model/{v}/manifest.json" for v in (1, 2, 3)]
    targets = repo.targets.signed.targets
    assert sorted(p for p in targets if p.startswith("releases/")) == [
        "releases/test-model/4/manifest.json",
        "releases/test-model/5/manifest.json",
    ]
    assert len(repo.metadata(f"{repo.targets.signed.version}.targets.json")) < 0.6 * full
    assert repo.sync_releases(live) == ([], [])  # nothing to do: no new metadata version
    # a retired release cannot be installed, and the device keeps serving what it has
    with pytest.raises(ReleaseError, match="is not a target the repository signed"):
        device.fetch_release("test-model", 2, tmp_path / "device" / "v2")
    assert load_release(tmp_path / "device" / "v1").ref == "test-model:1"
    # assigned again: published again, installable again
    published, _ = repo.sync_releases({**live, ("test-model", 2): bundles[("test-model", 2)]})
    assert published == ["releases/test-model/2/manifest.json"]
    device.fetch_release("test-model", 2, tmp_path / "device" / "v2")
    assert load_release(tmp_path / "device" / "v2").ref == "test-model:2"
