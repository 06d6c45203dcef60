"""Bytes a device moves for an update, through the real TUF path (coordinator repository,
device updater, content-addressed tensor targets).

Four releases of one MLP (finance schema, 23 inputs -> 256 -> 128 -> 1):
  v1  the base, installed first (a fresh device downloads everything);
  v2  a full retrain: every tensor changes;
  v3  only the last layer changes (the shape of an adapter-only update: the base tensors
      are shared targets the device already holds);
  v4  a re-issue of v3's artifact under a new version (what a rollback is on the wire).
Reported as bytes received by the device / bytes of the tensors that changed, and / size
of the whole model.

Run: ``.venv/bin/python benchmarks/delta_update.py`` (writes benchmarks/results/delta_update.json)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.coordinator.tufrepo import TufRepository  # noqa: E402
from consortia.edge.runtime import load_release, verify_bundle  # noqa: E402
from consortia.edge.updater import CallableFetcher, SecureUpdater  # noqa: E402
from consortia.store.blobs import BlobStore  # noqa: E402
from edge_latency import make_bundle  # noqa: E402

OPTIONS = {"hidden": [256, 128]}


def tensor_bytes(bundle: Path) -> dict[str, int]:
    return {p["sha256"]: p["size"] for p in verify_bundle(bundle)["parts"] if p["role"] == "tensor"}


def main() -> None:
    from consortia.ml.recipes import init_params

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = make_bundle(root, "mlp", OPTIONS, 1, model="delta")
        from consortia.protocol.schemas import PreprocessingPlan

        plan = PreprocessingPlan.model_validate(json.loads((base / "config.json").read_text())["preprocessing"])
        dim = plan.input_dim
        p1 = init_params("mlp", dim, OPTIONS, 0)
        p2 = init_params("mlp", dim, OPTIONS, 1)
        last = sorted(k for k in p1 if k.endswith("weight"))[-1]
        p3 = {k: (v + np.float32(0.01) if k in (last, last.replace("weight", "bias")) else v) for k, v in p1.items()}
        bundles = {
            1: base,
            2: make_bundle(root, "mlp", OPTIONS, 2, p2, "delta"),
            3: make_bundle(root, "mlp", OPTIONS, 3, p3, "delta"),
            4: make_bundle(root, "mlp", OPTIONS, 4, p3, "delta"),
        }
        repo = TufRepository.open_or_create(root / "repo", BlobStore(root / "blobs"), root / "keys")
        for b in bundles.values():
            repo.publish_bundle(b)

        def get(url: str) -> tuple[int, bytes]:
            kind, _, name = url.split("/v1/tuf/", 1)[1].partition("/")
            try:
                return 200, repo.metadata(name) if kind == "metadata" else repo.target(name)
            except Exception:
                return 404, b""

        fetcher = CallableFetcher(get)
        device = SecureUpdater(root / "device", fetcher, repo.trusted_root)
        rows, held = [], set()
        model_bytes = sum(tensor_bytes(base).values())
        for version, what in (
            (1, "first install (fresh device)"),
            (2, "full retrain"),
            (3, "last layer only (adapter-shaped)"),
            (4, "re-issue of v3 (rollback shape)"),
        ):
            tensors = tensor_bytes(bundles[version])
            changed = sum(size for sha, size in tensors.items() if sha not in held)
            before = fetcher.bytes_received
            device.fetch_release("delta", version, root / "device" / f"v{version}")
            moved = fetcher.bytes_received - before
            load_release(root / "device" / f"v{version}")  # the installed bundle runs
            held |= set(tensors)
            rows.append(
                {
                    "version": version,
                    "update": what,
                    "bytes_moved": moved,
                    "changed_tensor_bytes": changed,
                    "model_tensor_bytes": sum(tensors.values()),
                    "moved_over_changed": moved / changed if changed else None,
                    "moved_over_model": moved / model_bytes,
                }
            )
    print_table(
        "bytes a device moves per update (TUF metadata, manifest, graph, config and changed tensors)",
        ["v", "update", "bytes moved", "changed tensor bytes", "moved / changed", "moved / model"],
        [
            [
                r["version"],
                r["update"],
                r["bytes_moved"],
                r["changed_tensor_bytes"],
                r["moved_over_changed"] if r["moved_over_changed"] is not None else "-",
                r["moved_over_model"],
            ]
            for r in rows
        ],
    )
    print(f"wrote {write_result('delta_update', {'rows': rows, 'model_tensor_bytes': model_bytes})}")


if __name__ == "__main__":
    main()
