"""Local data handling at a site: load, check against the job's schema, split, profile,
and transform with the preprocessing plan agreed across sites.

Profiles contain sums, coarse quantile sketches (for agreeing monitoring bin edges) and
category counts over the site's training split, with categories rarer than the job's
``min_category_count`` suppressed, so no row and no rare value leaves the site.
:func:`merge_profiles` runs on the coordinator and turns them
into a :class:`~consortia.protocol.PreprocessingPlan`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from consortia.core.profile import bins_from_quantiles, merge_sketches, quantile_sketch
from consortia.errors import SchemaMismatchError, ValidationError
from consortia.protocol.schemas import (
    CategoricalStats,
    DataFingerprint,
    JobSpec,
    NumericStats,
    PreprocessingPlan,
    ProfileResult,
)

__all__ = [
    "MISSING",
    "check_schema",
    "fingerprint",
    "labels",
    "load_table",
    "merge_profiles",
    "profile",
    "split_indices",
    "transform",
]

MISSING = "<missing>"


def load_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; raises :class:`ValidationError` for other formats."""
    p = Path(path)
    if not p.is_file():
        raise ValidationError(f"data file {str(p)!r} does not exist or is not a file.")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(p)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    raise ValidationError(f"data file {p.name!r}: expected a .csv or .parquet file.")


def check_schema(df: pd.DataFrame, spec: JobSpec) -> None:
    """Raise :class:`SchemaMismatchError` naming every declared column that is missing or
    of the wrong type (numeric features must be numbers; categoricals may be anything)."""
    problems: list[str] = []
    for col in [f.name for f in spec.features] + [spec.label.column]:
        if col not in df.columns:
            problems.append(f"column {col!r} is missing")
    for f in spec.features:
        col = df[f.name] if f.name in df.columns else None
        numeric_ok = col is None or pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        if f.type == "numeric" and not numeric_ok:
            problems.append(f"column {f.name!r} is declared numeric but has dtype {df[f.name].dtype}")
    if not problems and spec.label.column in df.columns:
        present = set(df[spec.label.column].dropna().astype(str).unique())
        if spec.label.positive not in present:
            problems.append(
                f"label column {spec.label.column!r} has no row equal to the positive class "
                f"{spec.label.positive!r} (found {sorted(present)[:10]})"
            )
    if problems:
        raise SchemaMismatchError(
            "local data does not match the job's schema: "
            + "; ".join(problems)
            + ". Fix the job spec or the site's data file."
        )


