import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from consortia.errors import UpdateError
from consortia.protocol.tensors import decode, encode


def test_roundtrip_keeps_names_values_and_metadata():
    params = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "layer.bias": np.ones(2, np.float32)}
    body = encode(params, {"num_examples": "12"})
    out, meta = decode(body)
    assert meta == {"num_examples": "12"}
    for k in params:
        np.testing.assert_array_equal(out[k], params[k])


@pytest.mark.parametrize(
    "body, match",
    [
        (b"", "shorter"),
        (struct.pack("<Q", 10**12) + b"{}", "out of range"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_malformed_bodies_are_rejected(body, match):
    with pytest.raises(UpdateError, match=match):
        decode(body)


def test_non_float32_tensors_are_rejected():
    body = save({"w": np.ones(3, np.float64)})
    with pytest.raises(UpdateError, match="float32"):
        decode(body)


def test_torn_body_is_rejected():
    body = encode({"w": np.ones(100, np.float32)})
    with pytest.raises(UpdateError, match="not valid safetensors"):
        decode(body[:-10])


def test_pickle_is_never_accepted():
    import pickle

    with pytest.raises(UpdateError):
        decode(pickle.dumps({"w": np.ones(3, np.float32)}))


def test_metadata_must_be_strings():
    header = json.dumps({"__metadata__": {"n": 3}}).encode()
    with pytest.raises(UpdateError, match="strings"):
        decode(struct.pack("<Q", len(header)) + header)
