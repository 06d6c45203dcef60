"""Real processes on loopback: one coordinator, one process per site, real data."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from consortia.cli.demo import Federation
from consortia.datasets.scenarios import load_scenario
from consortia.protocol.tensors import decode
from consortia.store.blobs import BlobStore
from consortia.store.db import make_engine
from consortia.store.sqlstore import SqlStore

AUDIT = Path(__file__).parent / "audit"


def finance_spec(rounds: int = 3, deadline: float = 60.0, **kw):
    sc = load_scenario("finance", 3, rounds, seed=0)
    return sc, {**sc.spec, "round_deadline_seconds": deadline, **kw}


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(sites: int = 3, fmt: str = "parquet", env: dict | None = None):
        sc = load_scenario("finance", sites, 3, seed=0)
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        paths = {}
        for name, frame in sc.partitions.items():
            site_dir = data / name
            site_dir.mkdir()
            path = site_dir / f"{name}.{fmt}"
            frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
            paths[name] = path
        fed = Federation(tmp_path / "fed", env=env)
        feds.append(fed)
        return fed, paths

    yield make
    for fed in feds:
        fed.stop()


def enroll_all(fed: Federation, paths: dict[str, Path]) -> None:
    with fed.client() as c:
        for name, path in paths.items():
            token = c.post_json("/v1/tenants", {"name": name})["enrollment"]["token"]
            fed.start_site(name, path, token, poll_seconds=2.0)
    fed.wait_sites(len(paths))


def wait_state(fed: Federation, job_id: int, pred, timeout: float = 240.0, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            with fed.client() as c:
                last = c.get_json(f"/v1/jobs/{job_id}")
            if pred(last):
                return last
        except Exception:  # coordinator restarting
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last job state: {last and last['state']}, logs in {fed.logs}")


def _read_only(message: bytes) -> bytes:
    raise AssertionError("this test store only reads; it must not append to the audit log")


def assert_exactly_once(fed: Federation, job_id: int, rounds: int) -> None:
    """Every train round 1..R closed exactly once, and its model is exactly the FedAvg of
    the round's accepted updates (one per site), so nothing was lost or applied twice."""
    store = SqlStore(make_engine(f"sqlite:///{fed.coord_home / 'coordinator.db'}"), sign=_read_only)
    blobs = BlobStore(fed.coord_home / "blobs")
    closed = [r for r in store.job_rounds(job_id) if r.kind == "train" and r.state == "closed"]
    assert sorted(r.number for r in closed) == list(range(1, rounds + 1))
    for rnd in closed:
        ups = store.round_updates(rnd.id)
        assert len({u.site_id for u in ups}) == len(ups) >= 2
        reported = [t for t in rnd.tasks if t.state == "completed"]
        assert len(reported) == len(ups)
        base, _ = decode(blobs.get(rnd.global_in))
        total = sum(u.num_examples for u in ups)
        expected = {k: np.zeros(v.shape) for k, v in base.items()}
        for u in ups:
            p, _ = decode(blobs.get(u.blob_hash, verify=True))
            for k in p:
                expected[k] += p[k].astype(np.float64) * u.num_examples / total
        out, _ = decode(blobs.get(rnd.global_out))
        for k in out:
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)
    store.engine.dispose()
