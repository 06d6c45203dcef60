"""Direct-identifier scan of a job's declared columns, run at the site before any work.

Detectors look at the column name and at a sample of values. A finding carries the
column name and the detector kind only: values never leave the site, not even in an
error message. The site refuses the task unless its policy allows the column
(``allow_identifier_columns``).

Kinds: ``person_name``, ``email``, ``phone``, ``national_id``, ``unique_key`` (one value
per row, e.g. a patient or account number) and ``free_text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

__all__ = ["Finding", "scan_columns"]

SAMPLE = 5000
MIN_ROWS_FOR_UNIQUENESS = 20

_NAME_COL = re.compile(
    r"(first|last|given|family|middle|full|maiden|sur|fore|patient|customer|client|person)_?name"
    r"|^name$",
    re.I,
)
_EMAIL_COL = re.compile(r"e_?mail", re.I)
_PHONE_COL = re.compile(r"phone|mobile|(^|_)tel(ephone)?($|_)|(^|_)fax($|_)", re.I)
_NATIONAL_COL = re.compile(
    r"ssn|social_?security|national_?id|nhs_?(number|no)|passport|tax_?id|(^|_)(tin|nin|iban|mrn)($|_)"
    r"|medical_?record|insurance_?(number|no)|driver_?licen[cs]e",
    re.I,
)
_KEY_COL = re.compile(r"(^|_)(id|uuid|guid|key|account_?(number|no))$", re.I)

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
_PHONE = re.compile(r"^\+?[\d\s().\-]{7,20}$")
_SSN = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_IBAN = re.compile(r"^[A-Z]{2}\d{2}[A-Z0-9]{11,30}$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]{1,24}$")


@dataclass(frozen=True)
class Finding:
    """A declared column that looks like a direct identifier."""

    column: str
    kind: str
    evidence: str  # which signal fired ("column name" or "values"); never a value

    def __str__(self) -> str:
        return f"{self.column} ({self.kind}, by {self.evidence})"


def _share(values: pd.Series, pattern: re.Pattern[str]) -> float:
    if values.empty:
        return 0.0
    return float(values.map(lambda v: bool(pattern.match(v))).mean())


def _scan(name: str, col: pd.Series) -> Finding | None:
    for regex, kind in (
        (_NATIONAL_COL, "national_id"),
        (_EMAIL_COL, "email"),
        (_PHONE_COL, "phone"),
        (_NAME_COL, "person_name"),
        (_KEY_COL, "unique_key"),
    ):
        if regex.search(name):
            return Finding(name, kind, "column name")
    non_null = col.dropna()
    if non_null.empty:
        return None
    sample = non_null.iloc[:SAMPLE]
    is_text = pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)
    if is_text:
        text = sample.astype(str).str.strip()
        if _share(text, _EMAIL) >= 0.5:
            return Finding(name, "email", "values")
        if _share(text, _SSN) >= 0.5 or _share(text, _IBAN) >= 0.5:
            return Finding(name, "national_id", "values")
        digits = text.str.count(r"\d")
        if _share(text, _PHONE) >= 0.5 and float((digits >= 7).mean()) >= 0.5:
            return Finding(name, "phone", "values")
        words = text.str.split().str.len()
        if float(text.str.len().median()) >= 30 and float(words.median()) >= 5:
            return Finding(name, "free_text", "values")
        if len(non_null) >= MIN_ROWS_FOR_UNIQUENESS and non_null.nunique() == len(non_null):
            return Finding(name, "unique_key", "values")
        # Single capitalisable words with many distinct values: given or family names.
        if _share(text, _WORD) >= 0.9 and text.nunique() >= 50 and text.nunique() / len(text) >= 0.02:
            return Finding(name, "person_name", "values")
        return None
    if pd.api.types.is_integer_dtype(col) and len(non_null) >= MIN_ROWS_FOR_UNIQUENESS:
        n = len(non_null)
        span = int(non_null.max()) - int(non_null.min()) + 1
        if non_null.nunique() == n and span <= 2 * n:  # a dense run of distinct integers: a row key
            return Finding(name, "unique_key", "values")
    return None


def scan_columns(frame: pd.DataFrame, columns: list[str]) -> list[Finding]:
    """Findings for the given columns of ``frame`` (columns absent from it are skipped)."""
    out = []
    for name in columns:
        if name in frame.columns:
            f = _scan(name, frame[name])
            if f is not None:
                out.append(f)
    return out
