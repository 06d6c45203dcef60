"""Closing rounds, mixed into :class:`~consortia.coordinator.services.rounds.RoundService`:
the profile round agrees the preprocessing plan and initialises the model, a train round
aggregates its accepted updates (plain weighted sum, robust or DP mean, or the unmasked
sum of a secure round) and opens the next, the evaluate round pools the sites' metrics
and registers the version with its lineage. Each commits the closed round, the new
global model's hash and the next round in one transaction (the caller holds the job's
lock), so a coordinator killed at any point recomputes the same bytes after restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import numpy as np

from consortia.coordinator.faults import crash_point
from consortia.coordinator.services.downlink import DOWNLINK_STATE, compress_downlink, strategy_state
from consortia.coordinator.services.lineage import build_lineage, contributors
from consortia.coordinator.services.results import merge_references, pool, round_metrics
from consortia.coordinator.services.safeguards import privacy_summary, quarantine_flagged, safeguarded_mean
from consortia.core.aggregate import WeightedSum
from consortia.core.params import Params
from consortia.core.strategies import make_strategy
from consortia.ml.data import merge_profiles
from consortia.ml.recipes import init_params
from consortia.protocol.schemas import EvaluationResult, JobSpec, ProfileResult, ReferenceProfile
from consortia.protocol.tensors import decode, encode
from consortia.store.entities import Job, Round, Site, Update, utcnow

__all__ = ["RoundClosing"]


class RoundClosing:
    """How each kind of round closes (methods of the round service)."""

    async def _close_profile(self, job: Job, spec: JobSpec, rnd: Round) -> None:
        done = [t for t in rnd.tasks if t.state == "completed"]
        profiles = [ProfileResult.model_validate(t.result["profile"]) for t in done if t.result]
        plan = merge_profiles(profiles, spec)
        params = await asyncio.to_thread(init_params, spec.recipe.name, plan.input_dim, spec.recipe.options, spec.seed)
        strategy = make_strategy(spec.strategy.name, spec.strategy.options)
        global_hash = self.blobs.put(encode(params))
        state = strategy.init_state(params)
        state_hash = self.blobs.put(encode(state)) if state else None
        metrics = {"sites": [t.site for t in done], "rows": sum(p.rows for p in profiles), "input_dim": plan.input_dim}
        self._open(
            job.id,
            spec,
            1,
            0,
            "train",
            global_hash,
            close=rnd,
            close_fields={"global_out": global_hash, "metrics": metrics},
            job_fields={
                "preprocessing": plan.model_dump(mode="json"),
                "global_hash": global_hash,
                "state_hash": state_hash,
            },
        )

    async def _close_train(
        self, job: Job, spec: JobSpec, rnd: Round, done: tuple[Params, Params, dict[str, Any]] | None = None
    ) -> None:
        updates = self.store.round_updates(rnd.id)
        assert rnd.global_in is not None
        current = self.params(rnd.global_in)
        if done is None:
            state = decode(self.blobs.get(job.state_hash))[0] if job.state_hash else {}
            new_params, new_state, info = await asyncio.to_thread(
                self._aggregate, spec, rnd.number, current, state, updates, len(rnd.tasks)
            )
        else:  # a secure round: the unmasked sum was turned into the model already
            new_params, new_state, info = done
        downlink = None
        if spec.compression.downlink != "none":  # publish w + decode(compressed delta), exactly
            state = decode(self.blobs.get(job.state_hash))[0] if job.state_hash else {}
            new_params, own, body, downlink = compress_downlink(
                spec, rnd.number, current, new_params, state, rnd.global_in
            )
            new_state = {**{k: v for k, v in new_state.items() if not k.startswith(DOWNLINK_STATE)}, **own}
            downlink["delta"] = self.blobs.put(body)
        global_hash = self.blobs.put(encode(new_params))
        if downlink is not None:
            self.remember_downlink(global_hash, rnd.global_in, downlink["delta"])
        state_hash = self.blobs.put(encode(new_state)) if new_state else None
        crash_point("model_written", rnd.number)
        metrics = {**round_metrics(updates), **info}
        if updates:  # bytes on the wire against what fp32 parameters would have taken
            fp32 = 4 * sum(int(np.size(v)) for v in current.values()) * len(updates)
            if spec.adapter is not None:
                fp32 = 4 * sum(int(np.size(current[k])) for k in spec.adapter.params) * len(updates)
            payload = sum((u.metrics or {}).get("wire_bytes", u.nbytes) for u in updates)
            metrics["compression"] = {
                "method": spec.compression.method,
                "tensor_bytes": payload,
                "bytes_fp32": fp32,
                "ratio": payload / fp32,
            }
        if downlink is not None:
            metrics["downlink"] = downlink
        if spec.robust is not None:  # before the next round is sampled, so it leaves them out
            rounds = [
                r if r.id != rnd.id else dataclasses.replace(_closed(r), metrics=metrics)
                for r in self.store.job_rounds(job.id)
            ]
            quarantined = quarantine_flagged(self.store, spec, job.id, rounds, self._eligible(spec))
            if quarantined:
                metrics["quarantined"] = quarantined
        close = {
            "close": rnd,
            "close_fields": {"global_out": global_hash, "state_out": state_hash, "metrics": metrics},
            "job_fields": {"global_hash": global_hash, "state_hash": state_hash, "rounds_completed": rnd.number},
        }
        if rnd.number < spec.rounds:
            self._open(job.id, spec, rnd.number + 1, 0, "train", global_hash, **close)
        else:
            self._open(job.id, spec, rnd.number + 1, 0, "evaluate", global_hash, **close)

    def _aggregate(
        self, spec: JobSpec, number: int, current: Params, state: Params, updates: list[Update], expected: int
    ) -> tuple[Params, Params, dict[str, Any]]:
        if spec.adapter is not None:  # aggregate the adapter; the base's tensors stay as they are
            names = spec.adapter.params
            new, new_state, info = self._aggregate(
                spec.model_copy(update={"adapter": None}),
                number,
                {k: current[k] for k in names},
                state,
                updates,
                expected,
            )
            return {**current, **new}, new_state, info
        strategy = make_strategy(spec.strategy.name, spec.strategy.options)
        own_state = strategy_state(state)
        if spec.robust is not None or spec.privacy is not None:
            # robust rules and DP clipping need every update at once: O(model x sites) memory
            loaded = [(decode(self.blobs.get(u.blob_hash, verify=True))[0], u.num_examples, u.site) for u in updates]
            own = {k: v for k, v in state.items() if k.startswith("privacy/")}
            mean, own, info = safeguarded_mean(spec, current, own, loaded, expected)
            new, new_state = strategy.apply(current, mean, own_state)
            return new, {**new_state, **own}, info
        acc = WeightedSum(current)
        for i, u in enumerate(updates):
            params, _ = decode(self.blobs.get(u.blob_hash, verify=True))
            acc.add(params, float(u.num_examples), check=False)  # validated on arrival, hash re-verified
            if i == len(updates) // 2:
                crash_point("mid_aggregation", number)
        new, new_state = strategy.apply(current, acc.mean(), own_state)
        return new, new_state, {}

    def _close_evaluate(self, job: Job, spec: JobSpec, rnd: Round) -> None:
        done = [t for t in rnd.tasks if t.state == "completed" and t.result]
        evals = {t.site: EvaluationResult.model_validate(t.result["evaluation"]) for t in done}  # type: ignore[index]
        metrics = pool(evals)
        if (rnd.metrics or {}).get("fedbuff"):  # FedBuff: the buffer that made the evaluated model
            metrics["fedbuff"] = rnd.metrics["fedbuff"]  # type: ignore[index]
        assert rnd.global_in is not None
        rounds = [r if r.id != rnd.id else _closed(r) for r in self.store.job_rounds(job.id)]
        updates = {r.id: self.store.round_updates(r.id) for r in rounds if r.kind == "train" and r.state == "closed"}
        sites = self.store.list_sites()
        lineage = build_lineage(job, rounds, updates, sites, self.store.list_tenants(), metrics, rnd.global_in)
        refs = {
            t.site: ReferenceProfile.model_validate(t.result["reference"]) for t in done if t.result.get("reference")
        }
        if refs:  # the global reference for monitoring: the sites' coarsened histograms, summed
            tenant_of = {s.name: s.tenant for s in sites}
            # and each tenant's own, kept as a blob only the coordinator reads: a region's
            # traffic is judged against its own population, not the consortium's mixture
            per_tenant = {
                tenant: self.blobs.put(
                    merge_references([r for n, r in refs.items() if tenant_of.get(n) == tenant])
                    .model_dump_json()
                    .encode()
                )
                for tenant in sorted({tenant_of[n] for n in refs if n in tenant_of})
            }
            lineage["reference"] = {
                "sites": sorted(refs),
                "profile": merge_references(list(refs.values())).model_dump(mode="json"),
                "per_tenant": per_tenant,
            }
        if spec.adapter is not None:
            lineage["composite"] = self._composite_lineage(spec, sites, rnd.global_in)
        lineage["privacy"]["secure_aggregation"] = spec.secure_aggregation is not None
        privacy = privacy_summary(self.store, spec, job.id)
        if privacy is not None:  # the largest epsilon any contributing tenant has spent on this model
            spent = max((t["epsilon_total"] for t in privacy["tenants"].values()), default=0.0)
            lineage["privacy"] = {**lineage["privacy"], "differential_privacy": privacy, "epsilon_spent": spent}
        version = self.store.finish_job(
            job.id,
            state="completed",
            reason=None,
            close=rnd,
            close_fields={"metrics": metrics},
            job_fields={"final_metrics": metrics, "global_hash": rnd.global_in},
            register={"model": spec.registered_model, "params_hash": rnd.global_in, "lineage": lineage},
        )
        if version is not None and self.on_registered is not None:
            self.on_registered(version)

    def _composite_lineage(self, spec: JobSpec, sites: list[Site], params_hash: str) -> dict[str, Any]:
        """What a composite release is made of: the base version (by hash and release
        digest) and the adapter (site, parameters, the hash of each adapter tensor)."""
        assert spec.adapter is not None
        model, version = spec.adapter.base.split(":")
        base = self.store.get_version(model, int(version))
        params = self.params(params_hash)
        site = next(s for s in sites if s.name == spec.adapter.site)
        base_site = base.lineage["metrics"]["per_tenant"].get(site.tenant, {}).get("sites", {}).get(site.name)
        return {
            "base": {
                "ref": base.ref,
                "params_hash": base.params_hash,
                "release_digest": base.release_digest,
                "job_id": base.lineage["job"]["id"],
                "tenants": contributors(base.lineage),  # a composite's base may itself be one
                "metrics_at_site": base_site,
            },
            "adapter": {
                "site": site.name,
                "tenant": site.tenant,
                "params": list(spec.adapter.params),
                "tensors": {
                    k: {"shape": list(params[k].shape), "sha256": hashlib.sha256(params[k].tobytes()).hexdigest()}
                    for k in spec.adapter.params
                },
                "bytes": int(sum(params[k].nbytes for k in spec.adapter.params)),
            },
        }


def _closed(rnd: Round) -> Round:
    """``rnd`` as it will be once closed in the registering transaction."""
    return dataclasses.replace(rnd, state="closed", closed_at=utcnow())
