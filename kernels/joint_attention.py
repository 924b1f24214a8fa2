"""Triton kernels for multi-expert varlen flash attention (DESIGN.md section 5.1).

Up to three experts keep their own q/k/v buffers ``[T_e, H, D]`` (samples concatenated, boundaries in per-expert
``cu_seqlens`` int32 ``[B+1]``). A query of expert e in sample b attends to the keys of sample b in every expert
that e may see (an expert-level visibility bitmask). Nothing is packed or copied: each kernel reads the experts'
buffers where they are and writes per-expert outputs.

Work decomposition (same scheme in every kernel). The programs of one launch form a flat list
``[expert 0: B x NB_0 blocks | expert 1: B x NB_1 | expert 2: B x NB_2]`` times H heads, where
``NB_e = cdiv(max_seqlen_e, BLOCK)``. A program finds its (expert, sample, block) with two comparisons and a
division, reads the sample's bounds from ``cu_seqlens`` and exits if its block lies past the sample's end. The grid
therefore depends only on B, H and the host-side ``max_seqlen`` bounds: no device-to-host sync, no block table,
and a CUDA graph can replay it with new lengths as long as the bounds hold.

Kernels:
- ``_fwd_kernel``: one program per (query block, head); online softmax with exp2 (scores pre-scaled by
  log2(e)), fp32 accumulators, natural-log LSE out. For each visible key expert, whole key blocks run without
  masks and the last partial block runs masked.
- ``_delta_kernel``: Delta = rowsum(dO * O), the backward pre-pass (FlashAttention-2).
- ``_dkdv_kernel``: one program per (key block, head), looping over the query blocks of every expert that sees
  this key expert; writes dK and dV once.
- ``_dq_kernel``: one program per (query block, head), looping over visible key blocks; writes dQ once.
The backward has no atomics, so it is deterministic.

``causal`` (bottom-right aligned as in flash_attn_varlen_func: query i sees key j iff j <= i + len_k - len_q) is
supported for a single expert, which is what ``varlen_attention`` uses.

Layout limits: head_dim contiguous (the launchers copy otherwise); any token/head strides for q, k, v; outputs and
gradients are contiguous [T_e, H, D]. Offsets inside one sample are int32 (segment length x token stride < 2^31,
e.g. 230k tokens of a fused 3 x 24 x 128 projection); sample starts are int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from motus_fast.kernels.compile_check import kernel_signature

Tensor = torch.Tensor

LOG2E = 1.4426950408889634                     # scores are pre-scaled by log2(e) so the softmax can use exp2
_LOG2E_DEVICE = tl.constexpr(LOG2E)
_LN2_DEVICE = tl.constexpr(0.6931471805599453)  # LSE goes out as a natural log, like the reference's
MAX_EXPERTS = 3
HEAD_DIMS = (64, 128)                           # the compile-checked ones; others use the reference


# ---------------------------------------------------------------------------------------------------------------
# Configurations: fixed per (head_dim, dtype), chosen for H100 (sm_90) and checked for 0 spills by the compile test.
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockConfig:
    block_m: int          # query rows per tile
    block_n: int          # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfig:
    fwd: BlockConfig      # program = block_m queries, loop over key tiles of block_n
    dkdv: BlockConfig     # program = block_n keys, loop over query tiles of block_m
    dq: BlockConfig       # program = block_m queries, loop over key tiles of block_n
    delta_block: int = 64  # tokens per program of the Delta pre-pass


def default_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """The launch configuration for a head dim and dtype. fp16/bf16 are sized for H100 (sm_90: wgmma tiles, at
    most ~130 KB of shared memory, no register spills; see the compile test). fp32 runs only under the
    interpreter (the exact-fp32 dot spills heavily on sm_90, so CUDA fp32 inputs use the reference)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton attention kernels ({HEAD_DIMS})")
    if dtype == torch.float32:
        return AttentionConfig(fwd=BlockConfig(64, 32, 4, 2), dkdv=BlockConfig(32, 64, 4, 2),
                               dq=BlockConfig(64, 32, 4, 2))
    if head_dim <= 64:
        return AttentionConfig(fwd=BlockConfig(128, 64, 4, 3), dkdv=BlockConfig(32, 128, 8, 3),
                               dq=BlockConfig(128, 64, 8, 2))
    return AttentionConfig(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(16, 128, 8, 3),
                           dq=BlockConfig(128, 32, 8, 3))


GPU_DTYPES = (torch.float16, torch.bfloat16)


def visibility_bits(visible: Optional[Sequence[Sequence[bool]]], num_experts: int) -> int:
    """[E, E] bool matrix (visible[e_q][e_k]) -> bitmask with bit e_q * E + e_k. None = all visible."""
    if visible is None:
        return (1 << (num_experts * num_experts)) - 1
    bits = 0
    for eq in range(num_experts):
        for ek in range(num_experts):
            if visible[eq][ek]:
                bits |= 1 << (eq * num_experts + ek)
    return bits


