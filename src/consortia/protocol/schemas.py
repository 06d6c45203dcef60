"""Pydantic models for everything that crosses a process boundary.

Job specs are validated here, so a bad spec fails with a message that names its field
(``rounds: Input should be greater than or equal to 1``) before anything is persisted.
Tensors never travel as JSON: they are safetensors bodies addressed by SHA-256.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AdapterRequest",
    "AdapterSpec",
    "CardSpec",
    "CategoricalStats",
    "CredentialCreate",
    "CredentialPublic",
    "DataFingerprint",
    "EnrollRequest",
    "EnrollResponse",
    "EnrollmentTokenPublic",
    "EvaluationResult",
    "FeatureProfile",
    "FeatureSpec",
    "GroupEvaluation",
    "JobEventPublic",
    "JobPublic",
    "JobSpec",
    "JobsPublic",
    "LabelSpec",
    "NumericStats",
    "PreprocessingPlan",
    "PreprocessingSpec",
    "ProfileResult",
    "RecipeSpec",
    "ReferenceProfile",
    "RefusalRequest",
    "RoundPublic",
    "SitePublic",
    "StrategySpec",
    "TaskPublic",
    "TaskResultPublic",
    "TasksPublic",
    "TenantCreate",
    "TenantCreated",
    "TenantPublic",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
Name = Annotated[str, Field(pattern=NAME_RE.pattern, description="1-63 of [A-Za-z0-9_.-]")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- job spec


class RecipeSpec(_Strict):
    """Which built-in model recipe to train, and its hyperparameters."""

    name: Literal["logistic_regression", "mlp", "cnn"]
    options: dict[str, Any] = Field(default_factory=dict)


class FeatureSpec(_Strict):
    """One input column: numeric (standardised with federated statistics) or categorical
    (one-hot over a vocabulary that is either declared or agreed across sites)."""

    name: str = Field(min_length=1, max_length=200)
    type: Literal["numeric", "categorical"]
    vocabulary: list[str] | Literal["agreed"] | None = None

    @model_validator(mode="after")
    def _vocabulary_only_for_categorical(self) -> FeatureSpec:
        if self.type == "numeric" and self.vocabulary is not None:
            raise ValueError(f"feature {self.name!r} is numeric; 'vocabulary' is for categorical")
        if self.type == "categorical" and isinstance(self.vocabulary, list):
            if not self.vocabulary:
                raise ValueError(f"feature {self.name!r}: vocabulary list is empty")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError(f"feature {self.name!r}: vocabulary has duplicates")
        return self


class LabelSpec(_Strict):
    """Binary label: rows equal to ``positive`` are 1; rows in ``negative`` (or, when it is
    omitted, every other non-missing value) are 0; other rows are excluded."""

    column: str = Field(min_length=1)
    positive: str
    negative: list[str] | None = None


class StrategySpec(_Strict):
    """Server-side aggregation strategy (see :mod:`consortia.core.strategies`)."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
    options: dict[str, float] = Field(default_factory=dict)


class RobustSpec(_Strict):
    """Byzantine-robust aggregation in place of the weighted mean (see
    :mod:`consortia.core.robust`); the server strategy still applies the result."""

    rule: Literal["centered_clip", "krum", "multi_krum", "median", "trimmed_mean", "bulyan", "norm_bound"] = (
        "centered_clip"
    )
    options: dict[str, float] = Field(default_factory=dict, description="e.g. {f: 4} Byzantine sites to tolerate")
    quarantine_after: int = Field(
        default=3, ge=1, le=1000, description="consecutive flagged or rejected updates before a site is quarantined"
    )


class AdaptiveClipSpec(_Strict):
    """Adaptive clipping (Andrew et al. 2021): the norm follows a quantile of update norms."""

    quantile: float = Field(default=0.5, gt=0.0, lt=1.0)
    learning_rate: float = Field(default=0.2, gt=0.0, le=10.0)


class PrivacySpec(_Strict):
    """Client-level DP-FedAvg with central noise (see :mod:`consortia.core.privacy`)."""

    noise_multiplier: float = Field(gt=0.0, le=1000.0, description="z: noise std on the sum is z * clip_norm")
    clip_norm: float = Field(gt=0.0, le=1e6, description="S: each site's update delta is clipped to this L2 norm")
    adaptive_clipping: AdaptiveClipSpec | None = None
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "pld"] = "rdp"
    epsilon_budget: float = Field(
        gt=0.0, le=1000.0, description="per tenant and registered model, across every job; rounds stop before it"
    )


