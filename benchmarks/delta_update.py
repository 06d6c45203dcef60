"""Bytes a device moves for an update, through the real TUF path (coordinator repository,
device updater, content-addressed parts).

The model is an MLP on the finance schema (23 inputs -> 256 -> 128 -> 1, 204 KB of
weights), trained on one region's loans (the "global base" stand-in: what matters here is
which tensors change, not how the base was made). Adapters are real site fine-tunes
(``recipes.train`` with ``trainable=``, what ``consortia adapt`` runs at a site) on
another region's rows:

  v1  the base, installed by a fresh device (moves everything);
  v2  a full retrain (every tensor changes);
  v3  composite: v2 + the last layer fine-tuned at the site (``@last``: 129 weights);
  v4  composite: v2 + the last two layers fine-tuned (``2.*``, ``4.*``: 33,025 weights);
  v5  a re-issue of v4 under a new version (what a rollback is on the wire);
  v46 the site's refreshed last-layer adapter, after 40 other releases were published
      and kept in the TUF metadata (which every update downloads);
  v47 the next refresh, with the coordinator's retention: only live releases (newest
      three, and those devices run) stay in the TUF metadata.

Chronological as in production: each release is published, then a device updates (so
every update pays for fresh timestamp, snapshot and targets metadata). Adapter updates
are measured on devices that hold v2, the base they adapt. Reported: bytes received (TUF metadata and
release files separately) / adapter bytes, and / model bytes for full updates.

Run: ``.venv/bin/python benchmarks/delta_update.py`` (writes benchmarks/results/delta_update.json)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.coordinator.tufrepo import TufRepository  # noqa: E402
from consortia.edge.runtime import load_release, verify_bundle  # noqa: E402
from consortia.edge.updater import CallableFetcher, SecureUpdater  # noqa: E402
from consortia.store.blobs import BlobStore  # noqa: E402
from edge_latency import make_bundle  # noqa: E402

OPTIONS = {"hidden": [256, 128]}
MODEL = "delta"
EXTRA_RELEASES = 40


def train_on(plan: dict, region: int, params: dict, trainable: list[str] | None, seed: int) -> dict:
    """Train ``params`` (only ``trainable`` when given) on one region's rows of the finance scenario."""
    from consortia.datasets.scenarios import load_scenario
    from consortia.ml.data import labels, transform
    from consortia.protocol.schemas import JobSpec, PreprocessingPlan

    sc = load_scenario("finance")
    frame = list(sc.partitions.values())[region]
    spec = JobSpec.model_validate({**sc.spec, "recipe": {"name": "mlp", "options": OPTIONS}})
    df, y = labels(frame, spec)
    from consortia.ml.recipes import train

    return train(
        "mlp",
        OPTIONS,
        params,
        transform(df, PreprocessingPlan.model_validate(plan)),
        y,
        epochs=3,
        batch_size=64,
        lr=0.05,
        seed=seed,
        trainable=trainable,
    ).params


def tensors(bundle: Path) -> dict[str, int]:
    return {p["sha256"]: p["size"] for p in verify_bundle(bundle)["parts"] if p["role"] == "tensor"}


