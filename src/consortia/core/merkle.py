"""Merkle trees with RFC 6962 hashing: the arithmetic behind the tamper-evident audit log.

Leaves hash as ``SHA-256(0x00 || data)`` and interior nodes as
``SHA-256(0x01 || left || right)``; a tree of ``n`` leaves splits at the largest power of
two below ``n`` (RFC 6962, section 2.1). Pure functions over bytes: no I/O.

A log that grows one leaf at a time keeps a *frontier*: the roots of the perfect
subtrees that the binary digits of its size describe, largest first. Appending is
``O(log n)`` and the root is a fold of the frontier, so a store can persist the frontier
with each entry and never reread the log to append.

References
----------
B. Laurie, A. Langley, E. Kasper. Certificate Transparency. RFC 6962, 2013, section 2.1.

Examples
--------
>>> leaves = [b"", b"\\x00", b"\\x10"]
>>> frontier: list[bytes] = []
>>> for i, leaf in enumerate(leaves):
...     frontier = append(frontier, i, leaf_hash(leaf))
>>> root_from_frontier(frontier) == root([leaf_hash(x) for x in leaves])
True
>>> proof = inclusion_proof(1, [leaf_hash(x) for x in leaves])
>>> verify_inclusion(leaf_hash(b"\\x00"), 1, 3, proof, root([leaf_hash(x) for x in leaves]))
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "append",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_frontier",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of already-hashed leaves (``EMPTY_ROOT`` for none)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def append(frontier: Sequence[bytes], size: int, leaf: bytes) -> list[bytes]:
    """The frontier after appending hashed ``leaf`` to a tree of ``size`` leaves."""
    if len(frontier) != bin(size).count("1"):
        raise ValueError(f"frontier has {len(frontier)} hashes but a tree of {size} leaves needs {size.bit_count()}.")
    out = list(frontier)
    out.append(leaf)
    # Each trailing 1 bit of ``size`` is a subtree of the same height as the new one.
    s = size
    while s & 1:
        right = out.pop()
        left = out.pop()
        out.append(node_hash(left, right))
        s >>= 1
    return out


def root_from_frontier(frontier: Sequence[bytes]) -> bytes:
    """Root of the tree a frontier describes (the smallest subtree is rightmost)."""
    if not frontier:
        return EMPTY_ROOT
    h = frontier[-1]
    for left in reversed(frontier[:-1]):
        h = node_hash(left, h)
    return h


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree of ``leaves`` (RFC 6962, 2.1.1)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"index == {index}, must be in [0, {n}).")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """Check an audit path, following the verification algorithm of RFC 9162, 2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root
