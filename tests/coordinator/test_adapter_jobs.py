"""Adapter jobs at the coordinator: the update of an adapter job may carry the declared
tensors only, the composite keeps the base's other tensors bit for bit, and a base with a
single layer cannot be "adapted" (that would be a retrain)."""

import numpy as np
import pytest

from consortia.errors import ConsortiaError
from consortia.protocol.tensors import decode, encode
from support import SPEC


def _train_tasks(coord, ctx):
    for _ in range(200):
        tasks = [t for t in ctx.client.poll(0) if t.kind == "train"]
        if tasks:
            return tasks
    raise AssertionError("no train task")


def test_adapter_update_must_carry_exactly_the_declared_tensors(coord):
    a, b = coord.site("a"), coord.site("b")
    job = coord.admin.post_json("/v1/jobs", {**SPEC, "recipe": {"name": "mlp", "options": {"hidden": [4]}}})
    assert coord.wait_job(job["id"], [a, b])["state"] == "completed"
    adapt = coord.admin.post_json("/v1/jobs/adapt", {"base": "test-job:1", "site": "a", "local_epochs": 2})
    assert adapt["spec"]["adapter"] == {"base": "test-job:1", "site": "a", "params": ["2.bias", "2.weight"]}
    assert b.client.poll(0) == []  # site b is not asked to train on a's behalf
    (task,) = _train_tasks(coord, a)
    base = coord.http.app.state.rounds.params(task.global_hash)
    full = {k: v + np.float32(0.5) for k, v in base.items()}  # the whole model: not an adapter update
    resp = coord.http.post(
        f"/v1/tasks/{task.id}/update",
        content=encode(full, {"num_examples": "10"}),
        headers={"Authorization": a.client._http.headers["Authorization"]},
    )
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_update", resp.text
    assert "0.weight" in resp.json()["detail"]
    # the round is retried at once (every sampled site answered) and the real handler completes it
    done = coord.wait_job(adapt["id"], [a, b])
    assert done["state"] == "completed", done["reason"]
    comp = coord.admin.get_json("/v1/registry/models/test-job-a/versions/1")
    params = decode(coord.admin.request("GET", f"/v1/blobs/{comp['params_hash']}").content)[0]
    for k in ("0.weight", "0.bias"):
        np.testing.assert_array_equal(params[k], base[k])
    assert not np.array_equal(params["2.weight"], base["2.weight"])
    assert comp["lineage"]["composite"]["base"]["ref"] == "test-job:1"


def test_a_single_layer_base_cannot_be_adapted(coord):
    a, b = coord.site("a"), coord.site("b")
    job = coord.admin.post_json("/v1/jobs", SPEC)
    assert coord.wait_job(job["id"], [a, b])["state"] == "completed"
    with pytest.raises(ConsortiaError, match="selects every parameter of the base: that is a retrain"):
        coord.admin.post_json("/v1/jobs/adapt", {"base": "test-job:1", "site": "a"})
    with pytest.raises(ConsortiaError, match="no site named 'zz'"):
        coord.admin.post_json("/v1/jobs/adapt", {"base": "test-job:1", "site": "zz", "params": ["0.bias"]})
