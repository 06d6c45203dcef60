"""Wire schemas for edge devices: enrollment, reports, assignments."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from consortia.protocol.schemas import FeatureProfile, Name

__all__ = [
    "AssignRequest",
    "DeviceEnrollRequest",
    "DeviceEnrolled",
    "DeviceReport",
    "LatencySummary",
    "MonitoringWindow",
    "parse_labels",
]

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > 32:
        raise ValueError("at most 32 labels")
    for k, v in labels.items():
        if not _LABEL.match(k) or not _LABEL.match(v):
            raise ValueError(f"label {k}={v}: keys and values are 1-63 of [A-Za-z0-9_.-]")
    return labels


def parse_labels(text: str) -> dict[str, str]:
    """``region=eu,device=scanner`` -> ``{"region": "eu", "device": "scanner"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"label {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return _check_labels(out)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceEnrollRequest(_Strict):
    enrollment_token: str = Field(min_length=10, max_length=200)
    device_name: Name
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_labels(v)


class DeviceEnrolled(BaseModel):
    device_id: int
    device_name: str
    tenant: str
    credential: str
    tuf_root: str = Field(description="the TUF root the device pins (JSON text)")
    director_public_key: str = Field(description="PEM of the key that signs device instructions")


class PreviewReport(_Strict):
    """Signals of a release installed in preview (scored in shadow on live traffic)."""

    release: str | None = Field(default=None, max_length=200, description="model:version in preview")
    reason: str | None = Field(default=None, max_length=2000, description="why the preview could not be installed")
    predictions: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    latency_p99: float | None = Field(default=None, ge=0, description="model time of the preview, seconds")
    pred_hist: list[int] | None = Field(default=None, max_length=100)
    labelled: int = Field(default=0, ge=0)
    correct: int = Field(default=0, ge=0)


class DeviceReport(_Strict):
    state: Literal["idle", "serving", "installing", "failed", "held"]
    serving: str | None = Field(default=None, max_length=200, description="model:version being served")
    reason: str | None = Field(default=None, max_length=2000)
    counter: int = Field(default=0, ge=0, description="last instruction counter applied")
    attempted: int = Field(default=0, ge=0, description="last instruction counter tried (reason says why it failed)")
    predictions: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    latency_p50: float | None = Field(default=None, ge=0)
    latency_p99: float | None = Field(default=None, ge=0)
    pred_hist: list[int] | None = Field(default=None, max_length=100, description="predictions per score bin")
    labelled: int = Field(default=0, ge=0, description="predictions whose delayed label arrived")
    correct: int = Field(default=0, ge=0, description="of those, decisions that matched the label")
    preview: PreviewReport | None = None

    @model_validator(mode="after")
    def _correct_within_labelled(self) -> DeviceReport:
        if self.correct > self.labelled:
            raise ValueError(f"correct ({self.correct}) cannot exceed labelled ({self.labelled})")
        return self


class AssignRequest(_Strict):
    model: Name
    version: int = Field(ge=1)
    selector: dict[str, str] = Field(default_factory=dict, description="labels a device must carry")
    tenant: str | None = None
    devices: list[str] | None = Field(default=None, description="or name devices explicitly")


class LatencySummary(_Strict):
    count: int = Field(ge=0)
    p50: float | None = Field(default=None, ge=0)
    p95: float | None = Field(default=None, ge=0)
    p99: float | None = Field(default=None, ge=0)


class FeatureRecovery(_Strict):
    recovery: float = Field(ge=-100, le=100, description="share of the prediction shift removed by redrawing it")
    ci: tuple[float, float]


class Attribution(_Strict):
    """Interventional attribution computed at the agent (consortia.edge.attribution)."""

    prediction_psi: float = Field(ge=0)
    rows: int = Field(ge=1)
    features: dict[str, FeatureRecovery] = Field(max_length=10_000)


class GroupDecisions(_Strict):
    rows: int = Field(ge=0)
    positive: int | None = Field(default=None, ge=0, description="positive decisions; None when suppressed")


class WindowFairness(_Strict):
    """Decisions per group of the release's declared sensitive attribute."""

    attribute: str = Field(max_length=200)
    threshold: float = Field(ge=0, le=1)
    groups: dict[str, GroupDecisions] = Field(max_length=51)
    suppressed: int = Field(ge=0, description="rows in groups under the minimum count, left out")


class MonitoringWindow(_Strict):
    """What a serving agent sends about a window of its traffic: aggregates on the
    release's agreed bins, every count under ``min_count`` zeroed. Never a row, a value
    or an identifier."""

    release: str = Field(max_length=200, description="model:version that served the window")
    started_at: datetime
    ended_at: datetime
    rows: int = Field(ge=0, description="rows scored in the window")
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)
    features: dict[str, FeatureProfile] = Field(max_length=10_000)
    predictions: list[int] = Field(max_length=100, description="rows per score bin (or per group of bins)")
    prediction_groups: list[int] | None = Field(default=None, description="coarsened: group of each score bin")
    latency: LatencySummary
    labelled: dict[Literal["negative", "positive"], list[int]] = Field(
        default_factory=dict, description="scores of rows whose delayed label arrived, per true class"
    )
    attribution: Attribution | None = Field(
        default=None, description="per-feature recovery of the window's prediction shift (re-scored at the agent)"
    )
    label_counts: dict[Literal["labelled", "correct"], int] = Field(
        default_factory=dict, description="rows whose delayed label arrived, and how many decisions were right"
    )
    fairness: WindowFairness | None = Field(default=None, description="per-group decisions (sensitive attribute)")
    min_count: int = Field(ge=1, description="the suppression applied")

    @model_validator(mode="after")
    def _consistent(self) -> MonitoringWindow:
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        bins = [c for fp in self.features.values() for c in (*fp.counts, fp.missing, fp.out_of_range)]
        bins += self.predictions + [c for h in self.labelled.values() for c in h] + list(self.label_counts.values())
        if self.fairness is not None:
            for g in self.fairness.groups.values():
                if g.rows < self.min_count:
                    raise ValueError(f"fairness groups must hold at least min_count ({self.min_count}) rows")
                if g.positive is not None:
                    if g.positive > g.rows:
                        raise ValueError("a group's positive decisions exceed its rows")
                    bins += [g.positive, g.rows - g.positive]
        if any(c < 0 or 0 < c < self.min_count for c in bins):
            raise ValueError(f"every count must be 0 or at least min_count ({self.min_count})")
        return self
