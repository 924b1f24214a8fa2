"""``MOTUS_BACKEND=auto`` for joint attention: which implementation runs, read from a table of measurements.

The table is JSON written by ``python -m bench.attention --tune`` (``bench/results/attention_table.json`` of the
source tree; ``MOTUS_ATTENTION_TABLE`` names another file): ``{"entries": [{"op", "capability", "dtype",
"shape_class", "choice", ...timings}]}``. Its key:

- op: ``joint_attention``;
- capability: ``sm90`` (CUDA compute capability) or ``cpu`` (the Triton interpreter);
- dtype: ``bf16`` / ``fp16`` / ``fp32``;
- shape class: ``<visibility>/<length>``: visibility ``all`` (every expert sees every expert) or ``masked``;
  length by the longest key sequence of a sample (the sum of the experts' max_seqlens): ``s`` <= 1024,
  ``m`` <= 8192, ``l`` above.

Candidates: ``triton`` (ours, kernels/joint_attention.py), ``triton_hopper`` (ours with TMA descriptors and
128 x 128 tiles, kernels/joint_attention_hopper.py: compute capability 9.x only, and only the eager inference
forward; autograd and torch.compile keep ``triton``), ``sdpa`` (torch's scaled_dot_product_attention per sample
over the packed tokens: joint_attention_reference, its packing cost included in the measurement) and
``flash_attn`` (flash_attn_varlen_func over the packed tokens, all-visible only, when the package is installed).

Rule for a key the table lacks (or no table): ours, the one candidate that serves every visibility and layout
without repacking; entries at other lengths are not extrapolated. A table choice that cannot run here (package
missing, masked visibility for flash_attn, another GPU or unaligned strides for triton_hopper) falls back to ours
with one WARNING line. Each decision is logged once per key.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("motus_fast")

CANDIDATES = ("triton", "triton_hopper", "sdpa", "flash_attn")
DEFAULT_CHOICE = "triton"
LENGTH_CLASSES = ((1024, "s"), (8192, "m"))       # upper bounds; above the last: "l"
TABLE_ENV = "MOTUS_ATTENTION_TABLE"
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_logged: set = set()


def default_table_path() -> Path:
    env = os.environ.get(TABLE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bench" / "results" / "attention_table.json"


def capability(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def shape_class(visible: Optional[Sequence[Sequence[bool]]], max_seqlens: Sequence[int]) -> str:
    vis = "all" if visible is None or all(all(row) for row in visible) else "masked"
    keys = sum(max_seqlens)
    length = next((name for bound, name in LENGTH_CLASSES if keys <= bound), "l")
    return f"{vis}/{length}"


def table_key(op: str, device: torch.device, dtype: torch.dtype, cls: str) -> tuple[str, str, str, str]:
    return op, capability(device), _DTYPES.get(dtype, str(dtype)), cls


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> dict:
    """key -> choice. A missing file is an empty table; a malformed one raises, naming the file and field."""
    p = Path(path)
    if not p.exists():
        return {}
    entries = json.loads(p.read_text()).get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{p}: 'entries' must be a list of table rows")
    table = {}
    for i, e in enumerate(entries):
        for field in ("op", "capability", "dtype", "shape_class", "choice"):
            if field not in e:
                raise ValueError(f"{p}: entries[{i}] has no '{field}'")
        if e["choice"] not in CANDIDATES:
            raise ValueError(f"{p}: entries[{i}].choice={e['choice']!r} is not one of {CANDIDATES}")
        table[(e["op"], e["capability"], e["dtype"], e["shape_class"])] = e["choice"]
    return table


def runnable(candidate: str, device: torch.device, cls: str, inputs: Optional[tuple] = None) -> Optional[str]:
    """None if `candidate` can run here, else why not. `inputs` = (q, k, v) lists also checks what depends on the
    tensors (triton_hopper: dtype, head dim, 16-byte strides)."""
    if candidate == "triton_hopper":
        if device.type != "cuda":
            return "the Hopper forward runs on CUDA devices of compute capability 9.x only"
        if not capability(device).startswith("sm9"):
            return f"the Hopper forward needs compute capability 9.x, this device is {capability(device)}"
        from motus_fast.kernels.joint_attention_hopper import tensor_descriptors_available, unsupported

        if not tensor_descriptors_available():
            return "the installed triton has no device-side tensor descriptors"
        if inputs is not None:
            return unsupported(*inputs)
    if candidate == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        if device.type != "cuda":
            return "flash_attn runs on CUDA tensors only"
        if not cls.startswith("all/"):
            return "flash_attn cannot express a visibility mask"
    return None


def select(op: str, device: torch.device, dtype: torch.dtype, visible, max_seqlens: Sequence[int],
           table: Optional[dict] = None, inputs: Optional[tuple] = None) -> str:
    """The candidate for this call under MOTUS_BACKEND=auto (see the module docstring), logged once per key.
    `inputs` = (q, k, v) lets the table's choice be checked against the tensors too."""
    cls = shape_class(visible, max_seqlens)
    key = table_key(op, device, dtype, cls)
    table = load_table(str(default_table_path())) if table is None else table
    choice = table.get(key)
    if choice is None:
        choice, why = DEFAULT_CHOICE, "not in the table: the default rule"
    else:
        why = "from the table"
        reason = runnable(choice, device, cls, inputs)
        if reason is not None:
            _log_once(key + ("fallback",), logging.WARNING,
                      f"{op}: table choice {choice} for {key} cannot run ({reason}); using {DEFAULT_CHOICE}")
            choice, why = DEFAULT_CHOICE, "fallback"
    _log_once(key, logging.INFO, f"{op}: auto picks {choice} for {'/'.join(key[1:])} ({why})")
    return choice


def fall_back(op: str, choice: str, reason: str) -> str:
    """A chosen candidate cannot serve this call: one WARNING line per (op, choice, reason); returns ours."""
    _log_once((op, choice, reason), logging.WARNING, f"{op}: {choice} cannot run ({reason}); using {DEFAULT_CHOICE}")
    return DEFAULT_CHOICE


def _log_once(key, level: int, msg: str) -> None:
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.log(level, msg)


def flash_attn_joint(q, k, v, cu_seqlens, max_seqlens, scale):
    """All-visible joint attention with flash_attn_varlen_func: pack each sample's experts into one segment, run,
    unpack. Every expert has queries (the caller checks)."""
    from flash_attn import flash_attn_varlen_func

    bounds = [c.tolist() for c in cu_seqlens]
    B, E = len(bounds[0]) - 1, len(k)
    order = [(b, e) for b in range(B) for e in range(E)]
    pack = lambda xs: torch.cat([xs[e][bounds[e][b]:bounds[e][b + 1]] for b, e in order])  # noqa: E731
    lengths = [sum(bounds[e][b + 1] - bounds[e][b] for e in range(E)) for b in range(B)]
    cu = torch.tensor([0] + lengths, device=k[0].device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, sum(max_seqlens), sum(max_seqlens),
                                 softmax_scale=scale)
    parts, i = {e: [] for e in range(E)}, 0
    for b, e in order:
        n = bounds[e][b + 1] - bounds[e][b]
        parts[e].append(out[i:i + n])
        i += n
    return [torch.cat(parts[e]) for e in range(E)]