class SecureAggregationSpec(_Strict):
    """SecAgg+ (see :mod:`consortia.core.secagg`): the coordinator learns only the sum."""

    threshold: float = Field(
        default=0.7, gt=0.0, le=1.0, description="share of each closed neighbourhood that must survive to unmask"
    )
    degree: int | None = Field(default=None, ge=2, le=10_000, description="neighbours per site (default ~2 log2 n)")
    clip_range: float = Field(default=1.0, gt=0.0, le=1e6, description="delta values are clipped to +-clip_range")
    stage_seconds: float = Field(default=60.0, gt=0.0, le=86_400.0, description="deadline of each protocol stage")


class AsyncSpec(_Strict):
    """Buffered asynchronous aggregation (FedBuff): a new model every ``buffer_size``
    updates, each weighted by ``(1 + staleness) ** -staleness_exponent``."""

    buffer_size: int = Field(ge=1, le=100_000, description="K: updates per model version")
    staleness_exponent: float = Field(default=0.5, ge=0.0, le=10.0)
    max_staleness: int = Field(default=10, ge=0, le=10_000, description="older updates are recorded, not applied")
    server_learning_rate: float = Field(default=1.0, gt=0.0, le=100.0)


class RelaySpec(_Strict):
    """Set by a hub on its local copy of an upper coordinator's job, never by hand."""

    upstream: str = Field(min_length=1, max_length=2000)
    upstream_job: int = Field(ge=1)


class CompressionSpec(_Strict):
    """How sites compress their update deltas (see :mod:`consortia.core.compression`)."""

    method: Literal["none", "fp16", "int8", "topk"] = "none"
    topk_ratio: float = Field(default=0.01, gt=0.0, le=1.0, description="share of values top-k keeps per tensor")
    downlink: Literal["none", "fp16", "int8", "topk"] = Field(
        default="none",
        description="how the coordinator sends each new global model to sites that hold the previous one: as a "
        "compressed delta; the global model then is the previous one plus the decoded delta, exactly",
    )


class PreprocessingSpec(_Strict):
    """How preprocessing statistics are agreed across sites."""

    standardize: bool = True
    min_category_count: int = Field(default=5, ge=1, description="suppress rarer categories")


class CardSpec(_Strict):
    """What the model card states beyond the numbers."""

    intended_use: str = Field(default="", max_length=4000)
    limitations: list[str] = Field(default_factory=list)
    sensitive_attribute: str | None = Field(
        default=None, min_length=1, description="column for per-group fairness aggregates (computed at each site)"
    )


VERSIONED_REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,62}):([1-9][0-9]{0,8})$")


class AdapterSpec(_Strict):
    """What makes a job an adapter fine-tune: one site trains the named parameters of a
    registered base version on its own data; everything else stays the base's."""

    base: str = Field(description="NAME:VERSION of the registered base (global) model")
    site: Name = Field(description="the one site that fine-tunes on its own data")
    params: list[str] = Field(min_length=1, description="parameter names of the adapter (resolved, explicit)")

    @field_validator("base")
    @classmethod
    def _ref(cls, v: str) -> str:
        if not VERSIONED_REF.fullmatch(v):
            raise ValueError(f"base {v!r} must be NAME:VERSION, e.g. credit-risk:3")
        return v


class AdapterRequest(_Strict):
    """``consortia adapt``: fine-tune a declared subset of a base model's parameters at
    one site. The job spec (recipe, features, label, split, preprocessing) is the base's;
    only these training settings can differ."""

    base: str = Field(description="NAME:VERSION of the registered base model (it must have a signed release)")
    site: Name
    params: list[str] = Field(
        default_factory=lambda: ["@last"],
        min_length=1,
        max_length=256,
        description="parameter names or fnmatch patterns (e.g. '4.*'); '@last' is the final layer",
    )
    model: Name | None = Field(default=None, description="registered model of the composite (default BASE-SITE)")
    rounds: int = Field(default=1, ge=1, le=100)
    local_epochs: int = Field(default=5, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0.0, le=10.0)
    batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    round_deadline_seconds: float | None = Field(default=None, gt=0.0, le=86_400.0)

    @field_validator("base")
    @classmethod
    def _ref(cls, v: str) -> str:
        if not VERSIONED_REF.fullmatch(v):
            raise ValueError(f"base {v!r} must be NAME:VERSION, e.g. credit-risk:3")
        return v


