"""Site-sovereign policy: a site refuses what its own policy forbids, with the rule
named in the job's status, while the other sites' rounds complete."""

from __future__ import annotations

import copy

import pytest

from consortia.errors import ValidationError
from consortia.site.policy import SitePolicy, load_policy
from support import SPEC, synthetic_frame


def run_with_policies(coord, tmp_path, policies: dict[str, SitePolicy], spec=SPEC, frames=None):
    sites = []
    for name, pol in policies.items():
        ctx = coord.site(name, frame=(frames or {}).get(name, synthetic_frame(300, len(sites))), tmp=tmp_path)
        ctx.policy = pol
        sites.append(ctx)
    job = coord.admin.post_json("/v1/jobs", spec)
    return coord.wait_job(job["id"], sites)


def refusals(job) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in job["rounds"]:
        out.update(r["failed"])
    return out


def test_denied_recipe_is_refused_with_its_rule_and_the_others_complete(coord, tmp_path):
    job = run_with_policies(
        coord,
        tmp_path,
        {
            "bank-a": SitePolicy(),
            "bank-b": SitePolicy(),
            "bank-c": SitePolicy(allowed_recipes=["mlp"]),
        },
    )
    assert job["state"] == "completed"
    assert sorted(job["final_metrics"]["per_site"]) == ["bank-a", "bank-b"]
    why = refusals(job)["bank-c"]
    assert why.startswith("refused: policy.allowed_recipes")
    assert "'logistic_regression' is not allowed" in why
    for r in job["rounds"]:
        assert sorted(r["reported"]) == ["bank-a", "bank-b"]


def test_denied_column_and_no_training_are_refused(coord, tmp_path):
    job = run_with_policies(
        coord,
        tmp_path,
        {
            "bank-a": SitePolicy(),
            "bank-b": SitePolicy(),
            "bank-c": SitePolicy(denied_columns=["x2"]),
            "bank-d": SitePolicy(join_training=False),
        },
    )
    assert job["state"] == "completed"
    why = refusals(job)
    assert why["bank-c"].startswith("refused: policy.denied_columns") and "x2" in why["bank-c"]
    assert why["bank-d"].startswith("refused: policy.join_training")


def test_identifier_feature_is_refused_naming_column_and_kind_never_values(coord, tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["features"].append({"name": "fake_first_name", "type": "categorical", "vocabulary": "agreed"})
    frames = {}
    for i, name in enumerate(["hosp-a", "hosp-b", "hosp-c"]):
        df = synthetic_frame(300, i)
        df["fake_first_name"] = [f"name{j % 40}" for j in range(300)]
        frames[name] = df
    allow = SitePolicy(allow_identifier_columns=["fake_first_name"])
    job = run_with_policies(
        coord, tmp_path, {"hosp-a": allow, "hosp-b": allow, "hosp-c": SitePolicy()}, spec=spec, frames=frames
    )
    assert job["state"] == "completed"
    why = refusals(job)["hosp-c"]
    assert why.startswith("refused: compliance.direct_identifier")
    assert "fake_first_name (person_name, by column name)" in why
    assert "name1" not in why.replace("fake_first_name", "")


def test_sensitive_attribute_gives_pooled_fairness_with_small_groups_suppressed(coord, tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["card"] = {"sensitive_attribute": "grp", "intended_use": "test"}
    frames = {}
    for i, name in enumerate(["bank-a", "bank-b"]):
        df = synthetic_frame(400, i)
        df["grp"] = ["rare" if j == 0 else ("f" if j % 2 else "m") for j in range(400)]
        frames[name] = df
    job = run_with_policies(
        coord, tmp_path, {"bank-a": SitePolicy(min_count=5), "bank-b": SitePolicy(min_count=5)}, spec, frames
    )
    fair = job["final_metrics"]["fairness"]
    assert sorted(fair["groups"]) == ["f", "m"]  # "rare" has 1 row per site: never shared
    assert fair["groups"]["f"]["n"] + fair["groups"]["m"]["n"] <= job["final_metrics"]["n"]
    assert 0 <= fair["auc_gap"] < 1


def test_policy_file_errors_are_clear(tmp_path):
    assert load_policy(None) == SitePolicy()
    p = tmp_path / "p.yaml"
    p.write_text("min_count: 0\nallowed_recipes: mlp\n")
    with pytest.raises(ValidationError, match="min_count: Input should be greater than or equal to 1"):
        load_policy(p)
    p.write_text("mystery: 1\n")
    with pytest.raises(ValidationError, match="mystery: Extra inputs are not permitted"):
        load_policy(p)
    p.write_text("a: [\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_policy(p)
    with pytest.raises(ValidationError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")
    p.write_text("allowed_recipes: [mlp]\nprivacy: {require_dp: true, max_epsilon: 2}\nmin_count: 10\n")
    pol = load_policy(p)
    assert pol.allowed_recipes == ["mlp"] and pol.privacy.max_epsilon == 2 and pol.min_count == 10


def test_healthcare_sites_refuse_fake_first_name_as_a_feature(coord, tmp_path):
    from consortia.datasets.scenarios import load_scenario

    sc = load_scenario("healthcare", 2, rounds=1)
    spec = copy.deepcopy(sc.spec)
    spec["features"].append({"name": "fake_first_name", "type": "categorical", "vocabulary": "agreed"})
    spec["max_round_retries"] = 0
    job = run_with_policies(coord, tmp_path, {s: SitePolicy() for s in sc.partitions}, spec, sc.partitions)
    assert job["state"] == "failed"
    expected = (
        "refused: compliance.direct_identifier declared feature column(s) look like direct identifiers: "
        "fake_first_name (person_name, by column name). Remove them from the job, or list them in "
        "allow_identifier_columns in the site policy."
    )
    # exactly the template: column name and detector kind, no value from the data
    assert refusals(job) == {site: expected for site in sc.partitions}


def test_dp_requirements_are_checked_against_the_jobs_privacy_settings():
    from consortia.protocol.schemas import JobSpec
    from consortia.site.policy import check_task

    frame = synthetic_frame(50, 1)
    policy = SitePolicy.model_validate({"privacy": {"require_dp": True, "max_epsilon": 3.0}})
    plain = JobSpec.model_validate(SPEC)
    refusal = check_task(policy, "train", plain, frame)
    assert refusal is not None and refusal.rule == "policy.privacy.require_dp"
    loose = JobSpec.model_validate(
        {**SPEC, "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon_budget": 8.0}}
    )
    refusal = check_task(policy, "train", loose, frame)
    assert refusal is not None and refusal.rule == "policy.privacy.max_epsilon" and "8.0 exceeds" in refusal.reason
    tight = JobSpec.model_validate(
        {**SPEC, "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon_budget": 2.5}}
    )
    assert check_task(policy, "train", tight, frame) is None
