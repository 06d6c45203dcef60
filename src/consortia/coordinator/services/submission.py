"""Starting jobs: validated specs, adapter fine-tunes and retraining from a released
version (mixed into :class:`~consortia.coordinator.services.rounds.RoundService`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from consortia.coordinator.services.safeguards import check_spec
from consortia.core.strategies import make_strategy
from consortia.errors import ConflictError, ConsortiaError, PermissionDeniedError, SpecError, ValidationError
from consortia.ml.recipes import resolve_adapter, validate_recipe
from consortia.protocol.schemas import AdapterRequest, JobSpec
from consortia.store.entities import Job, ModelVersion, Principal

__all__ = ["JobSubmission", "parse_spec"]


def parse_spec(raw: Any) -> JobSpec:
    """Validate a job spec; raise :class:`SpecError` naming each bad field."""
    from pydantic import ValidationError as PydanticValidationError

    if not isinstance(raw, dict):
        raise SpecError("job spec must be a mapping (YAML object) with name, recipe, features, ...")
    try:
        spec = JobSpec.model_validate(raw)
    except PydanticValidationError as exc:
        parts = []
        for err in exc.errors()[:8]:
            loc = ".".join(str(p) for p in err["loc"]) or "spec"
            parts.append(f"{loc}: {err['msg']}")
        raise SpecError("invalid job spec: " + "; ".join(parts)) from exc
    validate_recipe(spec.recipe.name, spec.recipe.options)
    options = dict(spec.strategy.options)
    try:
        make_strategy(spec.strategy.name, options)
    except ConsortiaError as exc:
        raise SpecError(f"strategy.options: {exc.message}") from exc
    check_spec(spec)
    return spec


class JobSubmission:
    """Job submission methods of the round service."""

    def submit(self, raw_spec: Any, principal: Principal) -> Job:
        spec = parse_spec(raw_spec)
        sites = self._eligible(spec)
        if len(sites) < spec.min_sites:
            raise ConflictError(
                f"min_sites is {spec.min_sites} but only {len(sites)} active site(s) are enrolled"
                + (f" in tenants {spec.tenants}" if spec.tenants else "")
                + "; enroll more sites or lower min_sites."
            )
        canonical = spec.model_dump(mode="json")
        spec_hash = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
        job = self.store.create_job(spec.name, canonical, spec_hash, principal.credential_id, principal.name)
        self._open(job.id, spec, 0, 0, "profile", None)
        return self.store.get_job(job.id)

    def submit_adapter(self, req: AdapterRequest, principal: Principal) -> Job:
        """Start an adapter fine-tune: ``req.site`` trains the declared subset of the base's
        parameters on its own data, from the base's weights and under the base's spec
        (features, label, preprocessing, split); the finished job registers the composite
        (base + adapter) as a version of its own model, signed and released like any
        other. A tenant's operator may adapt for their own sites only."""
        model, version = req.base.split(":")
        base = self.store.get_version(model, int(version))
        if base.release_digest is None:
            raise ConflictError(f"{base.ref} has no signed release yet; adapt a released version.")
        site = next((s for s in self.store.list_sites() if s.name == req.site), None)
        if site is None:
            raise ValidationError(f"no site named {req.site!r}; see `consortia sites`.")
        if principal.tenant_id is not None and principal.tenant_id != site.tenant_id:
            raise PermissionDeniedError(
                f"site {req.site!r} belongs to another tenant; an operator adapts for their own tenant's sites only."
            )
        if site.status != "active":
            raise ConflictError(f"site {req.site!r} is {site.status}; it cannot train.")
        if "job" not in base.lineage or not base.lineage.get("preprocessing"):
            raise ConflictError(f"{base.ref} has no training lineage to adapt from.")
        try:
            params = resolve_adapter(self.params(base.params_hash), req.params)
        except SpecError as exc:
            raise ValidationError(exc.message) from exc
        name = req.model or f"{base.model}-{site.name}"
        if len(name) > 63:
            raise ValidationError(f"composite model name {name!r} is longer than 63 characters; pass --model NAME.")
        if name == base.model:
            raise ValidationError("the composite needs its own registered model name, not the base's.")
        raw = {k: v for k, v in base.lineage["job"]["spec"].items() if k != "adapter"}
        raw.update(
            name=name,
            model=name,
            rounds=req.rounds,
            local_epochs=req.local_epochs,
            min_sites=1,
            fraction=1.0,
            tenants=[site.tenant],
            strategy={"name": "fedavg", "options": {}},
            robust=None,  # one site: nothing to be robust against, nothing to hide a sum in
            secure_aggregation=None,
            adapter={"base": base.ref, "site": site.name, "params": params},
        )
        for key in ("learning_rate", "batch_size", "round_deadline_seconds"):
            if getattr(req, key) is not None:
                raw[key] = getattr(req, key)
        spec = parse_spec(raw)
        return self._start_from(
            base, spec, principal, "adapter_started", {"base": base.ref, "site": site.name, "params": params}
        )

    def _start_from(
        self, base: ModelVersion, spec: JobSpec, principal: Principal, event: str, detail: dict[str, Any]
    ) -> Job:
        """Create the job and open its round 1 from ``base``'s weights and preprocessing
        plan (no profile round: the agreed bins and vocabularies stay)."""
        canonical = spec.model_dump(mode="json")
        spec_hash = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
        job = self.store.create_job(spec.name, canonical, spec_hash, principal.credential_id, principal.name)
        self.store.add_event(job.id, event, detail)
        self._open(
            job.id,
            spec,
            1,
            0,
            "train",
            base.params_hash,
            job_fields={"preprocessing": base.lineage["preprocessing"], "global_hash": base.params_hash},
        )
        return self.store.get_job(job.id)

    def submit_retrain(self, base_ref: str, principal: Principal, rounds: int | None = None) -> Job:
        """Federated retraining of a released version under its own job spec, warm-started
        from its weights and its preprocessing plan (agreed bins, vocabularies and model
        shape stay), on the sites' current data. The finished job registers the next
        version of the same model, its lineage naming the version it started from."""
        model, _, version = base_ref.rpartition(":")
        base = self.store.get_version(model, int(version))
        if base.release_digest is None:
            raise ConflictError(f"{base.ref} has no signed release yet; retrain from a released version.")
        if "job" not in base.lineage or not base.lineage.get("preprocessing"):
            raise ConflictError(f"{base.ref} has no training lineage to retrain from.")
        raw = dict(base.lineage["job"]["spec"])
        if raw.get("adapter"):
            raise ConflictError(f"{base.ref} is a composite (base + adapter); retrain its base instead.")
        raw["warm_start"] = base.ref
        if rounds is not None:
            raw["rounds"] = rounds
        spec = parse_spec(raw)
        sites = self._eligible(spec)
        if len(sites) < spec.min_sites:
            raise ConflictError(
                f"retraining {base.ref} needs {spec.min_sites} active sites; {len(sites)} are enrolled and active."
            )
        return self._start_from(
            base, spec, principal, "retrain_started", {"warm_start": base.ref, "rounds": spec.rounds}
        )