class JobSpec(_Strict):
    """A federated training job, as written in ``SPEC.yaml``."""

    name: Name
    model: Name | None = Field(default=None, description="registered model name (default: the job name)")
    card: CardSpec = CardSpec()
    recipe: RecipeSpec
    features: list[FeatureSpec] = Field(min_length=1)
    label: LabelSpec
    strategy: StrategySpec = StrategySpec()
    robust: RobustSpec | None = Field(default=None, description="Byzantine-robust aggregation")
    privacy: PrivacySpec | None = Field(default=None, description="client-level differential privacy")
    compression: CompressionSpec = CompressionSpec()
    secure_aggregation: SecureAggregationSpec | None = Field(
        default=None, description="mask updates so the coordinator sees only their sum"
    )
    relay: RelaySpec | None = Field(default=None, description="set by a hub: the upper job this one relays")
    asynchronous: AsyncSpec | None = Field(
        default=None, description="FedBuff: apply updates as they arrive, K at a time, instead of in rounds"
    )
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    rounds: int = Field(ge=1, le=10_000)
    min_sites: int = Field(default=2, ge=1)
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    round_deadline_seconds: float = Field(default=120.0, gt=0.0, le=86_400.0)
    max_round_retries: int = Field(default=3, ge=0, le=100)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.05, gt=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    tenants: list[str] | None = Field(default=None, description="restrict to these tenants")
    adapter: AdapterSpec | None = Field(default=None, description="set by `consortia adapt`, not written by hand")
    warm_start: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,63}:[1-9][0-9]{0,8}$",
        description="set by a retraining: the released version whose weights and preprocessing it starts from",
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x <= 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split must be three positive fractions summing to 1")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"features: duplicate column(s) {dupes}")
        if self.label.column in names:
            raise ValueError(f"label.column {self.label.column!r} is also listed as a feature")
        if self.card.sensitive_attribute == self.label.column:
            raise ValueError("card.sensitive_attribute cannot be the label column")
        if self.robust is not None and self.privacy is not None and self.robust.rule != "norm_bound":
            raise ValueError(
                f"robust.rule {self.robust.rule!r} cannot be combined with privacy: the DP guarantee needs each "
                "site's influence on the result bounded by clip_norm / m, which only the mean of clipped updates "
                "has. DP clipping already bounds every update's norm; drop `robust`, or use rule norm_bound."
            )
        if self.privacy is not None and self.privacy.adaptive_clipping is not None:
            z = self.privacy.noise_multiplier
            if self.min_sites / 20.0 <= z / 2.0:
                raise ValueError(
                    f"privacy.adaptive_clipping noises the count of sites within the norm with std m / 20 (m sites "
                    f"sampled), and that must exceed noise_multiplier / 2 = {z / 2:g} (Andrew et al. 2021, "
                    f"Theorem 1): min_sites == {self.min_sites} needs to be > {10 * z:g}; raise min_sites, lower "
                    "the noise_multiplier or use a fixed clip_norm."
                )
        if self.secure_aggregation is not None:
            self._check_secure_aggregation()
        if self.compression.downlink != "none" and (self.asynchronous is not None or self.adapter is not None):
            raise ValueError(
                "compression.downlink sends each global model as a delta from the one before it, which the sites of "
                "a synchronous round hold; "
                + (
                    "an asynchronous (FedBuff) site may be several versions behind"
                    if self.asynchronous is not None
                    else "an adapter job changes only the adapter's tensors, already the smallest update"
                )
                + ". Drop compression.downlink."
            )
        if self.asynchronous is not None:
            clash = [k for k in ("secure_aggregation", "robust", "privacy", "adapter") if getattr(self, k) is not None]
            if clash:
                raise ValueError(
                    f"asynchronous (FedBuff) cannot be combined with {', '.join(clash)} yet: those need a round's "
                    "cohort (masks, robust statistics, per-round accounting); drop one of them."
                )
        return self

    def _check_secure_aggregation(self) -> None:
        if self.robust is not None:
            raise ValueError(
                f"robust.rule {self.robust.rule!r} needs every site's update, and secure aggregation shows the "
                "coordinator only their sum. Bound each update's influence by client-side clipping instead: "
                "add privacy (its clip_norm is applied at each site before masking), or drop secure_aggregation."
            )
        if self.min_sites < 3:
            raise ValueError(
                "secure_aggregation needs min_sites >= 3: with two sites the sum reveals the other's update"
            )
        if self.adapter is not None:
            raise ValueError("an adapter job trains at one site; secure aggregation needs several")
        if self.compression.method != "none":
            raise ValueError(
                "compression.method cannot be combined with secure_aggregation (masked values are fixed point); "
                "compression.downlink (the global model sent to sites) can"
            )

    @property
    def registered_model(self) -> str:
        return self.model or self.name


