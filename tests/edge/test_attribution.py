"""Interventional attribution at the serving agent: the drifted feature explains the
prediction shift (redrawing it from the reference removes most of it); an undrifted one
does not; no shift, no attribution."""

from __future__ import annotations

import numpy as np
import pytest

from consortia.edge.monitoring import MISSING, WindowMonitor, load_reference
from consortia.edge.runtime import load_release
from support import SPEC, synthetic_frame


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from fastapi.testclient import TestClient

    from consortia.coordinator.app import create_app
    from consortia.coordinator.settings import Settings
    from support import Coord

    home = tmp_path_factory.mktemp("coord")
    with TestClient(create_app(Settings(home=home, tick_seconds=0.05))) as http:
        coord = Coord(http, home)
        sites = [coord.site(n, frame=synthetic_frame(600, i + 1), tmp=home) for i, n in enumerate(("a", "b"))]
        job = coord.wait_job(coord.admin.post_json("/v1/jobs", {**SPEC, "rounds": 4})["id"], sites)
        assert job["state"] == "completed", job["reason"]
        v = http.app.state.store.get_version("test-job", 1)
        bundle = http.app.state.governance.releases.paths(v)[0]
        rel = load_release(bundle)
        reference = load_reference(rel)
        yield rel, reference


def window(release, frame):
    rel, reference = release
    m = WindowMonitor(
        rel.ref, reference["bins"], min_count=10, max_rows=len(frame), scorer=rel.predict, reference=reference
    )
    feeds = {c: frame[c].to_numpy(np.float64).reshape(-1, 1) for c in ("x1", "x2")}
    feeds["cat"] = frame["cat"].astype("string").fillna(MISSING).to_numpy(object).reshape(-1, 1)
    m.observe(feeds, rel.predict(feeds), 0.001)
    (w,) = m.drain()
    return w


def test_the_drifted_feature_explains_the_prediction_shift(release):
    for seed in range(3):
        w = window(release, synthetic_frame(400, 100 + seed, shift=1.5))  # x1 moved
        att = w["attribution"]
        assert att is not None and att["prediction_psi"] > 0.1
        ranked = sorted(att["features"], key=lambda f: -att["features"][f]["recovery"])
        assert ranked[0] == "x1" and att["features"]["x1"]["recovery"] > 0.6, att
        assert att["features"]["cat"]["recovery"] < 0.2  # undrifted: redrawing it changes nothing
        lo, hi = att["features"]["x1"]["ci"]
        assert lo <= att["features"]["x1"]["recovery"] <= hi


def test_another_feature_drifting_gets_the_credit_and_no_shift_gets_none(release):
    frame = synthetic_frame(400, 7)
    moved = frame.assign(x2=frame["x2"] + 5.0)
    att = window(release, moved)["attribution"]
    assert att is not None
    assert max(att["features"], key=lambda f: att["features"][f]["recovery"]) == "x2"
    assert window(release, synthetic_frame(400, 8))["attribution"] is None  # same population: nothing to explain
