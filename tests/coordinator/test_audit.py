"""The tamper-evident audit log: every state change is an RFC 6962 leaf with a signed
head; an auditor verifies it from the API alone and is told the first bad entry."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from consortia.core.audit import entry_bytes
from consortia.core.merkle import leaf_hash
from consortia.governance import verify_audit, verify_proof


def populate(coord, n_tenants: int = 6):
    for i in range(n_tenants):
        coord.tenant(f"t{i}", regulated=i % 2 == 0)
    coord.admin.post_json("/v1/credentials", {"name": "aud", "role": "auditor"})
    coord.admin.post_json("/v1/credentials", {"name": "aud-t1", "role": "auditor", "tenant": "t1"})


def sql(coord, statement: str, **params):
    with coord.http.app.state.store.engine.begin() as conn:
        conn.execute(text(statement), params)


def test_every_state_change_is_logged_and_the_log_verifies(coord):
    populate(coord)
    entries = coord.admin.get_json("/v1/audit/entries")
    actions = [e["action"] for e in entries]
    assert actions.count("tenant.created") == 6 and actions.count("enrollment_token.issued") == 6
    assert actions.count("credential.created") == 3  # the first admin, then two auditors
    assert {e["actor"] for e in entries if e["action"] == "tenant.created"} == {"admin"}
    verdict = verify_audit(coord.admin)
    assert verdict.ok and verdict.size == len(entries) and verdict.root == entries[-1]["root_hash"]


def test_inclusion_proofs_verify_for_every_entry(coord):
    populate(coord)
    size = coord.admin.get_json("/v1/audit/head")["size"]
    for seq in range(size):
        p = verify_proof(coord.admin, seq)
        assert p["verified"] and p["size"] == size
        older = verify_proof(coord.admin, 0, size=seq + 1)  # against every earlier signed head too
        assert older["verified"]


@pytest.mark.parametrize("also_fix_hashes", [False, True])
def test_an_edited_row_is_named(coord, also_fix_hashes):
    populate(coord)
    sql(coord, "UPDATE audit_log SET detail = :d WHERE seq = 5", d='{"regulated": true, "sneaky": 1}')
    if also_fix_hashes:  # an attacker who also recomputes the leaf hash is caught by the signed root
        store = coord.http.app.state.store
        e = store.audit_entries(4, 1)[0]
        leaf = leaf_hash(entry_bytes(e.seq, e.at, e.actor, e.tenant, e.action, e.subject, e.detail)).hex()
        sql(coord, "UPDATE audit_log SET leaf_hash = :h WHERE seq = 5", h=leaf)
    verdict = verify_audit(coord.admin)
    assert not verdict.ok and verdict.first_bad == 5 and "entry 5 was modified" in verdict.reason


def test_a_forged_head_signature_is_named(coord):
    populate(coord)
    sig = hashlib.sha512(b"not the coordinator").hexdigest()
    sql(coord, "UPDATE audit_log SET signature = :s WHERE seq = 3", s=sig)
    verdict = verify_audit(coord.admin)
    assert (verdict.ok, verdict.first_bad) == (False, 3) and "not the coordinator's" in verdict.reason


def test_deleted_rows_are_named_and_truncation_needs_a_saved_head(coord):
    populate(coord)
    head = coord.admin.get_json("/v1/audit/head")
    sql(coord, "DELETE FROM audit_log WHERE seq = 7")
    verdict = verify_audit(coord.admin)
    assert (verdict.ok, verdict.first_bad) == (False, 7) and "entry 7 is missing" in verdict.reason
    sql(coord, "DELETE FROM audit_log WHERE seq >= 7")
    assert verify_audit(coord.admin).ok  # a clean truncation looks like a shorter log ...
    verdict = verify_audit(coord.admin, head=head)  # ... until checked against a head saved earlier
    assert not verdict.ok and verdict.first_bad == 7 and "were deleted" in verdict.reason


def test_a_tenant_auditor_verifies_the_whole_log_seeing_only_its_tenant(coord):
    populate(coord)
    token = coord.admin.post_json("/v1/credentials", {"name": "aud-t3", "role": "auditor", "tenant": "t3"})["token"]
    auditor = coord.client(token)
    entries = auditor.get_json("/v1/audit/entries")
    assert {e["tenant"] for e in entries if not e.get("redacted")} <= {None, "t3"}
    verdict = verify_audit(auditor)
    assert verdict.ok and verdict.redacted > 0


def test_editing_any_row_in_any_column_is_named(coord):
    populate(coord, n_tenants=3)
    size = coord.admin.get_json("/v1/audit/head")["size"]
    columns = {
        "actor": "'mallory'",
        "tenant": "'t9'",
        "action": "'tenant.deleted'",
        "subject": "'x'",
        "detail": "'{\"x\": 1}'",
        "at": "'2020-01-01 00:00:00.000000'",
    }
    for seq in range(size):
        column, value = list(columns.items())[seq % len(columns)]
        with coord.http.app.state.store.engine.begin() as conn:
            before = conn.execute(text(f"SELECT {column} FROM audit_log WHERE seq = :s"), {"s": seq}).scalar()
            conn.execute(text(f"UPDATE audit_log SET {column} = {value} WHERE seq = :s"), {"s": seq})
        verdict = verify_audit(coord.admin)
        assert (verdict.ok, verdict.first_bad) == (False, seq), (seq, column, verdict)
        with coord.http.app.state.store.engine.begin() as conn:
            conn.execute(text(f"UPDATE audit_log SET {column} = :v WHERE seq = :s"), {"v": before, "s": seq})
        assert verify_audit(coord.admin).ok


def test_a_pinned_key_is_used_and_a_wrong_one_fails(coord, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    populate(coord, n_tenants=2)
    pinned = coord.home / "keys" / "audit-ed25519.pub.pem"
    assert verify_audit(coord.admin, public_key=pinned).ok
    other = tmp_path / "other.pub.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verdict = verify_audit(coord.admin, public_key=other)
    assert (verdict.ok, verdict.first_bad) == (False, 0) and "not the coordinator's" in verdict.reason
