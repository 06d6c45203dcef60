"""The coordinator's own keys, created on first start under ``HOME/keys`` (mode 0600).

- ``audit-ed25519.pem`` signs audit-log tree heads.
- ``release-p256.pem`` signs releases in the OpenSSF model-signing format, which accepts
  EC keys only (P-256/P-384/P-521), not Ed25519.
- ``director-ed25519.pem`` signs per-device instructions (which release a device runs).
- ``tuf/`` holds the TUF role keys (see :mod:`consortia.coordinator.tufrepo`).

Public halves are served at ``GET /v1/keys`` and written next to the private keys, so an
auditor can pin them out of band.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["CoordinatorKeys", "public_pem", "write_private"]


def write_private(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)


def public_pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_or_create(path: Path, make) -> object:  # type: ignore[no-untyped-def]
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = make()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(path, pem)
    path.with_suffix(".pub.pem").write_bytes(public_pem(key))
    return key


@dataclass
class CoordinatorKeys:
    audit: Ed25519PrivateKey
    release: ec.EllipticCurvePrivateKey
    release_key_path: Path
    director: Ed25519PrivateKey

    @classmethod
    def load_or_create(cls, directory: Path) -> CoordinatorKeys:
        audit = _load_or_create(directory / "audit-ed25519.pem", Ed25519PrivateKey.generate)
        release_path = directory / "release-p256.pem"
        release = _load_or_create(release_path, lambda: ec.generate_private_key(ec.SECP256R1()))
        director = _load_or_create(directory / "director-ed25519.pem", Ed25519PrivateKey.generate)
        if (
            not isinstance(audit, Ed25519PrivateKey)
            or not isinstance(release, ec.EllipticCurvePrivateKey)
            or not isinstance(director, Ed25519PrivateKey)
        ):
            raise ValueError(f"unexpected key types under {directory}; move the files away to create new keys.")
        return cls(audit, release, release_path, director)

    def sign_head(self, message: bytes) -> bytes:
        return self.audit.sign(message)

    @property
    def audit_public_pem(self) -> str:
        return public_pem(self.audit).decode()

    @property
    def director_public_pem(self) -> str:
        return public_pem(self.director).decode()

    @property
    def release_public_pem(self) -> str:
        return public_pem(self.release).decode()