# ----------------------------------------------------------------------------- preprocessing


class NumericStats(_Strict):
    count: int = Field(ge=0)
    sum: float
    sumsq: float = Field(ge=0)
    quantiles: list[float] | None = Field(
        default=None, description="values at core.profile.SKETCH_PROBS, 3 significant digits (bin-edge agreement)"
    )

    @field_validator("quantiles")
    @classmethod
    def _sketch(cls, v: list[float] | None) -> list[float] | None:
        from consortia.core.profile import SKETCH_PROBS

        if v is None:
            return v
        if len(v) != len(SKETCH_PROBS) or any(not math.isfinite(x) for x in v):
            raise ValueError(f"quantiles must be {len(SKETCH_PROBS)} finite values")
        if any(b < a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("quantiles must be non-decreasing")
        return v


class CategoricalStats(_Strict):
    counts: dict[str, int]
    suppressed: int = Field(default=0, ge=0, description="rows in categories below min count")


class ProfileResult(_Strict):
    """What a site sends for the preprocessing agreement: sums and category counts over
    its training split, small counts suppressed, never rows."""

    rows: int = Field(ge=0)
    numeric: dict[str, NumericStats]
    categorical: dict[str, CategoricalStats]


class PreprocessingPlan(_Strict):
    """The agreed transform: every site maps its rows to the same feature vector."""

    numeric: dict[str, tuple[float, float]] = Field(description="name -> (mean, std)")
    categorical: dict[str, list[str]] = Field(description="name -> vocabulary")
    feature_order: list[str]
    cuts: dict[str, list[float]] = Field(
        default_factory=dict, description="numeric name -> agreed monitoring bin cut points (global deciles)"
    )
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="numeric name -> expected range (global 1% and 99% points)"
    )

    @property
    def input_dim(self) -> int:
        return sum(1 if n in self.numeric else len(self.categorical[n]) for n in self.feature_order)


class GroupEvaluation(_Strict):
    """Score histograms of one group of the sensitive attribute at one site (only groups
    with at least the site's minimum count are shared)."""

    n: int = Field(ge=0)
    neg_hist: list[int]
    pos_hist: list[int]


class EvaluationResult(_Strict):
    """A site's evaluation of a global model on its own held-out split. Empty histograms
    mean the site's policy does not share them."""

    n: int = Field(ge=0)
    loss: float
    accuracy: float = Field(ge=0.0, le=1.0)
    auc: float | None = None
    neg_hist: list[int]
    pos_hist: list[int]
    groups: dict[str, GroupEvaluation] | None = None
    suppressed_groups: int = Field(default=0, ge=0)

    @field_validator("loss")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("loss must be finite")
        return v


class DataFingerprint(_Strict):
    """What identifies the data a site used, computed at the site: hashes and a count."""

    schema_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    row_count: int = Field(ge=0)
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class FeatureProfile(_Strict):
    """One feature on the agreed bins: numeric bins ``(-inf, c1], ..., (ck, inf)`` or
    vocabulary values plus one "other" bin; bins under the site's minimum count zeroed."""

    counts: list[int]
    missing: int = Field(default=0, ge=0)
    out_of_range: int = Field(default=0, ge=0, description="numeric: outside the agreed bounds; categorical: unseen")
    suppressed: int = Field(default=0, ge=0, description="rows in bins zeroed by minimum-count suppression")
    groups: list[int] | None = Field(
        default=None, description="coarsened: the group (index into counts) of each agreed bin"
    )

    @field_validator("counts")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if not v or any(c < 0 for c in v):
            raise ValueError("counts must be a non-empty list of counts >= 0")
        return v

    @model_validator(mode="after")
    def _groups_cover_counts(self) -> FeatureProfile:
        if self.groups is not None and (
            any(g < 0 for g in self.groups) or sorted(set(self.groups)) != list(range(len(self.counts)))
        ):
            raise ValueError("groups must map every agreed bin to a group, and every group to a count")
        return self

    @property
    def bins(self) -> int:
        """How many agreed bins this profile covers."""
        return len(self.groups) if self.groups is not None else len(self.counts)


