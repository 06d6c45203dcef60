"""Secure aggregation rounds through the real app: sites in threads run SecAgg+ over HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from consortia.cli.jobs import _secure_lines
from consortia.errors import NotFoundError, PermissionDeniedError, ValidationError
from consortia.protocol.tensors import decode
from consortia.site import secure as site_secure
from consortia.site.tasks import dispatch
from support import SPEC, run_concurrently, synthetic_frame

SECURE = {**SPEC, "name": "secure-job", "min_sites": 3, "secure_aggregation": {"stage_seconds": 5}}


def _model(coord, job):
    return decode(coord.http.app.state.blobs.get(job["model_hash"]))[0]


def test_a_secure_job_gives_the_same_model_as_plain_fedavg(coord):
    # sites of 150 to 600 rows: the masked weights a_k = n_k / max n make it FedAvg's weighted mean
    sites = [coord.site(f"bank-{i}", frame=synthetic_frame(150 * (i + 1), i)) for i in range(4)]
    secure, errors = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", SECURE)["id"])
    assert secure["state"] == "completed", (secure["reason"], errors)
    plain = coord.wait_job(
        coord.admin.post_json("/v1/jobs", {**SPEC, "name": "plain-job", "min_sites": 3})["id"], sites
    )
    a, b = _model(coord, secure), _model(coord, plain)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4)  # fixed point at 2^-28 of the clip range
    train = [r for r in secure["rounds"] if r["kind"] == "train"]
    info = train[0]["metrics"]["secure_aggregation"]
    assert info["survivors"] == 4 and info["threshold"] == 3 and info["dropped_by_stage"] == {}
    examples = [u.num_examples for u in coord.http.app.state.store.round_updates(_train_round_id(coord, secure))]
    assert info["weight_sum"] == pytest.approx(sum(examples) / max(examples), abs=1e-4)  # 1/4 + 2/4 + 3/4 + 1
    card = coord.admin.get_json("/v1/registry/models/secure-job/versions/1/card")
    assert card["lineage"]["privacy"]["secure_aggregation"] is True


def _train_round_id(coord, job):
    store = coord.http.app.state.store
    return next(r.id for r in store.job_rounds(job["id"]) if r.kind == "train")


def test_no_individual_update_is_stored_by_the_coordinator(coord, monkeypatch):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    sent = []
    real = site_secure.secure_update

    def spy(ctx, task, spec, trained, base, meta, n):
        sent.append({k: v.copy() for k, v in trained.items()})
        return real(ctx, task, spec, trained, base, meta, n)

    monkeypatch.setattr("consortia.site.tasks.secure_update", spy)
    job, errors = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", {**SECURE, "rounds": 1})["id"])
    assert job["state"] == "completed", (job["reason"], errors)
    assert len(sent) == 3
    blobs = coord.http.app.state.blobs
    stored = list(blobs.root.rglob("*"))
    store = coord.http.app.state.store
    train = next(r for r in store.job_rounds(job["id"]) if r.kind == "train")
    for u in store.round_updates(train.id):  # the rows keep the hash of the masked body only
        assert not blobs.exists(u.blob_hash)
    for path in (p for p in stored if p.is_file()):
        try:
            params, _ = decode(path.read_bytes())
        except Exception:
            continue
        for update in sent:
            assert not all(k in params and np.array_equal(params[k], update[k]) for k in update)


def test_a_site_that_drops_after_sharing_keys_is_unmasked_around(coord, monkeypatch):
    sites = [coord.site(f"bank-{i}") for i in range(5)]
    victim = next(s["id"] for s in coord.admin.get_json("/v1/sites") if s["name"] == "bank-4")
    real = site_secure.SiteSession.masked_input

    def crash_before_upload(self, *args, **kwargs):  # bank-4 shared its keys, then dies
        if self.site == victim:
            raise site_secure.SecAggError("simulated crash before the masked upload")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(site_secure.SiteSession, "masked_input", crash_before_upload)
    spec = {**SECURE, "rounds": 1, "secure_aggregation": {"stage_seconds": 3, "threshold": 0.6}}
    job, _ = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", spec)["id"])
    assert job["state"] == "completed", job["reason"]
    info = next(r for r in job["rounds"] if r["kind"] == "train")["metrics"]["secure_aggregation"]
    assert info["survivors"] == 4 and info["dropped_by_stage"] == {"3": ["bank-4"]}
    assert job["final_metrics"]["pooled_auc"] > 0.7
    (line,) = _secure_lines(job)  # what `consortia job status` prints under its table
    assert "4/5 survived (threshold 3" in line and "dropped stage 3: bank-4" in line and ", stages " in line


def test_too_many_dropouts_abort_the_round_and_the_job_says_why(coord):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    spec = {**SECURE, "rounds": 1, "max_round_retries": 0, "round_deadline_seconds": 5, "min_sites": 3}
    spec["secure_aggregation"] = {"stage_seconds": 2, "threshold": 1.0}

    def silent_in_training(ctx, task):  # bank-2 profiles, then never answers a train task
        if task.kind != "train":
            dispatch(ctx, task)

    job_id = coord.admin.post_json("/v1/jobs", spec)["id"]
    job, _ = run_concurrently(coord, sites, job_id, handlers={"bank-2": silent_in_training})
    assert job["state"] == "failed"
    assert "secure aggregation aborted" in job["reason"] and "threshold is 3" in job["reason"]


def test_a_site_cannot_act_in_or_read_another_sites_secure_session(coord):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    refused: list[str] = []

    def nosy(ctx, task):  # bank-0 tries its round neighbours' tasks, then does its own
        if task.kind == "train" and not refused:
            for other in (task.id - 2, task.id - 1, task.id + 1, task.id + 2):
                for call in (
                    lambda o=other: ctx.client.post_json(f"/v1/tasks/{o}/secagg/keys", {"num_examples": 5}),
                    lambda o=other: ctx.client.get_json(f"/v1/tasks/{o}/secagg"),
                ):
                    try:
                        call()
                    except PermissionDeniedError as exc:
                        refused.append(str(exc))
                    except NotFoundError:
                        pass
        dispatch(ctx, task)

    job_id = coord.admin.post_json("/v1/jobs", {**SECURE, "rounds": 1})["id"]
    job, errors = run_concurrently(coord, sites, job_id, handlers={"bank-0": nosy})
    assert job["state"] == "completed", (job["reason"], errors)
    # the two other train tasks are within 2 ids (x 2 calls), and profile tasks may be too
    assert len(refused) >= 4 and all("belongs to another site" in r for r in refused)
    train = next(r for r in job["rounds"] if r["kind"] == "train")
    assert train["metrics"]["secure_aggregation"]["survivors"] == 3
    assert len(train["metrics"]["secure_aggregation"]["stage_seconds"]) == 4  # what each stage took


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"robust": {"rule": "median", "options": {"f": 1}}}, "client-side clipping"),
        ({"min_sites": 2}, "min_sites >= 3"),
        ({"compression": {"method": "int8"}}, "compression.method cannot be combined"),
    ],
)
def test_secure_specs_that_cannot_work_are_refused_with_the_reason(coord, extra, message):
    for i in range(3):
        coord.site(f"bank-{i}")
    with pytest.raises(ValidationError, match=message):
        coord.admin.post_json("/v1/jobs", {**SECURE, **extra})


def test_dp_with_secure_aggregation_adds_the_noise_at_the_sites_and_charges_the_ledger(coord):
    sites = [coord.site(f"bank-{i}") for i in range(3)]
    spec = {
        **SECURE,
        "name": "dp-secure",
        "rounds": 2,
        "privacy": {"noise_multiplier": 0.5, "clip_norm": 1.0, "epsilon_budget": 50.0},
    }
    job, errors = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", spec)["id"])
    assert job["state"] == "completed", (job["reason"], errors)
    store = coord.http.app.state.store
    assert {e["rounds"] for e in store.ledger("dp-secure")} == {2}
    train = [r for r in job["rounds"] if r["kind"] == "train"]
    assert all(r["metrics"]["secure_aggregation"]["weight_sum"] == pytest.approx(3.0, abs=1e-4) for r in train)
    dp = store.get_version("dp-secure", 1).lineage["privacy"]
    assert dp["secure_aggregation"] is True and dp["epsilon_spent"] > 0
    assert dp["differential_privacy"]["mechanism"].startswith("DP-FedAvg, client-level, distributed")


ADAPTIVE = {"noise_multiplier": 0.3, "clip_norm": 100.0, "epsilon_budget": 500.0}


@pytest.mark.parametrize("secure", [True, False], ids=["distributed", "central"])
def test_adaptive_clipping_moves_the_norm_from_the_noised_bits(coord, secure):
    # every update is far inside a norm of 100, so the noised share within is ~1 and the
    # norm shrinks by about exp(-lr (1 - 0.5)) a round, secure or not
    sites = [coord.site(f"bank-{i}") for i in range(5)]
    privacy = {**ADAPTIVE, "adaptive_clipping": {"quantile": 0.5, "learning_rate": 1.0}}
    spec = {**SECURE, "name": f"adaptive-{secure}", "rounds": 3, "min_sites": 4, "privacy": privacy}
    if not secure:
        del spec["secure_aggregation"]
    job, errors = run_concurrently(coord, sites, coord.admin.post_json("/v1/jobs", spec)["id"])
    assert job["state"] == "completed", (job["reason"], errors)
    train = [r["metrics"] for r in job["rounds"] if r["kind"] == "train"]
    norms = [m["privacy"]["clip_norm"] for m in train]
    assert norms[0] == 100.0
    for m, following in zip(train, norms[1:], strict=False):
        assert m["next_clip_norm"] == pytest.approx(following, rel=1e-6)  # the next round clips with it
    for before, after in zip(norms, norms[1:], strict=False):
        assert after < before * np.exp(-0.3)  # share within > 0.8: 4 noise stds below 1
    if secure:
        assert all(0.8 < m["privacy"]["within_share"] < 1.2 for m in train)
        assert all(m["secure_aggregation"]["survivors"] == 5 for m in train)
    store = coord.http.app.state.store
    ledger = store.ledger(f"adaptive-{secure}")  # the bits take part of z; accounted at the spec's
    assert {(e["rounds"], e["noise_multiplier"]) for e in ledger} == {(3, 0.3)}


def test_adaptive_clipping_with_too_few_sites_for_its_bit_noise_is_refused(coord):
    privacy = {**ADAPTIVE, "noise_multiplier": 1.0, "adaptive_clipping": {}}
    with pytest.raises(ValidationError, match="min_sites == 3 needs to be > 10"):
        coord.admin.post_json("/v1/jobs", {**SECURE, "privacy": privacy})
