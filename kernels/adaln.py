"""Triton kernels: AdaLN modulation and the gated residual in front of it (DESIGN.md section 5.3).

Forward, per row of D features:

    x' = x + gate * y                       (gated_residual_adaln only; gate None = ungated residual)
    n  = LN(x')  or  RMS(x')                (fp32 statistics, no affine)
    h  = n * (1 + scale) + shift            (modulation None = plain normalisation)

A program owns `tiles_per_prog` consecutive tiles of BLOCK_R rows of one sample (grid = [programs per sample, B]),
so per-sample modulation [B, 1, D] is loaded once per program; per-token modulation [B, L, D] with each tile.
Broadcast is expressed by a zero stride. The backward kernel recomputes the statistics from x' and writes dx (and
dy, d_gate); per-sample modulation gradients are reduced over the program's rows into an fp32 partial buffer
[B, programs, D] that the caller sums (deterministic, no atomics); per-token ones are written row by row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from motus_fast.kernels import constexpr_order
from motus_fast.kernels.compile_check import kernel_signature


@triton.jit
def _normalise(x, mask, D, eps, RMS: tl.constexpr):
    """fp32 rows x [R, BLOCK_D] -> (n, rstd [R, 1]) with n = (x - mean) * rstd (x * rstd for RMS); masked lanes 0."""
    if RMS:
        xc = x
    else:
        xc = tl.where(mask, x - tl.sum(x, axis=1)[:, None] / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1)[:, None] / D + eps)
    return xc * rstd, rstd


@triton.jit
def adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, XOUT, H,
    L, D, tiles_per_prog, eps,
    s_xb, s_xl, s_yb, s_yl, s_gb, s_gl, s_shb, s_shl, s_scb, s_scl, s_ob, s_ol, s_hb, s_hl,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr, PER_TOKEN: tl.constexpr,
    RMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < D
    if not PER_TOKEN:  # per-sample modulation: one load per program
        if HAS_GATE:
            gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_MOD:
            shift = tl.load(SHIFT + b * s_shb + cols, mask=cmask, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(0, tiles_per_prog):
        l = ((pid * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        mask = (l < L) & cmask
        x = tl.load(X + b * s_xb + l * s_xl + cols, mask=mask, other=0.0).to(tl.float32)
        if PER_TOKEN:
            if HAS_GATE:
                gate = tl.load(GATE + b * s_gb + l * s_gl + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_MOD:
                shift = tl.load(SHIFT + b * s_shb + l * s_shl + cols, mask=mask, other=0.0).to(tl.float32)
                scale = tl.load(SCALE + b * s_scb + l * s_scl + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(Y + b * s_yb + l * s_yl + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * gate
            # the residual stream is stored in its dtype; normalise exactly what was stored
            xr = (x + y).to(XOUT.dtype.element_ty)
            tl.store(XOUT + b * s_ob + l * s_ol + cols, xr, mask=mask)
            x = xr.to(tl.float32)
        n, _ = _normalise(x, mask, D, eps, RMS)
        if HAS_MOD:
            n = n * (1.0 + scale) + shift
        tl.store(H + b * s_hb + l * s_hl + cols, n.to(H.dtype.element_ty), mask=mask)


@triton.jit
def adaln_bwd_kernel(
    XR, Y, GATE, SCALE, DH, DXR,
    DX, DY, DGATE, DSHIFT, DSCALE,
    L, D, tiles_per_prog, num_progs, eps,
    s_xb, s_xl, s_yb, s_yl, s_gb, s_gl, s_scb, s_scl, s_dhb, s_dhl, s_dxrb, s_dxrl,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr, PER_TOKEN: tl.constexpr,
    RMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """XR: the normalised input (x' of the residual, or x). DH: grad of h; DXR: grad of the x' output.
    Outputs DX, DY are contiguous [B, L, D]. DGATE/DSHIFT/DSCALE: contiguous [B, L, D] (per token) or fp32
    partials [B, num_progs, D] (per sample)."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cmask = cols < D
    if HAS_MOD:
        if not PER_TOKEN:
            scale = tl.load(SCALE + b * s_scb + cols, mask=cmask, other=0.0).to(tl.float32)
            acc_shift = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            acc_scale = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    if HAS_GATE:
        if not PER_TOKEN:
            gate = tl.load(GATE + b * s_gb + cols, mask=cmask, other=0.0).to(tl.float32)
            acc_gate = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        l = ((pid * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        mask = (l < L) & cmask
        x = tl.load(XR + b * s_xb + l * s_xl + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + b * s_dhb + l * s_dhl + cols, mask=mask, other=0.0).to(tl.float32)
        n, rstd = _normalise(x, mask, D, eps, RMS)
        out = b * L * D + l * D + cols                       # rows of the contiguous outputs
        if HAS_MOD:
            if PER_TOKEN:
                scale = tl.load(SCALE + b * s_scb + l * s_scl + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DSHIFT + out, dh.to(DSHIFT.dtype.element_ty), mask=mask)
                tl.store(DSCALE + out, (dh * n).to(DSCALE.dtype.element_ty), mask=mask)
            else:
                acc_shift += dh
                acc_scale += dh * n
            dn = dh * (1.0 + scale)
        else:
            dn = dh
        # d/dx of n: rstd * (dn - mean(dn) - n * mean(dn * n)); RMS has no mean term
        dx = dn - n * (tl.sum(dn * n, axis=1)[:, None] / D)
        if not RMS:
            dx -= tl.sum(dn, axis=1)[:, None] / D
        dx = tl.where(mask, dx * rstd, 0.0)
        if HAS_RESIDUAL:
            dx += tl.load(DXR + b * s_dxrb + l * s_dxrl + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = tl.load(Y + b * s_yb + l * s_yl + cols, mask=mask, other=0.0).to(tl.float32)
                if PER_TOKEN:
                    gate = tl.load(GATE + b * s_gb + l * s_gl + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DGATE + out, (dx * y).to(DGATE.dtype.element_ty), mask=mask)
                else:
                    acc_gate += dx * y
                tl.store(DY + out, (dx * gate).to(DY.dtype.element_ty), mask=mask)
            else:
                tl.store(DY + out, dx.to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
    if not PER_TOKEN:
        part = (b * num_progs + pid) * D + tl.arange(0, BLOCK_D)
        pmask = tl.arange(0, BLOCK_D) < D
        if HAS_MOD:
            tl.store(DSHIFT + part, tl.sum(acc_shift, axis=0), mask=pmask)
            tl.store(DSCALE + part, tl.sum(acc_scale, axis=0), mask=pmask)
        if HAS_GATE:
            tl.store(DGATE + part, tl.sum(acc_gate, axis=0), mask=pmask)


# ---- launchers ---------------------------------------------------------------------------------------------
def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _warps(block_d: int) -> int:
    return 8 if block_d >= 4096 else 4 if block_d >= 1024 else 2 if block_d >= 256 else 1


def plan(B: int, L: int, D: int, max_programs: int, tile_elems: int) -> tuple[int, int, int]:
    """(rows per tile BLOCK_R, tiles per program, programs per sample): tiles of about `tile_elems` elements,
    about `max_programs` programs over the B samples."""
    block_r = max(1, min(triton.next_power_of_2(max(L, 1)), tile_elems // _block_d(D)))
    tiles = -(-L // block_r)
    if tiles == 0:
        return block_r, 1, 0
    per_tile = -(-tiles // max(1, min(tiles, max_programs // max(B, 1))))
    return block_r, per_tile, -(-tiles // per_tile)


def _strides(t, L):
    """(batch stride, row stride) of a [B|1, L|1, D] tensor or None; a broadcast dim gets stride 0."""
    if t is None:
        return 0, 0
    return (0 if t.shape[0] == 1 else t.stride(0)), (0 if t.shape[1] == 1 else t.stride(1))


def _or(t, dummy):
    return dummy if t is None else t


def forward_launcher(shape: tuple[int, int, int], strides: tuple[int, ...], has_residual: bool, has_gate: bool,
                     has_mod: bool, per_token: bool, rms: bool, eps: float, tiling: tuple[int, int, int]):
    """Everything of an adaln_fwd_kernel launch that depends only on the input signature, computed once: returns
    launch(x, y, gate, shift, scale, x_out, h) (absent tensors None). x, y: [B, L, D] (unit last stride);
    gate/shift/scale: [B|1, 1|L, D]; strides: the (batch, row) strides of x, y, gate, shift, scale, x_out, h as
    _strides gives them; tiling: plan(B, L, D, ...)."""
    B, L, D = shape
    block_r, tiles, progs = tiling
    if B == 0 or progs == 0:
        return lambda *tensors: None
    block = _block_d(D)
    consts = dict(HAS_RESIDUAL=has_residual, HAS_GATE=has_gate, HAS_MOD=has_mod, PER_TOKEN=per_token, RMS=rms,
                  BLOCK_R=block_r, BLOCK_D=block)
    grid, scalars = (progs, B), (L, D, tiles, eps, *strides, *(consts[n] for n in _FWD_CONSTEXPRS))
    warps = _warps(block_r * block)

    def launch(x, y, gate, shift, scale, x_out, h):   # absent tensors: x in their (unread) slots
        adaln_fwd_kernel[grid](x, y if has_residual else x, gate if has_gate else x, shift if has_mod else x,
                               scale if has_mod else x, x_out if has_residual else x, h, *scalars, num_warps=warps)
    return launch


_FWD_CONSTEXPRS = constexpr_order(adaln_fwd_kernel, 7)


def strides_of(L: int, *tensors) -> tuple[int, ...]:
    """The (batch, row) strides of each [B|1, L|1, D] tensor (or None), flattened, as the kernels take them."""
    return tuple(s for t in tensors for s in _strides(t, L))


def adaln_backward(xr, y, gate, scale, dh, dxr, eps: float, rms: bool, dx, dy, dgate, dshift, dscale,
                   per_token: bool, tiling: tuple[int, int, int]):
    """Gradients of adaln_forward (see adaln_bwd_kernel); per-sample modulation grads go to fp32 partials
    [B, tiling[2], D] that the caller sums over dim 1."""
    B, L, D = xr.shape
    block_r, tiles, progs = tiling
    if B == 0 or progs == 0:
        return
    block = _block_d(D)
    adaln_bwd_kernel[(progs, B)](
        xr, _or(y, xr), _or(gate, xr), _or(scale, xr), dh, _or(dxr, xr),
        dx, _or(dy, dx), _or(dgate, dx), _or(dshift, dx), _or(dscale, dx),
        L, D, tiles, progs, eps,
        *_strides(xr, L), *_strides(y, L), *_strides(gate, L), *_strides(scale, L), *_strides(dh, L),
        *_strides(dxr, L),
        HAS_RESIDUAL=y is not None, HAS_GATE=gate is not None, HAS_MOD=scale is not None, PER_TOKEN=per_token,
        RMS=rms, BLOCK_R=block_r, BLOCK_D=block, num_warps=_warps(block_r * block),
    )


# ---- sm_90 compile targets (tests/kernels/test_compile_fused.py) --------------------------------------------------
_TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# (name, residual, gate, modulation, per token, rms): the variants the model launches, plus the RMS variant
VARIANTS = [("adaln/sample", False, False, True, False, False), ("adaln/token", False, False, True, True, False),
            ("ln", False, False, False, False, False), ("gated/sample", True, True, True, False, False),
            ("gated/token", True, True, True, True, False), ("residual+adaln/token", True, False, True, True, False),
            ("residual+ln", True, False, False, False, False), ("rms/sample", False, False, True, False, True)]


def compile_targets(dtypes=("bfloat16", "float32"), widths=(3072, 1024, 512)):
    """The GPU launch configurations (plan() with a GPU budget: 4096-element tiles) as compile_report kwargs:
    every variant in bf16 at width 3072; the main variants at the action / und widths and in fp32."""
    for dtype in dtypes:
        for D in widths:
            block = _block_d(D)
            block_r = max(1, 4096 // block)
            for name, res, gate, mod, per_token, rms in VARIANTS:
                if (dtype != dtypes[0] or D != widths[0]) and name not in ("adaln/sample", "gated/sample"):
                    continue
                consts = dict(HAS_RESIDUAL=res, HAS_GATE=gate, HAS_MOD=mod, PER_TOKEN=per_token, RMS=rms,
                              BLOCK_R=block_r, BLOCK_D=block)
                for kname, fn in (("fwd", adaln_fwd_kernel), ("bwd", adaln_bwd_kernel)):
                    yield dict(name=f"adaln {kname} {name} {_TRITON_DTYPE[dtype]} D{D} R{block_r}", fn=fn,
                               **_signature(fn, _TRITON_DTYPE[dtype], D, consts),
                               num_warps=_warps(block_r * block), num_stages=1)


def _signature(fn, dt: str, D: int, consts: dict) -> dict:
    """Tensors are pointers (gradient partials fp32), eps fp32, the rest i32; widths and row strides 16-aligned."""
    return kernel_signature(
        fn, consts, lambda n: None if not n.isupper() or n in ("L", "D") else
        "*fp32" if n in ("DGATE", "DSHIFT", "DSCALE") else f"*{dt}",
        is_float=lambda n: n == "eps", aligned=lambda n: D % 16 == 0 and (n == "D" or n.startswith("s_")))
