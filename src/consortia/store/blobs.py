"""Content-addressed blob store on the local file system.

A blob's name is the SHA-256 of its bytes; files live under ``root/ab/cd/<hash>`` (fan-out
keeps directories small). Writes go to a temporary file, are fsynced and renamed into
place, so a process killed mid-write leaves either no blob or a complete one, never a
torn one. Reads can verify the hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from consortia.errors import NotFoundError, ValidationError

__all__ = ["BlobStore", "sha256_hex"]

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Immutable blobs addressed by SHA-256 under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        if not _HASH_RE.match(digest):
            raise ValidationError(f"blob id {digest[:80]!r} is not a lowercase hex SHA-256.")
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its hash."""
        digest = sha256_hex(data)
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return digest

    def exists(self, digest: str) -> bool:
        return self._path(digest).exists()

    def get(self, digest: str, *, verify: bool = False) -> bytes:
        """Bytes of blob ``digest``; raises :class:`NotFoundError` if absent."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} not found.") from exc
        if verify and sha256_hex(data) != digest:
            raise ValidationError(f"blob {digest} is corrupt: its content hash differs.")
        return data

    def size(self, digest: str) -> int:
        try:
            return self._path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {digest} not found.") from exc
