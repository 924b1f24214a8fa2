"""Triton kernels: RMSNorm of whole q/k rows (all heads together) with a learned weight, then interleaved RoPE,
for up to three experts in one launch (DESIGN.md section 5.2).

Each expert slot e brings q_e (optional) and k_e as row views [rows_e, WIDTH] with any row stride (the chunks of a
fused qkv projection), its own weights and eps, and optionally a rope table (cos, sin) [seq_e, HEAD_DIM/2] in any
float dtype (row r has position r % seq_e). The 1-D grid is the concatenation of the experts' programs; a program
finds its expert from the `start` offsets and normalises `tiles_per_prog` tiles of BLOCK_R rows of q and k.
Statistics, the weight product and the rotation are fp32; outputs are contiguous [rows_e, WIDTH] in the output
dtype.

A row is held as [pairs, 2] so the interleaved (real, imag) halves come out of one contiguous load with tl.split.

Backward recomputes rstd from the input, un-rotates dy, and writes dx plus a per-program fp32 partial of the weight
gradients ([programs, 2, WIDTH]: q then k) that the caller sums over each expert's programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from motus_fast.kernels.compile_check import kernel_signature


@triton.jit
def _rope(y, COS, SIN, r, seq_len, pairs, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate the interleaved pairs of rows y [R, BLOCK_P, 2] (row indices r [R, 1, 1]) by their positions'
    angles (or by minus them)."""
    j = (pairs % (HEAD_DIM // 2))[None, :]                       # [1, BLOCK_P]
    pos = (r % seq_len).to(tl.int64).reshape(r.shape[0], 1)      # [R, 1]
    pm = (pairs < WIDTH // 2)[None, :]
    c = tl.load(COS + pos * (HEAD_DIM // 2) + j, mask=pm, other=1.0).to(tl.float32)
    s = tl.load(SIN + pos * (HEAD_DIM // 2) + j, mask=pm, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    re, im = tl.split(y)
    return tl.join(re * c - im * s, re * s + im * c)


@triton.jit
def _row_sum(x):
    """[R, P, 2] -> [R, 1, 1]"""
    return tl.sum(tl.sum(x, axis=2), axis=1)[:, None, None]


@triton.jit
def _fwd_rows(X, Y, Wt, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
              WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
              ROPE: tl.constexpr):
    pairs = tl.arange(0, BLOCK_P)
    cols = (pairs[:, None] * 2 + tl.arange(0, 2)[None, :])[None, :, :]          # [1, BLOCK_P, 2]
    cmask = cols < WIDTH
    w = tl.load(Wt + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(0, tiles_per_prog):
        r = (prog * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]   # [R, 1, 1]
        mask = (r < n_rows) & cmask
        x = tl.load(X + r.to(tl.int64) * stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(_row_sum(x * x) / WIDTH + eps)
        y = x * rstd * w
        if ROPE:
            y = _rope(y, COS, SIN, r, seq_len, pairs, HEAD_DIM, WIDTH, False)
        tl.store(Y + r.to(tl.int64) * WIDTH + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_expert(Q, K, QO, KO, WQ, WK, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
                WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                HAS_Q: tl.constexpr,
                ROPE: tl.constexpr):
    if HAS_Q:
        _fwd_rows(Q, QO, WQ, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
                  WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, ROPE)
    _fwd_rows(K, KO, WK, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
              WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, ROPE)


@triton.jit
def qk_norm_rope_fwd_kernel(
    Q0, K0, QO0, KO0, WQ0, WK0, COS0, SIN0, rows0, stride0, seq0, eps0, tpp0,
    Q1, K1, QO1, KO1, WQ1, WK1, COS1, SIN1, rows1, stride1, seq1, eps1, tpp1,
    Q2, K2, QO2, KO2, WQ2, WK2, COS2, SIN2, rows2, stride2, seq2, eps2, tpp2,
    start1, start2,
    WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    HAS_Q0: tl.constexpr, HAS_Q1: tl.constexpr, HAS_Q2: tl.constexpr,
    ROPE0: tl.constexpr, ROPE1: tl.constexpr, ROPE2: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < start1:
        _fwd_expert(Q0, K0, QO0, KO0, WQ0, WK0, COS0, SIN0, pid, rows0, stride0, seq0, eps0, tpp0,
                    WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q0, ROPE0)
    else:
        if NUM_EXPERTS > 1:
            if pid < start2:
                _fwd_expert(Q1, K1, QO1, KO1, WQ1, WK1, COS1, SIN1, pid - start1, rows1, stride1, seq1, eps1,
                            tpp1, WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q1, ROPE1)
            else:
                if NUM_EXPERTS > 2:
                    _fwd_expert(Q2, K2, QO2, KO2, WQ2, WK2, COS2, SIN2, pid - start2, rows2, stride2, seq2, eps2,
                                tpp2, WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q2, ROPE2)


@triton.jit
def _bwd_rows(X, DY, DX, Wt, DW, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
              WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
              ROPE: tl.constexpr):
    """DY, DX: contiguous [rows, WIDTH]; DW: this program's fp32 partial row [WIDTH]."""
    pairs = tl.arange(0, BLOCK_P)
    cols = (pairs[:, None] * 2 + tl.arange(0, 2)[None, :])[None, :, :]
    cmask = cols < WIDTH
    w = tl.load(Wt + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_P, 2], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        r = (prog * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]
        mask = (r < n_rows) & cmask
        x = tl.load(X + r.to(tl.int64) * stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + r.to(tl.int64) * WIDTH + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(_row_sum(x * x) / WIDTH + eps)
        if ROPE:
            g = _rope(g, COS, SIN, r, seq_len, pairs, HEAD_DIM, WIDTH, True)   # R^T dy
        n = x * rstd
        dw += g * n
        dn = g * w
        dx = rstd * (dn - n * (_row_sum(dn * n) / WIDTH))
        tl.store(DX + r.to(tl.int64) * WIDTH + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + cols, tl.sum(dw, axis=0)[None, :, :], mask=cmask)


@triton.jit
def _bwd_expert(Q, K, DQO, DKO, DQ, DK, WQ, WK, DW, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
                WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                HAS_Q: tl.constexpr,
                ROPE: tl.constexpr):
    if HAS_Q:
        _bwd_rows(Q, DQO, DQ, WQ, DW, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
                  WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, ROPE)
    _bwd_rows(K, DKO, DK, WK, DW + WIDTH, COS, SIN, prog, n_rows, stride, seq_len, eps, tiles_per_prog,
              WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, ROPE)


@triton.jit
def qk_norm_rope_bwd_kernel(
    Q0, K0, DQO0, DKO0, DQ0, DK0, WQ0, WK0, COS0, SIN0, rows0, stride0, seq0, eps0, tpp0,
    Q1, K1, DQO1, DKO1, DQ1, DK1, WQ1, WK1, COS1, SIN1, rows1, stride1, seq1, eps1, tpp1,
    Q2, K2, DQO2, DKO2, DQ2, DK2, WQ2, WK2, COS2, SIN2, rows2, stride2, seq2, eps2, tpp2,
    DW, start1, start2,
    WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    HAS_Q0: tl.constexpr, HAS_Q1: tl.constexpr, HAS_Q2: tl.constexpr,
    ROPE0: tl.constexpr, ROPE1: tl.constexpr, ROPE2: tl.constexpr,
):
    """DW: fp32 [programs, 2, WIDTH] weight-gradient partials (q row, k row) of every program."""
    pid = tl.program_id(0)
    dw = DW + pid.to(tl.int64) * (2 * WIDTH)
    if pid < start1:
        _bwd_expert(Q0, K0, DQO0, DKO0, DQ0, DK0, WQ0, WK0, dw, COS0, SIN0, pid, rows0, stride0, seq0, eps0, tpp0,
                    WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q0, ROPE0)
    else:
        if NUM_EXPERTS > 1:
            if pid < start2:
                _bwd_expert(Q1, K1, DQO1, DKO1, DQ1, DK1, WQ1, WK1, dw, COS1, SIN1, pid - start1, rows1, stride1,
                            seq1, eps1, tpp1, WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q1, ROPE1)
            else:
                if NUM_EXPERTS > 2:
                    _bwd_expert(Q2, K2, DQO2, DKO2, DQ2, DK2, WQ2, WK2, dw, COS2, SIN2, pid - start2, rows2,
                                stride2, seq2, eps2, tpp2, WIDTH, HEAD_DIM, BLOCK_R, BLOCK_P, HAS_Q2, ROPE2)


# ---- launchers ---------------------------------------------------------------------------------------------
MAX_EXPERTS = 3


def block_pairs(width: int) -> int:
    return triton.next_power_of_2((width + 1) // 2)


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1


def _slot_tensors(slot, dummy, backward: bool) -> list:
    """Tensor arguments of one expert slot (None: an unused slot)."""
    if slot is None:
        return [dummy] * (10 if backward else 8)
    cos, sin = slot["rope"] if slot["rope"] is not None else (dummy, dummy)
    has_q = slot["q"] is not None
    q = slot["q"] if has_q else slot["k"]                # keys-only expert: q arguments unused (HAS_Q False)
    wq = slot["wq"] if has_q else slot["wk"]
    if backward:
        return [q, slot["k"], slot["dqo"] if has_q else slot["dko"], slot["dko"], slot["dq"] if has_q else slot["dk"],
                slot["dk"], wq, slot["wk"], cos, sin]
    return [q, slot["k"], slot["qo"] if has_q else slot["ko"], slot["ko"], wq, slot["wk"], cos, sin]


def plan(slots, width: int, max_programs: int, tile_elems: int) -> int:
    """Choose BLOCK_R (rows per tile) and set each slot's tiles per program ("tpp") and programs ("progs"), about
    `max_programs` programs per expert. Returns BLOCK_R."""
    max_rows = max(s["rows"] for s in slots)
    block_r = max(1, min(triton.next_power_of_2(max(max_rows, 1)), tile_elems // (2 * block_pairs(width))))
    for s in slots:
        tiles = -(-s["rows"] // block_r)
        s["tpp"] = -(-tiles // max(1, min(tiles, max_programs))) if tiles else 1
        s["progs"] = -(-tiles // s["tpp"]) if tiles else 0
    return block_r


def launcher(kernel, slots, width: int, head_dim: int, block_r: int, backward: bool):
    """Grid, flags and integer arguments of a launch for slots of this layout (plan()ed), computed once: returns
    launch(slots, *extra) for slots holding any tensors of the same layout."""
    if len(slots) > MAX_EXPERTS:
        raise ValueError(f"qk_norm_rope kernels take at most {MAX_EXPERTS} experts, got {len(slots)}")
    progs = [s["progs"] for s in slots]
    if sum(progs) == 0:
        return lambda slots, *extra: None
    n = len(slots)
    ints = [(s["rows"], s["stride"], s["seq"], s["eps"], s["tpp"]) for s in slots] + [(0, 0, 1, 1.0, 1)] * (
        MAX_EXPERTS - n)
    starts = (progs[0], progs[0] + (progs[1] if n > 1 else 0))
    bp = block_pairs(width)
    padded = list(slots) + [None] * (MAX_EXPERTS - n)
    consts = {f"HAS_Q{i}": s is not None and s["q"] is not None for i, s in enumerate(padded)}
    consts.update({f"ROPE{i}": s is not None and s["rope"] is not None for i, s in enumerate(padded)})
    consts.update(WIDTH=width, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_P=bp, NUM_EXPERTS=n,
                  num_warps=_warps(2 * bp * block_r))
    grid = (sum(progs),)

    def launch(slots, *extra):
        args = []
        for i in range(MAX_EXPERTS):
            args += _slot_tensors(slots[i] if i < n else None, slots[0]["k"], backward)
            args += ints[i]
        kernel[grid](*args, *extra, *starts, **consts)
    return launch


def qk_norm_rope_forward(slots, width: int, head_dim: int, block_r: int):
    """slots (<= 3): per expert dict(q, k, qo, ko, wq, wk, rope, rows, stride, seq, eps) with plan()'s tpp/progs;
    q/qo/wq None for a keys-only expert. Row views [rows, width] with unit column stride."""
    launcher(qk_norm_rope_fwd_kernel, slots, width, head_dim, block_r, backward=False)(slots)


def qk_norm_rope_backward(slots, dw_partial, width: int, head_dim: int, block_r: int):
    """slots: as for the forward plus dqo, dko (output grads) and dq, dk (contiguous input grads);
    dw_partial: fp32 [sum(progs), 2, width] (row q, row k of each program)."""
    launcher(qk_norm_rope_bwd_kernel, slots, width, head_dim, block_r, backward=True)(slots, dw_partial)


# ---- sm_90 compile targets (tests/kernels/test_compile_fused.py) --------------------------------------------------
def compile_targets(dtypes=("bf16", "fp32"), widths=((3072, 128), (1536, 128))):
    """The GPU launch configurations (plan() with a GPU budget: 4096-element tiles) as compile_report kwargs:
    Motus layers (video with RoPE, action, und with and without queries), and rms_norm (one keys-only slot)."""
    variants = [("3 experts", 3, (True, True, True), (True, False, False)),
                ("3 experts, und keys only", 3, (True, True, False), (True, False, False)),
                ("rms_norm", 1, (False,), (False,))]
    for dt in dtypes:
        for width, head_dim in widths:
            bp = block_pairs(width)
            block_r = max(1, 4096 // (2 * bp))
            for name, E, has_q, rope in variants:
                if (dt != dtypes[0] or width != widths[0][0]) and name != variants[0][0]:
                    continue
                consts = dict(WIDTH=width, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_P=bp, NUM_EXPERTS=E)
                for i in range(MAX_EXPERTS):
                    consts[f"HAS_Q{i}"] = i < E and has_q[i]
                    consts[f"ROPE{i}"] = i < E and rope[i]
                for kname, fn in (("fwd", qk_norm_rope_fwd_kernel), ("bwd", qk_norm_rope_bwd_kernel)):
                    yield dict(name=f"qk_norm_rope {kname} {name} {dt} W{width} R{block_r}", fn=fn,
                               **_signature(fn, dt, consts), num_warps=_warps(2 * bp * block_r), num_stages=1)


def _signature(fn, dt: str, consts: dict) -> dict:
    """Tensors are pointers (rope tables fp64, weight partials fp32), eps fp32, the rest i32; row strides carry
    the 16-divisibility of qkv chunks."""
    def pointer(name):
        stem = name.rstrip("0123456789")
        if not stem.isupper():
            return None
        return "*fp64" if stem in ("COS", "SIN") else "*fp32" if stem == "DW" else f"*{dt}"
    return kernel_signature(fn, consts, pointer, is_float=lambda n: n.rstrip("0123456789") == "eps",
                            aligned=lambda n: n.rstrip("0123456789") == "stride")
