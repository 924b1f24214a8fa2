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
``flash_attn`` (flash_attn_varlen_func over the packed tokens, all-visible only, when the package is installed)
and ``flex`` (torch's flex_attention over the experts' buffers concatenated, every sample and visibility at once
through a mask_mod on per-token segment ids; compiled on CUDA, its eager reference math on CPU; the concatenation
and the block-mask build are part of its measured cost: flex_joint; only the inference forward, as the table
measures: autograd keeps ours).

Rule for a key the table lacks (or no table): ours, the one candidate that serves every visibility and layout
without repacking; entries at other lengths are not extrapolated. A table choice that cannot run here (package
missing, masked visibility for flash_attn, another GPU or unaligned strides for triton_hopper, a torch without
flex_attention or autograd through flex) falls back to ours with one WARNING line. Each decision is logged
once per key.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from motus_fast.ops.availability import needs_grad

log = logging.getLogger("motus_fast")

CANDIDATES = ("triton", "triton_hopper", "sdpa", "flash_attn", "flex")
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
    tensors (triton_hopper: dtype, head dim, 16-byte strides; flex: autograd)."""
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
    if candidate == "flex":
        why = flex_attention_missing(device)
        if why is None and inputs is not None and needs_grad(*inputs[0], *inputs[1], *inputs[2]):
            # the table times the inference forward only (and flex has no backward on CPU at all)
            why = "flex serves the inference forward only (no backward timed; none on CPU)"
        return why
    return None


def flex_attention_missing(device: torch.device) -> Optional[str]:
    """None if torch's flex_attention can run on `device`, else why not."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if not torch._dynamo.is_dynamo_supported():
        return "flex_attention needs TorchDynamo, which this Python / platform lacks"
    if device.type not in ("cuda", "cpu"):
        return f"flex_attention is wired for CUDA (compiled) and CPU (eager) tensors, not {device.type}"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "compiled flex_attention on CUDA needs triton"
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


