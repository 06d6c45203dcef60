"""Registry, lineage, cards, approvals and promotion through the real API (in-process
coordinator, real SQLite, real site handlers)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from consortia.errors import ConflictError, NotFoundError, PermissionDeniedError
from consortia.governance import keygen, sign_approval
from consortia.protocol.governance import ApprovalPayload, ApprovalRequest, approval_message
from support import SPEC, synthetic_frame

POLICY = {
    "model": "test-job",
    "stages": {
        "staging": {
            "rules": [
                {"rule": "pooled_metric", "metric": "auc", "min": 0.5},
                {"rule": "signed"},
                {"rule": "coverage", "min_tenants": 2},
            ]
        },
        "production": {
            "rules": [{"rule": "non_regression", "metric": "auc", "max_drop": 0.5}],
            "approvals": {"quorum": "every_regulated"},
        },
    },
}


def train(coord, tmp_path, tenants=("bank-a", "bank-b", "bank-c"), regulated=("bank-a", "bank-b"), sites=None):
    if sites is None:
        sites = []
        for i, t in enumerate(tenants):
            token = coord.admin.post_json("/v1/tenants", {"name": t, "regulated": t in regulated})["enrollment"][
                "token"
            ]
            resp = coord.client(None).enroll(token, t)
            from consortia.site.tasks import SiteContext

            sites.append(
                SiteContext(
                    name=t, home=tmp_path / t, client=coord.client(resp.credential), frame=synthetic_frame(300, i)
                )
            )
    job = coord.admin.post_json("/v1/jobs", SPEC)
    return coord.wait_job(job["id"], sites), sites


def cred(coord, name, role, tenant=None):
    return coord.client(
        coord.admin.post_json("/v1/credentials", {"name": name, "role": role, "tenant": tenant})["token"]
    )


def approver(coord, tmp_path, tenant):
    c = cred(coord, f"approver-{tenant}", "approver", tenant)
    key, public = keygen(tmp_path / f"{tenant}.pem")
    c.post_json(f"/v1/tenants/{tenant}/approver-keys", {"public_key": public})
    return c, key


def test_finished_job_registers_a_version_with_federated_lineage_and_a_card(coord, tmp_path):
    job, _ = train(coord, tmp_path)
    [v] = coord.admin.get_json("/v1/registry/models/test-job")
    assert (v["version"], v["stage"], v["job_id"], v["signed"]) == (1, "candidate", job["id"], True)
    assert v["params_hash"] == job["model_hash"]
    full = coord.admin.get_json("/v1/registry/models/test-job/versions/1")
    lin = full["lineage"]
    assert lin["job"]["spec_hash"] and lin["strategy"]["name"] == "fedavg" and lin["hyperparameters"]["rounds"] == 2
    assert [(r["number"], r["kind"]) for r in lin["rounds"]] == [
        (0, "profile"),
        (1, "train"),
        (2, "train"),
        (3, "evaluate"),
    ]
    train1 = lin["rounds"][1]
    assert train1["tenants"] == ["bank-a", "bank-b", "bank-c"]
    for site, fp in train1["fingerprints"].items():
        assert fp["row_count"] == train1["examples"][site] == 210
        assert len(fp["content_hash"]) == 64 and len(fp["schema_hash"]) == 64
    assert len({fp["content_hash"] for fp in train1["fingerprints"].values()}) == 3  # different data, different hash
    assert lin["tenants"]["bank-a"]["rounds"]["train"] == [1, 2] and lin["tenants"]["bank-a"]["regulated"]
    assert lin["privacy"] == {"secure_aggregation": False, "differential_privacy": None, "epsilon_spent": None}
    card = coord.admin.get_json("/v1/registry/models/test-job/versions/1/card")
    assert card["institutions"]["bank-c"]["train_rows"] == 210
    assert card["metrics"]["pooled"]["pooled_auc"] == job["final_metrics"]["pooled_auc"]
    md = coord.admin.request("GET", "/v1/registry/models/test-job/versions/1/card", params={"format": "md"}).text
    assert md.startswith("# Model card: test-job version 1") and "| bank-b | yes | bank-b | 210 | 45 |" in md


def test_tenant_scoped_readers_see_their_own_lineage_details_only(coord, tmp_path):
    _, sites = train(coord, tmp_path)
    site_a = sites[0].client
    lin = site_a.get_json("/v1/registry/models/test-job/versions/1")["lineage"]
    assert lin["tenants"]["bank-b"] == {"redacted": True} and "rows" in lin["tenants"]["bank-a"]
    assert lin["metrics"]["per_tenant"]["bank-c"] == {"redacted": True}
    assert set(lin["rounds"][1]["fingerprints"]) == {"bank-a"}
    auditor_a = cred(coord, "aud-a", "auditor", "bank-a")
    entries = auditor_a.get_json("/v1/audit/entries")
    assert any(e.get("redacted") for e in entries)
    assert all(e.get("redacted") or e["tenant"] in (None, "bank-a") for e in entries)
    assert not any(e.get("tenant") == "bank-b" for e in entries)


def test_roles_auditor_reads_only_operator_and_admin_cannot_promote(coord, tmp_path):
    train(coord, tmp_path)
    auditor = cred(coord, "aud", "auditor")
    assert auditor.get_json("/v1/registry/models")[0]["name"] == "test-job"
    with pytest.raises(PermissionDeniedError):
        auditor.post_json("/v1/policies", POLICY)
    with pytest.raises(PermissionDeniedError):
        auditor.post_json("/v1/registry/models/test-job/versions/1/promote", {"to": "staging"})
    operator = cred(coord, "op", "operator")
    operator.post_json("/v1/policies", POLICY)
    for who in (operator, coord.admin):
        with pytest.raises(PermissionDeniedError, match="needs one of \\['promoter'\\]"):
            who.post_json("/v1/registry/models/test-job/versions/1/promote", {"to": "staging"})


def test_production_needs_every_regulated_approval_and_names_whose_is_missing(coord, tmp_path):
    train(coord, tmp_path)
    coord.admin.post_json("/v1/policies", POLICY)
    promoter = cred(coord, "prom", "promoter")
    path = "/v1/registry/models/test-job/versions/1/promote"
    assert promoter.post_json(path, {"to": "staging"})["promoted"]
    out = promoter.post_json(path, {"to": "production"})
    assert not out["promoted"]
    [quorum] = [r for r in out["rules"] if r["rule"] == "approval of every regulated tenant"]
    assert not quorum["passed"] and "missing approvals from: bank-a, bank-b" in quorum["evidence"]
    a, key_a = approver(coord, tmp_path, "bank-a")
    a.post_json(
        "/v1/registry/models/test-job/versions/1/approvals",
        sign_approval(a, key_a, "test-job", 1, "production").model_dump(),
    )
    out = promoter.post_json(path, {"to": "production"})
    assert not out["promoted"] and "missing approvals from: bank-b" in out["rules"][-1]["evidence"]
    b, key_b = approver(coord, tmp_path, "bank-b")
    b.post_json(
        "/v1/registry/models/test-job/versions/1/approvals",
        sign_approval(b, key_b, "test-job", 1, "production").model_dump(),
    )
    out = promoter.post_json(path, {"to": "production"})
    assert out["promoted"] and out["stage"] == "production"
    v = coord.admin.get_json("/v1/registry/models/test-job/versions/1")
    assert [(h["from"], h["to"]) for h in v["stage_history"]] == [("candidate", "staging"), ("staging", "production")]
    assert sorted(x["tenant"] for x in v["approvals"]) == ["bank-a", "bank-b"]


def test_forged_cross_tenant_and_replayed_approvals_are_refused(coord, tmp_path):
    job, sites = train(coord, tmp_path)
    train(coord, tmp_path, sites=sites)  # version 2 of the same model
    a, key_a = approver(coord, tmp_path, "bank-a")
    b, key_b = approver(coord, tmp_path, "bank-b")
    url1 = "/v1/registry/models/test-job/versions/1/approvals"
    url2 = "/v1/registry/models/test-job/versions/2/approvals"
    req = sign_approval(a, key_a, "test-job", 1, "production")
    # A's approver cannot approve for B: neither with A's credential and a payload naming B ...
    forged_tenant = dict(req.payload, tenant="bank-b")
    signed = ApprovalRequest(
        payload=forged_tenant,
        signature=key_a.sign(approval_message(ApprovalPayload.model_validate(forged_tenant))).hex(),
    )
    with pytest.raises(PermissionDeniedError, match="approves for tenant 'bank-a' only"):
        a.post_json(url1, signed.model_dump())
    # ... nor by B's credential presenting A's signature (it does not verify with B's key).
    req_b = sign_approval(b, key_a, "test-job", 1, "production")  # signed with the wrong (A's) key
    with pytest.raises(PermissionDeniedError, match="does not verify with any approval key of tenant 'bank-b'"):
        b.post_json(url1, req_b.model_dump())
    # A forged signature (one flipped bit) is refused.
    bad = req.signature[:-1] + ("0" if req.signature[-1] != "0" else "1")
    with pytest.raises(PermissionDeniedError, match="does not verify"):
        a.post_json(url1, {"payload": req.payload, "signature": bad})
    a.post_json(url1, req.model_dump())
    with pytest.raises(ConflictError, match="replay"):
        a.post_json(url1, req.model_dump())  # the same approval twice
    with pytest.raises(ConflictError, match="signed for test-job:1, not test-job:2"):
        a.post_json(url2, req.model_dump())  # replayed for another version
    stale = sign_approval(a, key_a, "test-job", 2, "production")
    old = dict(stale.payload, signed_at=(datetime.now(UTC) - timedelta(hours=1)).isoformat())
    sig = key_a.sign(approval_message(ApprovalPayload.model_validate(old))).hex()
    with pytest.raises(ConflictError, match="not fresh"):
        a.post_json(url2, {"payload": old, "signature": sig})
    operator = cred(coord, "op", "operator")
    with pytest.raises(PermissionDeniedError):
        operator.post_json(url2, req.model_dump())


def test_new_production_archives_the_old_and_audit_at_answers_history(coord, tmp_path):
    _, sites = train(coord, tmp_path, regulated=())
    policy = copy.deepcopy(POLICY)
    policy["stages"]["production"]["approvals"] = {"quorum": "none"}
    coord.admin.post_json("/v1/policies", policy)
    promoter = cred(coord, "prom", "promoter")
    for stage in ("staging", "production"):
        assert promoter.post_json("/v1/registry/models/test-job/versions/1/promote", {"to": stage})["promoted"]
    between = datetime.now(UTC)
    train(coord, tmp_path, sites=sites)
    for stage in ("staging", "production"):
        assert promoter.post_json("/v1/registry/models/test-job/versions/2/promote", {"to": stage})["promoted"]
    stages = {v["version"]: v["stage"] for v in coord.admin.get_json("/v1/registry/models/test-job")}
    assert stages == {1: "archived", 2: "production"}
    then = coord.admin.get_json("/v1/audit/at", params={"time": between.isoformat()})
    assert [(v["version"], v["stage"]) for v in then["versions"]] == [(1, "production")]
    now = coord.admin.get_json("/v1/audit/at", params={"time": datetime.now(UTC).isoformat(), "tenant": "bank-c"})
    assert [(v["version"], v["stage"]) for v in now["versions"]] == [(1, "archived"), (2, "production")]
    with pytest.raises(NotFoundError, match="tenant 'nobody' not found"):
        coord.admin.get_json("/v1/audit/at", params={"time": datetime.now(UTC).isoformat(), "tenant": "nobody"})


def test_bad_policies_and_promotions_get_clear_errors(coord, tmp_path):
    from consortia.errors import ValidationError

    train(coord, tmp_path)
    promoter = cred(coord, "prom", "promoter")
    with pytest.raises(ConflictError, match="no promotion policy for 'test-job'"):
        promoter.post_json("/v1/registry/models/test-job/versions/1/promote", {"to": "staging"})
    with pytest.raises(ValidationError, match="stages.staging.rules.0.pooled_metric.min"):
        coord.admin.post_json(
            "/v1/policies",
            {
                "model": "test-job",
                "stages": {"staging": {"rules": [{"rule": "pooled_metric", "metric": "auc", "min": 7}]}},
            },
        )
    with pytest.raises(ValidationError, match="quorum k_of_n needs k"):
        coord.admin.post_json(
            "/v1/policies", {"model": "test-job", "stages": {"staging": {"approvals": {"quorum": "k_of_n"}}}}
        )
    with pytest.raises(NotFoundError, match="test-job:9 not found"):
        coord.admin.get_json("/v1/registry/models/test-job/versions/9")
    coord.admin.post_json("/v1/policies", {"model": "test-job", "stages": {"staging": {"rules": []}}})
    with pytest.raises(ConflictError, match="has no stage 'production'"):
        promoter.post_json("/v1/registry/models/test-job/versions/1/promote", {"to": "production"})
