"""Bad and repeated updates: clear JSON errors, state intact, exactly-once counting."""

import numpy as np

from consortia.protocol.tensors import encode
from consortia.site.tasks import dispatch
from support import SPEC


def _drive_until_train(coord, sites):
    """Run profile round with real handlers, return each site's train task."""
    import time

    out = {}
    for _ in range(400):
        for ctx in sites:
            for t in ctx.client.poll(0):
                if t.kind == "train":
                    out[ctx.name] = t
                elif t.kind == "profile":
                    dispatch(ctx, t)
        if len(out) == len(sites):
            return out
        time.sleep(0.02)
    raise AssertionError("no train tasks")


def _token(ctx):
    return ctx.client._http.headers["Authorization"]


def _post(coord, ctx, task_id, body):
    return coord.http.post(f"/v1/tasks/{task_id}/update", content=body, headers={"Authorization": _token(ctx)})


def _valid_update(coord, task, n=10, scale=1.0):
    params = {
        k: (v + scale).astype(np.float32) for k, v in coord.http.app.state.rounds.params(task.global_hash).items()
    }
    return params, encode(params, {"num_examples": str(n)})


def test_malformed_updates_get_json_errors_and_fail_the_task(coord):
    a, b, c = coord.site("a"), coord.site("b"), coord.site("c")
    spec = {**SPEC, "min_sites": 2}
    coord.admin.post_json("/v1/jobs", spec)
    tasks = _drive_until_train(coord, [a, b, c])
    store = coord.http.app.state.store
    params, _ = _valid_update(coord, tasks["a"])
    # wrong shape
    bad = {k: np.zeros((7,), np.float32) for k in params}
    resp = _post(coord, a, tasks["a"].id, encode(bad, {"num_examples": "10"}))
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_update" and "shape" in resp.json()["detail"]
    t = store.get_task(tasks["a"].id)
    assert t.state == "failed" and "shape" in t.reason
    # NaN
    nan = {k: v.copy() for k, v in params.items()}
    next(iter(nan.values())).flat[0] = np.nan
    resp = _post(coord, b, tasks["b"].id, encode(nan, {"num_examples": "10"}))
    assert resp.status_code == 422 and "non-finite" in resp.json()["detail"]
    assert store.get_task(tasks["b"].id).state == "failed"
    # garbage body and missing metadata
    resp = _post(coord, c, tasks["c"].id, b"not safetensors at all")
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_update"
    # nothing was accepted; the round is still open and no update rows exist
    rnd = store.get_round(t.round_id)
    assert store.round_updates(rnd.id) == []


def test_oversized_body_is_refused_before_parsing(coord):
    a, b = coord.site("a"), coord.site("b")
    coord.admin.post_json("/v1/jobs", SPEC)
    tasks = _drive_until_train(coord, [a, b])
    resp = _post(coord, a, tasks["a"].id, b"\0" * 2_100_000)
    assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
    assert coord.http.app.state.store.get_task(tasks["a"].id).state == "delivered"


def test_resent_update_counts_once_and_late_update_is_recorded_not_applied(coord):
    a, b, c = coord.site("a"), coord.site("b"), coord.site("c")
    coord.admin.post_json("/v1/jobs", {**SPEC, "min_sites": 2, "round_deadline_seconds": 1})
    tasks = _drive_until_train(coord, [a, b, c])
    store = coord.http.app.state.store
    _, body_a = _valid_update(coord, tasks["a"], n=10, scale=1.0)
    _, body_b = _valid_update(coord, tasks["b"], n=30, scale=2.0)
    assert _post(coord, a, tasks["a"].id, body_a).json()["status"] == "accepted"
    assert _post(coord, a, tasks["a"].id, body_a).json()["status"] == "duplicate"
    assert _post(coord, a, tasks["a"].id, body_a).json()["status"] == "duplicate"
    assert _post(coord, b, tasks["b"].id, body_b).json()["status"] == "accepted"
    round_id = store.get_task(tasks["a"].id).round_id
    import time

    for _ in range(200):  # deadline (1 s) passes with 2 >= min_sites: round closes without c
        if store.get_round(round_id).state == "closed":
            break
        time.sleep(0.02)
    rnd = store.get_round(round_id)
    assert rnd.state == "closed"
    _, body_c = _valid_update(coord, tasks["c"], n=1000, scale=50.0)
    assert _post(coord, c, tasks["c"].id, body_c).json()["status"] == "late"
    accepted = store.round_updates(round_id)
    assert sorted(u.site for u in accepted) == ["a", "b"]
    assert [u.site for u in store.round_updates(round_id, status="late")] == ["c"]
    # the new global model is the weighted mean of a (+1, n=10) and b (+2, n=30) only
    from consortia.protocol.tensors import decode

    base = coord.http.app.state.rounds.params(tasks["a"].global_hash)
    out, _ = decode(coord.http.app.state.blobs.get(rnd.global_out))
    for k in base:
        np.testing.assert_allclose(out[k], base[k] + (10 * 1.0 + 30 * 2.0) / 40, rtol=1e-5)


def test_round_below_min_sites_is_retried_with_fresh_sample_then_fails(coord):
    a, b = coord.site("a"), coord.site("b")
    coord.admin.post_json("/v1/jobs", {**SPEC, "round_deadline_seconds": 0.5, "max_round_retries": 2})
    tasks = _drive_until_train(coord, [a, b])
    _, body = _valid_update(coord, tasks["a"])
    _post(coord, a, tasks["a"].id, body)
    import time

    for _ in range(300):
        job = coord.admin.get_json("/v1/jobs/1")
        if job["state"] == "failed":
            break
        time.sleep(0.02)
    assert job["state"] == "failed"
    train = [r for r in job["rounds"] if r["kind"] == "train"]
    assert [r["attempt"] for r in train] == [0, 1, 2]
    assert all(r["state"] == "abandoned" for r in train)
    assert "1 of 2 sampled site(s) reported, min_sites is 2" in train[0]["reason"]
    assert "b: delivered" in train[0]["reason"]
    assert "gave up after 3 attempt(s)" in job["reason"]