def main() -> None:
    from consortia.ml.recipes import init_params, resolve_adapter

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        probe = make_bundle(root, "mlp", OPTIONS, 0, model="probe")  # only for the agreed plan
        plan = json.loads((probe / "config.json").read_text())["preprocessing"]
        p0 = init_params("mlp", _input_dim(plan), OPTIONS, 0)
        p1 = train_on(plan, 0, p0, None, 1)
        p2 = train_on(plan, 0, p1, None, 2)  # full retrain: every tensor moves
        last = resolve_adapter(p2, ["@last"])
        two = resolve_adapter(p2, ["2.*", "4.*"])
        p3 = train_on(plan, 1, p2, last, 3)
        p4 = train_on(plan, 1, p2, two, 4)
        p6 = train_on(plan, 1, p3, last, 6)  # the site refreshes its last-layer adapter later
        params = {1: p1, 2: p2, 3: p3, 4: p4, 5: p4}
        bundles = {v: make_bundle(root, "mlp", OPTIONS, v, p, MODEL) for v, p in params.items()}
        repo = TufRepository.open_or_create(root / "repo", BlobStore(root / "blobs"), root / "keys")
        received = {"metadata": 0, "targets": 0}

        def get(url: str) -> tuple[int, bytes]:
            kind, _, name = url.split("/v1/tuf/", 1)[1].partition("/")
            try:
                data = repo.metadata(name) if kind == "metadata" else repo.target(name)
            except Exception:
                return 404, b""
            received[kind] += len(data)
            return 200, data

        model_bytes = sum(tensors(bundles[1]).values())
        adapter_bytes = {3: sum(p3[k].nbytes for k in last), 4: sum(p4[k].nbytes for k in two)}
        rows = []

        def step(device: SecureUpdater, version: int, what: str, ref: tuple[str, int]) -> None:
            """Install ``version`` (already published) on ``device``; record what moved."""
            held = {p.name for p in (device.home / "targets" / "parts").glob("*")}
            before = dict(received)
            into = device.home / f"v{version}"
            device.fetch_release(MODEL, version, into)
            load_release(into)  # the installed bundle runs and passes its smoke test
            meta = received["metadata"] - before["metadata"]
            files = received["targets"] - before["targets"]
            changed = sum(size for sha, size in tensors(bundles[version]).items() if sha not in held)
            rows.append(
                {
                    "version": version,
                    "update": what,
                    "tuf_metadata_bytes": meta,
                    "release_file_bytes": files,
                    "bytes_moved": meta + files,
                    "changed_tensor_bytes": changed,
                    "reference": ref[0],
                    "reference_bytes": ref[1],
                    "moved_over_reference": (meta + files) / ref[1] if ref[1] else None,
                }
            )

        def device(name: str) -> SecureUpdater:
            return SecureUpdater(root / name, CallableFetcher(get), repo.trusted_root)

        # Chronological, as in production: each release is published, then devices update.
        d1, d3, d4 = device("d1"), device("d3"), device("d4")
        repo.publish_bundle(bundles[1])
        step(d1, 1, "first install (fresh device)", ("model", model_bytes))
        repo.publish_bundle(bundles[2])
        step(d1, 2, "full retrain (every tensor)", ("model", model_bytes))
        for dv in (d3, d4):
            dv.fetch_release(MODEL, 2, dv.home / "v2")  # both hold the base the adapters adapt
        repo.publish_bundle(bundles[3])
        step(d3, 3, "adapter: last layer (@last)", ("adapter", adapter_bytes[3]))
        repo.publish_bundle(bundles[4])
        step(d4, 4, "adapter: last two layers", ("adapter", adapter_bytes[4]))
        repo.publish_bundle(bundles[5])
        step(d4, 5, "re-issue of v4 (rollback shape)", ("adapter", adapter_bytes[4]))
        dim = _input_dim(plan)
        extra = {}
        for i in range(EXTRA_RELEASES):  # other full releases land in the repository meanwhile
            v = 6 + i
            extra[v] = make_bundle(root, "mlp", OPTIONS, v, init_params("mlp", dim, OPTIONS, 10 + i), MODEL)
            repo.publish_bundle(extra[v])
        late = 6 + EXTRA_RELEASES
        bundles[late] = make_bundle(root, "mlp", OPTIONS, late, p6, MODEL)
        repo.publish_bundle(bundles[late])
        step(d3, late, f"adapter refresh, {EXTRA_RELEASES} more releases kept", ("adapter", adapter_bytes[3]))
        # The coordinator's retention (GovernanceService.live_releases): the newest three
        # versions plus what devices are told to run; the rest leave the TUF metadata.
        p7 = train_on(plan, 1, p6, last, 7)
        bundles[late + 1] = make_bundle(root, "mlp", OPTIONS, late + 1, p7, MODEL)
        live = {(MODEL, v): b for v, b in {**extra, **bundles}.items() if v >= late - 1 or v in (3, 4, 5)}
        repo.sync_releases(live)
        step(d3, late + 1, "adapter refresh, history retired", ("adapter", adapter_bytes[3]))
    print_table(
        "bytes a device moves per update (TUF metadata + release files) vs the adapter or the model",
        ["v", "update", "TUF metadata", "release files", "moved", "changed tensors", "ratio", "vs"],
        [
            [
                r["version"],
                r["update"],
                r["tuf_metadata_bytes"],
                r["release_file_bytes"],
                r["bytes_moved"],
                r["changed_tensor_bytes"],
                r["moved_over_reference"],
                f"{r['reference']} ({r['reference_bytes']} B)",
            ]
            for r in rows
        ],
    )
    out = write_result(
        "delta_update", {"rows": rows, "model_tensor_bytes": model_bytes, "adapter_bytes": adapter_bytes}
    )
    print(f"wrote {out}")


def _input_dim(plan: dict) -> int:
    from consortia.protocol.schemas import PreprocessingPlan

    return PreprocessingPlan.model_validate(plan).input_dim


if __name__ == "__main__":
    main()
