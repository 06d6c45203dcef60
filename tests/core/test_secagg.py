"""SecAgg+: exact sums under dropouts, aborts, refused unmask requests, 256-bit masks."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from consortia.core.secagg import (
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggRefusal,
    ServerSession,
    SiteSession,
    combine_shares,
    dequantize,
    expand_mask,
    quantize,
    split_secret,
)

N, T = 20, 14


def _config(n=N, t=T, degree=None, seed=0):
    return SecAggConfig(
        sites=tuple(range(100, 100 + n)),
        threshold=t,
        clip_range=1.0,
        context=b"job-7/round-3/attempt-0",
        graph_seed=seed,
        degree=n - 1 if degree is None else degree,
    )


def run_round(config, values, drops=None, weights=None, seed=0):
    """Drive one round in process; ``drops[stage]`` stop answering at that stage (1-4).

    Returns ``(server, sum, survivors, expected_quantised_sum)``.
    """
    drops = drops or {}
    size = values.shape[1]
    sites = {s: SiteSession(config, s) for s in config.sites}
    server = ServerSession(config, size)
    alive = set(config.sites)
    quantised = {}

    alive -= set(drops.get(1, ()))
    for s in sorted(alive):
        server.add_keys(s, *sites[s].advertise())
    alive -= set(drops.get(2, ()))
    for s in sorted(alive):
        server.add_ciphertexts(s, sites[s].share_keys(server.keys_for(s)))
    alive -= set(drops.get(3, ()))
    for i, s in enumerate(config.sites):
        if s not in alive:
            continue
        w = 1.0 if weights is None else weights[i]
        rng = np.random.default_rng(seed + i)
        # the plaintext this site masks, for the test's comparison only
        q_rng = np.random.default_rng(seed + i)
        quantised[s] = np.concatenate(
            [
                quantize(np.array([w]), 1.0, config.bits, q_rng),
                quantize(values[i] * w, config.clip_range, config.bits, q_rng),
            ]
        )
        server.add_masked(s, sites[s].masked_input(values[i], w, server.ciphertexts_for(s), rng))
    alive -= set(drops.get(4, ()))
    for s in sorted(alive):
        server.add_unmask(s, sites[s].unmask(*server.unmask_request(s)))
    total, count = server.finish()
    expected = np.zeros(size + 1, np.uint32)
    for q in quantised.values():
        expected += q
    return server, total, count, expected, sites


def _values(n=N, size=50, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, size))


def test_without_dropouts_the_sum_is_exact_and_dequantises_to_the_plain_sum():
    values = _values()
    _, total, count, expected, _ = run_round(_config(), values)
    np.testing.assert_array_equal(total, expected)
    assert count == N
    plain = dequantize(total, 1.0, _config().bits, count)
    assert plain[0] == pytest.approx(N, abs=1e-4)  # summed weights
    np.testing.assert_allclose(plain[1:], values.sum(axis=0), atol=N * 2.0 / 2 ** _config().bits)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_dropping_n_minus_t_sites_at_any_stage_still_gives_the_exact_sum(stage):
    victims = list(_config().sites[3 : 3 + N - T])
    _, total, count, expected, _ = run_round(_config(), _values(), drops={stage: victims})
    np.testing.assert_array_equal(total, expected)
    assert count == (N - len(victims) if stage < 4 else N)


def test_dropouts_spread_over_every_stage_still_give_the_exact_sum():
    s = _config().sites
    drops = {1: [s[0]], 2: [s[5], s[6]], 3: [s[9], s[10]], 4: [s[19]]}
    _, total, count, expected, _ = run_round(_config(), _values(), drops=drops)
    np.testing.assert_array_equal(total, expected)
    assert count == N - 5


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_n_minus_t_plus_one_dropouts_abort_with_no_output(stage):
    victims = list(_config().sites[: N - T + 1])
    with pytest.raises((SecAggAbort, SecAggRefusal)):
        run_round(_config(), _values(), drops={stage: victims})


def test_a_sparse_neighbour_graph_sums_exactly_with_a_dropout():
    config = _config(n=40, t=5, degree=8)
    assert all(len(v) == 8 for v in config.neighbours().values())
    values = _values(n=40)
    _, total, count, expected, _ = run_round(config, values, drops={3: [config.sites[7]]})
    np.testing.assert_array_equal(total, expected)
    assert count == 39


@pytest.mark.parametrize("clip_range", [1.0, 0.05])
def test_weighted_inputs_carry_their_weights_whatever_the_clip_range(clip_range):
    values = _values(n=6) * 0.04  # inside the smaller range too
    weights = [1.0, 0.5, 0.25, 1.0, 0.1, 0.8]
    base = _config(n=6, t=4)
    config = SecAggConfig(base.sites, 4, clip_range, base.context, 0, 5)
    _, total, count, _, _ = run_round(config, values, weights=weights)
    weight_sum, summed = config.decode(total, count)
    assert weight_sum == pytest.approx(sum(weights), abs=1e-5)
    exact = (values * np.array(weights)[:, None]).sum(axis=0) / sum(weights)
    np.testing.assert_allclose(summed / weight_sum, exact, atol=1e-5)


# ------------------------------------------------------------------ malicious unmask requests


def _stage3(config):
    sites = {s: SiteSession(config, s) for s in config.sites}
    server = ServerSession(config, 4)
    for s in config.sites:
        server.add_keys(s, *sites[s].advertise())
    for s in config.sites:
        server.add_ciphertexts(s, sites[s].share_keys(server.keys_for(s)))
    for i, s in enumerate(config.sites):
        server.add_masked(
            s, sites[s].masked_input(np.zeros(4), 1.0, server.ciphertexts_for(s), np.random.default_rng(i))
        )
    return sites, server


def test_a_site_listed_as_both_active_and_dropped_is_refused():
    config = _config(n=6, t=4)
    sites, server = _stage3(config)
    me, victim = config.sites[0], config.sites[1]
    active, _ = server.unmask_request(me)
    with pytest.raises(SecAggRefusal, match=r"both active and dropped"):
        sites[me].unmask(active, [victim])  # would reveal b and s of the victim: its update


def test_too_few_active_neighbours_is_refused():
    config = _config(n=6, t=4)
    sites, _ = _stage3(config)
    s = config.sites
    with pytest.raises(SecAggRefusal, match=r"only 3 active"):
        sites[s[0]].unmask([s[0], s[1], s[2]], [s[3], s[4], s[5]])


def test_a_second_unmask_request_in_the_same_round_is_refused():
    config = _config(n=6, t=4)
    sites, server = _stage3(config)
    me = config.sites[0]
    sites[me].unmask(*server.unmask_request(me))
    with pytest.raises(SecAggRefusal, match="already answered"):
        sites[me].unmask(config.sites[:5], [config.sites[5]])


def test_a_request_naming_sites_that_never_shared_is_refused():
    config = _config(n=6, t=4)
    sites, _ = _stage3(config)
    s = config.sites
    with pytest.raises(SecAggRefusal, match=r"never shared keys"):
        sites[s[0]].unmask(list(s), [999])


def test_a_tampered_or_misrouted_share_does_not_decrypt():
    config = _config(n=4, t=3)
    sites = {s: SiteSession(config, s) for s in config.sites}
    server = ServerSession(config, 2)
    for s in config.sites:
        server.add_keys(s, *sites[s].advertise())
    for s in config.sites:
        server.add_ciphertexts(s, sites[s].share_keys(server.keys_for(s)))
    a, b, c = config.sites[:3]
    cts = server.ciphertexts_for(a)
    cts[b] = cts[c]  # the server swaps who a share comes from
    with pytest.raises(SecAggError, match="does not decrypt"):
        sites[a].masked_input(np.zeros(2), 1.0, cts, np.random.default_rng(0))


# ------------------------------------------------------------------ masks and secrets


def test_seeds_that_collide_under_a_32_bit_xor_fold_give_different_masks():
    a = secrets.token_bytes(32)
    words = np.frombuffer(a, dtype="<u4").copy()
    words[0] ^= 0xDEADBEEF
    words[1] ^= 0xDEADBEEF  # the XOR of all eight words is unchanged
    b = words.tobytes()
    fold = lambda s: np.bitwise_xor.reduce(np.frombuffer(s, dtype="<u4"))  # noqa: E731
    assert a != b and fold(a) == fold(b)
    ma, mb = expand_mask(a, 1000), expand_mask(b, 1000)
    assert np.mean(ma == mb) < 0.01


def test_masked_inputs_look_uniform_and_never_equal_the_plain_input():
    config = _config(n=6, t=4)
    # A site masking an all-zero update: its words are spread over the whole range.
    fresh_sites = {s: SiteSession(config, s) for s in config.sites}
    fresh = ServerSession(config, 20_000)
    for s in config.sites:
        fresh.add_keys(s, *fresh_sites[s].advertise())
    for s in config.sites:
        fresh.add_ciphertexts(s, fresh_sites[s].share_keys(fresh.keys_for(s)))
    first = config.sites[0]
    y = fresh_sites[first].masked_input(np.zeros(20_000), 1.0, fresh.ciphertexts_for(first), np.random.default_rng(0))
    counts = np.bincount((y >> np.uint32(28)).astype(int), minlength=16)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 40  # 15 degrees of freedom; p ~ 5e-4 at 40
    plain = quantize(np.zeros(20_001), 1.0, config.bits, np.random.default_rng(0))
    assert np.mean(y == plain) < 0.001


def test_the_server_holds_only_a_running_sum_of_masked_inputs():
    config = _config(n=6, t=4)
    values = _values(n=6, size=8)
    server, _, _, _, _ = run_round(config, values, drops={3: [config.sites[2]]})
    held = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    assert len(held) == 1 and held[0].shape == (9,)  # the running masked sum, nothing per site
    for i in range(6):
        q = quantize(np.concatenate([[1.0], values[i]]), 1.0, config.bits, np.random.default_rng(i))
        assert not np.array_equal(held[0], q)


def test_shamir_reconstructs_from_any_t_shares_and_not_from_fewer():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 5, list(range(9)))
    for pick in ([0, 1, 2, 3, 4], [8, 6, 4, 2, 0], [1, 3, 5, 7, 8]):
        assert combine_shares({i: shares[i] for i in pick}, 5) == secret
    with pytest.raises(SecAggAbort):
        combine_shares({i: shares[i] for i in range(4)}, 5)
    leading_zero = b"\x00\x00" + secret[2:]
    assert combine_shares(split_secret(leading_zero, 2, [0, 1]), 2) == leading_zero


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1}, "threshold == 1"),
        ({"threshold": 21}, "threshold == 21"),
        ({"clip_range": 0.0}, "clip_range == 0.0"),
        ({"sites": (1, 1, 2)}, "2 distinct sites"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    base = {
        "sites": tuple(range(N)),
        "threshold": T,
        "clip_range": 1.0,
        "context": b"c",
        "graph_seed": 0,
        "degree": N - 1,
    }
    with pytest.raises(SecAggError, match=message):
        SecAggConfig(**{**base, **kwargs})


def test_a_masked_input_of_the_wrong_shape_is_refused_and_the_sum_untouched():
    config = _config(n=4, t=3)
    sites, server = _stage3(config)
    before = server._sum.copy()
    with pytest.raises(SecAggError, match="uint32 of length 5"):
        server.add_masked(config.sites[0], np.zeros(3, np.uint32))
    np.testing.assert_array_equal(server._sum, before)
