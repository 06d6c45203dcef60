"""Jobs and rounds through the real app, with real site task handlers in-process."""

import numpy as np

from consortia.protocol.tensors import decode
from support import SPEC


def test_job_runs_profile_train_evaluate_and_pools_auc(coord):
    a, b = coord.site("bank-a"), coord.site("bank-b")
    job = coord.admin.post_json("/v1/jobs", SPEC)
    assert job["state"] == "running"
    job = coord.wait_job(job["id"], [a, b])
    assert job["state"] == "completed", job["reason"]
    assert job["rounds_completed"] == 2
    kinds = [(r["number"], r["kind"], r["state"]) for r in job["rounds"]]
    assert kinds == [
        (0, "profile", "closed"),
        (1, "train", "closed"),
        (2, "train", "closed"),
        (3, "evaluate", "closed"),
    ]
    fm = job["final_metrics"]
    assert set(fm["per_site"]) == {"bank-a", "bank-b"}
    assert fm["pooled_auc"] > 0.7  # the synthetic label is learnable
    assert fm["n"] == sum(v["n"] for v in fm["per_site"].values())
    # the final model is stored by hash and decodes to the recipe's tensors
    params, _ = decode(coord.http.app.state.blobs.get(job["model_hash"]))
    assert set(params) == {"0.weight", "0.bias"} and params["0.weight"].shape == (1, 5)


def test_round_model_is_exact_fedavg_of_accepted_updates(coord):
    a, b = coord.site("bank-a"), coord.site("bank-b")
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], [a, b])
    store, blobs = coord.http.app.state.store, coord.http.app.state.blobs
    for rnd in store.job_rounds(job["id"]):
        if rnd.kind != "train":
            continue
        ups = store.round_updates(rnd.id)
        assert [u.site for u in ups] == ["bank-a", "bank-b"]
        total = sum(u.num_examples for u in ups)
        expected = {}
        for u in ups:
            p, _ = decode(blobs.get(u.blob_hash))
            for k, v in p.items():
                expected[k] = expected.get(k, 0) + v.astype(np.float64) * u.num_examples / total
        out, _ = decode(blobs.get(rnd.global_out))
        for k in out:
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)


def test_fedadam_job_persists_server_state(coord):
    a, b = coord.site("bank-a"), coord.site("bank-b")
    spec = {**SPEC, "strategy": {"name": "fedadam", "options": {"eta": 0.05}}}
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], [a, b])
    assert job["state"] == "completed"
    rounds = coord.http.app.state.store.job_rounds(job["id"])
    assert all(r.state_out for r in rounds if r.kind == "train")


def test_schema_mismatch_is_refused_with_reason_and_job_fails_after_retries(coord):
    a = coord.site("bank-a")
    b = coord.site("bank-b", frame=coord.site("tmp").frame.drop(columns=["x2"]))
    spec = {**SPEC, "max_round_retries": 1, "round_deadline_seconds": 5}
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], [a, b])
    assert job["state"] == "failed"
    assert "column 'x2' is missing" in job["reason"] and "schema" in job["reason"]
    assert "gave up after 2 attempt(s)" in job["reason"]
    profile_rounds = [r for r in job["rounds"] if r["number"] == 0]
    assert [r["attempt"] for r in profile_rounds] == [0, 1]
    assert "bank-b" in profile_rounds[0]["failed"]


def test_min_sites_above_enrolled_sites_is_refused_at_submit(coord):
    coord.site("bank-a")
    import pytest

    from consortia.errors import ConflictError

    with pytest.raises(ConflictError, match="only 1 active site"):
        coord.admin.post_json("/v1/jobs", {**SPEC, "min_sites": 2})
