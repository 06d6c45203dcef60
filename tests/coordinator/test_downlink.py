"""Downlink compression: sites receive each new global model as a compressed delta and
rebuild exactly the model the coordinator registers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from consortia.coordinator.services.downlink import compress_downlink
from consortia.core.compression import add_delta, decompress
from consortia.errors import NotFoundError, ValidationError
from consortia.protocol.schemas import JobSpec
from consortia.protocol.tensors import decode, decode_wire
from support import SPEC, run_concurrently

MLP = {"name": "mlp", "options": {"hidden": [64]}}
FP32 = 4 * (5 * 64 + 64 + 64 + 1)
PARTS = {"int8": {"i8", "scale"}, "topk": {"idx", "val"}}


def _record_downloads(ctx) -> list[str]:
    seen: list[str] = []
    real = ctx.client.blob

    def blob(digest):
        seen.append(digest)
        return real(digest)

    ctx.client.blob = blob
    return seen


def _rounds(job, kind="train"):
    return [r for r in job["rounds"] if r["kind"] == kind]


@pytest.mark.parametrize(("method", "most"), [("int8", 0.26), ("topk", 0.03)])
def test_sites_download_small_deltas_and_rebuild_the_registered_model_exactly(coord, method, most):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    downloads = {ctx.name: _record_downloads(ctx) for ctx in sites}
    spec = {**SPEC, "name": f"down-{method}", "recipe": MLP, "rounds": 3, "compression": {"downlink": method}}
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], sites)
    assert job["state"] == "completed", job["reason"]

    blobs = coord.http.app.state.blobs
    deltas = [r["metrics"]["downlink"] for r in _rounds(job)]
    models = [d["base"] for d in deltas] + [job["model_hash"]]  # round r's input, then what it published
    for i, d in enumerate(deltas):
        assert d["method"] == method and d["bytes_fp32"] == FP32 and d["ratio"] <= most
        # the published model is the round's input plus the decoded delta, bit for bit
        base = decode(blobs.get(d["base"]))[0]
        wire, meta = decode_wire(blobs.get(d["delta"]))
        assert meta == {"base": d["base"]} and {k.rpartition("::")[2] for k in wire} == PARTS[method]
        published = decode(blobs.get(models[i + 1]))[0]
        rebuilt = add_delta(base, decompress(wire, base))
        for k in published:
            np.testing.assert_array_equal(rebuilt[k], published[k])
    initial = deltas[0]["base"]
    for ctx in sites:  # the initial model in full, then deltas only (rounds 2, 3 and the evaluation)
        assert downloads[ctx.name] == [initial] + [d["delta"] for d in deltas], ctx.name
        for d in deltas:
            cached = (ctx.home / "cache" / d["base"]).read_bytes()
            assert hashlib.sha256(cached).hexdigest() == d["base"]
        final = (ctx.home / "cache" / job["model_hash"]).read_bytes()
        assert hashlib.sha256(final).hexdigest() == job["model_hash"]
    version = coord.admin.get_json(f"/v1/registry/models/down-{method}/versions/1")
    assert version["params_hash"] == job["model_hash"]
    if method == "int8":
        assert job["final_metrics"]["pooled_auc"] > 0.7


def test_a_site_without_the_previous_model_downloads_the_whole_one(coord):
    sites = [coord.site(f"bank-{i}") for i in range(2)]
    forgetful = sites[1]
    downloads = _record_downloads(forgetful)
    real = forgetful.global_params

    def without_cache(digest, delta=None):  # this site's cache is wiped before every task
        for f in (forgetful.home / "cache").glob("*"):
            f.unlink()
        return real(digest, delta)

    forgetful.global_params = without_cache
    spec = {**SPEC, "name": "down-fresh", "compression": {"downlink": "int8"}}
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], sites)
    assert job["state"] == "completed", job["reason"]
    models = [r["metrics"]["downlink"]["base"] for r in _rounds(job)] + [job["model_hash"]]
    assert downloads == models  # every model in full, no delta


def test_a_delta_is_served_only_to_a_site_that_may_read_both_models(coord):
    sites = [coord.site(f"bank-{i}") for i in range(2)]
    spec = {**SPEC, "name": "down-acl", "compression": {"downlink": "fp16"}}
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], sites)
    assert job["state"] == "completed", job["reason"]
    delta = _rounds(job)[0]["metrics"]["downlink"]["delta"]
    assert len(sites[0].client.blob(delta)) > 0
    outsider = coord.site("bank-late")  # enrolled after the job: none of its tasks used either model
    with pytest.raises(NotFoundError, match="not visible to this credential"):
        outsider.client.blob(delta)


def test_a_secure_job_can_compress_its_downlink(coord):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    spec = {
        **SPEC,
        "name": "down-secure",
        "recipe": MLP,
        "min_sites": 3,
        "secure_aggregation": {"stage_seconds": 5},
        "compression": {"downlink": "int8"},
    }
    job, errors = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", spec)["id"])
    assert job["state"] == "completed", (job["reason"], errors)
    for r in _rounds(job):
        assert r["metrics"]["secure_aggregation"]["survivors"] == 3
        assert r["metrics"]["downlink"]["ratio"] <= 0.26
    assert job["final_metrics"]["pooled_auc"] > 0.7


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"asynchronous": {"buffer_size": 2}}, "an asynchronous \\(FedBuff\\) site may be several versions behind"),
        ({"compression": {"downlink": "gzip"}}, "downlink"),
        ({"compression": {"method": "int8"}, "secure_aggregation": {}, "min_sites": 3}, "compression.downlink"),
    ],
)
def test_downlink_specs_that_cannot_work_are_refused(coord, extra, message):
    spec = {**SPEC, "name": "bad-down", "compression": {"downlink": "int8"}, **extra}
    with pytest.raises(ValidationError, match=message):
        coord.admin.post_json("/v1/jobs", spec)


def _spec(method):
    return JobSpec.model_validate({**SPEC, "name": "unit", "compression": {"downlink": method, "topk_ratio": 0.25}})


def test_closing_twice_publishes_the_same_bytes():  # a coordinator killed while closing recomputes them
    rng = np.random.default_rng(0)
    current = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    new = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in current.items()}
    a = compress_downlink(_spec("int8"), 3, current, new, {}, "f" * 64)
    b = compress_downlink(_spec("int8"), 3, current, new, {}, "f" * 64)
    assert a[2] == b[2]
    for k in current:
        np.testing.assert_array_equal(a[0][k], b[0][k])
        assert np.abs(a[0][k] - new[k]).max() <= np.abs(new[k] - current[k]).max() / 127 + 1e-7


def test_topk_downlink_loses_nothing_only_delays_it():
    step = {"w": np.arange(1, 9, dtype=np.float32) / 8}  # every round the strategy moves the model by step
    model: dict = {"w": np.zeros(8, np.float32)}
    state: dict = {}
    for number in range(1, 17):
        new = {"w": model["w"] + step["w"]}
        model, state, _, info = compress_downlink(_spec("topk"), number, model, new, state, "0" * 64)
        assert info["tensor_bytes"] == 2 * 6  # two int32 indices and two fp16 values of eight
        # what was published plus what waits at the coordinator is every step so far
        np.testing.assert_allclose(model["w"] + state["downlink/w"], number * step["w"], rtol=1e-3)
    assert np.count_nonzero(model["w"]) == 8  # the small values got through too, later
