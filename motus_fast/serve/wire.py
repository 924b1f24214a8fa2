"""The wire format: msgpack with NumPy arrays, byte-compatible with ``openpi_client.msgpack_numpy``.

An array travels as the map ``{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype": "<f4", b"shape":
[...]}``, a NumPy scalar as ``{b"__npgeneric__": True, b"data": <value>, b"dtype": "<i8"}`` (openpi's layout).
No pickle anywhere: object, void and structured dtypes are refused when packing and when unpacking.

Unpacking is written for hostile input: dtypes come from a whitelist (``np.dtype`` never sees a client string),
shapes must be small lists of non-negative ints whose product matches the byte count exactly, and a
``DecodeBudget`` bounds the whole message before msgpack builds a single object: its bytes, the total number of
objects in it and their nesting depth (a per-container limit alone lets 12 MB of nested empty maps decode into
millions of objects). The budget is checked by walking the msgpack headers (``scan``), which stops at the first
object beyond the budget, so refusing a bomb costs at most ``max_objects`` header reads. Any problem raises
``WireError`` with a message saying what was wrong (client text in it is shortened).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# dtype strings a message may carry (bool, ints, floats; either byte order); nothing else reaches np.dtype()
ALLOWED_DTYPES = {s: np.dtype(s) for s in ("|b1", "|u1", "|i1") + tuple(
    order + kind for order in "<>" for kind in ("u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"))}
MAX_NDIM = 8
SHOW_CHARS = 80         # client-supplied values quoted in an error message are cut to this length


@dataclass(frozen=True)
class DecodeBudget:
    """What one message may cost to decode, all containers together."""

    max_bytes: int = 16 * 2**20
    max_objects: int = 4096         # every msgpack object counts: maps, arrays, strings, bytes, numbers, nil, ...
    max_depth: int = 8              # a top-level scalar has depth 0, the values of a top-level map depth 1


AUTH_BUDGET = DecodeBudget(max_bytes=1024, max_objects=8, max_depth=1)   # {"api_key": "<key>"} and no more


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


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """repr(value), escaped (repr never emits raw control characters) and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _dtype(value) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or value not in ALLOWED_DTYPES:
        raise WireError(f"unsupported array dtype {show(value)}; allowed: {sorted(ALLOWED_DTYPES)}")
    return ALLOWED_DTYPES[value]


def _decode(obj: dict):
    if b"__ndarray__" in obj:
        if set(obj) != {b"__ndarray__", b"data", b"dtype", b"shape"}:
            raise WireError(f"an __ndarray__ map needs exactly the keys data, dtype, shape; got {show(sorted(obj))}")
        dtype, shape, data = _dtype(obj[b"dtype"]), obj[b"shape"], obj[b"data"]
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
                type(n) is int and n >= 0 for n in shape):
            raise WireError(f"array shape must be a list of at most {MAX_NDIM} non-negative ints, got {show(shape)}")
        if not isinstance(data, bytes):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        count = math.prod(shape)
        if count * dtype.itemsize != len(data):
            raise WireError(f"array of shape {show(list(shape))} and dtype {dtype.str} needs {count * dtype.itemsize} "
                            f"bytes, the message has {len(data)}")
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    if b"__npgeneric__" in obj:
        if set(obj) != {b"__npgeneric__", b"data", b"dtype"}:
            raise WireError(f"an __npgeneric__ map needs exactly the keys data, dtype; got {show(sorted(obj))}")
        dtype, value = _dtype(obj[b"dtype"]), obj[b"data"]
        if type(value) not in (int, float, bool):
            raise WireError(f"scalar data must be a number, got {type(value).__name__}")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError, TypeError) as e:
            raise WireError(f"scalar {show(value)} does not fit dtype {dtype.str}") from None
    return obj


# msgpack header byte -> (kind, how many bytes of length follow, or the fixed payload size); see the msgpack spec
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2,
          0xd2: 4, 0xd3: 8}
_SIZED = {0xc4: ("bytes", 1), 0xc5: ("bytes", 2), 0xc6: ("bytes", 4), 0xd9: ("bytes", 1), 0xda: ("bytes", 2),
          0xdb: ("bytes", 4), 0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4)}
_LEN = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def scan(data, budget: DecodeBudget) -> int:
    """Check `data` against `budget` by reading only msgpack headers (no object is built) -> the object count.
    Raises WireError naming the limit that was hit, or the malformation found. Ext types are malformed here."""
    n = len(data)
    if n > budget.max_bytes:
        raise WireError(f"message of {n} bytes exceeds the decode budget of {budget.max_bytes} bytes")
    view = memoryview(data)
    pos = objects = 0
    pending = [1]           # objects still to read at each open nesting level (the root level holds one)
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > budget.max_objects:
            raise WireError(f"message has more than {budget.max_objects} objects (the decode budget's "
                            "max_objects)")
        if pos >= n:
            raise WireError("malformed msgpack message (truncated)")
        b = view[pos]
        pos += 1
        children = 0
        if b <= 0x7f or b >= 0xe0:                  # fixint
            continue
        if b <= 0x8f:                               # fixmap
            children = 2 * (b & 0x0f)
        elif b <= 0x9f:                             # fixarray
            children = b & 0x0f
        elif b <= 0xbf:                             # fixstr
            pos += b & 0x1f
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            kind, width = _SIZED[b]
            if pos + width > n:
                raise WireError("malformed msgpack message (truncated)")
            length = _LEN[width].unpack_from(view, pos)[0]
            pos += width
            if kind == "bytes":
                pos += length
            else:
                children = length * (2 if kind == "map" else 1)
        else:                                       # 0xc1 (never used) and the ext types
            raise WireError(f"malformed msgpack message (unsupported type byte 0x{b:02x} at offset {pos - 1})")
        if pos > n:
            raise WireError("malformed msgpack message (truncated)")
        if children:
            # a container promising more objects than the budget is refused before any of them is read
            if objects + children > budget.max_objects:
                raise WireError(f"message has more than {budget.max_objects} objects (the decode budget's "
                                "max_objects)")
            if len(pending) > budget.max_depth:
                raise WireError(f"message nests deeper than {budget.max_depth} levels (the decode budget's "
                                "max_depth)")
            pending.append(children)
    if pos != n:
        raise WireError(f"malformed msgpack message ({n - pos} bytes of extra data after the message)")
    return objects


def unpack(data: bytes, budget: DecodeBudget = DecodeBudget()) -> Any:
    """msgpack bytes -> Python objects with NumPy arrays (read-only views of `data`). Raises WireError.
    The message is first checked against `budget` (``scan``), so msgpack never builds more than
    ``budget.max_objects`` objects."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    scan(data, budget)
    limit = budget.max_objects
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=True, use_list=True,
                               max_array_len=limit, max_map_len=limit, max_ext_len=0)
    except WireError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, MemoryError) as e:
        # msgpack's ExtraData, FormatError, StackError and limit errors are ValueErrors
        raise WireError(f"malformed msgpack message ({type(e).__name__}: {show(str(e))})") from None
