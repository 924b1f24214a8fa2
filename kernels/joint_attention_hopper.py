"""Hopper (sm_90) forward of the multi-expert varlen joint attention: TMA tile loads and stores through tensor
descriptors, 128 x 128 tiles, two consumer warp groups (DESIGN.md section 5.1; issue 16 item 4).

Same inputs, outputs and visibility rules as ``_fwd_kernel`` of kernels/joint_attention.py, and the same work
decomposition (one program per (query tile, head), found by the shared ``_tile`` prologue), so its O and LSE feed
that module's backward unchanged. What differs:

- Every tile moves through a tensor descriptor made on the device per (expert, sample, head): base = the sample's
  first row of that head, shape = [segment length, D], strides = [token stride, 1]. The descriptor's shape is the
  segment, so TMA zero-fills the rows past a segment's end on loads and drops them on stores: the query tile, the
  last key/value tile and the output tile need no masks of their own (scores past the end of a key segment are
  still set to -inf). Device-side descriptors live in a global scratch buffer that Triton asks the allocator set
  by ``triton.set_allocator`` for (``_ensure_allocator``).
- BLOCK_M = BLOCK_N = 128 with 8 warps: each of the two warp groups owns 64 query rows of the tile and issues
  its own wgmma (Triton's layout for M = 128 and 8 warps); K/V tiles are double-buffered by the software
  pipeliner (num_stages=2) through TMA + mbarriers. No warp specialisation: Triton 3.7.1 accepts
  ``tl.range(..., warp_specialize=True)`` for sm_90 but emits byte-identical PTX (its automatic warp
  specialisation is for Blackwell; checked on this kernel and on a plain TMA matmul loop), so the loop is plain.

Not served (``unsupported`` says why, the dispatcher then keeps our portable kernel): causal attention (only
``varlen_attention`` uses it), head dims other than 64/128, fp32 on a GPU, and token/head strides or base pointers
that are not 16-byte aligned (TMA's requirement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from motus_fast.kernels.joint_attention import (HEAD_DIMS, LOG2E, MAX_EXPERTS, _LN2_DEVICE, _TRITON_DTYPE,
                                                _online_softmax_step, _padded, _pick, _precision, _sees,
                                                _signature, _static_pick, _tile, _token_head_strides,
                                                effective_visibility, visibility_bits)

Tensor = torch.Tensor

TMA_ALIGN = 16          # bytes: descriptor base addresses and every stride but the last


def tensor_descriptors_available() -> bool:
    """The installed Triton can make device-side tensor descriptors (3.4 and later)."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@dataclass(frozen=True)
class HopperConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype) -> HopperConfig:
    """128 x 128 tiles, 8 warps (two consumer warp groups of 64 rows), two K/V stages: 161 KB of shared memory
    and 188 registers at d=128 (155 / 81 KB at d=64), one block per SM either way. Not measured yet: three stages
    also compile without spills (225 KB at d=128), as do 128 x 64 tiles; ``python -m bench.attention --sweep``
    times them on a GPU. fp32 runs only under the interpreter."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Hopper attention forward ({HEAD_DIMS})")
    if dtype == torch.float32:
        return HopperConfig(64, 32, 4, 1)
    return HopperConfig(128, 128, 8, 2)


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _segment(X, start, length, stride_t, head_offset, BLOCK: tl.constexpr, HEAD_D: tl.constexpr):
    """Descriptor of one head of one sample's segment: [length, HEAD_D] rows from X + start * stride_t."""
    return tl.make_tensor_descriptor(X + start.to(tl.int64) * stride_t + head_offset, shape=[length, HEAD_D],
                                     strides=[stride_t, 1], block_shape=[BLOCK, HEAD_D])


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_desc, v_desc, lo, hi, k_len, qk_scale, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update with the key tiles starting at lo, lo + BLOCK_N, ... < hi (exp2, fp32 state)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k = k_desc.load([start, 0])                                     # [N, D]; rows past k_len are 0
        v = v_desc.load([start, 0])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)          # [M, N] fp32
        if MASKED:
            s = tl.where((start + offs_n)[None, :] < k_len, s, float("-inf"))
        # every tile has >= 1 valid key (no causal mask here): no row is ever empty
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, False, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q0, Q1, Q2, K0, K1, K2, V0, V1, V2,            # [T_e, H, D] inputs (unit stride over D, 16-byte aligned)
    O0, O1, O2, LSE0, LSE1, LSE2,                  # [T_e, H, D] outputs (contiguous), [T_e, H] fp32 (natural log)
    CUQ0, CUQ1, CUQ2, CUK0, CUK1, CUK2,            # int32 [B+1] query / key boundaries per expert
    sq_t0, sq_h0, sq_t1, sq_h1, sq_t2, sq_h2,      # q strides (token, head) per expert
    sk_t0, sk_h0, sk_t1, sk_h1, sk_t2, sk_h2,
    sv_t0, sv_h0, sv_t1, sv_h1, sv_t2, sv_h2,
    NB0, NB1, NB2,                                 # query tiles per sample per expert (0: expert has no queries)
    B, H, qk_scale,                                # qk_scale = softmax_scale * log2(e)
    NUM_EXPERTS: tl.constexpr, VISIBLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_LSE: tl.constexpr,                       # False: LSE* are None (inference needs no LSE)
):
    h = tl.program_id(1)
    e, b, m0, q_start, q_len = _tile(NB0, NB1, NB2, CUQ0, CUQ1, CUQ2, B, BLOCK_M, NUM_EXPERTS)
    if m0 >= q_len:
        return

    q_desc = _segment(_pick(e, Q0, Q1, Q2, NUM_EXPERTS), q_start, q_len, _pick(e, sq_t0, sq_t1, sq_t2, NUM_EXPERTS),
                      h * _pick(e, sq_h0, sq_h1, sq_h2, NUM_EXPERTS), BLOCK_M, HEAD_D)
    q = q_desc.load([m0, 0])                                             # rows past q_len are 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for ek in tl.static_range(NUM_EXPERTS):
        column = (VISIBLE >> ek) & (1 | (1 << NUM_EXPERTS) | (1 << (2 * NUM_EXPERTS)))
        if column != 0:                                       # some query expert sees ek: compile its loop
            if _sees(e, ek, VISIBLE, NUM_EXPERTS):
                cu_k = _static_pick(ek, CUK0, CUK1, CUK2)
                k_start = tl.load(cu_k + b)
                k_len = tl.load(cu_k + b + 1) - k_start
                if k_len > 0:                                 # a descriptor of an empty segment is not valid
                    k_desc = _segment(_static_pick(ek, K0, K1, K2), k_start, k_len,
                                      _static_pick(ek, sk_t0, sk_t1, sk_t2),
                                      h * _static_pick(ek, sk_h0, sk_h1, sk_h2), BLOCK_N, HEAD_D)
                    v_desc = _segment(_static_pick(ek, V0, V1, V2), k_start, k_len,
                                      _static_pick(ek, sv_t0, sv_t1, sv_t2),
                                      h * _static_pick(ek, sv_h0, sv_h1, sv_h2), BLOCK_N, HEAD_D)
                    full_hi = k_len // BLOCK_N * BLOCK_N
                    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_desc, v_desc, 0, full_hi, k_len, qk_scale,
                                               False, BLOCK_N, PRECISION)
                    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_desc, v_desc, full_hi, k_len, k_len, qk_scale,
                                               True, BLOCK_N, PRECISION)

    # a query that saw no key at all: output 0, lse -inf (as the reference)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2_DEVICE)
    o_desc = _segment(_pick(e, O0, O1, O2, NUM_EXPERTS), q_start, q_len, H * HEAD_D, h * HEAD_D, BLOCK_M, HEAD_D)
    o_desc.store([m0, 0], acc.to(O0.dtype.element_ty))                 # rows past q_len are dropped
    if WRITE_LSE:
        rows = m0 + tl.arange(0, BLOCK_M)
        lse_base = _pick(e, LSE0, LSE1, LSE2, NUM_EXPERTS) + q_start.to(tl.int64) * H + h
        tl.store(lse_base + rows * H, lse, mask=rows < q_len)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

