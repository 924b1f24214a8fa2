"""The wire format is byte-compatible with openpi-client's msgpack_numpy and refuses hostile payloads."""

import msgpack
import numpy as np
import pytest

from motus_fast.serve import wire


def sample_message(rng):
    return {"image": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
            "state": rng.standard_normal(14).astype(np.float32),
            "f64": rng.standard_normal((2, 3)), "i": np.int64(7), "flag": np.bool_(True), "prompt": "pick",
            "empty": np.zeros((0, 4), np.float16), "transposed": np.arange(6).reshape(2, 3).T,
            "nested": {"list": [1, 2.5, None, "x"], "bytes": b"\x00\x01"}}


def assert_tree_equal(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


def test_bytes_identical_to_openpi_both_ways(openpi_client):
    openpi_msgpack = openpi_client.msgpack_numpy
    rng = np.random.default_rng(0)
    for _ in range(3):
        msg = sample_message(rng)
        assert wire.pack(msg) == openpi_msgpack.packb(msg)
        assert_tree_equal(wire.unpack(openpi_msgpack.packb(msg)), openpi_msgpack.unpackb(wire.pack(msg)))
        assert_tree_equal(wire.unpack(wire.pack(msg)), msg)


def nd(dtype, shape, data):
    return msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


@pytest.mark.parametrize("payload,match", [
    (nd("|O", [1], b"\x00" * 8), "unsupported array dtype"),                 # object arrays: pickle territory
    (nd("|V8", [1], b"\x00" * 8), "unsupported array dtype"),
    (nd("[('a', '<f4')]", [1], b"\x00" * 4), "unsupported array dtype"),
    (nd("<f4", [2, 2], b"\x00" * 15), "needs 16 bytes"),
    (nd("<f4", [2**40, 2**40], b"\x00" * 16), "needs"),                     # huge declared shape, tiny data
    (nd("<f4", [-1], b""), "non-negative ints"),
    (nd("<f4", [1] * 9, b"\x00" * 4), "at most 8"),
    (nd("<f4", "4", b"\x00" * 16), "list of"),
    (nd("<f4", [True], b"\x00" * 4), "non-negative ints"),
    (nd("<f4", [1], "text"), "must be bytes"),
    (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4"}}), "exactly the keys"),
    (msgpack.packb({"x": {b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}}), "does not fit"),
    (msgpack.packb({"x": {b"__npgeneric__": True, b"data": "s", b"dtype": "<f4"}}), "must be a number"),
    (msgpack.packb({"x": 1})[:-1], "malformed"),                               # truncated
    (b"\xc1", "malformed"),                                                    # reserved byte
    (msgpack.packb(1) + b"\x00", "malformed"),                                 # extra data
    (msgpack.packb({1: 2}), "malformed"),                                      # non-string map key
    (msgpack.packb(msgpack.ExtType(3, b"abc")), "malformed"),                  # ext types
    (b"\x91" * 100_000 + b"\x01", "max_depth"),                                # nesting bomb
    (b"\xdd\xff\xff\xff\xff", "max_objects"),                                  # 4G-element array header
    (b"\xdf\xff\xff\xff\xff", "max_objects"),                                  # 4G-entry map header
], ids=lambda v: None if isinstance(v, str) else f"{len(v)}B")
def test_hostile_payloads_raise_wire_errors(payload, match):
    with pytest.raises(wire.WireError, match=match):
        wire.unpack(payload)


def test_pack_refuses_objects_without_a_safe_encoding():
    for bad in (np.array(["a"]), np.array([object()]), object(), np.zeros(2, dtype=[("a", "<f4")])):
        with pytest.raises(TypeError):
            wire.pack({"x": bad})
