"""Compression: bytes on the wire, unbiasedness, error feedback, malformed wire tensors."""

from __future__ import annotations

import numpy as np
import pytest

from consortia.core.compression import compress, decompress, wire_bytes
from consortia.errors import StrategyError, UpdateError


def _delta(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.normal(0, 0.01, (64, 200)).astype(np.float32),
        "0.bias": rng.normal(0, 0.01, 64).astype(np.float32),
    }


def _fp32_bytes(d):
    return sum(v.nbytes for v in d.values())


@pytest.mark.parametrize(("method", "most"), [("none", 1.0), ("fp16", 0.5), ("int8", 0.26), ("topk", 0.03)])
def test_bytes_per_update_relative_to_fp32(method, most):
    d = _delta()
    wire, _ = compress(d, method, rng=np.random.default_rng(0), ratio=0.01)
    assert wire_bytes(wire) / _fp32_bytes(d) <= most


def test_int8_is_unbiased():
    d = {"w": np.linspace(-1, 1, 101, dtype=np.float32)}
    rng = np.random.default_rng(1)
    mean = np.mean([decompress(compress(d, "int8", rng=rng)[0], d)["w"] for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, d["w"], atol=4 * (1 / 127) / np.sqrt(4000) * 0.5 + 1e-4)


def test_fp16_round_trip_is_close():
    d = _delta()
    back = decompress(compress(d, "fp16", rng=np.random.default_rng(0))[0], d)
    for k in d:
        np.testing.assert_allclose(back[k], d[k], rtol=1e-3, atol=1e-7)


def test_topk_error_feedback_loses_nothing_only_delays_it():
    rng = np.random.default_rng(2)
    shape = {"w": np.zeros((20, 30), np.float32)}
    residual = None
    sent_total = np.zeros((20, 30))
    true_total = np.zeros((20, 30))
    for _ in range(50):
        d = {"w": rng.normal(size=(20, 30)).astype(np.float32)}
        true_total += d["w"]
        wire, residual = compress(d, "topk", rng=rng, ratio=0.05, residual=residual)
        sent_total += decompress(wire, shape)["w"]
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-2)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ({"w::f32": np.zeros(4, np.float32), "x::f32": np.zeros(1, np.float32)}, "names no tensor"),
        ({}, "lacks tensor"),
        ({"w::f32": np.zeros(5, np.float32)}, "shape"),
        ({"w::i8": np.zeros(4, np.int8)}, "unknown encoding"),
        (
            {
                "w::idx": np.array([0, 9], np.int32),
                "w::val": np.zeros(2, np.float16),
            },
            "out of range",
        ),
        (
            {
                "w::idx": np.array([1, 1], np.int32),
                "w::val": np.zeros(2, np.float16),
            },
            "repeated",
        ),
        ({"w::f16": np.array([np.inf, 0, 0, 0], np.float16)}, "non-finite"),
    ],
)
def test_malformed_wire_tensors_are_refused(wire, message):
    with pytest.raises(UpdateError, match=message):
        decompress(wire, {"w": np.zeros(4, np.float32)})


def test_bad_arguments_are_refused():
    with pytest.raises(StrategyError, match="unknown compression 'zip'"):
        compress({"w": np.zeros(1, np.float32)}, "zip", rng=np.random.default_rng(0))
    with pytest.raises(StrategyError, match="ratio == 0"):
        compress({"w": np.zeros(1, np.float32)}, "topk", rng=np.random.default_rng(0), ratio=0)
    with pytest.raises(UpdateError, match="fp16 range"):
        compress({"w": np.array([1e6], np.float32)}, "fp16", rng=np.random.default_rng(0))
