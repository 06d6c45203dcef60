"""FedAvg aggregation: throughput relative to streaming ``np.add``, and coordinator peak
memory as the number of updates grows.

1. Throughput: fold N updates of a 1M-parameter model into :class:`WeightedSum` and
   compare with the floor, a streaming ``np.add(acc, x, out=acc)`` over the same arrays
   (target ratio >= 0.7). Both are timed in the same run, interleaved, best of several.
2. Peak RSS: in a fresh process per N (10, 100, 1000), the coordinator's real
   aggregation path (``RoundService._aggregate``: read each update from the
   content-addressed blob store, verify its hash, decode the safetensors body, fold)
   over N updates of a 1M-parameter model. Target: flat in N. To keep the disk use
   bounded, 16 distinct update blobs are stored and the N updates cycle over them;
   every one is still read, hash-verified, decoded and folded separately.

Run: ``.venv/bin/python benchmarks/aggregation.py`` (writes benchmarks/results/aggregation.json)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.core.aggregate import WeightedSum  # noqa: E402

N_PARAMS = 1_000_000
SHAPES = {"conv.weight": (64, 32, 3, 3), "fc1.weight": (1000, 900), "fc1.bias": (1000,), "fc2.weight": (100, 557)}
_used = sum(int(np.prod(s)) for s in SHAPES.values())
SHAPES["fc2.bias"] = (N_PARAMS - _used,)


def make_updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def throughput(n_updates: int = 32, repeats: int = 7) -> dict[str, float]:
    updates = make_updates(n_updates)
    ref = updates[0]
    weights = np.arange(1, n_updates + 1, dtype=np.float64)

    def fold(check: bool) -> float:
        acc = WeightedSum(ref)
        t = time.perf_counter()
        for u, w in zip(updates, weights, strict=True):
            acc.add(u, float(w), check=check)
        return time.perf_counter() - t

    def np_add() -> float:
        acc = {k: np.zeros(v.shape, np.float32) for k, v in ref.items()}
        t = time.perf_counter()
        for u in updates:
            for k, a in acc.items():
                np.add(a, u[k], out=a)
        return time.perf_counter() - t

    best = {"np_add": np.inf, "fedavg": np.inf, "fedavg_checked": np.inf}
    for _ in range(repeats):  # interleaved so machine noise hits all three alike
        best["np_add"] = min(best["np_add"], np_add())
        best["fedavg"] = min(best["fedavg"], fold(False))
        best["fedavg_checked"] = min(best["fedavg_checked"], fold(True))
    gparams = n_updates * N_PARAMS / 1e9
    return {
        "updates": n_updates,
        "params": N_PARAMS,
        "np_add_gparams_per_s": gparams / best["np_add"],
        "fedavg_gparams_per_s": gparams / best["fedavg"],
        "fedavg_checked_gparams_per_s": gparams / best["fedavg_checked"],
        "ratio_fedavg_to_np_add": best["np_add"] / best["fedavg"],
        "ratio_checked_to_np_add": best["np_add"] / best["fedavg_checked"],
    }


CHILD = r"""
import json, resource, sys
import numpy as np
from consortia.coordinator.services.rounds import RoundService
from consortia.protocol.schemas import JobSpec
from consortia.protocol.tensors import decode
from consortia.store.blobs import BlobStore
blobs = BlobStore(sys.argv[1]); digests = json.loads(sys.argv[2]); n = int(sys.argv[3])
current, _ = decode(blobs.get(digests[0]))
spec = JobSpec.model_validate({"name": "b", "recipe": {"name": "mlp"}, "rounds": 1,
    "features": [{"name": "x", "type": "numeric"}], "label": {"column": "y", "positive": "1"}})
svc = RoundService.__new__(RoundService); svc.blobs = blobs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = svc._aggregate(spec, 1, current, {}, [(digests[i % len(digests)], 10 + i) for i in range(n)])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_rss_mb": base / 1024, "peak_rss_mb": peak / 1024}))
"""


def peak_rss(counts: tuple[int, ...] = (10, 100, 1000)) -> list[dict[str, float]]:
    from consortia.protocol.tensors import encode
    from consortia.store.blobs import BlobStore

    with tempfile.TemporaryDirectory() as tmp:
        blobs = BlobStore(tmp)
        digests = [blobs.put(encode(u)) for u in make_updates(16, seed=1)]
        rows = []
        for n in counts:
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, json.dumps(digests), str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout)
            res.update(
                updates=n, seconds=time.perf_counter() - t, aggregation_mb=res["peak_rss_mb"] - res["baseline_rss_mb"]
            )
            rows.append(res)
        return rows


def main() -> None:
    tp = throughput()
    print_table(
        "FedAvg fold vs streaming np.add (1M params, 32 updates, best of 7)",
        ["path", "Gparams/s", "ratio to np.add"],
        [
            ["np.add (floor)", tp["np_add_gparams_per_s"], 1.0],
            [
                "WeightedSum.add (check=False, coordinator path)",
                tp["fedavg_gparams_per_s"],
                tp["ratio_fedavg_to_np_add"],
            ],
            ["WeightedSum.add (check=True)", tp["fedavg_checked_gparams_per_s"], tp["ratio_checked_to_np_add"]],
        ],
    )
    rss = peak_rss()
    print_table(
        "Coordinator aggregation peak RSS, 1M-parameter model",
        ["updates", "peak RSS MB", "RSS after imports MB", "aggregation MB", "seconds"],
        [[r["updates"], r["peak_rss_mb"], r["baseline_rss_mb"], r["aggregation_mb"], r["seconds"]] for r in rss],
    )
    path = write_result(
        "aggregation",
        {"throughput": tp, "peak_rss": rss, "target": {"ratio_fedavg_to_np_add": ">= 0.7", "peak_rss": "flat in N"}},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
