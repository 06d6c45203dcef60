"""End-to-end governance with real processes and the real CLIs: a site's own policy file,
the signed release checked by the model-signing package's own verifier, and the audit
log verified by `consortia audit verify` after a row is edited in the database."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fedtools import finance_spec, wait_state

pytestmark = pytest.mark.e2e


def cli(*args: str, token: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consortia.cli.main", *args, "--coordinator", url, "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_site_policy_release_signature_and_audit_log(federation, tmp_path):
    fed, paths = federation(sites=3)
    fed.start_coordinator()
    policy = tmp_path / "strict.yaml"
    policy.write_text("denied_columns: [int_rate]\nmin_count: 5\n")
    with fed.client() as c:
        for i, (name, path) in enumerate(paths.items()):
            token = c.post_json("/v1/tenants", {"name": name, "regulated": True})["enrollment"]["token"]
            fed.start_site(name, path, token, poll_seconds=2.0, policy=policy if i == 2 else None)
        fed.wait_sites(3)
        _, spec = finance_spec(rounds=2, min_sites=2)
        job_id = c.post_json("/v1/jobs", spec)["id"]
    strict = list(paths)[2]
    job = wait_state(fed, job_id, lambda j: j["state"] in ("completed", "failed"), what="job end")
    assert job["state"] == "completed", job["reason"]
    assert sorted(job["final_metrics"]["per_site"]) == sorted(list(paths)[:2])
    status = cli("job", "status", str(job_id), token=fed.admin_token, url=fed.url)
    assert status.returncode == 0 and "policy.denied_columns" in status.stdout and strict in status.stdout

    # The signed release: our verifier and the model-signing package's own CLI accept it ...
    rel = tmp_path / "release"
    out = cli("registry", "verify", "credit-risk:1", "--dir", str(rel), token=fed.admin_token, url=fed.url)
    assert out.returncode == 0, out.stderr
    assert "verified credit-risk:1" in out.stdout
    own = [
        str(Path(sys.executable).parent / "model_signing"),
        "verify",
        "key",
        str(rel / "bundle"),
        "--public_key",
        str(rel / "release-p256.pub.pem"),
        "--signature",
        str(rel / "model.sig"),
    ]
    assert subprocess.run(own, capture_output=True, timeout=120).returncode == 0
    # ... and one flipped byte in the weights fails both.
    weights = next((rel / "bundle" / "tensors").iterdir())  # one weight tensor (ONNX external data)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert subprocess.run(own, capture_output=True, timeout=120).returncode != 0
    from consortia.errors import ValidationError
    from consortia.governance import verify_release

    with pytest.raises(ValidationError, match="does not verify"):
        verify_release(rel / "bundle", rel / "model.sig", rel / "release-p256.pub.pem")

    # Governance through the CLI: list/show/card, policy, promote, keygen, signed approvals.
    admin = fed.admin_token
    assert "credit-risk" in cli("registry", "list", token=admin, url=fed.url).stdout
    shown = json.loads(cli("registry", "show", "credit-risk:1", "--json", token=admin, url=fed.url).stdout)
    assert shown["stage"] == "candidate" and shown["tenants"] == sorted(list(paths)[:2])  # the strict site refused
    assert cli("registry", "card", "credit-risk:1", token=admin, url=fed.url).stdout.startswith("# Model card")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "model: credit-risk\nstages:\n  staging: {rules: [{rule: signed}]}\n"
        "  production: {approvals: {quorum: every_regulated}}\n"
    )
    assert cli("policy", "apply", str(policy), token=admin, url=fed.url).returncode == 0
    with fed.client() as c:
        promoter = c.post_json("/v1/credentials", {"name": "rm", "role": "promoter"})["token"]
        approvers = {
            t: c.post_json("/v1/credentials", {"name": f"ap-{t}", "role": "approver", "tenant": t})["token"]
            for t in paths
        }
    assert cli("registry", "promote", "credit-risk:1", "--to", "staging", token=promoter, url=fed.url).returncode == 0
    refused = cli("registry", "promote", "credit-risk:1", "--to", "production", token=promoter, url=fed.url)
    assert refused.returncode == 1 and "missing approvals from:" in refused.stdout
    for t, tok in approvers.items():
        key = tmp_path / f"{t}.pem"
        assert cli("approver", "keygen", "--key", str(key), token=tok, url=fed.url).returncode == 0
        out = cli(
            "registry", "approve", "credit-risk:1", "--stage", "production", "--key", str(key), token=tok, url=fed.url
        )
        assert out.returncode == 0, out.stderr
    done = cli("registry", "promote", "credit-risk:1", "--to", "production", token=promoter, url=fed.url)
    assert done.returncode == 0 and "promoted credit-risk:1 to production" in done.stdout
    proof = cli("audit", "proof", "3", token=admin, url=fed.url)
    assert proof.returncode == 0 and json.loads(proof.stdout)["verified"] is True
    when = datetime.now(UTC).isoformat()
    at = json.loads(cli("audit", "at", when, "--json", token=admin, url=fed.url).stdout)
    assert [(v["model"], v["version"], v["stage"]) for v in at["versions"]] == [("credit-risk", 1, "production")]

    # The audit log verifies, until a row is edited in the database.
    ok = cli("audit", "verify", token=fed.admin_token, url=fed.url)
    assert ok.returncode == 0 and "audit log verified" in ok.stdout
    db = sqlite3.connect(fed.coord_home / "coordinator.db")
    [(seq,)] = db.execute("SELECT seq FROM audit_log WHERE action = 'job.completed'").fetchall()
    db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    bad = cli("audit", "verify", token=fed.admin_token, url=fed.url)
    assert bad.returncode == 1
    assert f"at entry {seq}: entry {seq} was modified" in bad.stderr


def test_concurrent_writers_keep_one_dense_verifiable_audit_log(federation):
    from concurrent.futures import ThreadPoolExecutor

    from consortia.governance import verify_audit

    fed, _ = federation(sites=1)
    fed.start_coordinator()

    def create(i: int) -> int:
        with fed.client() as c:
            c.post_json("/v1/tenants", {"name": f"t{i}", "regulated": i % 2 == 0})
            c.post_json("/v1/credentials", {"name": f"aud{i}", "role": "auditor", "tenant": f"t{i}"})
        return i

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(create, range(40))) == list(range(40))
    with fed.client() as c:
        verdict = verify_audit(c)
        entries = c.get_json("/v1/audit/entries", params={"limit": 5000})
    assert verdict.ok, verdict.reason
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    assert sum(e["action"] == "tenant.created" for e in entries) == 40