class ReferenceProfile(_Strict):
    """A site's (or the consortium's) reference for monitoring: every feature of its
    training split on the agreed bins, and the final model's score histograms per class
    on its test split. What leaves a site is coarsened: small bins merged into groups of
    at least the site's minimum count (``groups``, ``score_groups``)."""

    rows: int = Field(ge=0)
    features: dict[str, FeatureProfile]
    scores: dict[Literal["negative", "positive"], list[int]] = Field(default_factory=dict)
    score_groups: dict[Literal["negative", "positive"], list[int]] = Field(
        default_factory=dict, description="coarsened: the group (index into scores[cls]) of each score bin"
    )

    @model_validator(mode="after")
    def _score_groups_cover_scores(self) -> ReferenceProfile:
        for cls, groups in self.score_groups.items():
            hist = self.scores.get(cls)
            if hist is None or any(g < 0 for g in groups) or sorted(set(groups)) != list(range(len(hist))):
                raise ValueError(f"score_groups[{cls!r}] must map every score bin to one of scores[{cls!r}]")
        return self


class TaskResultPublic(_Strict):
    """JSON result of a profile or evaluate task."""

    profile: ProfileResult | None = None
    evaluation: EvaluationResult | None = None
    fingerprint: DataFingerprint | None = None
    reference: ReferenceProfile | None = None


class RefusalRequest(_Strict):
    """A site declines a task; ``rule`` names the check or policy rule that refused it."""

    reason: str = Field(min_length=1, max_length=2000)
    rule: str = Field(min_length=1, max_length=200)


# ----------------------------------------------------------------------------- tenants, auth


class TenantCreate(_Strict):
    name: Name
    regulated: bool = False


class TenantPublic(BaseModel):
    name: str
    regulated: bool
    created_at: datetime


class EnrollmentTokenPublic(BaseModel):
    tenant: str
    token: str
    expires_at: datetime


class TenantCreated(BaseModel):
    tenant: TenantPublic
    enrollment: EnrollmentTokenPublic


class EnrollRequest(_Strict):
    enrollment_token: str = Field(min_length=10, max_length=200)
    site_name: Name


class EnrollResponse(BaseModel):
    site_id: int
    site_name: str
    tenant: str
    credential: str


class CredentialCreate(_Strict):
    role: Literal["admin", "operator", "approver", "auditor", "promoter"]
    tenant: str | None = None
    name: Name
    ttl_days: float = Field(default=365.0, gt=0, le=3650)


class CredentialPublic(BaseModel):
    name: str
    role: str
    tenant: str | None
    token: str
    expires_at: datetime


class SiteRelease(_Strict):
    reason: str = Field(min_length=3, max_length=2000, description="why the operator trusts the site again")


class SitePublic(BaseModel):
    id: int
    name: str
    tenant: str
    status: str
    created_at: datetime
    last_seen_at: datetime | None


# ----------------------------------------------------------------------------- tasks, jobs


class TaskPublic(BaseModel):
    """A unit of work for one site. ``kind`` selects the site's handler (profile, train,
    evaluate; more to come); ``payload`` holds what the handler needs."""

    id: int
    job_id: int
    kind: str
    round: int
    attempt: int
    deadline_at: datetime
    global_hash: str | None
    payload: dict[str, Any]


class TasksPublic(BaseModel):
    tasks: list[TaskPublic]


class RoundPublic(BaseModel):
    number: int
    kind: str
    attempt: int
    state: str
    sampled: list[str]
    reported: list[str]
    failed: dict[str, str]
    deadline_at: datetime
    closed_at: datetime | None
    metrics: dict[str, Any]
    reason: str | None = None


class JobPublic(BaseModel):
    id: int
    name: str
    state: str
    reason: str | None
    rounds_requested: int
    rounds_completed: int
    created_at: datetime
    finished_at: datetime | None
    spec: dict[str, Any]
    rounds: list[RoundPublic]
    final_metrics: dict[str, Any] | None
    model_hash: str | None


class JobsPublic(BaseModel):
    jobs: list[JobPublic]


class JobEventPublic(BaseModel):
    at: datetime
    kind: str
    detail: dict[str, Any]
