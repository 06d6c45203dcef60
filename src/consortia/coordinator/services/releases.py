"""Signed releases: a model version bound with its configuration, signed in the OpenSSF
model-signing format with the coordinator's EC P-256 key.

A release bundle binds everything inference needs (format ``consortia-release/3``, see
:mod:`consortia.edge.runtime`): ``model.onnx`` (raw columns in, probability out, the
agreed preprocessing inside the graph), one file per weight tensor under ``tensors/``
(ONNX external data), ``config.json`` (recipe, features, label, preprocessing,
threshold), ``sample.json`` (smoke-test inputs), ``bins.json`` (the agreed monitoring
bins), ``reference.json`` (the global reference profile of the training data: the sites'
suppressed histograms summed; the model's own test-score histograms ride in the
manifest), the model card, the lineage, and ``manifest.json`` listing every part by role,
hash and size, with model, version and parameter hash (binding the identity into the
signed content), the outputs the trained model gives for the sample, and a slot for a
vector-index snapshot. ``model_signing`` hashes every file into an in-toto statement and
signs it (a Sigstore bundle with a DSSE envelope, no transparency log: offline). The
statement's subject digest is the *release digest* that approvers sign. Anyone can check
a release with the package's own CLI:
``model_signing verify key DIR --public_key release-p256.pub.pem --signature SIG``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from consortia.coordinator.keys import CoordinatorKeys
from consortia.coordinator.services.lineage import card_markdown, model_card
from consortia.edge.runtime import FORMAT
from consortia.errors import NotFoundError
from consortia.governance import statement_digest
from consortia.protocol.tensors import decode
from consortia.store.blobs import BlobStore
from consortia.store.entities import ModelVersion

__all__ = ["ReleaseBuilder", "write_bundle"]


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _part(root: Path, role: str, rel: str, data: bytes, **extra: Any) -> dict[str, Any]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"role": role, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **extra}


def write_bundle(root: Path, v: ModelVersion, params: dict[str, np.ndarray], threshold: float = 0.5) -> dict[str, Any]:
    """Write the release bundle of ``v`` into ``root``: the ONNX graph with preprocessing
    inside, one file per weight tensor, config, the smoke-test sample with the outputs
    the trained model gives for it, card, lineage, and the manifest over all of them."""
    import pandas as pd

    from consortia.ml.data import transform
    from consortia.ml.export import export_onnx, externalize, sample_inputs
    from consortia.ml.recipes import predict
    from consortia.protocol.schemas import PreprocessingPlan

    lin = v.lineage
    spec = lin["job"]["spec"]
    plan = PreprocessingPlan.model_validate(lin["preprocessing"])
    recipe, options = spec["recipe"]["name"], spec["recipe"].get("options", {})
    graph, tensors = externalize(export_onnx(recipe, options, params, plan), root)
    parts = [_part(root, "graph", "model.onnx", graph)]
    parts += [{"role": "tensor", "name": name, **t} for name, t in sorted(tensors.items())]
    inputs = {f["name"]: f["type"] for f in spec["features"]}
    config = {
        "recipe": spec["recipe"],
        "features": spec["features"],
        "label": spec["label"],
        "preprocessing": lin["preprocessing"],
        "threshold": threshold,
        "output": "probability of the positive class",
    }
    parts.append(_part(root, "config", "config.json", _dump(config)))
    sample = sample_inputs(plan, spec["features"])
    expected = predict(recipe, options, params, transform(pd.DataFrame(sample), plan))
    parts.append(_part(root, "sample", "sample.json", _dump(sample)))
    reference_scores: dict[str, Any] = {}
    reference_score_groups: dict[str, Any] = {}
    if lin.get("reference"):  # what serving agents compare their traffic with (monitoring)
        bins = {
            f["name"]: (
                {"kind": "numeric", "cuts": plan.cuts.get(f["name"], []), "bounds": plan.bounds.get(f["name"])}
                if f["type"] == "numeric"
                else {"kind": "categorical", "vocabulary": plan.categorical[f["name"]]}
            )
            for f in spec["features"]
        }
        # bins change with the plan, the data profile with the training data, the score
        # histograms with every model: three places, so a retrain or an adapter moves only
        # what changed (the scores ride in the manifest)
        parts.append(_part(root, "bins", "bins.json", _dump({"format": "consortia-bins/1", "bins": bins})))
        profile = {k: v for k, v in lin["reference"]["profile"].items() if k not in ("scores", "score_groups")}
        reference_scores = lin["reference"]["profile"].get("scores", {})
        reference_score_groups = lin["reference"]["profile"].get("score_groups", {})
        reference = {"format": "consortia-reference/1", "sites": lin["reference"]["sites"], "profile": profile}
        parts.append(_part(root, "reference", "reference.json", _dump(reference)))
    card = model_card(v)
    card["release_digest"] = None  # unknown until signed; the registry serves the live card
    parts.append(_part(root, "card", "model-card.json", _dump(card)))
    parts.append(_part(root, "card", "model-card.md", card_markdown(card).encode()))
    parts.append(_part(root, "lineage", "lineage.json", _dump(lin)))
    manifest = {
        "format": FORMAT,
        "model": v.model,
        "version": v.version,
        "params_hash": v.params_hash,
        "spec_hash": lin["job"]["spec_hash"],
        "created_at": v.created_at.isoformat(),
        "inputs": inputs,
        "output": "probability",
        "threshold": threshold,
        # monitoring: serving agents count decisions per group of the declared sensitive
        # attribute when it is one of the model's inputs
        "sensitive_attribute": next(
            (a for a in [(spec.get("card") or {}).get("sensitive_attribute")] if a in inputs), None
        ),
        "index": None,  # slot for a vector-index snapshot (a later release kind fills it)
        "sample": {"expected": [float(x) for x in expected], "tolerance": 1e-5},
        "reference_scores": reference_scores,  # the model's test scores per class (monitoring reference)
        "reference_score_groups": reference_score_groups,  # their coarsening, if any
        "parts": parts,
    }
    # compact: the manifest is the one file every update moves
    (root / "manifest.json").write_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    return manifest


class ReleaseBuilder:
    """Writes and signs release directories under ``root/<model>/<version>/``."""

    def __init__(self, root: Path, blobs: BlobStore, keys: CoordinatorKeys) -> None:
        self.root = root
        self.blobs = blobs
        self.keys = keys

    def paths(self, v: ModelVersion) -> tuple[Path, Path]:
        base = self.root / v.model / str(v.version)
        return base / "bundle", base / "model.sig"

    def build(self, v: ModelVersion) -> tuple[str, dict[str, str]]:
        """Write and sign the release of ``v``; returns (release digest, file digests).
        Content is a function of the version only, so a rebuild after a crash gives
        the same digest."""
        import model_signing

        bundle, sig = self.paths(v)
        tmp = bundle.with_name("bundle.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_bundle(tmp, v, decode(self.blobs.get(v.params_hash, verify=True))[0])
        shutil.rmtree(bundle, ignore_errors=True)
        tmp.rename(bundle)
        sig_tmp = sig.with_suffix(".sig.tmp")
        model_signing.signing.Config().use_elliptic_key_signer(private_key=self.keys.release_key_path).sign(
            bundle, sig_tmp
        )
        sig_tmp.replace(sig)
        return statement_digest(sig.read_bytes())

    def manifest(self, v: ModelVersion) -> dict[str, Any]:
        bundle, sig = self.paths(v)
        if v.release_digest is None or not sig.exists():
            raise NotFoundError(f"{v.ref} has no signed release yet.")
        digest, files = statement_digest(sig.read_bytes())
        return {
            "model": v.model,
            "version": v.version,
            "release_digest": digest,
            "files": files,
            "signature": json.loads(sig.read_bytes()),
            "public_key": self.keys.release_public_pem,
            "format": "OpenSSF model-signing v1 (Sigstore bundle, DSSE, in-toto statement), EC P-256 key",
        }

    def file(self, v: ModelVersion, name: str) -> bytes:
        """One file of the signed release, by its path in the manifest."""
        bundle, sig = self.paths(v)
        if v.release_digest is None or not sig.exists():
            raise NotFoundError(f"{v.ref} has no signed release yet.")
        _, files = statement_digest(sig.read_bytes())
        if name not in files:
            raise NotFoundError(f"release {v.ref} has no file {name!r}; see its manifest.")
        return (bundle / name).read_bytes()
