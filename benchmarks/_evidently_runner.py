"""Runs Evidently's default data drift preset on windows the drift benchmark wrote.

Executed with the benchmark's separate Evidently environment (``.venv-evidently``, made
by ``benchmarks/drift_detection.py``), never imported by Consortia. Input: a directory
with ``reference.parquet`` and ``windows.parquet`` (a ``_window`` column numbers the
windows) and ``columns.json`` ({"numerical": [...], "categorical": [...]}). Output (JSON on
stdout): per window, whether the preset's dataset drift fired (share of drifted columns
>= its default 0.5) and how many columns drifted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset


def main(folder: Path) -> None:
    cols = json.loads((folder / "columns.json").read_text())
    definition = DataDefinition(numerical_columns=cols["numerical"], categorical_columns=cols["categorical"])
    reference = Dataset.from_pandas(pd.read_parquet(folder / "reference.parquet"), data_definition=definition)
    windows = pd.read_parquet(folder / "windows.parquet")
    out = []
    started = time.perf_counter()
    for wid, frame in windows.groupby("_window", sort=True):
        current = Dataset.from_pandas(frame.drop(columns="_window"), data_definition=definition)
        snapshot = Report([DataDriftPreset()]).run(current, reference)
        count = share = None
        for m in snapshot.dict()["metrics"]:
            if m["metric_name"].startswith("DriftedColumnsCount"):
                count, share = m["value"]["count"], m["value"]["share"]
        out.append({"window": int(wid), "drifted_columns": count, "share": share})
    print(json.dumps({"windows": out, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
