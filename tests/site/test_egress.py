"""The egress contract (DESIGN.md): capture every byte two hospital sites send during a
whole job on the real healthcare data, and check it against what may leave a site."""

from __future__ import annotations

import copy
import json

import httpx

from consortia.protocol.schemas import TaskResultPublic
from consortia.protocol.tensors import decode
from consortia.site.client import CoordinatorClient
from consortia.site.policy import SitePolicy
from consortia.site.tasks import SiteContext


class Recorder(httpx.BaseTransport):
    """Passes requests through and keeps (method, path, body) of each."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path, request.read()))
        return self.inner.handle_request(request)


ALLOWED_META = {"num_examples", "train_loss", "evaluation", "fingerprint"}


def test_every_byte_a_site_sends_fits_the_egress_contract(coord, tmp_path):
    from consortia.datasets.scenarios import load_scenario

    sc = load_scenario("healthcare", 2, rounds=2)
    spec = copy.deepcopy(sc.spec)
    sites, recorders = [], {}
    policy = SitePolicy(min_count=10)
    for name, frame in sc.partitions.items():
        rec = Recorder(coord.http._transport)
        anon = CoordinatorClient("http://testserver", transport=rec)
        resp = anon.enroll(coord.tenant(name, regulated=True), name)
        client = CoordinatorClient("http://testserver", resp.credential, transport=rec)
        sites.append(SiteContext(name=name, home=tmp_path / name, client=client, frame=frame, policy=policy))
        recorders[name] = rec
    job = coord.wait_job(coord.admin.post_json("/v1/jobs", spec)["id"], sites, timeout=300)
    assert job["state"] == "completed", job["reason"]

    identifiers = set()
    for frame in sc.partitions.values():
        for col in ("fake_first_name", "fake_last_name"):
            identifiers |= {v for v in frame[col].dropna().astype(str) if len(v) >= 4}
    params = None
    references = 0
    for name, rec in recorders.items():
        assert rec.sent, name
        for method, path, body in rec.sent:
            parts = path.strip("/").split("/")
            allowed = (
                (method, path) in {("POST", "/v1/enroll"), ("GET", "/v1/sites/me/tasks")}
                or (method == "GET" and parts[:2] == ["v1", "blobs"])
                or (method == "POST" and parts[:2] == ["v1", "tasks"] and parts[3] in ("update", "result", "refuse"))
            )
            assert allowed, (method, path)
            if path.endswith("/update"):
                tensors, meta = decode(body)
                assert set(meta) <= ALLOWED_META
                params = params or set(tensors)
                assert set(tensors) == params  # model parameters only
                text = " ".join(meta.values())
            else:
                text = body.decode()
            if path.endswith("/result"):
                result = TaskResultPublic.model_validate_json(body)
                if result.profile is not None:  # category counts under the site's minimum are suppressed
                    counts = [c for stats in result.profile.categorical.values() for c in stats.counts.values()]
                    assert counts and min(counts) >= policy.min_count
                    assert result.fingerprint is not None and result.fingerprint.row_count == result.profile.rows
                if result.profile is not None:  # quantile sketches are coarse (3 significant digits)
                    for stats in result.profile.numeric.values():
                        for q in stats.quantiles or []:
                            assert q == float(f"{q:.3g}"), q
                if result.reference is not None:  # every histogram bin is empty or >= the minimum count
                    ref = result.reference
                    bins = [c for fp in ref.features.values() for c in (*fp.counts, fp.missing, fp.out_of_range)]
                    bins += [c for hist in ref.scores.values() for c in hist]
                    assert bins and all(c == 0 or c >= policy.min_count for c in bins)
                    references += 1
                if result.evaluation is not None and result.evaluation.groups is not None:
                    assert all(g.n >= policy.min_count for g in result.evaluation.groups.values())
                    assert set(result.evaluation.groups) <= {"female", "male"}
            words = set(text.replace('"', " ").replace(",", " ").replace(":", " ").split())
            assert not (words & identifiers), (name, path, sorted(words & identifiers)[:5])
            assert "fake_first_name" not in text and "subject_id" not in text
    assert references == len(recorders)  # each site sent its (suppressed) reference profile
    # what the coordinator holds about the sites' data: hashes and counts, no rows
    lineage = coord.admin.get_json(f"/v1/registry/models/{spec['name']}/versions/1")["lineage"]
    fps = [fp for r in lineage["rounds"] for fp in r["fingerprints"].values()]
    assert fps and all(set(fp) == {"schema_hash", "row_count", "content_hash"} for fp in fps)
    held = set(json.dumps(lineage).replace('"', " ").replace(",", " ").replace(":", " ").split())
    assert not (held & identifiers)
