"""The audit log's costs as it grows: append (in the store, signed head included),
local verification by an auditor, and an inclusion proof.

Appends should stay flat in the log size (the frontier makes them O(log n)); verification
and proofs are linear (every leaf is recomputed / the tree rebuilt). Reported as ratios
against the smallest size, measured in one run, plus the cost of an audited write
relative to the same write without an audit entry.

Run: ``.venv/bin/python benchmarks/audit_log.py [SIZES...]`` (default 1000 10000 50000;
writes benchmarks/results/audit_log.json)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.coordinator.keys import CoordinatorKeys  # noqa: E402
from consortia.core.audit import verify_entries  # noqa: E402
from consortia.core.merkle import inclusion_proof  # noqa: E402
from consortia.store.db import make_engine, upgrade  # noqa: E402
from consortia.store.models import JobEventRow  # noqa: E402
from consortia.store.sqlstore import SqlStore  # noqa: E402

BATCH = 500  # entries per transaction while growing the log (fast fill)
PROBE = 200  # single-entry transactions timed at each size


def _grow(store: SqlStore, n: int) -> None:
    with store._tx() as s:
        for i in range(n):
            store._audit(s, "bench", None, "bench.fill", f"e{i}", {"i": i})


def _probe(store: SqlStore) -> float:
    t = time.perf_counter()
    for i in range(PROBE):
        store.audit("bench", "t0", "bench.probe", f"p{i}", {"i": i, "note": "one transaction per entry"})
    return (time.perf_counter() - t) / PROBE


def _plain(store: SqlStore) -> float:
    """The same single-row transaction without the audit entry (a job-event insert)."""
    from consortia.store.entities import utcnow

    t = time.perf_counter()
    for i in range(PROBE):
        with store._tx() as s:
            s.add(JobEventRow(job_id=0, at=utcnow(), kind="bench.plain", detail={"i": i, "note": "x"}))
    return (time.perf_counter() - t) / PROBE


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        keys = CoordinatorKeys.load_or_create(Path(d) / "keys")
        engine = make_engine(f"sqlite:///{d}/bench.db")
        upgrade(engine)
        with engine.begin() as conn:  # job_events has a FK to jobs; a bare row for the plain baseline
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        store = SqlStore(engine, sign=keys.sign_head)
        public = keys.audit.public_key()
        rows = []
        current = 0
        plain = _plain(store)
        for size in sizes:
            while current < size:
                step = min(BATCH, size - current)
                _grow(store, step)
                current += step
            append = _probe(store)
            current += PROBE
            entries = [
                {
                    "seq": e.seq,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "tenant": e.tenant,
                    "action": e.action,
                    "subject": e.subject,
                    "detail": e.detail,
                    "leaf_hash": e.leaf_hash,
                    "root_hash": e.root_hash,
                    "signature": e.signature,
                }
                for e in store.iter_audit(5000)
            ]
            t = time.perf_counter()
            verdict = verify_entries(entries, public)
            verify = time.perf_counter() - t
            assert verdict.ok and verdict.size == current, verdict
            leaves = store.audit_leaves(current)
            t = time.perf_counter()
            inclusion_proof(current // 2, leaves)
            proof = time.perf_counter() - t
            rows.append(
                {
                    "size": current,
                    "append_s": append,
                    "verify_s": verify,
                    "verify_us_per_entry": verify / current * 1e6,
                    "proof_s": proof,
                }
            )
        base = rows[0]
        table = [
            [
                r["size"],
                r["append_s"] * 1e3,
                r["append_s"] / base["append_s"],
                r["append_s"] / plain,
                r["verify_us_per_entry"],
                r["verify_s"] / base["verify_s"],
                r["proof_s"] * 1e3,
            ]
            for r in rows
        ]
        print_table(
            "audit log: costs as the log grows (ratios vs the smallest size, one run)",
            [
                "entries",
                "append ms",
                "append ratio",
                "append / plain write",
                "verify us/entry",
                "verify ratio",
                "proof ms",
            ],
            table,
        )
        path = write_result("audit_log", {"plain_write_s": plain, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [1000, 10000, 50000])