def _scratch(size: int, alignment: int, stream: Optional[int]):
    """Global memory for the device-side TMA descriptors of one launch (128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need an allocator; install ours unless the caller set one (it is a ContextVar:
    each thread starts without)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def unsupported(q: Sequence[Optional[Tensor]], k: Sequence[Tensor], v: Sequence[Tensor], *,
                causal: bool = False, interpreter: bool = False) -> Optional[str]:
    """None if this forward serves inputs of this signature, else why not (the caller keeps our portable kernel).
    Base pointers are checked per launch (``forward_launcher``)."""
    if not tensor_descriptors_available():
        return f"triton {triton.__version__} has no device-side tensor descriptors"
    if causal:
        return "causal attention is not implemented in the Hopper forward"
    if not 1 <= len(k) <= MAX_EXPERTS:
        return f"{len(k)} experts (1..{MAX_EXPERTS} supported)"
    D, dtype = k[0].shape[-1], k[0].dtype
    if D not in HEAD_DIMS:
        return f"head_dim={D} (supported: {HEAD_DIMS})"
    if dtype not in (torch.float16, torch.bfloat16) and not (interpreter and dtype == torch.float32):
        return f"dtype {dtype} (fp16/bf16 only)"
    size = k[0].element_size()
    for name, ts in (("q", q), ("k", k), ("v", v)):
        for e, t in enumerate(ts):
            if t is None or t.numel() == 0:
                continue
            if t.stride(2) != 1:
                return f"{name}[{e}] has head_dim stride {t.stride(2)} (TMA needs 1)"
            if (t.stride(0) * size) % TMA_ALIGN or (t.stride(1) * size) % TMA_ALIGN:
                return (f"{name}[{e}] has strides {tuple(t.stride())}: token/head strides must be "
                        f"{TMA_ALIGN}-byte aligned")
    return None


def _check_aligned(**named: Sequence[Optional[Tensor]]) -> None:
    """Every descriptor base must be 16-byte aligned; the signature cannot tell (a view may start anywhere)."""
    ptrs = [t.data_ptr() if t is not None and t.numel() else 0 for ts in named.values() for t in ts]
    if not any(p % TMA_ALIGN for p in ptrs):
        return
    for what, ts in named.items():
        for e, t in enumerate(ts):
            if t is not None and t.numel() and t.data_ptr() % TMA_ALIGN:
                raise ValueError(f"joint_attention_hopper: {what}[{e}] starts at a pointer that is not "
                                 f"{TMA_ALIGN}-byte aligned (TMA needs it); use the portable kernel for it")


def forward_launcher(q: Sequence[Optional[Tensor]], k: Sequence[Tensor], v: Sequence[Tensor],
                     cu_q: Sequence[Tensor], cu_k: Sequence[Tensor], max_q: Sequence[int], *, visible_bits: int,
                     softmax_scale: float, causal: bool = False, config: Optional[HopperConfig] = None,
                     write_lse: bool = True):
    """kernels/joint_attention.forward_launcher's contract (write_lse included), on the Hopper kernel: returns
    launch(q, k, v, cu_q, cu_k, out=None, lse=None) -> (out, lse) for inputs of this signature. Raises ValueError
    (naming the field) for inputs ``unsupported`` refuses."""
    interp = k[0].device.type == "cpu"
    why = unsupported(q, k, v, causal=causal, interpreter=interp)
    if why is not None:
        raise ValueError(f"joint_attention_hopper: {why}")
    E = len(k)
    _, H, D = k[0].shape
    dtype, device = k[0].dtype, k[0].device
    config = config or default_config(D, dtype)
    B = cu_k[0].numel() - 1
    has_q = [t is not None for t in q]
    out_shapes = [None if t is None else t.shape for t in q]
    bits = effective_visibility(visible_bits, has_q)
    nb = [triton.cdiv(max_q[e], config.block_m) if has_q[e] else 0 for e in range(E)]
    grid = (B * sum(nb), H)
    q_ptrs = [q[e] if has_q[e] else k[e] for e in range(E)]
    scalars = (*_token_head_strides(q_ptrs), *_token_head_strides(k), *_token_head_strides(v), *_padded(nb, 0),
               B, H, softmax_scale * LOG2E)
    consts = dict(NUM_EXPERTS=E, VISIBLE=bits, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_D=D,
                  PRECISION=_precision(dtype), WRITE_LSE=write_lse, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    pad = [None] * (MAX_EXPERTS - E)

    def launch(q, k, v, cu_q, cu_k, out=None, lse=None):
        if out is None:
            out = [None if s is None else torch.empty(s, dtype=dtype, device=device) for s in out_shapes]
        if not write_lse:
            lse = [None] * E
        elif lse is None:
            lse = [None if s is None else torch.empty(s[:2], dtype=torch.float32, device=device) for s in out_shapes]
        if grid[0] == 0 or H == 0:
            return out, lse
        _check_aligned(q=q, k=k, v=v, out=out)
        if not interp:
            _ensure_allocator()
        # experts without queries still need pointers of the right type in the q/out/lse slots; never read
        spare = None if all(has_q) or not write_lse else torch.empty(0, dtype=torch.float32, device=device)
        _fwd_kernel[grid](
            *[q[e] if has_q[e] else k[e] for e in range(E)], *pad, *k, *pad, *v, *pad,
            *[out[e] if has_q[e] else k[e] for e in range(E)], *pad,
            *[lse[e] if has_q[e] else spare for e in range(E)], *pad, *cu_q, *pad, *cu_k, *pad,
            *scalars, **consts)
        return out, lse
    return launch


def attention_forward(q, k, v, cu_q, cu_k, max_q, *, visible_bits: int, softmax_scale: float,
                      config: Optional[HopperConfig] = None, out: Optional[list] = None,
                      lse: Optional[list] = None):
    """kernels/joint_attention.attention_forward's contract (non-causal) on the Hopper kernel: (out, lse)."""
    launch = forward_launcher(q, k, v, cu_q, cu_k, max_q, visible_bits=visible_bits, softmax_scale=softmax_scale,
                              config=config)
    return launch(q, k, v, cu_q, cu_k, out, lse)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile targets (tests/kernels/test_compile_joint_attention_hopper.py)