# ---------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _pick(e, x0, x1, x2, NUM_EXPERTS: tl.constexpr):
    """x_e for a runtime expert index e (a select on scalars or pointers)."""
    r = x0
    if NUM_EXPERTS > 1:
        r = tl.where(e == 1, x1, r)
    if NUM_EXPERTS > 2:
        r = tl.where(e == 2, x2, r)
    return r


@triton.jit
def _static_pick(i: tl.constexpr, x0, x1, x2):
    """x_i for a compile-time expert index i."""
    if i == 0:
        r = x0
    elif i == 1:
        r = x1
    else:
        r = x2
    return r


@triton.jit
def _locate(pid, n0, n1, NUM_EXPERTS: tl.constexpr):
    """Program id -> (expert, index within that expert's work list); expert e owns n_e consecutive ids."""
    e = pid * 0
    local = pid
    if NUM_EXPERTS > 1:
        past0 = pid >= n0
        e = tl.where(past0, 1, e)
        local = tl.where(past0, pid - n0, local)
    if NUM_EXPERTS > 2:
        past1 = pid >= n0 + n1
        e = tl.where(past1, 2, e)
        local = tl.where(past1, pid - n0 - n1, local)
    return e, local


@triton.jit
def _tile(NB0, NB1, NB2, CU0, CU1, CU2, B, BLOCK: tl.constexpr, NUM_EXPERTS: tl.constexpr):
    """The prologue of the attention kernels: program id 0 -> (expert e, sample b, first row of this program's
    tile, start and length of sample b's segment of expert e). Expert e owns B * NB_e consecutive programs, NB_e
    tiles of BLOCK rows per sample; CU_e are its int32 [B+1] boundaries."""
    e, local = _locate(tl.program_id(0), B * NB0, B * NB1, NUM_EXPERTS)
    nb = _pick(e, NB0, NB1, NB2, NUM_EXPERTS)
    b = local // nb
    cu = _pick(e, CU0, CU1, CU2, NUM_EXPERTS)
    start = tl.load(cu + b)
    return e, b, (local - b * nb) * BLOCK, start, tl.load(cu + b + 1) - start


@triton.jit
def _sees(e_q, e_k, VISIBLE: tl.constexpr, NUM_EXPERTS: tl.constexpr):
    """Runtime test of visibility bit (e_q, e_k)."""
    return ((tl.full([], VISIBLE, tl.int32) >> (e_q * NUM_EXPERTS + e_k)) & 1) != 0