FLEX_BLOCK = 128        # flex_attention's sparse block (tokens per side) on CUDA; the CPU eager math ignores blocks


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_joint(q, k, v, cu_seqlens, visible, scale, max_seqlens):
    """-> run(q, k, v, cu_seqlens, return_lse) -> (out, lse) per expert: joint attention with flex_attention, for
    inputs of this signature (q/k/v/cu_seqlens per expert as joint_attention takes them; visible: python rows or
    None; max_seqlens: the per-expert bounds of the sample lengths).

    The query experts' buffers and all key/value buffers are concatenated in expert order (one copy each: the pack
    cost); token t of the concatenation belongs to segment ``e * B + b`` (expert e, sample b), and query segment g
    sees key segment g' iff they share the sample and visible[e][e'] holds. Outputs are split back per expert,
    [T_e, H, D] (flex writes them in the query's [T, H, D] order); flex's LSE is natural-log already (it rescales
    its log2 statistics). A query that sees no key gets output 0 and LSE -inf from flex itself: the eager math
    masks the row, the compiled kernel sets the empty row's normaliser to 1 (torch 2.13's template).

    Cost outside the kernel: the concatenation, per call; and the block mask (flex_block_mask: segment ids by
    searchsorted, O(T); block-level visibility by two small matmuls over [blocks, E*B], no O(T_q * T_k) dense mask
    as create_block_mask builds; argsorts over [q blocks, kv blocks]; ~25 small device launches, no host sync). The
    mask depends on the boundary values, not only on the signature, so it is built here once only when the shapes
    fix them: every expert's buffer holds B x its bound (T_e == B * max_seqlens[e], so every sample has exactly the
    bound; e.g. any B == 1 call). Otherwise it is rebuilt per call, except that CPU boundaries (free to read) keep
    the mask of the last values seen."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    E, B = len(k), cu_seqlens[0].numel() - 1
    q_experts = [e for e in range(E) if q[e] is not None]
    q_sizes, k_sizes = [q[e].shape[0] for e in q_experts], [t.shape[0] for t in k]
    Tq, Tk = sum(q_sizes), sum(k_sizes)
    dev, dtype = k[0].device, k[0].dtype
    lse_dtype = torch.promote_types(dtype, torch.float32)
    vis = torch.ones(E, E, dtype=torch.bool) if visible is None else torch.tensor(visible, dtype=torch.bool)
    vis = vis.to(dev)
    backward = False     # inference only (runnable): the backward's q-block lists are not built
    static = None
    if Tq and Tk and all(n == B * bound for n, bound in zip(k_sizes, max_seqlens)):
        uniform = [torch.arange(B + 1, device=dev) * bound for bound in max_seqlens]
        static = flex_block_mask(uniform, q_experts, q_sizes, k_sizes, vis, backward)
    last: dict = {}          # CPU boundary values -> block mask, one entry

    def block_mask(cu):
        if static is not None:
            return static
        key = None
        if not torch.compiler.is_compiling() and all(c.device.type == "cpu" for c in cu):
            key = tuple(tuple(c.tolist()) for c in cu)
            if key in last:
                return last[key]
        mask = flex_block_mask(cu, q_experts, q_sizes, k_sizes, vis, backward)
        if key is not None:
            last.clear()
            last[key] = mask
        return mask

    def run(q, k, v, cu, return_lse):
        out: list[Optional[torch.Tensor]] = [None] * E
        lse: list[Optional[torch.Tensor]] = [None] * E
        if Tq == 0 or Tk == 0:       # no query or no key at all (flex needs both): outputs 0, LSE -inf
            for e in q_experts:
                out[e] = torch.zeros_like(q[e])
                lse[e] = q[e].new_full(q[e].shape[:2], -math.inf, dtype=lse_dtype) if return_lse else None
            return out, lse
        packed = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in ([q[e] for e in q_experts], k, v)]
        qq, kk, vv = (t.transpose(0, 1).unsqueeze(0) for t in packed)              # [1, H, T, D] views
        attend = _compiled_flex() if dev.type == "cuda" and not torch.compiler.is_compiling() else flex_attention
        res = attend(qq, kk, vv, block_mask=block_mask(cu), scale=scale,
                     return_aux=AuxRequest(lse=True) if return_lse else None)
        o, aux = res if return_lse else (res, None)
        o = o[0].transpose(0, 1)                                                    # [Tq, H, D]
        o = o if o.is_contiguous() else o.contiguous()
        for e, part in zip(q_experts, o.split(q_sizes)):
            out[e] = part
        if return_lse:
            for e, part in zip(q_experts, aux.lse[0].t().to(lse_dtype).contiguous().split(q_sizes)):
                lse[e] = part
        return out, lse
    return run


def flex_block_mask(cu_seqlens, q_experts, q_sizes, k_sizes, vis, backward: bool = True):
    """The flex BlockMask of joint attention over expert-concatenated buffers (see flex_joint): exact mask_mod on
    per-token segment ids, and block lists built at block granularity (a block pair is visited iff some segment
    pair in it is visible, and skips the mask_mod iff every one is and both blocks are whole). Without `backward`
    the transposed (q-block) lists only the backward reads are not built."""
    from torch.nn.attention.flex_attention import BlockMask

    dev = vis.device
    E, B = len(cu_seqlens), cu_seqlens[0].numel() - 1
    cu = [c.to(device=dev, dtype=torch.int64) for c in cu_seqlens]

    def segments(experts, sizes):       # token of the concatenation -> e * B + b
        return torch.cat([e * B + torch.searchsorted(cu[e][1:], torch.arange(n, device=dev), right=True)
                          for e, n in zip(experts, sizes)])

    seg_q, seg_k = segments(q_experts, q_sizes), segments(range(E), k_sizes)
    same_sample = torch.eye(B, dtype=torch.bool, device=dev)
    pair = (vis[:, None, :, None] & same_sample[None, :, None, :]).reshape(E * B, E * B)   # segment visibility

    def visible_pair(b, h, q_idx, kv_idx):
        return pair[seg_q[q_idx], seg_k[kv_idx]]

    def presence(seg):                  # [blocks, E*B]: 1 where the block holds a token of the segment
        T = seg.numel()
        p = torch.zeros(-(-T // FLEX_BLOCK), E * B, device=dev)
        p[torch.arange(T, device=dev) // FLEX_BLOCK, seg] = 1.0
        whole = (torch.arange(p.shape[0], device=dev) + 1) * FLEX_BLOCK <= T
        return p, whole

    (pq, whole_q), (pk, whole_k) = presence(seg_q), presence(seg_k)
    reach = lambda m: ((pq @ m.float()) > 0).float() @ pk.T > 0  # noqa: E731  some segment pair in m
    some, full = reach(pair), ~reach(~pair) & whole_q[:, None] & whole_k[None, :]
    full &= some

    def ordered(m):                     # dense [q blocks, kv blocks] -> (counts [1, 1, nq], indices [1, 1, nq, nk])
        m = m.to(torch.int32)
        idx = torch.argsort(m, dim=-1, descending=True, stable=True)
        return m.sum(-1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=visible_pair, seq_lengths=(seg_q.numel(), seg_k.numel()),
                                    compute_q_blocks=backward)
