"""Lazy tensor sources: sharded safetensors (+ index json), torch ``.pth`` files, in-memory dicts; and a streaming
safetensors writer.

Opening a safetensors checkpoint reads only the file headers: every shard the index lists must exist and be complete
(safetensors checks that the header covers the whole file, so a truncated download fails here, naming the file),
and every key the index lists must be in the shard it names. ``load(key)`` then maps that one tensor from its file
(zero-copy; the OS pages it in on first touch), so a converter that assigns tensors into a model built on the meta
device never holds the checkpoint twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from motus_fast.weights.mapping import CheckpointError

log = logging.getLogger("motus_fast")

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class DictSource:
    """Tensors already in memory (or memory-mapped by ``torch.load(mmap=True)``), named after their file."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str):
        self.tensors, self.name = tensors, name
        self.tensors_read = 0

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def load(self, key: str) -> torch.Tensor:
        self.tensors_read += 1
        return self.tensors[key]

    def where(self, key: str) -> str:
        return self.name

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsSource:
    """One checkpoint spread over safetensors shards; tensors are read only when ``load`` asks for them.

    ``tensors_read`` counts the tensors read so far (tests use it to show that opening reads no tensor data).
    """

    def __init__(self, name: str, key_file: dict[str, Path]):
        from safetensors import SafetensorError, safe_open

        self.name = name
        self._file = key_file
        self._handles, self._shapes, self._dtypes = {}, {}, {}
        self.tensors_read = 0
        by_file: dict[Path, list[str]] = {}
        for key, f in key_file.items():
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: shard is missing ({name} maps {len(keys)} of its {len(key_file)} "
                                      f"tensors there, e.g. {keys[0]!r})")
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: not a complete safetensors file ({e}); it is truncated or corrupt, "
                                      "download it again") from e
            in_file = set(handle.keys())
            absent = [k for k in keys if k not in in_file]
            if absent:
                raise CheckpointError(f"{name} maps {len(absent)} tensor(s) to {f}, which does not hold them: "
                                      + ", ".join(repr(k) for k in absent[:10]))
            self._handles[f] = handle
            for k in keys:
                sl = handle.get_slice(k)
                self._shapes[k], self._dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()

    def keys(self) -> list[str]:
        return list(self._file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return _TORCH_DTYPES[self._dtypes[key]]

    def load(self, key: str) -> torch.Tensor:
        self.tensors_read += 1
        return self._handles[self._file[key]].get_tensor(key)

    def where(self, key: str) -> str:
        return self._file[key].name

    def files(self) -> list[Path]:
        return sorted(set(self._file.values()))

    def close(self) -> None:
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_weights(path: str | Path, prefer: tuple[str, ...] = ()):
    """Open the weights at `path` lazily: a ``*.safetensors.index.json`` (shards next to it), one ``.safetensors``
    file, one torch file (``.pth``/``.pt``/``.bin``, memory-mapped, weights only), or a directory holding exactly one
    of these (`prefer`: file-name stems to pick when a directory holds several index files, e.g.
    ``("diffusion_pytorch_model",)``). Returns a ``SafetensorsSource`` or ``DictSource``; use it as a context
    manager."""
    p = Path(path)
    if p.is_dir():
        p = find_weights_file(p, prefer)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.name.endswith(".safetensors.index.json"):
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a safetensors index (a JSON object with a 'weight_map'): {e}") from e
        return SafetensorsSource(str(p), {k: p.parent / f for k, f in weight_map.items()})
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: not a complete safetensors file ({e}); it is truncated or corrupt, "
                                  "download it again") from e
        return SafetensorsSource(str(p), {k: p for k in keys})
    if p.suffix in TORCH_SUFFIXES:
        return DictSource(read_torch_file(p), str(p))
    raise CheckpointError(f"{p}: unknown weights format (expected .safetensors, .safetensors.index.json, "
                          f"{', '.join(TORCH_SUFFIXES)} or a directory holding one)")


def find_weights_file(d: Path, prefer: tuple[str, ...] = ()) -> Path:
    """The one weights file (or index) in directory `d`; `prefer`: index stems to pick among several."""
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        by_stem = {i.name[: -len(".safetensors.index.json")]: i for i in indexes}
        picked = [by_stem[s] for s in prefer if s in by_stem]
        if not picked:
            raise CheckpointError(f"{d}: several index files {[i.name for i in indexes]}; point at one of them")
        indexes = picked[:1]
    if indexes:
        return indexes[0]
    for pattern in ("*.safetensors", *(f"*{s}" for s in TORCH_SUFFIXES)):
        found = sorted(d.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{d}: several {pattern} files {[f.name for f in found]} and no "
                                  "*.safetensors.index.json saying which belong together; point at one of them")
    raise CheckpointError(f"{d}: no weights found (looked for *.safetensors.index.json, *.safetensors, "
                          f"{', '.join('*' + s for s in TORCH_SUFFIXES)})")


def read_torch_file(p: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, weights only (no pickled code runs), memory-mapped when the file format allows.
    Unwraps ``{"state_dict": ...}``, ``{"module": ...}`` and ``{"model": ...}``."""
    obj = _torch_load(p, mmap=True)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "module", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: no state dict of tensors found (looked at the top level, 'state_dict', "
                              "'module' and 'model')")
    return obj


def _torch_load(p: Path, mmap: bool):
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated or foreign files
        if mmap and isinstance(e, RuntimeError) and "mmap" in str(e):
            log.warning("%s: legacy torch format, cannot be memory-mapped; reading it into memory", p)
            return _torch_load(p, mmap=False)
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e}); "
                              "it is truncated or corrupt, or not a state dict") from e


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                      metadata: Optional[dict[str, str]] = None, progress: Optional[str] = None) -> Path:
    """Write `tensors` as one safetensors file, streaming: each tensor is cast (floating tensors to `dtype`, if
    given) and written on its own, so peak extra memory is one tensor, not the whole checkpoint. Atomic: the file
    appears under its name only once complete."""
    path = Path(path)
    items = sorted(tensors.items())
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in items:
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {out_dtype} cannot be stored in safetensors")
        nbytes = t.numel() * out_dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[out_dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)             # the format aligns the data section to 8 bytes
    if progress is not None:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=progress, unit="tensor", leave=False)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, t in items:
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return path