# ---------------------------------------------------------------------------------------------------------------

def compile_targets(dtypes=(torch.float16, torch.bfloat16), head_dims=HEAD_DIMS):
    """Per (dtype, head_dim): three experts all-to-all (every key-expert loop compiled), and for bf16 at the
    largest head dim the prefix-cache visibility (und sees only und), as compile_report(...) keyword arguments."""
    prefix_cache = visibility_bits([[1, 1, 1], [1, 1, 1], [0, 0, 1]], 3)
    for dtype in dtypes:
        dt = _TRITON_DTYPE[dtype]
        for D in head_dims:
            cfg = default_config(D, dtype)
            variants = [("E3", visibility_bits(None, 3))]
            if dtype == torch.bfloat16 and D == max(head_dims):
                variants.append(("E3-masked", prefix_cache))
            for tag, bits in variants:
                for lse in (True, False) if tag == "E3" else (True,):   # eager inference writes no LSE
                    consts = dict(NUM_EXPERTS=3, VISIBLE=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                  HEAD_D=D, PRECISION=_precision(dtype), WRITE_LSE=lse)
                    yield dict(name=f"hopper fwd {dt} d{D} {tag}{'' if lse else ' no-LSE'} {cfg.block_m}x"
                                    f"{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                               fn=_fwd_kernel, **_signature(_fwd_kernel, dt, 3, consts),
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
