"""The wire format: msgpack with NumPy arrays, byte-compatible with ``openpi_client.msgpack_numpy``.

An array travels as the map ``{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype": "<f4", b"shape":
[...]}``, a NumPy scalar as ``{b"__npgeneric__": True, b"data": <value>, b"dtype": "<i8"}`` (openpi's layout).
No pickle anywhere: object, void and structured dtypes are refused when packing and when unpacking.

Unpacking is written for hostile input: dtypes come from a whitelist (``np.dtype`` never sees a client string),
shapes must be small lists of non-negative ints whose product matches the byte count exactly, and the msgpack
limits bound every container, string and element count. Any problem raises ``WireError`` with a message saying
what was wrong.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

# dtype strings a message may carry (bool, ints, floats; either byte order); nothing else reaches np.dtype()
ALLOWED_DTYPES = {s: np.dtype(s) for s in ("|b1", "|u1", "|i1") + tuple(
    order + kind for order in "<>" for kind in ("u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"))}
MAX_NDIM = 8


class WireError(ValueError):
    """A message that is not valid msgpack-numpy (truncated, malformed, an unsupported dtype, ...)."""


def _encode(obj: Any):
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"cannot send an array of dtype {obj.dtype} (allowed: {sorted(ALLOWED_DTYPES)})")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """dicts, lists, str, bytes, numbers, bools, None, NumPy arrays and scalars -> msgpack bytes."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def _dtype(value) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or value not in ALLOWED_DTYPES:
        raise WireError(f"unsupported array dtype {value!r}; allowed: {sorted(ALLOWED_DTYPES)}")
    return ALLOWED_DTYPES[value]


def _decode(obj: dict):
    if b"__ndarray__" in obj:
        if set(obj) != {b"__ndarray__", b"data", b"dtype", b"shape"}:
            raise WireError(f"an __ndarray__ map needs exactly the keys data, dtype, shape; got {sorted(obj)}")
        dtype, shape, data = _dtype(obj[b"dtype"]), obj[b"shape"], obj[b"data"]
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
                type(n) is int and n >= 0 for n in shape):
            raise WireError(f"array shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        count = math.prod(shape)
        if count * dtype.itemsize != len(data):
            raise WireError(f"array of shape {list(shape)} and dtype {dtype.str} needs {count * dtype.itemsize} "
                            f"bytes, the message has {len(data)}")
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    if b"__npgeneric__" in obj:
        if set(obj) != {b"__npgeneric__", b"data", b"dtype"}:
            raise WireError(f"an __npgeneric__ map needs exactly the keys data, dtype; got {sorted(obj)}")
        dtype, value = _dtype(obj[b"dtype"]), obj[b"data"]
        if type(value) not in (int, float, bool):
            raise WireError(f"scalar data must be a number, got {type(value).__name__}")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError, TypeError) as e:
            raise WireError(f"scalar {value!r} does not fit dtype {dtype.str}: {e}") from None
    return obj


def unpack(data: bytes, max_container_len: int = 4096) -> Any:
    """msgpack bytes -> Python objects with NumPy arrays (read-only views of `data`). Raises WireError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=True, use_list=True,
                               max_array_len=max_container_len, max_map_len=max_container_len, max_ext_len=0)
    except WireError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, MemoryError) as e:
        # msgpack's ExtraData, FormatError, StackError and limit errors are ValueErrors
        raise WireError(f"malformed msgpack message ({type(e).__name__}: {e or 'truncated or invalid'})") from None
