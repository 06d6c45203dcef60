"""The site's direct-identifier scan: each detector fires on what it should, and not on
the real scenario features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from consortia.site.compliance import scan_columns


def frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    first = ["anna", "bert", "carla", "dmitri", "elif", "femi", "gita", "hugo", "ines", "jonas"]
    names = [first[i % 10] + "abcdef"[i // 10 % 6] for i in range(n)]  # 60 distinct words, repeated
    return pd.DataFrame(
        {
            "contact": [f"user{i}@example.org" for i in range(n)],
            "reach": [f"+44 20 7946 {i:04d}" for i in range(n)],
            "ident": [f"{100 + i % 800:03d}-{i % 90 + 10:02d}-{i:04d}" for i in range(n)],
            "given": names,
            "ref": np.arange(1000, 1000 + n),
            "notes": [f"patient reported mild symptoms on visit {i} and was sent home" for i in range(n)],
            "income": rng.normal(50_000, 10_000, n),
            "grade": rng.choice(["A", "B", "C"], n),
            "count": rng.integers(0, 5, n),
        }
    )


def test_each_detector_fires_by_values_and_reports_no_values():
    found = {f.column: (f.kind, f.evidence) for f in scan_columns(frame(), list(frame().columns))}
    assert found == {
        "contact": ("email", "values"),
        "reach": ("phone", "values"),
        "ident": ("national_id", "values"),
        "given": ("person_name", "values"),
        "ref": ("unique_key", "values"),
        "notes": ("free_text", "values"),
    }
    text = " ".join(str(f) for f in scan_columns(frame(), list(frame().columns)))
    assert "example.org" not in text and "7946" not in text and "anna" not in text


@pytest.mark.parametrize(
    "column,kind",
    [
        ("email_address", "email"),
        ("mobile", "phone"),
        ("nhs_number", "national_id"),
        ("last_name", "person_name"),
        ("patient_id", "unique_key"),
        ("ssn", "national_id"),
    ],
)
def test_column_names_alone_are_enough(column, kind):
    df = pd.DataFrame({column: ["x"] * 30})
    [f] = scan_columns(df, [column])
    assert (f.kind, f.evidence) == (kind, "column name")


def test_scenario_features_are_clean_and_healthcare_identifiers_are_found():
    from consortia.datasets.scenarios import load_scenario

    for name in ("finance", "healthcare"):
        sc = load_scenario(name)
        features = [f["name"] for f in sc.spec["features"]]
        for site, df in sc.partitions.items():
            assert scan_columns(df, features) == [], (name, site)
    df = next(iter(load_scenario("healthcare").partitions.values()))
    kinds = {f.column: f.kind for f in scan_columns(df, ["fake_first_name", "fake_last_name", "subject_id"])}
    assert kinds == {"fake_first_name": "person_name", "fake_last_name": "person_name", "subject_id": "unique_key"}
    renamed = df.rename(columns={"fake_first_name": "col_a"})
    assert [(f.kind, f.evidence) for f in scan_columns(renamed, ["col_a"])] == [("person_name", "values")]
