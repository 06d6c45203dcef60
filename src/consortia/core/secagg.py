"""Secure aggregation after SecAgg+ (Bell et al. 2020): the coordinator learns only the sum.

A round runs in four stages; every site keeps a :class:`SiteSession`, the coordinator a
:class:`ServerSession`, and the messages between them are plain bytes and integers (the
coordinator routes them; this module does no I/O):

1. **advertise**: each site makes two X25519 key pairs, one to encrypt shares (``c``) and
   one to agree pairwise masks (``s``), and publishes both public keys.
2. **share keys**: each site draws a self-mask seed ``b`` (32 bytes from ``secrets``),
   Shamir-shares ``b`` and its mask private key over a prime field (threshold ``t``) among
   its neighbours in a random ``k``-regular graph, and encrypts each neighbour's share
   with AES-GCM under a key from X25519 + HKDF. The coordinator only relays ciphertexts.
3. **masked input**: each site quantises its (clipped) update to fixed point modulo
   ``2^32`` and adds ``PRG(b)`` and, for each neighbour ``j`` that shared keys,
   ``+/- PRG(s_ij)``; the PRG is AES-256-CTR keyed by the whole 256-bit seed (never
   folded to 32 bits).
4. **unmask**: the coordinator sends each survivor the lists of neighbours that sent a
   masked input (active) and that did not (dropped). A site refuses unless the lists are
   disjoint, name only its neighbours, include itself as active, and leave at least ``t``
   active members of its closed neighbourhood; it then reveals shares of ``b`` for the
   active and of the mask key for the dropped, never both for one site. The coordinator
   reconstructs and removes the masks; if any needed secret has fewer than ``t`` shares
   it raises :class:`SecAggAbort` and outputs nothing.

Weighted averaging masks ``[a_k, a_k * x_k]`` with ``a_k = n_k / max_j n_j``: the
coordinator divides the summed update by the summed weight.

``t`` counts members of a closed neighbourhood (the site and its ``k`` neighbours). With
the complete graph (``k = n - 1``) that is plain SecAgg: any ``n - t`` sites may drop and
``n - t + 1`` abort the round.

References
----------
Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)
Logarithmic Overhead", CCS 2020 (SecAgg+).
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (SecAgg).
Shamir, "How to Share a Secret", CACM 1979.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consortia.errors import ConsortiaError

__all__ = [
    "PRIME",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggError",
    "SecAggRefusal",
    "ServerSession",
    "SiteSession",
    "combine_shares",
    "dequantize",
    "expand_mask",
    "harary_neighbours",
    "quantize",
    "split_secret",
]

PRIME = 2**521 - 1  # a Mersenne prime above any 256-bit secret
MOD = 2**32


class SecAggError(ConsortiaError):
    """Secure aggregation could not proceed (bad message, bad parameters)."""

    code = "secagg_error"


class SecAggRefusal(SecAggError):
    """A site refused an unmask request that could reveal an individual update."""

    code = "secagg_refused"


class SecAggAbort(SecAggError):
    """Too few sites survived to remove the masks; the round has no output."""

    code = "secagg_aborted"


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SecAggConfig:
    """One round's public parameters, fixed by the coordinator before stage 1.

    Parameters
    ----------
    sites
        The participating site ids (distinct integers).
    threshold
        ``t``: surviving members each closed neighbourhood needs (``2 <= t <= k + 1``).
    degree
        ``k``: neighbours per site (even, or ``n - 1``); default ``min(n - 1, 2 ceil(log2 n) + 2)``
        rounded up to even.
    clip_range
        Update values are clipped to ``[-clip_range, clip_range]`` before quantisation.
    context
        Bytes naming the round (job, round, attempt): bound into every key and ciphertext,
        so nothing from one round is accepted in another.
    graph_seed
        Public seed of the neighbour graph's permutation (the coordinator draws it).
    """

    sites: tuple[int, ...]
    threshold: int
    clip_range: float
    context: bytes
    graph_seed: int
    degree: int | None = None

    def __post_init__(self) -> None:
        n = len(self.sites)
        if n < 2 or len(set(self.sites)) != n:
            raise SecAggError(f"secure aggregation needs at least 2 distinct sites, got {list(self.sites)}.")
        k = self.k
        if not (2 <= self.threshold <= k + 1):
            raise SecAggError(
                f"threshold == {self.threshold}, must be in [2, k + 1 = {k + 1}] (k = {k} neighbours per site)."
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise SecAggError(f"clip_range == {self.clip_range!r}, must be a finite number > 0.")

    @property
    def k(self) -> int:
        n = len(self.sites)
        k = min(n - 1, 2 * math.ceil(math.log2(n)) + 2) if self.degree is None else self.degree
        if k < n - 1 and k % 2:
            k += 1
        if not (1 <= k <= n - 1):
            raise SecAggError(f"degree == {self.degree}, must be in [1, n - 1 = {n - 1}].")
        return min(k, n - 1)

    @property
    def bits(self) -> int:
        """Bits per quantised value so that the sum of ``n`` values never wraps."""
        return 32 - max(1, math.ceil(math.log2(len(self.sites) + 1)))

    def neighbours(self) -> dict[int, tuple[int, ...]]:
        return harary_neighbours(self.sites, self.k, self.graph_seed)

    def decode(self, total: np.ndarray, count: int) -> tuple[float, np.ndarray]:
        """``(sum of weights, sum of weight * values)`` from an unmasked sum of ``count``
        inputs (the weight is quantised on [-1, 1], the values on ``clip_range``)."""
        weight = float(dequantize(total[:1], 1.0, self.bits, count)[0])
        return weight, dequantize(total[1:], self.clip_range, self.bits, count)


def harary_neighbours(sites: Sequence[int], k: int, seed: int) -> dict[int, tuple[int, ...]]:
    """A random ``k``-regular graph: the Harary graph on a seeded permutation of ``sites``
    (each site linked to the ``k / 2`` nearest on either side of a ring), as in Bell et
    al.; ``k = n - 1`` is the complete graph.

    Examples
    --------
    >>> g = harary_neighbours(list(range(6)), 2, seed=1)
    >>> sorted(len(v) for v in g.values()), all(i in g[j] for i in g for j in g[i])
    ([2, 2, 2, 2, 2, 2], True)
    """
    n = len(sites)
    if k >= n - 1:
        return {s: tuple(sorted(x for x in sites if x != s)) for s in sites}
    order = [sites[i] for i in np.random.default_rng(seed).permutation(n)]
    out: dict[int, set[int]] = {s: set() for s in sites}
    for pos, s in enumerate(order):
        for step in range(1, k // 2 + 1):
            for other in (order[(pos + step) % n], order[(pos - step) % n]):
                out[s].add(other)
    return {s: tuple(sorted(v)) for s, v in out.items()}


# ----------------------------------------------------------------------------- fixed point


def quantize(values: np.ndarray, clip_range: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to ``[-clip_range, clip_range]`` and map to ``[0, 2^bits - 1]`` with unbiased
    stochastic rounding; returns uint32.

    Examples
    --------
    >>> import numpy as np
    >>> q = quantize(np.array([-1.0, 0.0, 1.0, 9.0]), 1.0, 8, np.random.default_rng(0))
    >>> q.tolist()[0], q.tolist()[2], q.tolist()[3]
    (0, 255, 255)
    """
    levels = 2**bits - 1
    x = np.array(values, np.float64)  # a copy, worked on in place (this runs on every update)
    np.clip(x, -clip_range, clip_range, out=x)
    x += clip_range
    x *= levels / (2.0 * clip_range)
    low = np.floor(x)
    x -= low  # the fractional part: round up with that probability
    low += rng.random(x.shape) < x
    np.minimum(low, levels, out=low)
    return low.astype(np.uint32)