def labels(df: pd.DataFrame, spec: JobSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows usable for this label and their 0/1 targets (rows outside the label's classes
    are excluded)."""
    col = df[spec.label.column].astype("string")
    pos = col == spec.label.positive
    keep = col.notna() & (pos | col.isin(spec.label.negative) if spec.label.negative else col.notna())
    keep = keep.fillna(False).to_numpy(dtype=bool)
    y = pos.fillna(False).to_numpy(dtype=bool)[keep].astype(np.float32)
    return df.loc[keep].reset_index(drop=True), y


def split_indices(
    n: int, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15), salt: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/validation/test index split seeded by the job (and ``salt``,
    e.g. the site name, so sites do not share a permutation)."""
    salt_int = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, salt_int])
    perm = rng.permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def _categorical_values(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna(MISSING)


def profile(df: pd.DataFrame, spec: JobSpec, min_count: int = 1) -> ProfileResult:
    """Sums and category counts for the agreement; categories under the larger of the
    job's and the site's (``min_count``) minimum count are suppressed (only their total
    is reported)."""
    min_count = max(spec.preprocessing.min_category_count, min_count)
    numeric: dict[str, NumericStats] = {}
    categorical: dict[str, CategoricalStats] = {}
    for f in spec.features:
        if f.type == "numeric":
            x = pd.to_numeric(df[f.name], errors="coerce").astype("float64").dropna().to_numpy()
            numeric[f.name] = NumericStats(
                count=int(x.size),
                sum=float(x.sum()),
                sumsq=float((x * x).sum()),
                quantiles=quantile_sketch(x, min_count),
            )
        elif f.vocabulary == "agreed" or f.vocabulary is None:
            counts = _categorical_values(df[f.name]).value_counts()
            kept = {str(k): int(v) for k, v in counts.items() if v >= min_count}
            categorical[f.name] = CategoricalStats(counts=kept, suppressed=int(counts[counts < min_count].sum()))
    return ProfileResult(rows=len(df), numeric=numeric, categorical=categorical)


def merge_profiles(profiles: Sequence[ProfileResult], spec: JobSpec) -> PreprocessingPlan:
    """Global means/stds and vocabularies from the sites' profiles (coordinator side)."""
    if not profiles:
        raise ValidationError("no site profiles to merge; at least one site must report.")
    numeric: dict[str, tuple[float, float]] = {}
    categorical: dict[str, list[str]] = {}
    cuts: dict[str, list[float]] = {}
    bounds: dict[str, tuple[float, float]] = {}
    for f in spec.features:
        if f.type == "numeric":
            n = sum(p.numeric[f.name].count for p in profiles if f.name in p.numeric)
            s = sum(p.numeric[f.name].sum for p in profiles if f.name in p.numeric)
            ss = sum(p.numeric[f.name].sumsq for p in profiles if f.name in p.numeric)
            mean = s / n if n else 0.0
            var = max(ss / n - mean * mean, 0.0) if n else 1.0
            std = math.sqrt(var) if spec.preprocessing.standardize else 1.0
            if not spec.preprocessing.standardize:
                mean = 0.0
            numeric[f.name] = (mean, std if std > 1e-12 else 1.0)
            sketches = [
                (p.numeric[f.name].quantiles, p.numeric[f.name].count)
                for p in profiles
                if f.name in p.numeric and p.numeric[f.name].quantiles is not None
            ]
            if sketches:
                try:
                    cuts[f.name] = bins_from_quantiles(merge_sketches(sketches))
                    lo, hi = merge_sketches(sketches, (0.01, 0.99))
                    bounds[f.name] = (lo, hi)
                except ValueError as exc:
                    raise ValidationError(f"feature {f.name!r}: malformed quantile sketch from a site: {exc}") from exc
        elif isinstance(f.vocabulary, list):
            categorical[f.name] = list(f.vocabulary)
        else:
            totals: dict[str, int] = {}
            for p in profiles:
                for k, v in p.categorical.get(f.name, CategoricalStats(counts={})).counts.items():
                    totals[k] = totals.get(k, 0) + v
            vocab = sorted(k for k, v in totals.items() if v >= spec.preprocessing.min_category_count)
            categorical[f.name] = vocab or [MISSING]
    return PreprocessingPlan(
        numeric=numeric,
        categorical=categorical,
        feature_order=[f.name for f in spec.features],
        cuts=cuts,
        bounds=bounds,
    )


def transform(df: pd.DataFrame, plan: PreprocessingPlan) -> np.ndarray:
    """Feature matrix (float32): standardised numerics (missing -> mean, i.e. 0) and
    one-hot categoricals (unknown or rare values -> all zeros)."""
    cols: list[np.ndarray] = []
    for name in plan.feature_order:
        if name in plan.numeric:
            mean, std = plan.numeric[name]
            x = pd.to_numeric(df[name], errors="coerce").astype("float64").to_numpy()
            z = (x - mean) / std
            cols.append(np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)[:, None])
        else:
            vocab = plan.categorical[name]
            values = _categorical_values(df[name]).to_numpy(dtype=object)
            index = {v: i for i, v in enumerate(vocab)}
            onehot = np.zeros((len(df), len(vocab)), dtype=np.float64)
            rows = np.arange(len(df))
            pos = np.array([index.get(v, -1) for v in values], dtype=np.int64)
            ok = pos >= 0
            onehot[rows[ok], pos[ok]] = 1.0
            cols.append(onehot)
    if not cols:
        return np.zeros((len(df), 0), np.float32)
    return np.hstack(cols).astype(np.float32)


def fingerprint(df: pd.DataFrame, spec: JobSpec) -> DataFingerprint:
    """Schema hash, row count and content hash of the job's columns in ``df``, computed
    at the site; only these hashes and the count leave it."""
    cols = [f.name for f in spec.features] + [spec.label.column]
    schema = json.dumps([[c, str(df[c].dtype)] for c in cols], separators=(",", ":")).encode()
    rows = pd.util.hash_pandas_object(df[cols], index=False).to_numpy()
    return DataFingerprint(
        schema_hash=hashlib.sha256(schema).hexdigest(),
        row_count=len(df),
        content_hash=hashlib.sha256(rows.tobytes()).hexdigest(),
    )
