"""Reference profiles: bin edges agreed from the sites' quantile sketches are the
consortium's deciles, each site keeps its full-resolution reference, only suppressed
histograms leave, and the global reference (their sum) ships inside the release."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consortia.coordinator.services.results import merge_references
from consortia.core.profile import DECILES, SKETCH_PROBS, common_groups, merge_sketches, onto, quantile_sketch
from consortia.protocol.schemas import PreprocessingPlan, ReferenceProfile
from consortia.site.monitor import suppressed
from support import SPEC, synthetic_frame


def test_merged_sketches_give_the_pooled_deciles():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 1000), rng.normal(3, 1, 3000)
    merged = merge_sketches([(quantile_sketch(a, 10), 1000), (quantile_sketch(b, 10), 3000)])
    pooled = np.quantile(np.concatenate([a, b]), DECILES)
    np.testing.assert_allclose(merged, pooled, atol=0.12)
    assert quantile_sketch(a[:5], min_count=10) is None  # too few values: no sketch at all
    with pytest.raises(ValueError, match="non-decreasing"):
        merge_sketches([(list(range(len(SKETCH_PROBS)))[::-1], 10)])


def test_reference_profiles_from_a_job_end_up_in_lineage_and_release(coord, tmp_path):
    frames = {"a": synthetic_frame(400, 1), "b": synthetic_frame(600, 2, shift=1.0)}
    sites = [coord.site(name, frame=frame, tmp=tmp_path) for name, frame in frames.items()]
    for s in sites:
        s.policy = s.policy.model_copy(update={"min_count": 8})
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", SPEC)["id"], sites)
    assert job["state"] == "completed", job["reason"]
    version = coord.admin.get_json("/v1/registry/models/test-job/versions/1")
    lin = version["lineage"]
    plan = lin["preprocessing"]
    assert len(plan["cuts"]["x1"]) == 9 and plan["bounds"]["x1"][0] < plan["cuts"]["x1"][0]
    glob = ReferenceProfile.model_validate(lin["reference"]["profile"])
    assert lin["reference"]["sites"] == ["a", "b"]

    # each site kept its own full-resolution reference; the global one is their suppressed sum
    local = {
        s.name: ReferenceProfile.model_validate_json((s.home / "references" / f"job-{job['id']}.json").read_text())
        for s in sites
    }
    for s in sites:  # the same file, where the site's serving endpoint looks it up by the model's params
        kept = s.home / "references" / "by-params" / f"{version['params_hash']}.json"
        assert kept.read_text() == (s.home / "references" / f"job-{job['id']}.json").read_text()
    for name, ref in local.items():
        for feature, fp in ref.features.items():
            assert sum(fp.counts) + fp.missing == ref.rows, (name, feature)
    sent = [suppressed(r, 8, PreprocessingPlan.model_validate(plan)) for r in local.values()]
    for r in sent:  # what left each site: no count under its minimum, small bins merged rather than lost
        for fp in r.features.values():
            assert all(c == 0 or c >= 8 for c in (*fp.counts, fp.missing, fp.out_of_range))
            assert sum(fp.counts) + fp.missing == r.rows
        assert all(c == 0 or c >= 8 for h in r.scores.values() for c in h)
    assert merge_references(sent) == glob  # the global one is their sum on the common grouping
    for feature in ("x1", "x2", "cat"):  # exact on the sites' common grouping
        local_sum = np.sum([r.features[feature].counts for r in local.values()], axis=0).tolist()
        common = common_groups([r.features[feature].groups for r in sent], len(local_sum))
        assert onto(glob.features[feature].counts, None, common) == onto(local_sum, None, common)
    # the agreed edges are the consortium's deciles: x1's ten bins are about equally full
    x1 = np.array(glob.features["x1"].counts) / sum(glob.features["x1"].counts)
    assert x1.min() > 0.05 and x1.max() < 0.15
    assert sum(glob.scores["negative"]) + sum(glob.scores["positive"]) > 0

    # the release carries the bins and the global reference for the serving agents
    files = "/v1/registry/models/test-job/versions/1/release/files"
    bins = json.loads(coord.admin.request("GET", f"{files}/bins.json").content)["bins"]
    ref = json.loads(coord.admin.request("GET", f"{files}/reference.json").content)
    manifest = json.loads(coord.admin.request("GET", f"{files}/manifest.json").content)
    assert bins["x1"]["cuts"] == plan["cuts"]["x1"] and bins["cat"]["vocabulary"] == ["a", "b", "c"]
    want = lin["reference"]["profile"]
    assert ref["profile"] == {k: v for k, v in want.items() if k not in ("scores", "score_groups")}
    assert manifest["reference_score_groups"] == want["score_groups"]
    assert manifest["reference_scores"] == want["scores"]  # the model's own part rides in the manifest
