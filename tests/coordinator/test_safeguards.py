"""Robust aggregation with quarantine, and central DP with its epsilon ledger, through
the real app with real site task handlers in process."""

from __future__ import annotations

import time

import numpy as np
import pytest

from consortia.core.privacy import DpRound, epsilon
from consortia.errors import ConflictError, PermissionDeniedError, ValidationError
from consortia.protocol.tensors import decode, encode
from consortia.site.tasks import dispatch
from support import SPEC


def _drive(coord, honest, poisoner, job_id, timeout=90):
    """Run honest sites with their real handlers; the poisoner answers every train task
    with the global model + 1000 in every coordinate."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = coord.admin.get_json(f"/v1/jobs/{job_id}")
        if job["state"] in ("completed", "failed"):
            return job
        for ctx in honest:
            for task in ctx.client.poll(0):
                dispatch(ctx, task)
        for task in poisoner.client.poll(0):
            if task.kind == "train":
                params, _ = decode(coord.http.app.state.blobs.get(task.global_hash))
                bad = {k: (v + 1000.0).astype(np.float32) for k, v in params.items()}
                poisoner.client.submit_update(task.id, encode(bad, {"num_examples": "100000"}))
            else:
                dispatch(poisoner, task)
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_a_poisoner_is_flagged_quarantined_and_released_by_an_operator(coord):
    honest = [coord.site(f"bank-{i}") for i in range(4)]
    mallory = coord.site("bank-m")
    spec = {
        **SPEC,
        "name": "robust-job",
        "rounds": 4,
        "min_sites": 3,
        "robust": {"rule": "centered_clip", "options": {"f": 1}, "quarantine_after": 2},
    }
    job = _drive(coord, honest, mallory, coord.admin.post_json("/v1/jobs", spec)["id"])
    assert job["state"] == "completed", job["reason"]
    assert job["final_metrics"]["pooled_auc"] > 0.7  # the +1000 update did not reach the model
    store = coord.http.app.state.store
    train = [r for r in store.job_rounds(job["id"]) if r.kind == "train"]
    assert all("bank-m" in r.metrics["robust"]["flagged"] for r in train[:2])
    assert train[1].metrics["quarantined"] == ["bank-m"]  # honest sites are not flagged round after round
    assert all("bank-m" not in {t.site for t in r.tasks} for r in train[2:])  # never sampled again
    sites = {s["name"]: s["status"] for s in coord.admin.get_json("/v1/sites")}
    assert sites["bank-m"] == "quarantined" and sites["bank-0"] == "active"
    entries = coord.admin.get_json("/v1/audit/entries")
    quarantine = [e for e in entries if e["action"] == "site.quarantined"]
    assert len(quarantine) == 1 and quarantine[0]["subject"] == "site:bank-m"
    assert "flagged as an outlier or rejected in each of its last 2" in quarantine[0]["detail"]["reason"]

    # a tenant's own operator cannot release it; the consortium operator can, with a reason
    coord.admin.post_json("/v1/credentials", {"name": "op-m", "role": "operator", "tenant": "bank-m"})
    tenant_op = coord.client(
        coord.admin.post_json("/v1/credentials", {"name": "op-m2", "role": "operator", "tenant": "bank-m"})["token"]
    )
    with pytest.raises(PermissionDeniedError):
        tenant_op.post_json("/v1/sites/bank-m/release", {"reason": "we fixed it"})
    out = coord.admin.post_json("/v1/sites/bank-m/release", {"reason": "key rotated after compromise"})
    assert out["status"] == "active"
    with pytest.raises(ConflictError, match="not quarantined"):
        coord.admin.post_json("/v1/sites/bank-m/release", {"reason": "again"})
    released = [e for e in coord.admin.get_json("/v1/audit/entries") if e["action"] == "site.released"]
    assert released[-1]["detail"]["reason"] == "key rotated after compromise"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"min_sites": 3, "robust": {"rule": "krum", "options": {"f": 2}}}, r"n > 2f \+ 2 = 6"),
        ({"robust": {"rule": "trimmed_mean", "options": {"f": 1, "beta": 0.7}}}, "beta == 0.7"),
        (
            {
                "robust": {"rule": "median"},
                "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon_budget": 5},
            },
            "cannot be combined with privacy",
        ),
        ({"privacy": {"noise_multiplier": 0, "clip_norm": 1.0, "epsilon_budget": 5}}, "noise_multiplier"),
    ],
)
def test_bad_safeguard_specs_are_refused_at_submit(coord, extra, message):
    coord.site("bank-a"), coord.site("bank-b"), coord.site("bank-c")
    with pytest.raises(ValidationError, match=message):
        coord.admin.post_json("/v1/jobs", {**SPEC, **extra})


def _dp_spec(name, model, budget, rounds=5):
    return {
        **SPEC,
        "name": name,
        "model": model,
        "rounds": rounds,
        "min_sites": 3,
        "privacy": {"noise_multiplier": 1.0, "clip_norm": 0.5, "epsilon_budget": budget},
    }


def test_the_ledger_stops_a_job_before_the_round_that_would_cross_the_budget(coord):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    two_rounds = epsilon([DpRound(1.0, 1.0, 2)], 1e-5)
    budget = round(two_rounds + 0.01, 4)  # fits two rounds, not three
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", _dp_spec("dp-1", "dp-model", budget))["id"], sites)
    assert job["state"] == "completed", job["reason"]
    assert job["rounds_completed"] == 2
    store = coord.http.app.state.store
    events = [d for _, kind, d in store.events(job["id"]) if kind == "privacy_budget_reached"]
    assert len(events) == 1 and "round 3 would take" in events[0]["reason"]
    ledger = store.ledger("dp-model")
    assert sorted(e["tenant"] for e in ledger) == ["bank-0", "bank-1", "bank-2"]
    assert {e["rounds"] for e in ledger} == {2}
    train = [r for r in store.job_rounds(job["id"]) if r.kind == "train"]
    assert train[0].metrics["privacy"]["noise_std_on_mean"] == pytest.approx(1.0 * 0.5 / 3)
    # epsilon spent goes into lineage and the model card
    version = store.get_version("dp-model", 1)
    dp = version.lineage["privacy"]
    assert dp["epsilon_spent"] == pytest.approx(two_rounds, rel=1e-6)
    assert dp["differential_privacy"]["tenants"]["bank-1"]["rounds_this_job"] == 2
    card = coord.admin.get_json("/v1/registry/models/dp-model/versions/1/card")
    assert card["lineage"]["privacy"]["epsilon_spent"] == pytest.approx(two_rounds, rel=1e-6)

    # the same model's next job has no budget left: it says so and trains nothing
    job2 = coord.wait_job(coord.admin.post_json("/v1/jobs", _dp_spec("dp-2", "dp-model", budget))["id"], sites)
    assert job2["state"] == "failed" and "privacy budget" in job2["reason"]
    assert "bank-0 from epsilon" in job2["reason"] and "no round could run" in job2["reason"]
    assert {e["rounds"] for e in store.ledger("dp-model")} == {2}
    # the budget is per registered model: another model starts from zero
    job3 = coord.wait_job(coord.admin.post_json("/v1/jobs", _dp_spec("dp-3", "other", budget, 1))["id"], sites)
    assert job3["state"] == "completed", job3["reason"]
    audit = [e for e in coord.admin.get_json("/v1/audit/entries") if e["action"] == "privacy.round_charged"]
    assert len(audit) == 3 * 2 + 3 * 1


@pytest.mark.parametrize(("method", "most"), [("none", 1.0), ("fp16", 0.5), ("int8", 0.26), ("topk", 0.03)])
def test_compressed_jobs_count_bytes_per_round_and_still_learn(coord, method, most):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    spec = {
        **SPEC,
        "name": f"zip-{method}",
        "recipe": {"name": "mlp", "options": {"hidden": [64]}},
        "rounds": 3,
        "compression": {"method": method, "topk_ratio": 0.01},
    }
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], sites)
    assert job["state"] == "completed", job["reason"]
    train = [r for r in job["rounds"] if r["kind"] == "train"]
    for r in train:
        c = r["metrics"]["compression"]
        assert c["method"] == method and c["bytes_fp32"] == 3 * 4 * (5 * 64 + 64 + 64 + 1)
        assert c["ratio"] <= most
    if method != "topk":  # top-k at 1% moves four values a round: three rounds learn little
        assert job["final_metrics"]["pooled_auc"] > 0.7
    if method == "topk":  # error feedback: what was not sent waits at the site, on disk
        assert all((ctx.home / "residuals" / f"job-{job['id']}.safetensors").exists() for ctx in sites)


def test_an_update_in_another_encoding_than_the_jobs_is_refused(coord):
    from consortia.core.compression import compress
    from consortia.protocol.tensors import encode_wire

    sites = [coord.site(f"bank-{i}") for i in range(2)]
    spec = {**SPEC, "name": "zip-int8", "compression": {"method": "int8"}}
    job_id = coord.admin.post_json("/v1/jobs", spec)["id"]
    for _ in range(200):
        tasks = [(ctx, t) for ctx in sites for t in ctx.client.poll(0)]
        train = [(ctx, t) for ctx, t in tasks if t.kind == "train"]
        for ctx, t in tasks:
            if t.kind == "profile":
                dispatch(ctx, t)
        if train:
            break
        time.sleep(0.05)
    ctx, task = train[0]
    params, _ = decode(coord.http.app.state.blobs.get(task.global_hash))
    wire, _ = compress({k: np.zeros_like(v) for k, v in params.items()}, "fp16", rng=np.random.default_rng(0))
    body = encode_wire(wire, {"num_examples": "10", "encoding": "delta/fp16"})
    with pytest.raises(ValidationError, match="does not match the job's compression 'int8'"):
        ctx.client.submit_update(task.id, body)
    assert coord.http.app.state.store.get_task(task.id).state == "failed"
    assert coord.admin.get_json(f"/v1/jobs/{job_id}")["state"] == "running"
