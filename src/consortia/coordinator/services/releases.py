"""Signed releases: a model version bound with its configuration, signed in the OpenSSF
model-signing format with the coordinator's EC P-256 key.

A release directory holds ``model.safetensors`` (the parameters), ``config.json``
(recipe, features, label, agreed preprocessing, decision threshold), ``release.json``
(model, version, hashes: binds the identity into the signed content),
``model-card.json`` / ``model-card.md`` and ``lineage.json``. ``model_signing`` hashes
every file into an in-toto statement and signs it (a Sigstore bundle with a DSSE
envelope, no transparency log: offline). The statement's subject digest is the
*release digest* that approvers sign. Anyone can check a release with the package's own
CLI: ``model_signing verify key DIR --public_key release-p256.pub.pem --signature SIG``.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

from consortia.coordinator.keys import CoordinatorKeys
from consortia.coordinator.services.lineage import card_markdown, model_card
from consortia.errors import NotFoundError, ValidationError
from consortia.store.blobs import BlobStore
from consortia.store.entities import ModelVersion

__all__ = ["RELEASE_FILES", "ReleaseBuilder", "statement_digest", "verify_release"]

RELEASE_FILES = ("config.json", "lineage.json", "model-card.json", "model-card.md", "model.safetensors", "release.json")


def statement_digest(signature_bundle: bytes) -> tuple[str, dict[str, str]]:
    """The subject digest and per-file digests from a model-signing bundle."""
    bundle = json.loads(signature_bundle)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    files = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    return str(statement["subject"][0]["digest"]["sha256"]), files


def verify_release(directory: Path, signature: Path, public_key: Path) -> None:
    """Verify with the model-signing package; raises :class:`ValidationError` on failure."""
    import model_signing

    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(directory, signature)
    except Exception as exc:  # the package raises ValueError and friends
        raise ValidationError(f"release signature does not verify: {exc}") from exc


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


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
        lin = v.lineage
        spec = lin["job"]["spec"]
        config = {
            "recipe": spec["recipe"],
            "features": spec["features"],
            "label": spec["label"],
            "preprocessing": lin["preprocessing"],
            "threshold": 0.5,
            "output": "probability of the positive class",
        }
        release = {
            "model": v.model,
            "version": v.version,
            "params_hash": v.params_hash,
            "spec_hash": lin["job"]["spec_hash"],
            "created_at": v.created_at.isoformat(),
        }
        card = model_card(v)
        card["release_digest"] = None  # unknown until signed; the registry serves the live card
        (tmp / "model.safetensors").write_bytes(self.blobs.get(v.params_hash, verify=True))
        (tmp / "config.json").write_bytes(_dump(config))
        (tmp / "release.json").write_bytes(_dump(release))
        (tmp / "lineage.json").write_bytes(_dump(lin))
        (tmp / "model-card.json").write_bytes(_dump(card))
        (tmp / "model-card.md").write_text(card_markdown(card))
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
        if name not in RELEASE_FILES:
            raise NotFoundError(f"a release has no file {name!r}; files are {list(RELEASE_FILES)}.")
        bundle, _ = self.paths(v)
        path = bundle / name
        if not path.is_file():
            raise NotFoundError(f"{v.ref} has no signed release yet.")
        return path.read_bytes()
