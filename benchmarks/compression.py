"""Update compression on the finance scenario: bytes per update relative to fp32, and the
accuracy cost, through the real coordinator app and real site task handlers (in process).

The four banks of the finance scenario (lending_club by region) train the scenario's job
once per compression method; every method uses the same seed, data and spec. Reported
per method: tensor bytes per update / fp32 bytes (the ratio the coordinator records in
each round's metrics), whole request bodies / fp32 (metadata included), with
``compression.downlink`` the tensor bytes of each new global model's delta / fp32 (what a
site that holds the previous model downloads), and the pooled test AUC and its
difference from uncompressed training.

    .venv/bin/python benchmarks/compression.py [ROUNDS] [SEEDS]

Targets (issue 6): int8 <= 0.26, top-k with error feedback <= 0.03, accuracy cost <= 1 point.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fastapi.testclient import TestClient  # noqa: E402

from _common import print_table, write_result  # noqa: E402
from consortia.coordinator.app import create_app  # noqa: E402
from consortia.coordinator.settings import Settings  # noqa: E402
from consortia.datasets.scenarios import load_scenario  # noqa: E402
from consortia.site.client import CoordinatorClient  # noqa: E402
from consortia.site.tasks import SiteContext, dispatch  # noqa: E402

# (uplink method, top-k ratio, downlink method)
METHODS = [
    ("none", None, "none"),
    ("fp16", None, "none"),
    ("int8", None, "none"),
    ("topk", 0.01, "none"),
    ("topk", 0.05, "none"),
    ("int8", None, "int8"),
    ("topk", 0.01, "int8"),
    ("topk", 0.05, "topk"),
]
RECIPES = {
    "logistic_regression": {"name": "logistic_regression"},  # the scenario's own: 68 parameters
    "mlp 64-32": {"name": "mlp", "options": {"hidden": [64, 32]}},
}


def run(recipe: str, method: str, ratio: float | None, downlink: str, rounds: int, seed: int) -> dict:
    scenario = load_scenario("finance", rounds=rounds, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        app = create_app(Settings(home=home / "coord", tick_seconds=0.05, max_update_bytes=20_000_000))
        with TestClient(app) as http:
            admin_token = (home / "coord" / "admin.token").read_text().strip()
            admin = CoordinatorClient("http://testserver", admin_token, transport=http._transport)
            sites = []
            for name, frame in scenario.partitions.items():
                tok = admin.post_json("/v1/tenants", {"name": name})["enrollment"]["token"]
                cred = CoordinatorClient("http://testserver", None, transport=http._transport).enroll(tok, name)
                client = CoordinatorClient("http://testserver", cred.credential, transport=http._transport)
                sites.append(SiteContext(name=name, home=home / name, client=client, frame=frame))
            spec = {
                **scenario.spec,
                "recipe": RECIPES[recipe],
                "compression": {"method": method, "topk_ratio": ratio or 0.01, "downlink": downlink},
            }
            job = admin.post_json("/v1/jobs", spec)
            t0 = time.perf_counter()
            while job["state"] not in ("completed", "failed"):
                for ctx in sites:
                    for task in ctx.client.poll(0):
                        dispatch(ctx, task)
                job = admin.get_json(f"/v1/jobs/{job['id']}")
            if job["state"] != "completed":
                raise SystemExit(f"{method}: job failed: {job['reason']}")
            train = [r["metrics"] for r in job["rounds"] if r["kind"] == "train"]
            fp32 = sum(m["compression"]["bytes_fp32"] for m in train)
            down = [m["downlink"] for m in train if "downlink" in m]
            label = method if ratio is None else f"{method} {ratio:.0%}"
            return {
                "recipe": recipe,
                "method": label if downlink == "none" else f"{label}, down {downlink}",
                "downlink_ratio": (
                    sum(d["tensor_bytes"] for d in down) / sum(d["bytes_fp32"] for d in down) if down else 1.0
                ),
                "tensor_ratio": sum(m["compression"]["tensor_bytes"] for m in train) / fp32,
                "body_ratio": sum(m["bytes_received"] for m in train) / fp32,
                "auc": job["final_metrics"]["pooled_auc"],
                "seconds": time.perf_counter() - t0,
                "params": train[0]["compression"]["bytes_fp32"] // 4 // len(sites),
            }


def main(rounds: int, seeds: int) -> None:
    rows, out = [], []
    for recipe in RECIPES:
        for seed in range(seeds):
            base = None
            for method, ratio, downlink in METHODS:
                r = run(recipe, method, ratio, downlink, rounds, seed)
                base = r["auc"] if method == "none" else base
                r["auc_cost_points"] = 100 * (base - r["auc"])
                r["seed"] = seed
                out.append(r)
                rows.append(
                    [
                        f"{recipe} ({r['params']})",
                        seed,
                        r["method"],
                        r["tensor_ratio"],
                        r["body_ratio"],
                        r["downlink_ratio"],
                        r["auc"],
                        r["auc_cost_points"],
                    ]
                )
                print(f"{recipe} seed {seed} {r['method']}: done in {r['seconds']:.1f} s", flush=True)
    print_table(
        f"Compression on the finance scenario ({rounds} rounds, 4 banks)",
        [
            "recipe (parameters)",
            "seed",
            "method",
            "tensor bytes / fp32",
            "request bytes / fp32",
            "model delta bytes / fp32",
            "pooled AUC",
            "AUC cost (points)",
        ],
        rows,
    )
    path = write_result("compression", {"rounds": rounds, "seeds": seeds, "runs": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