@triton.jit
def _key_ranges(m0, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query tile starting at row m0: key tiles [0, full_hi) need no mask, [full_hi, hi) need one."""
    if CAUSAL:
        shift = k_len - q_len                                   # bottom-right aligned diagonal
        lim = tl.minimum(tl.maximum(m0 + shift + 1, 0), k_len)   # keys every row of the tile sees
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), k_len)
    else:
        lim = k_len
        hi = k_len
    full_hi = lim // BLOCK_N * BLOCK_N
    return full_hi, hi


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, k_len, rows, shift, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with the key tiles starting at lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start * stride_kt, mask=cols[None, :] < k_len, other=0.0)      # [D, N]
            v = tl.load(v_ptrs + start * stride_vt, mask=cols[:, None] < k_len, other=0.0)      # [N, D]
        else:
            k = tl.load(k_ptrs + start * stride_kt)
            v = tl.load(v_ptrs + start * stride_vt)
        s = tl.dot(q, k, input_precision=PRECISION)                                           # [M, N] fp32
        if MASKED:
            valid = cols[None, :] < k_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, MASKED, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, qk_scale, MAY_BE_EMPTY: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into the running output, row max and row sum of the online softmax (exp2, fp32 state): s
    [M, N] raw scores (masked entries -inf), v [N, D]. MAY_BE_EMPTY: some row of s may be all -inf (masked tiles);
    such a row keeps max -inf -> 0 so it stays empty instead of NaN. Shared by both forwards."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MAY_BE_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q0, Q1, Q2, K0, K1, K2, V0, V1, V2,            # [T_e, H, D] inputs (unit stride over D)
    O0, O1, O2, LSE0, LSE1, LSE2,                  # [T_e, H, D] outputs (contiguous), [T_e, H] fp32 (natural log)
    CUQ0, CUQ1, CUQ2, CUK0, CUK1, CUK2,            # int32 [B+1] query / key boundaries per expert
    sq_t0, sq_h0, sq_t1, sq_h1, sq_t2, sq_h2,      # q strides (token, head) per expert
    sk_t0, sk_h0, sk_t1, sk_h1, sk_t2, sk_h2,
    sv_t0, sv_h0, sv_t1, sv_h1, sv_t2, sv_h2,
    NB0, NB1, NB2,                                 # query tiles per sample per expert (0: expert has no queries)
    B, H, qk_scale,                                # qk_scale = softmax_scale * log2(e)
    NUM_EXPERTS: tl.constexpr, VISIBLE: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_LSE: tl.constexpr,                       # False: LSE* are None (inference needs no LSE)
):
    h = tl.program_id(1)
    e, b, m0, q_start, q_len = _tile(NB0, NB1, NB2, CUQ0, CUQ1, CUQ2, B, BLOCK_M, NUM_EXPERTS)
    if m0 >= q_len:
        return

    offs_d = tl.arange(0, HEAD_D)
    rows = m0 + tl.arange(0, BLOCK_M)                       # query rows within the sample
    row_ok = rows < q_len
    sq_t = _pick(e, sq_t0, sq_t1, sq_t2, NUM_EXPERTS)
    sq_h = _pick(e, sq_h0, sq_h1, sq_h2, NUM_EXPERTS)
    q_base = _pick(e, Q0, Q1, Q2, NUM_EXPERTS) + q_start.to(tl.int64) * sq_t + h * sq_h
    q = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for ek in tl.static_range(NUM_EXPERTS):
        column = (VISIBLE >> ek) & (1 | (1 << NUM_EXPERTS) | (1 << (2 * NUM_EXPERTS)))
        if column != 0:                                       # some query expert sees ek: compile its loop
            if _sees(e, ek, VISIBLE, NUM_EXPERTS):
                cu_k = _static_pick(ek, CUK0, CUK1, CUK2)
                k_start = tl.load(cu_k + b)
                k_len = tl.load(cu_k + b + 1) - k_start
                sk_t = _static_pick(ek, sk_t0, sk_t1, sk_t2)
                sv_t = _static_pick(ek, sv_t0, sv_t1, sv_t2)
                k_ptrs = (_static_pick(ek, K0, K1, K2) + k_start.to(tl.int64) * sk_t
                          + h * _static_pick(ek, sk_h0, sk_h1, sk_h2)
                          + offs_n[None, :] * sk_t + offs_d[:, None])                          # [D, N]
                v_ptrs = (_static_pick(ek, V0, V1, V2) + k_start.to(tl.int64) * sv_t
                          + h * _static_pick(ek, sv_h0, sv_h1, sv_h2)
                          + offs_n[:, None] * sv_t + offs_d[None, :])                          # [N, D]
                shift = k_len - q_len
                full_hi, hi = _key_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
                acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, sk_t, sv_t, 0, full_hi, k_len,
                                           rows, shift, qk_scale, False, CAUSAL, BLOCK_N, PRECISION)
                acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, sk_t, sv_t, full_hi, hi, k_len,
                                           rows, shift, qk_scale, True, CAUSAL, BLOCK_N, PRECISION)

    # a query that saw no key at all: output 0, lse -inf (as the reference)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2_DEVICE)
    o_base = _pick(e, O0, O1, O2, NUM_EXPERTS) + q_start.to(tl.int64) * (H * HEAD_D) + h * HEAD_D
    tl.store(o_base + rows[:, None] * (H * HEAD_D) + offs_d[None, :],
             acc.to(O0.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        lse_base = _pick(e, LSE0, LSE1, LSE2, NUM_EXPERTS) + q_start.to(tl.int64) * H + h
        tl.store(lse_base + rows * H, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(O0, O1, O2, DO0, DO1, DO2, DELTA0, DELTA1, DELTA2, NT0, NT1, T0, T1, T2, H,
                  NUM_EXPERTS: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_D: tl.constexpr):
    """Delta[t, h] = sum_d dO[t, h, d] * O[t, h, d] (fp32) for every query expert; O and dO contiguous."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    e, blk = _locate(pid, NT0, NT1, NUM_EXPERTS)
    n_tok = _pick(e, T0, T1, T2, NUM_EXPERTS)
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_D)
    ok = rows < n_tok
    offs = rows.to(tl.int64)[:, None] * (H * HEAD_D) + h * HEAD_D + offs_d[None, :]
    o = tl.load(_pick(e, O0, O1, O2, NUM_EXPERTS) + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(_pick(e, DO0, DO1, DO2, NUM_EXPERTS) + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(_pick(e, DELTA0, DELTA1, DELTA2, NUM_EXPERTS) + rows * H + h, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, lo, hi, q_len, cols, shift,
                qk_scale, H, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles starting at lo, lo + BLOCK_M, ... < hi."""
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        if MASKED:
            ok = rows < q_len
            q_t = tl.load(q_ptrs + start * stride_qt, mask=ok[None, :], other=0.0)               # [D, M]
            do = tl.load(do_ptrs + start * (H * HEAD_D), mask=ok[:, None], other=0.0)           # [M, D]
            lse = tl.load(lse_ptrs + start * H, mask=ok, other=0.0)
            delta = tl.load(delta_ptrs + start * H, mask=ok, other=0.0)
        else:
            q_t = tl.load(q_ptrs + start * stride_qt)
            do = tl.load(do_ptrs + start * (H * HEAD_D))
            lse = tl.load(lse_ptrs + start * H)
            delta = tl.load(delta_ptrs + start * H)
        s_t = tl.dot(k, q_t, input_precision=PRECISION)                                       # [N, M]
        p_t = tl.math.exp2(s_t * qk_scale - (lse * _LOG2E_DEVICE)[None, :])
        if MASKED:
            valid = rows[None, :] < q_len
            if CAUSAL:
                valid = valid & (cols[:, None] <= rows[None, :] + shift)
            p_t = tl.where(valid, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)                             # [N, M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q0, Q1, Q2, K0, K1, K2, V0, V1, V2, DO0, DO1, DO2, LSE0, LSE1, LSE2, DELTA0, DELTA1, DELTA2,
    DK0, DK1, DK2, DV0, DV1, DV2,                 # dK, dV: [T_e, H, D] contiguous
    CUQ0, CUQ1, CUQ2, CUK0, CUK1, CUK2,
    sq_t0, sq_h0, sq_t1, sq_h1, sq_t2, sq_h2,
    sk_t0, sk_h0, sk_t1, sk_h1, sk_t2, sk_h2,
    sv_t0, sv_h0, sv_t1, sv_h1, sv_t2, sv_h2,
    NB0, NB1, NB2,                                # key tiles per sample per expert
    B, H, qk_scale, softmax_scale,
    NUM_EXPERTS: tl.constexpr, VISIBLE: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    # e: this program's key expert
    e, b, n0, k_start, k_len = _tile(NB0, NB1, NB2, CUK0, CUK1, CUK2, B, BLOCK_N, NUM_EXPERTS)
    if n0 >= k_len:
        return

    offs_d = tl.arange(0, HEAD_D)
    cols = n0 + tl.arange(0, BLOCK_N)                      # key rows within the sample
    col_ok = cols < k_len
    sk_t = _pick(e, sk_t0, sk_t1, sk_t2, NUM_EXPERTS)
    sv_t = _pick(e, sv_t0, sv_t1, sv_t2, NUM_EXPERTS)
    k_base = _pick(e, K0, K1, K2, NUM_EXPERTS) + k_start.to(tl.int64) * sk_t + h * _pick(
        e, sk_h0, sk_h1, sk_h2, NUM_EXPERTS)
    v_base = _pick(e, V0, V1, V2, NUM_EXPERTS) + k_start.to(tl.int64) * sv_t + h * _pick(
        e, sv_h0, sv_h1, sv_h2, NUM_EXPERTS)
    k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for eq in tl.static_range(NUM_EXPERTS):
        row = (VISIBLE >> (eq * NUM_EXPERTS)) & ((1 << NUM_EXPERTS) - 1)
        if row != 0:                                          # eq sees some expert: compile its loop
            if _sees(eq, e, VISIBLE, NUM_EXPERTS):
                cu_q = _static_pick(eq, CUQ0, CUQ1, CUQ2)
                q_start = tl.load(cu_q + b)
                q_len = tl.load(cu_q + b + 1) - q_start
                sq_t = _static_pick(eq, sq_t0, sq_t1, sq_t2)
                q_ptrs = (_static_pick(eq, Q0, Q1, Q2) + q_start.to(tl.int64) * sq_t
                          + h * _static_pick(eq, sq_h0, sq_h1, sq_h2)
                          + offs_m[None, :] * sq_t + offs_d[:, None])                          # [D, M]
                do_ptrs = (_static_pick(eq, DO0, DO1, DO2) + q_start.to(tl.int64) * (H * HEAD_D) + h * HEAD_D
                           + offs_m[:, None] * (H * HEAD_D) + offs_d[None, :])                 # [M, D]
                lse_ptrs = _static_pick(eq, LSE0, LSE1, LSE2) + q_start.to(tl.int64) * H + h + offs_m * H
                delta_ptrs = _static_pick(eq, DELTA0, DELTA1, DELTA2) + q_start.to(tl.int64) * H + h + offs_m * H
                shift = k_len - q_len
                # query tiles [lo, mid) straddle the causal diagonal; [mid, full_hi) are whole and unmasked;
                # [max(mid, full_hi), q_len) is the partial last tile
                if CAUSAL:
                    lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
                    diag = n0 + BLOCK_N - 1 - shift               # first row that sees the whole key tile
                    mid = lo + tl.maximum(tl.cdiv(diag - lo, BLOCK_M), 0) * BLOCK_M
                    mid = tl.minimum(mid, tl.cdiv(q_len, BLOCK_M) * BLOCK_M)
                    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sq_t, lo, mid,
                                         q_len, cols, shift, qk_scale, H, True, CAUSAL, BLOCK_M, HEAD_D,
                                         PRECISION)
                else:
                    mid = 0
                full_hi = tl.maximum(q_len // BLOCK_M * BLOCK_M, mid)
                dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sq_t, mid, full_hi,
                                     q_len, cols, shift, qk_scale, H, False, CAUSAL, BLOCK_M, HEAD_D, PRECISION)
                dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, sq_t, full_hi, q_len,
                                     q_len, cols, shift, qk_scale, H, True, CAUSAL, BLOCK_M, HEAD_D, PRECISION)

    out = k_start.to(tl.int64) * (H * HEAD_D) + h * HEAD_D + cols[:, None] * (H * HEAD_D) + offs_d[None, :]
    tl.store(_pick(e, DK0, DK1, DK2, NUM_EXPERTS) + out, (dk * softmax_scale).to(DK0.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(_pick(e, DV0, DV1, DV2, NUM_EXPERTS) + out, dv.to(DV0.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, k_len, rows, shift, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles starting at lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start * stride_kt, mask=cols[:, None] < k_len, other=0.0)      # [N, D]
            v = tl.load(v_ptrs + start * stride_vt, mask=cols[:, None] < k_len, other=0.0)      # [N, D]
        else:
            k = tl.load(k_ptrs + start * stride_kt)
            v = tl.load(v_ptrs + start * stride_vt)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)                                 # [M, N]
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            valid = cols[None, :] < k_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + shift)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                               # [M, N]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q0, Q1, Q2, K0, K1, K2, V0, V1, V2, DO0, DO1, DO2, LSE0, LSE1, LSE2, DELTA0, DELTA1, DELTA2,
    DQ0, DQ1, DQ2,                                # dQ: [T_e, H, D] contiguous
    CUQ0, CUQ1, CUQ2, CUK0, CUK1, CUK2,
    sq_t0, sq_h0, sq_t1, sq_h1, sq_t2, sq_h2,
    sk_t0, sk_h0, sk_t1, sk_h1, sk_t2, sk_h2,
    sv_t0, sv_h0, sv_t1, sv_h1, sv_t2, sv_h2,
    NB0, NB1, NB2,                                # query tiles per sample per expert
    B, H, qk_scale, softmax_scale,
    NUM_EXPERTS: tl.constexpr, VISIBLE: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    e, b, m0, q_start, q_len = _tile(NB0, NB1, NB2, CUQ0, CUQ1, CUQ2, B, BLOCK_M, NUM_EXPERTS)
    if m0 >= q_len:
        return

    offs_d = tl.arange(0, HEAD_D)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    sq_t = _pick(e, sq_t0, sq_t1, sq_t2, NUM_EXPERTS)
    q_base = _pick(e, Q0, Q1, Q2, NUM_EXPERTS) + q_start.to(tl.int64) * sq_t + h * _pick(
        e, sq_h0, sq_h1, sq_h2, NUM_EXPERTS)
    q = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tok = q_start.to(tl.int64) * (H * HEAD_D) + h * HEAD_D + rows[:, None] * (H * HEAD_D) + offs_d[None, :]
    do = tl.load(_pick(e, DO0, DO1, DO2, NUM_EXPERTS) + tok, mask=row_ok[:, None], other=0.0)
    stat = q_start.to(tl.int64) * H + h + rows * H
    lse2 = tl.load(_pick(e, LSE0, LSE1, LSE2, NUM_EXPERTS) + stat, mask=row_ok, other=0.0) * _LOG2E_DEVICE
    delta = tl.load(_pick(e, DELTA0, DELTA1, DELTA2, NUM_EXPERTS) + stat, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for ek in tl.static_range(NUM_EXPERTS):
        column = (VISIBLE >> ek) & (1 | (1 << NUM_EXPERTS) | (1 << (2 * NUM_EXPERTS)))
        if column != 0:
            if _sees(e, ek, VISIBLE, NUM_EXPERTS):
                cu_k = _static_pick(ek, CUK0, CUK1, CUK2)
                k_start = tl.load(cu_k + b)
                k_len = tl.load(cu_k + b + 1) - k_start
                sk_t = _static_pick(ek, sk_t0, sk_t1, sk_t2)
                sv_t = _static_pick(ek, sv_t0, sv_t1, sv_t2)
                k_ptrs = (_static_pick(ek, K0, K1, K2) + k_start.to(tl.int64) * sk_t
                          + h * _static_pick(ek, sk_h0, sk_h1, sk_h2)
                          + offs_n[:, None] * sk_t + offs_d[None, :])                          # [N, D]
                v_ptrs = (_static_pick(ek, V0, V1, V2) + k_start.to(tl.int64) * sv_t
                          + h * _static_pick(ek, sv_h0, sv_h1, sv_h2)
                          + offs_n[:, None] * sv_t + offs_d[None, :])                          # [N, D]
                shift = k_len - q_len
                full_hi, hi = _key_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
                dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, sk_t, sv_t, 0, full_hi, k_len, rows, shift,
                               qk_scale, False, CAUSAL, BLOCK_N, PRECISION)
                dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, sk_t, sv_t, full_hi, hi, k_len, rows,
                               shift, qk_scale, True, CAUSAL, BLOCK_N, PRECISION)

    tl.store(_pick(e, DQ0, DQ1, DQ2, NUM_EXPERTS) + tok, (dq * softmax_scale).to(DQ0.dtype.element_ty),
             mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host-side launchers. Everything the grid needs comes from shapes and the caller's max_seqlen bounds, so the
# launches are CUDA-graph friendly: no .item(), no host copies of cu_seqlens.
# ---------------------------------------------------------------------------------------------------------------

def _padded(xs, fill=None) -> list:
    return list(xs) + [fill] * (MAX_EXPERTS - len(xs))


def _token_head_strides(ts: Sequence[Optional[Tensor]]) -> list[int]:
    flat = []
    for t in _padded(ts):
        flat += [0, 0] if t is None else [t.stride(0), t.stride(1)]
    return flat


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get the exact fp32 dot (the GPU default would be tf32); fp16/bf16 are unaffected
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels take any token and head strides but need head_dim contiguous (16-byte vector loads)."""
    return t if t is None or t.stride(2) == 1 or t.numel() == 0 else t.contiguous()


def _row_bits(e: int, num_experts: int) -> int:
    return ((1 << num_experts) - 1) << (e * num_experts)


def effective_visibility(visible_bits: int, has_query: Sequence[bool]) -> int:
    """Clear the rows of experts that have no queries, so no kernel visits them."""
    for e, has in enumerate(has_query):
        if not has:
            visible_bits &= ~_row_bits(e, len(has_query))
    return visible_bits


def _common_args(q, k, v, cu_q, cu_k):
    E = len(k)
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the Triton joint attention supports 1..{MAX_EXPERTS} experts, got {E}")
    q, k, v = ([_unit_stride(t) for t in ts] for ts in (q, k, v))
    # experts without queries still need a pointer of the right type in the q slot; it is never read
    q_ptrs = [q[e] if q[e] is not None else k[e] for e in range(E)]
    return (*_padded(q_ptrs), *_padded(k), *_padded(v)), (*_padded(cu_q), *_padded(cu_k)), (
        *_token_head_strides(q_ptrs), *_token_head_strides(k), *_token_head_strides(v))


def attention_forward(q: Sequence[Optional[Tensor]], k: Sequence[Tensor], v: Sequence[Tensor],
                      cu_q: Sequence[Tensor], cu_k: Sequence[Tensor], max_q: Sequence[int], *, visible_bits: int,
                      softmax_scale: float, causal: bool = False, config: Optional[AttentionConfig] = None,
                      out: Optional[list] = None, lse: Optional[list] = None):
    """Multi-expert varlen attention forward.

    q/k/v[e]: [T_e, H, D] (q[e] may be None: expert e only provides keys/values); cu_q/cu_k[e]: int32 [B+1] on the
    device; max_q[e] >= every query length of expert e (sizes the grid); visible_bits: bit e_q * E + e_k.
    out/lse: optional preallocated buffers (tests pass NaN-filled ones to catch unwritten elements).
    Returns (out, lse): per expert [T_e, H, D] and fp32 [T_e, H] (natural log), None where q[e] is None.
    """
    q, k, v = ([_unit_stride(t) for t in ts] for ts in (q, k, v))
    launch = forward_launcher(q, k, v, cu_q, cu_k, max_q, visible_bits=visible_bits, softmax_scale=softmax_scale,
                              causal=causal, config=config)
    return launch(q, k, v, cu_q, cu_k, out, lse)


def forward_launcher(q: Sequence[Optional[Tensor]], k: Sequence[Tensor], v: Sequence[Tensor],
                     cu_q: Sequence[Tensor], cu_k: Sequence[Tensor], max_q: Sequence[int], *, visible_bits: int,
                     softmax_scale: float, causal: bool = False, config: Optional[AttentionConfig] = None,
                     write_lse: bool = True):
    """What a forward launch needs from the inputs' signature (shapes, strides, dtype, bounds), computed once:
    returns launch(q, k, v, cu_q, cu_k, out=None, lse=None) -> (out, lse) for any inputs of that signature (head
    dim contiguous, as _unit_stride makes it). Without `write_lse` the kernel writes no LSE and lse is all None."""
    E = len(k)
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the Triton joint attention supports 1..{MAX_EXPERTS} experts, got {E}")
    T_any, H, D = k[0].shape
    dtype, device = k[0].dtype, k[0].device
    config = config or default_config(D, dtype)
    if causal and E != 1:
        raise ValueError("causal attention is defined for a single expert only")
    B = cu_k[0].numel() - 1
    bm, bn = config.fwd.block_m, config.fwd.block_n
    has_q = [t is not None for t in q]
    out_shapes = [None if t is None else tuple(t.shape) for t in q]   # torch.empty parses a tuple faster
    bits = effective_visibility(visible_bits, has_q)
    nb = [triton.cdiv(max_q[e], bm) if has_q[e] else 0 for e in range(E)]
    grid = (B * sum(nb), H)
    q_ptrs = [q[e] if has_q[e] else k[e] for e in range(E)]
    scalars = (*_token_head_strides(q_ptrs), *_token_head_strides(k), *_token_head_strides(v), *_padded(nb, 0),
               B, H, softmax_scale * LOG2E)
    consts = dict(NUM_EXPERTS=E, VISIBLE=bits, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, HEAD_D=D,
                  PRECISION=_precision(dtype), WRITE_LSE=write_lse, num_warps=config.fwd.num_warps,
                  num_stages=config.fwd.num_stages)
    pad = [None] * (MAX_EXPERTS - E)
    all_q, first_q = all(has_q), (has_q.index(True) if any(has_q) else 0)

    def launch(q, k, v, cu_q, cu_k, out=None, lse=None):
        if out is None:
            out = [None if s is None else torch.empty(s, dtype=dtype, device=device) for s in out_shapes]
        if not write_lse:
            lse = [None] * E
        elif lse is None:
            lse = [None if s is None else torch.empty(s[:2], dtype=torch.float32, device=device) for s in out_shapes]
        if grid[0] == 0 or H == 0:
            return out, lse
        qs, outs, lses = q, out, lse
        # experts without queries still need pointers of the right type in the q/out/lse slots (never read nor
        # written): another expert's
        if not all_q and write_lse:
            lses = [lse[e] if has_q[e] else lse[first_q] for e in range(E)]
        if not all_q:
            qs = [q[e] if has_q[e] else k[e] for e in range(E)]
            outs = [out[e] if has_q[e] else k[e] for e in range(E)]
        _fwd_kernel[grid](*qs, *pad, *k, *pad, *v, *pad, *outs, *pad, *lses, *pad, *cu_q, *pad, *cu_k, *pad,
                          *scalars, **consts)
        return out, lse
    return launch


def attention_backward(do: Sequence[Optional[Tensor]], q: Sequence[Optional[Tensor]], k: Sequence[Tensor],
                       v: Sequence[Tensor], out: Sequence[Optional[Tensor]], lse: Sequence[Optional[Tensor]],
                       cu_q: Sequence[Tensor], cu_k: Sequence[Tensor], max_q: Sequence[int], max_k: Sequence[int],
                       *, visible_bits: int, softmax_scale: float, causal: bool = False,
                       config: Optional[AttentionConfig] = None, dq: Optional[list] = None,
                       dk: Optional[list] = None, dv: Optional[list] = None):
    """Gradients of attention_forward. do/out/lse[e]: as returned (contiguous), None where q[e] is None.

    Three launches: Delta = rowsum(dO * O); dK/dV per key tile; dQ per query tile. No atomics: deterministic.
    Returns (dq, dk, dv) per expert (dq[e] None where q[e] is None).
    """
    E = len(k)
    _, H, D = k[0].shape
    dtype = k[0].dtype
    config = config or default_config(D, dtype)
    if causal and E != 1:
        raise ValueError("causal attention is defined for a single expert only")
    B = cu_k[0].numel() - 1
    has_q = [t is not None for t in q]
    bits = effective_visibility(visible_bits, has_q)
    dev = k[0].device
    for e in range(E):
        if has_q[e] and (not do[e].is_contiguous() or not out[e].is_contiguous()):
            raise ValueError(f"do[{e}] and out[{e}] must be contiguous [T, H, D]")
    if dq is None:
        dq = [None if t is None else torch.empty(t.shape, dtype=dtype, device=dev) for t in q]
    if dk is None:
        dk = [torch.empty(t.shape, dtype=dtype, device=dev) for t in k]
    if dv is None:
        dv = [torch.empty(t.shape, dtype=dtype, device=dev) for t in v]
    if H == 0:
        return dq, dk, dv
    spare = torch.empty(0, dtype=torch.float32, device=dev)
    delta = [torch.empty(t.shape[:2], dtype=torch.float32, device=dev) if t is not None else spare for t in q]
    o_args = [out[e] if has_q[e] else k[e] for e in range(E)]
    do_args = [do[e] if has_q[e] else k[e] for e in range(E)]
    lse_args = [lse[e] if has_q[e] else spare for e in range(E)]
    dq_args = [dq[e] if has_q[e] else k[e] for e in range(E)]

    n_tok = [q[e].shape[0] if has_q[e] else 0 for e in range(E)]
    nt = [triton.cdiv(n, config.delta_block) for n in n_tok]
    if sum(nt):
        _delta_kernel[(sum(nt), H)](*_padded(o_args), *_padded(do_args), *_padded(delta), *_padded(nt, 0)[:2],
                                    *_padded(n_tok, 0), H, NUM_EXPERTS=E, BLOCK_T=config.delta_block, HEAD_D=D,
                                    num_warps=4, num_stages=1)

    tensors, cus, strides = _common_args(q, k, v, cu_q, cu_k)
    stats = (*_padded(do_args), *_padded(lse_args), *_padded(delta))
    consts = dict(NUM_EXPERTS=E, VISIBLE=bits, CAUSAL=causal, HEAD_D=D, PRECISION=_precision(dtype))
    nbk = [triton.cdiv(max_k[e], config.dkdv.block_n) for e in range(E)]
    if B * sum(nbk):
        _dkdv_kernel[(B * sum(nbk), H)](
            *tensors, *stats, *_padded(dk), *_padded(dv), *cus, *strides, *_padded(nbk, 0),
            B, H, softmax_scale * LOG2E, softmax_scale, **consts,
            BLOCK_M=config.dkdv.block_m, BLOCK_N=config.dkdv.block_n,
            num_warps=config.dkdv.num_warps, num_stages=config.dkdv.num_stages)
    nbq = [triton.cdiv(max_q[e], config.dq.block_m) if has_q[e] else 0 for e in range(E)]
    if B * sum(nbq):
        _dq_kernel[(B * sum(nbq), H)](
            *tensors, *stats, *_padded(dq_args), *cus, *strides, *_padded(nbq, 0),
            B, H, softmax_scale * LOG2E, softmax_scale, **consts,
            BLOCK_M=config.dq.block_m, BLOCK_N=config.dq.block_n,
            num_warps=config.dq.num_warps, num_stages=config.dq.num_stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile targets (used by tests/kernels/test_compile_joint_attention.py)
# ---------------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_targets(dtypes=GPU_DTYPES, head_dims=(64, 128)):
    """Every launch configuration used on a GPU, as compile_report(...) keyword arguments.

    Per (dtype, head_dim): three experts with all-to-all visibility (the largest code: every key-expert loop is
    compiled) and the single-expert causal variant used by varlen_attention, for the forward, dK/dV and dQ
    kernels, plus the Delta pre-pass. A partial visibility matrix only removes loops (constexpr); it is compiled
    once, for bf16 at head_dim 128. Pointers and strides carry the 16-divisibility hints Triton derives at run
    time for aligned buffers.
    """
    partial = visibility_bits([[1, 0, 1], [1, 1, 1], [0, 0, 1]], 3)
    for dtype in dtypes:
        dt = _TRITON_DTYPE[dtype]
        for D in head_dims:
            cfg = default_config(D, dtype)
            variants = [("E3", 3, visibility_bits(None, 3), False), ("E1-causal", 1, 1, True)]
            if dtype == torch.bfloat16 and D == max(head_dims):
                variants.append(("E3-masked", 3, partial, False))
            for tag, E, bits, causal in variants:
                for kname, fn, blocks in (("fwd", _fwd_kernel, cfg.fwd), ("dkdv", _dkdv_kernel, cfg.dkdv),
                                          ("dq", _dq_kernel, cfg.dq)):
                    # the forward with its LSE store (training) and, all-visible, without it (eager inference)
                    for lse in ((True, False) if kname == "fwd" and tag == "E3" else (True,)):
                        consts = dict(NUM_EXPERTS=E, VISIBLE=bits, CAUSAL=causal, BLOCK_M=blocks.block_m,
                                      BLOCK_N=blocks.block_n, HEAD_D=D, PRECISION=_precision(dtype),
                                      **({"WRITE_LSE": lse} if kname == "fwd" else {}))
                        yield dict(name=f"{kname} {dt} d{D} {tag}{'' if lse else ' no-LSE'} "
                                        f"{blocks.block_m}x{blocks.block_n} w{blocks.num_warps} s{blocks.num_stages}",
                                   fn=fn, **_signature(fn, dt, E, consts),
                                   num_warps=blocks.num_warps, num_stages=blocks.num_stages)
            consts = dict(NUM_EXPERTS=3, BLOCK_T=cfg.delta_block, HEAD_D=D)
            yield dict(name=f"delta {dt} d{D} E3 {cfg.delta_block}", fn=_delta_kernel,
                       **_signature(_delta_kernel, dt, 3, consts), num_warps=4, num_stages=1)


def _signature(fn, dt: str, num_experts: int, consts: dict) -> dict:
    """Per-expert arguments end in the expert index; pointers of experts >= num_experts are None (constexpr) and
    their ints unused. Token / head strides of q, k, v carry the 16-divisibility hint."""
    expert = lambda n: int(n[-1]) if n[-1].isdigit() else None                   # noqa: E731

    def pointer(name):
        stem = name.rstrip("0123456789")
        if not stem.isupper() or stem in ("B", "H", "NB", "NT", "T"):
            return None
        return "*fp32" if stem in ("LSE", "DELTA") else "*i32" if stem.startswith("CU") else f"*{dt}"
    used = lambda n: expert(n) is None or expert(n) < num_experts               # noqa: E731
    no_lse = consts.get("WRITE_LSE") is False                                   # launched with LSE* = None
    return kernel_signature(fn, consts, pointer, is_float=lambda n: n in ("qk_scale", "softmax_scale"),
                            aligned=lambda n: n.startswith("s") and n[1] in "qkv" and used(n),
                            absent=lambda n: not used(n) or (no_lse and n.startswith("LSE")))