def dequantize(total: np.ndarray, clip_range: float, bits: int, count: int) -> np.ndarray:
    """Invert :func:`quantize` for a sum of ``count`` quantised vectors.

    Examples
    --------
    >>> import numpy as np
    >>> dequantize(np.array([255 + 0], np.uint32), 1.0, 8, 2).tolist()  # 1.0 + (-1.0)
    [0.0]
    """
    levels = 2**bits - 1
    return np.asarray(total, np.float64) * (2.0 * clip_range / levels) - count * clip_range


def expand_mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint32 words (a read-only view) of AES-256-CTR keystream keyed by the whole 32-byte seed.

    Examples
    --------
    >>> a = expand_mask(bytes(32), 4)
    >>> b = expand_mask(bytes(31) + b"\\x01", 4)
    >>> a.dtype.name, bool((a != b).any())
    ('uint32', True)
    """
    if len(seed) != 32:
        raise SecAggError(f"mask seed has {len(seed)} bytes, expected 32.")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(4 * size)) + enc.finalize(), dtype="<u4")  # read-only, no copy


# ----------------------------------------------------------------------------- Shamir


def split_secret(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Shamir shares of a secret of at most 64 bytes: ``{holder: f(x_holder)}`` over
    ``GF(2^521 - 1)`` with a random degree ``threshold - 1`` polynomial, ``x = holder + 1``.

    Examples
    --------
    >>> shares = split_secret(b"key", 3, [0, 1, 2, 3, 4])
    >>> combine_shares({i: shares[i] for i in (0, 2, 4)}, 3)
    b'key'
    """
    if len(secret) > 64:
        raise SecAggError("secret longer than 64 bytes.")
    if not (1 <= threshold <= len(holders)):
        raise SecAggError(f"threshold {threshold} with {len(holders)} holders.")
    value = int.from_bytes(b"\x01" + secret, "big")  # a leading 1 keeps leading zero bytes
    coeffs = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, int] = {}
    for h in holders:
        x, acc = h + 1, 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out[h] = acc
    return out


