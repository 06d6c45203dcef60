"""`pip install consortia[edge]` runs a release with no torch: a clean venv with the
package and only its edge extra, then model-as-dependency and precompute in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consortia.edge.runtime import load_release
from consortia.governance import download_release
from consortia.site.tasks import SiteContext
from support import SPEC, synthetic_frame

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import consortia
rel = consortia.load_release(sys.argv[1])
p = rel.predict({"x1": [0.5, None], "x2": [1.0, 2.0], "cat": ["a", None]})
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "sqlalchemy", "sklearn", "scipy", "safetensors"})
print(json.dumps({"p": p.tolist(), "heavy": heavy}))
"""


def test_edge_extra_runs_releases_without_torch(coord, tmp_path):
    sites = []
    for i, name in enumerate(["bank-a", "bank-b"]):
        resp = coord.client(None).enroll(coord.tenant(name), name)
        sites.append(
            SiteContext(
                name=name, home=tmp_path / name, client=coord.client(resp.credential), frame=synthetic_frame(300, i)
            )
        )
    coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)
    bundle = download_release(coord.admin, "test-job", 1, tmp_path / "rel")[0]

    venv = tmp_path / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", f"{REPO}[edge]"], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0

    out = subprocess.run([str(py), "-c", SCRIPT, str(bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["heavy"] == []
    want = load_release(bundle).predict({"x1": [0.5, None], "x2": [1.0, 2.0], "cat": ["a", None]})
    np.testing.assert_allclose(got["p"], want, atol=1e-6)

    src, dst = tmp_path / "rows.csv", tmp_path / "scored.parquet"
    synthetic_frame(20, 1).to_csv(src, index=False)
    cli = venv / "bin" / "consortia"
    scored = subprocess.run(
        [str(cli), "predict", "--release", str(bundle), "--input", str(src), "--output", str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scored.returncode == 0 and dst.is_file(), scored.stderr
    server = subprocess.run(
        [str(cli), "coordinator", "serve", "--home", str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200"},
    )
    assert server.returncode == 2 and "pip install 'consortia[server]'" in server.stderr
