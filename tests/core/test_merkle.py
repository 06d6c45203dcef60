"""RFC 6962 Merkle hashing against the Certificate Transparency reference vectors
(transparency-dev/merkle, testonly/constants.go) and proofs for every leaf of 1..64."""

from __future__ import annotations

import pytest

from consortia.core.merkle import (
    EMPTY_ROOT,
    append,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_frontier,
    verify_inclusion,
)

DATA = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
LEAVES = [leaf_hash(bytes.fromhex(d)) for d in DATA]


def test_roots_match_rfc6962_vectors_for_every_size():
    assert EMPTY_ROOT.hex() == ROOTS[0]
    for n in range(0, 9):
        assert root(LEAVES[:n]).hex() == ROOTS[n], f"size {n}"


def test_frontier_gives_the_same_root_after_every_append():
    frontier: list[bytes] = []
    assert root_from_frontier(frontier).hex() == ROOTS[0]
    for i, leaf in enumerate(LEAVES):
        frontier = append(frontier, i, leaf)
        assert root_from_frontier(frontier).hex() == ROOTS[i + 1]
        assert len(frontier) == (i + 1).bit_count()


def test_reference_inclusion_proofs():
    for (index, size), path in INCLUSION.items():
        assert [p.hex() for p in inclusion_proof(index, LEAVES[:size])] == path
        assert verify_inclusion(LEAVES[index], index, size, [bytes.fromhex(p) for p in path], bytes.fromhex(ROOTS[8]))


@pytest.mark.parametrize("size", range(1, 65))
def test_every_leaf_proof_verifies_and_tampering_fails(size):
    leaves = [leaf_hash(f"entry-{i}".encode()) for i in range(size)]
    r = root(leaves)
    for i in range(size):
        proof = inclusion_proof(i, leaves)
        assert verify_inclusion(leaves[i], i, size, proof, r)
        # wrong leaf, wrong index, wrong root, a flipped proof byte: all refused. (A wrong
        # size is not always detectable from a path alone; the signed head binds size to root.)
        assert not verify_inclusion(leaf_hash(b"forged"), i, size, proof, r)
        if size > 1:
            assert not verify_inclusion(leaves[i], (i + 1) % size, size, proof, r)
        assert not verify_inclusion(leaves[i], i, size, proof, node_hash(r, r))
        if proof:
            bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
            assert not verify_inclusion(leaves[i], i, size, bad, r)


def test_append_rejects_a_frontier_of_the_wrong_shape():
    with pytest.raises(ValueError, match="frontier has 0 hashes"):
        append([], 3, LEAVES[0])
    with pytest.raises(ValueError, match="index == 4"):
        inclusion_proof(4, LEAVES[:4])