def combine_shares(shares: Mapping[int, int], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from ``threshold`` shares ``{holder: y}``."""
    if len(shares) < threshold:
        raise SecAggAbort(f"{len(shares)} share(s), {threshold} needed.")
    points = sorted(shares.items())[:threshold]
    value = 0
    for i, (hi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (hj, _) in enumerate(points):
            if i != j:
                num = num * (-(hj + 1)) % PRIME
                den = den * ((hi + 1) - (hj + 1)) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1:
        raise SecAggAbort("shares do not reconstruct a well-formed secret (corrupted share?).")
    return raw[1:]


# ----------------------------------------------------------------------------- key agreement


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pairwise_seed(own: X25519PrivateKey, other_pk: bytes, context: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_pk))
    return _hkdf(shared, b"consortia/secagg/pairwise-mask/" + context)


def _share_key(own: X25519PrivateKey, other_pk: bytes, context: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_pk))
    return _hkdf(shared, b"consortia/secagg/share-encryption/" + context)


def _aad(context: bytes, sender: int, recipient: int) -> bytes:
    return context + struct.pack(">qq", sender, recipient)


def _encode_share(b_share: int, s_share: int) -> bytes:
    return b_share.to_bytes(66, "big") + s_share.to_bytes(66, "big")


def _decode_share(raw: bytes) -> tuple[int, int]:
    if len(raw) != 132:
        raise SecAggError("share plaintext has the wrong length.")
    return int.from_bytes(raw[:66], "big"), int.from_bytes(raw[66:], "big")


def _pairwise_total(site: int, seeds: Mapping[int, bytes], size: int) -> np.ndarray:
    """``sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)`` modulo 2^32."""
    total = np.zeros(size, np.uint32)
    for other, seed in seeds.items():
        mask = expand_mask(seed, size)
        if other > site:
            total += mask
        else:
            total -= mask
    return total


# ----------------------------------------------------------------------------- site side


@dataclass
class SiteSession:
    """One site's state for one secure-aggregation round."""

    config: SecAggConfig
    site: int
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    _share_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    _unmasked: bool = False

    def __post_init__(self) -> None:
        if self.site not in self.config.sites:
            raise SecAggError(f"site {self.site} is not part of this round.")
        self.neighbours = self.config.neighbours()[self.site]

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: ``(c_public, s_public)``, 32 bytes each."""
        return self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw()

    def share_keys(self, keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: given the neighbours' advertised keys, return one ciphertext per
        neighbour (nonce + AES-GCM) holding its shares of ``b`` and of ``s``."""
        unknown = sorted(set(keys) - set(self.neighbours) - {self.site})
        if unknown:
            raise SecAggError(f"keys offered for non-neighbours {unknown}.")
        peers = sorted(j for j in keys if j != self.site)
        if len(peers) + 1 < self.config.threshold:
            raise SecAggAbort(
                f"site {self.site}: {len(peers)} neighbour(s) advertised keys; threshold {self.config.threshold} "
                "cannot be met."
            )
        pairs = {tuple(v) for v in keys.values()}
        if len(pairs) != len(keys):
            raise SecAggError("two sites advertised the same keys.")
        self._keys = {j: (bytes(keys[j][0]), bytes(keys[j][1])) for j in peers}
        holders = [*peers, self.site]
        b_shares = split_secret(self._b, self.config.threshold, holders)
        s_shares = split_secret(self._s.private_bytes_raw(), self.config.threshold, holders)
        self._held[self.site] = (b_shares[self.site], s_shares[self.site])
        out: dict[int, bytes] = {}
        for j in peers:
            key = self._share_keys[j] = _share_key(self._c, self._keys[j][0], self.config.context)
            nonce = secrets.token_bytes(12)
            ct = AESGCM(key).encrypt(
                nonce, _encode_share(b_shares[j], s_shares[j]), _aad(self.config.context, self.site, j)
            )
            out[j] = nonce + ct
        return out

    def masked_input(
        self, values: np.ndarray, weight: float, ciphertexts: Mapping[int, bytes], rng: np.random.Generator
    ) -> np.ndarray:
        """Stage 3: decrypt the shares received from neighbours (those are the sites that
        completed stage 2) and return ``quantise([weight, weight * values]) + masks``.

        ``weight`` is the site's share of the largest example count (in (0, 1]).
        """
        if not (0.0 < weight <= 1.0):
            raise SecAggError(f"weight == {weight!r}, must be in (0, 1] (n_k / max n).")
        for j, blob in ciphertexts.items():
            if j not in self._keys:
                raise SecAggError(f"ciphertext from {j}, which is not a neighbour that advertised keys.")
            key = self._share_keys.get(j) or _share_key(self._c, self._keys[j][0], self.config.context)
            try:
                plain = AESGCM(key).decrypt(blob[:12], blob[12:], _aad(self.config.context, j, self.site))
            except InvalidTag as exc:
                raise SecAggError(f"share from site {j} does not decrypt (tampered or misrouted).") from exc
            self._held[j] = _decode_share(plain)
        survivors = sorted(ciphertexts)
        if len(survivors) + 1 < self.config.threshold:
            raise SecAggAbort(f"site {self.site}: only {len(survivors)} neighbour(s) shared keys.")
        bits = self.config.bits
        q = np.concatenate(  # the weight in (0, 1] on its own range, the values on clip_range
            [
                quantize(np.array([weight]), 1.0, bits, rng),
                quantize(np.asarray(values, np.float64).reshape(-1) * weight, self.config.clip_range, bits, rng),
            ]
        )
        q += expand_mask(self._b, q.size)
        seeds = {j: _pairwise_seed(self._s, self._keys[j][1], self.config.context) for j in survivors}
        q += _pairwise_total(self.site, seeds, q.size)
        return q

    def unmask(self, active: Iterable[int], dropped: Iterable[int]) -> dict[int, tuple[str, int]]:
        """Stage 4: check the request, then ``{site: ("b" | "s", share)}``.

        Raises :class:`SecAggRefusal` when the lists overlap, name a site this one did
        not hold shares for, leave itself out, leave fewer than ``t`` active members of
        its closed neighbourhood, or when a second request arrives for the round.
        """
        active, dropped = set(active), set(dropped)
        if self._unmasked:
            raise SecAggRefusal(f"site {self.site} already answered an unmask request this round.")
        both = sorted(active & dropped)
        if both:
            raise SecAggRefusal(f"site(s) {both} are listed as both active and dropped; refusing to reveal shares.")
        if self.site not in active:
            raise SecAggRefusal(f"site {self.site} is not in its own active list.")
        strangers = sorted((active | dropped) - set(self._held))
        if strangers:
            raise SecAggRefusal(f"site(s) {strangers} never shared keys with site {self.site}.")
        if len(active) < self.config.threshold:
            raise SecAggRefusal(
                f"only {len(active)} active member(s) of site {self.site}'s neighbourhood, threshold is "
                f"{self.config.threshold}; refusing to reveal shares."
            )
        self._unmasked = True
        out: dict[int, tuple[str, int]] = {}
        for j in active:
            out[j] = ("b", self._held[j][0])
        for j in dropped:
            out[j] = ("s", self._held[j][1])
        return out


