import os

import pytest

from consortia.errors import NotFoundError, ValidationError
from consortia.store.blobs import BlobStore, sha256_hex
from consortia.store.db import make_engine, upgrade


def test_put_is_content_addressed_and_idempotent(tmp_path):
    store = BlobStore(tmp_path)
    d1 = store.put(b"hello")
    assert d1 == sha256_hex(b"hello")
    assert store.put(b"hello") == d1
    assert store.get(d1, verify=True) == b"hello"
    assert (tmp_path / d1[:2] / d1[2:4] / d1).exists()
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_missing_bad_and_corrupt_blobs(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(NotFoundError):
        store.get("0" * 64)
    with pytest.raises(ValidationError, match="SHA-256"):
        store.get("../../etc/passwd")
    d = store.put(b"data")
    path = tmp_path / d[:2] / d[2:4] / d
    os.chmod(path, 0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(ValidationError, match="corrupt"):
        store.get(d, verify=True)


def test_migrations_create_schema_and_are_idempotent(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(engine)
    upgrade(engine)
    from sqlalchemy import inspect

    tables = set(inspect(engine).get_table_names())
    assert {"tenants", "sites", "credentials", "jobs", "rounds", "tasks", "updates", "job_events"} <= tables
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