# ----------------------------------------------------------------------------- server side


@dataclass
class ServerSession:
    """The coordinator's state for one round: routes messages, folds masked inputs into
    one running sum modulo 2^32 (no individual masked input is kept) and removes masks.
    """

    config: SecAggConfig
    size: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: set[int] = field(default_factory=set)
    _sum: np.ndarray | None = field(default=None, repr=False)
    _shares: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.graph = self.config.neighbours()
        self._sum = np.zeros(self.size + 1, np.uint32)

    def _check_site(self, site: int) -> None:
        if site not in self.graph:
            raise SecAggError(f"site {site} is not part of this round.")

    # stage 1
    def add_keys(self, site: int, c_pk: bytes, s_pk: bytes) -> None:
        self._check_site(site)
        if len(c_pk) != 32 or len(s_pk) != 32:
            raise SecAggError("public keys must be 32 raw bytes (X25519).")
        self.keys.setdefault(site, (bytes(c_pk), bytes(s_pk)))

    def keys_for(self, site: int) -> dict[int, tuple[bytes, bytes]]:
        """What ``site`` receives after stage 1: its neighbours' keys (and its own)."""
        return {j: self.keys[j] for j in (*self.graph[site], site) if j in self.keys}

    # stage 2
    def add_ciphertexts(self, site: int, cts: Mapping[int, bytes]) -> None:
        self._check_site(site)
        if site not in self.keys:
            raise SecAggError(f"site {site} sent shares without advertising keys.")
        bad = sorted(set(cts) - set(self.graph[site]))
        if bad:
            raise SecAggError(f"site {site} sent shares for non-neighbours {bad}.")
        self.shared.setdefault(site, dict(cts))

    def ciphertexts_for(self, site: int) -> dict[int, bytes]:
        """What ``site`` receives after stage 2: ciphertexts addressed to it."""
        return {j: cts[site] for j, cts in self.shared.items() if site in cts and j in self.shared}

    # stage 3
    def add_masked(self, site: int, vector: np.ndarray) -> None:
        self._check_site(site)
        if site not in self.shared:
            raise SecAggError(f"site {site} sent a masked input without sharing keys.")
        v = np.asarray(vector)
        if v.dtype != np.uint32 or v.shape != (self.size + 1,):
            raise SecAggError(f"masked input must be uint32 of length {self.size + 1}, got {v.dtype} {v.shape}.")
        if site in self.masked:
            return  # a retried upload counts once
        assert self._sum is not None
        self._sum += v  # wraps modulo 2^32
        self.masked.add(site)

    def unmask_request(self, site: int) -> tuple[list[int], list[int]]:
        """Stage 4 request for ``site``: its active and dropped neighbours (and itself)."""
        closed = [*self.graph[site], site]
        active = sorted(j for j in closed if j in self.masked)
        dropped = sorted(j for j in closed if j in self.shared and j not in self.masked)
        return active, dropped

    def add_unmask(self, site: int, shares: Mapping[int, tuple[str, int]]) -> None:
        self._check_site(site)
        if site not in self.masked:
            raise SecAggError(f"site {site} sent unmask shares without a masked input.")
        self._shares.setdefault(site, dict(shares))

    def finish(self) -> tuple[np.ndarray, int]:
        """Remove the masks: ``(quantised sum of [weight, weight * values], sites)``.

        Raises :class:`SecAggAbort` (and keeps no output) when fewer than ``t`` sites
        sent masked inputs or any needed secret has fewer than ``t`` shares.
        """
        t = self.config.threshold
        if len(self.masked) < t:
            raise SecAggAbort(f"{len(self.masked)} site(s) sent masked inputs; threshold is {t}.")
        assert self._sum is not None
        total = self._sum.copy()
        n = self.size + 1
        for j in sorted(self.masked):
            got = {h: s[j][1] for h, s in self._shares.items() if j in s and s[j][0] == "b"}
            if len(got) < t:
                raise SecAggAbort(f"site {j}'s self mask has {len(got)} share(s), threshold is {t}.")
            total -= expand_mask(combine_shares(got, t), n)
        for j in sorted(set(self.shared) - self.masked):
            got = {h: s[j][1] for h, s in self._shares.items() if j in s and s[j][0] == "s"}
            if len(got) < t:
                raise SecAggAbort(f"dropped site {j}'s mask key has {len(got)} share(s), threshold is {t}.")
            sk = X25519PrivateKey.from_private_bytes(combine_shares(got, t))
            # The survivors added +/-PRG(s_ij) for the dropped j; j's own term was never sent.
            seeds = {
                i: _pairwise_seed(sk, self.keys[i][1], self.config.context)
                for i in self.graph[j]
                if i in self.masked and j in self.shared.get(i, {})
            }
            total += _pairwise_total(j, seeds, n)  # j's sign convention, added back = removed
        return total, len(self.masked)
