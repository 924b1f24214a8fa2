"""Triton kernels of the rectified-flow step (DESIGN.md section 5.4): memory-bound, so one pass and one launch each.

Latents are viewed as [B, C, T, S] (S = H*W; actions are [B, 1, 1, K*A]); programs work on blocks of one sample
(offsets within a sample are int32), element i of a sample is in frame (i // S) % T. Frames t < `clean_frames` are
the clean condition frames.

- noise_and_target: x_t = (1 - sigma_b) x0 + sigma_b noise (x0 itself on clean frames), v = noise - x0.
- masked MSE: per-sample sums of (pred - target)^2 over the non-clean frames into fp32 partials [B, programs]
  (the caller reduces them), and its backward d_pred = g * 2 (pred - target) * coef_b (0 on clean frames).
- euler_step: x + dt_b * v for up to two streams (video, action) in one launch; frames t < Tc of a stream with a condition are overwritten by the condition [B, C, Tc, S].
"""

from __future__ import annotations

import triton
import triton.language as tl

from motus_fast.kernels import constexpr_order
from motus_fast.kernels.compile_check import kernel_signature


@triton.jit
def noise_and_target_kernel(X0, NOISE, SIGMA, XT, V, per_sample, T, S, clean_frames, BLOCK: tl.constexpr):
    """grid (blocks per sample, B): element offsets within a sample stay int32; sigma is one scalar load."""
    b = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < per_sample
    base = b.to(tl.int64) * per_sample
    x0 = tl.load(X0 + base + i, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(NOISE + base + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.where((i // S) % T < clean_frames, 0.0, tl.load(SIGMA + b).to(tl.float32))
    tl.store(XT + base + i, ((1.0 - s) * x0 + s * eps).to(XT.dtype.element_ty), mask=mask)
    tl.store(V + base + i, (eps - x0).to(V.dtype.element_ty), mask=mask)


@triton.jit
def masked_sq_err_kernel(PRED, TARGET, PARTIAL, per_sample, chunk, T, S, skip_frames, num_progs,
                         BLOCK: tl.constexpr):
    """PARTIAL[b, p] = sum over elements [p*chunk, (p+1)*chunk) of sample b of (pred - target)^2 (fp32)."""
    p, b = tl.program_id(0), tl.program_id(1)
    base = b.to(tl.int64) * per_sample
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lo = p * chunk
    for start in range(0, chunk, BLOCK):
        i = lo + start + tl.arange(0, BLOCK)
        mask = (i < lo + chunk) & (i < per_sample) & ((i // S) % T >= skip_frames)
        d = (tl.load(PRED + base + i, mask=mask, other=0.0).to(tl.float32)
             - tl.load(TARGET + base + i, mask=mask, other=0.0).to(tl.float32))
        acc += d * d
    tl.store(PARTIAL + b * num_progs + p, tl.sum(acc, axis=0))


@triton.jit
def masked_sq_err_bwd_kernel(PRED, TARGET, COEF, GRAD, DPRED, per_sample, T, S, skip_frames, BLOCK: tl.constexpr):
    """grid (blocks per sample, B): d_pred = grad * coef_b * 2 (pred - target), 0 on skipped frames."""
    b = tl.program_id(1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < per_sample
    base = b.to(tl.int64) * per_sample
    d = (tl.load(PRED + base + i, mask=mask, other=0.0).to(tl.float32)
         - tl.load(TARGET + base + i, mask=mask, other=0.0).to(tl.float32))
    c = tl.load(COEF + b) * tl.load(GRAD).to(tl.float32)
    g = tl.where((i // S) % T >= skip_frames, 2.0 * c * d, 0.0)
    tl.store(DPRED + base + i, g.to(DPRED.dtype.element_ty), mask=mask)


@triton.jit
def _euler_stream(X, V, COND, OUT, DT, dt_stride, prog, per_sample, T, S, Tc, cs_b, cs_c, cs_f,
                  HAS_COND: tl.constexpr, BLOCK: tl.constexpr):
    """Program `prog` of this stream: block prog % blocks of sample prog // blocks (int32 offsets in a sample)."""
    blocks = tl.cdiv(per_sample, BLOCK)
    b = prog // blocks
    i = (prog % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = i < per_sample
    base = b.to(tl.int64) * per_sample
    x = tl.load(X + base + i, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + base + i, mask=mask, other=0.0).to(tl.float32)
    x = x + tl.load(DT + b * dt_stride).to(tl.float32) * v
    if HAS_COND:
        f = (i // S) % T
        clean = mask & (f < Tc)
        # condition [B, C, Tc, S] with strides (cs_b, cs_c, cs_f, 1) (e.g. a frame slice of the latents):
        # channel i // (T*S), frame f, position i % S
        c_off = b.to(tl.int64) * cs_b + (i // (T * S)) * cs_c + f * cs_f + i % S
        x = tl.where(clean, tl.load(COND + c_off, mask=clean, other=0.0).to(tl.float32), x)
    tl.store(OUT + base + i, x.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def euler_step_kernel(
    X0, V0, COND0, OUT0, per_sample0, T0, S0, Tc0, cs_b0, cs_c0, cs_f0,
    X1, V1, COND1, OUT1, per_sample1, T1, S1, Tc1, cs_b1, cs_c1, cs_f1,
    DT, dt_stride, start1,
    NUM_STREAMS: tl.constexpr, HAS_COND0: tl.constexpr, HAS_COND1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """1-D grid: the programs of stream 0 (B x blocks per sample), then those of stream 1."""
    pid = tl.program_id(0)
    if pid < start1:
        _euler_stream(X0, V0, COND0, OUT0, DT, dt_stride, pid, per_sample0, T0, S0, Tc0, cs_b0, cs_c0, cs_f0,
                      HAS_COND0, BLOCK)
    else:
        if NUM_STREAMS > 1:
            _euler_stream(X1, V1, COND1, OUT1, DT, dt_stride, pid - start1, per_sample1, T1, S1, Tc1,
                          cs_b1, cs_c1, cs_f1, HAS_COND1, BLOCK)


# ---- launchers ---------------------------------------------------------------------------------------------
BLOCK = 1024
MAX_STREAMS = 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def noise_and_target(x0, noise, sigma, x_t, v, per_sample: int, T: int, S: int, clean_frames: int):
    B = x0.shape[0]
    if B and per_sample:
        noise_and_target_kernel[(_cdiv(per_sample, BLOCK), B)](x0, noise, sigma, x_t, v, per_sample, T, S,
                                                               clean_frames, BLOCK=BLOCK, num_warps=4)


def masked_sq_err(pred, target, partial, per_sample: int, T: int, S: int, skip_frames: int):
    """partial: fp32 [B, P]; each of the P programs of a sample sums a contiguous chunk of it."""
    B, P = partial.shape
    if B and P:
        chunk = _cdiv(_cdiv(per_sample, P), BLOCK) * BLOCK
        masked_sq_err_kernel[(P, B)](pred, target, partial, per_sample, chunk, T, S, skip_frames, P,
                                     BLOCK=BLOCK, num_warps=4)


def masked_sq_err_backward(pred, target, coef, grad, d_pred, per_sample: int, T: int, S: int, skip_frames: int):
    B = pred.shape[0]
    if B and per_sample:
        masked_sq_err_bwd_kernel[(_cdiv(per_sample, BLOCK), B)](pred, target, coef, grad, d_pred, per_sample, T, S,
                                                                skip_frames, BLOCK=BLOCK, num_warps=4)


def euler_launcher(streams, dt_stride: int):
    """streams: up to two (B, (per_sample, T, S), has_cond, Tc, cond strides) of contiguous latents viewed as
    [B, per_sample] with T frames of S (see _layout in motus_fast/ops/flow_step.py); cond strides: the (batch,
    channel, frame) strides of the condition, whose frames are contiguous. Returns launch(xs, vs, conds, outs, dt),
    the launch arguments computed once."""
    if len(streams) > MAX_STREAMS:
        raise ValueError(f"euler_step takes at most {MAX_STREAMS} streams in one launch, got {len(streams)}")
    progs = [B * _cdiv(per_sample, BLOCK) for B, (per_sample, T, S), has_cond, Tc, strides in streams]
    if sum(progs) == 0:
        return lambda xs, vs, conds, outs, dt: None
    n = len(streams)
    sizes = [(*layout, Tc, *strides) for B, layout, has_cond, Tc, strides in streams] + [(1, 1, 1, 0, 0, 0, 0)] * (
        MAX_STREAMS - n)
    has_cond = [s[2] for s in streams] + [False] * (MAX_STREAMS - n)
    consts = dict(NUM_STREAMS=n, HAS_COND0=has_cond[0], HAS_COND1=has_cond[1], BLOCK=BLOCK)
    grid, tail = (sum(progs),), (dt_stride, progs[0], *(consts[name] for name in _EULER_CONSTEXPRS))
    c0, c1 = has_cond[0], has_cond[1]
    s0, s1 = sizes[0], sizes[1]

    def launch(xs, vs, conds, outs, dt):   # (MAX_STREAMS = 2) an absent second stream gets stream 0's pointers
        x0 = xs[0]
        x1, v1, o1, cond1 = (xs[1], vs[1], outs[1], conds[1] if c1 else xs[1]) if n > 1 else (x0, x0, x0, x0)
        euler_step_kernel[grid](x0, vs[0], conds[0] if c0 else x0, outs[0], *s0, x1, v1, cond1, o1, *s1,
                                dt, *tail, num_warps=4)
    return launch


_EULER_CONSTEXPRS = constexpr_order(euler_step_kernel, 4)


# ---- sm_90 compile targets (tests/kernels/test_compile_fused.py) --------------------------------------------------
def compile_targets(dtypes=("bf16", "fp32")):
    """Every kernel as launched on a GPU, as compile_report kwargs; euler_step with both streams (video with its
    condition frame, actions) and the action stream alone."""
    for dt in dtypes:
        yield dict(name=f"noise_and_target {dt}", fn=noise_and_target_kernel,
                   **_signature(noise_and_target_kernel, dt, dict(BLOCK=BLOCK)), num_warps=4, num_stages=1)
        yield dict(name=f"masked_sq_err {dt}", fn=masked_sq_err_kernel,
                   **_signature(masked_sq_err_kernel, dt, dict(BLOCK=BLOCK)), num_warps=4, num_stages=1)
        yield dict(name=f"masked_sq_err_bwd {dt}", fn=masked_sq_err_bwd_kernel,
                   **_signature(masked_sq_err_bwd_kernel, dt, dict(BLOCK=BLOCK)), num_warps=4, num_stages=1)
        for streams, cond0 in ((2, True), (1, False)):
            consts = dict(NUM_STREAMS=streams, HAS_COND0=cond0, HAS_COND1=False, BLOCK=BLOCK)
            yield dict(name=f"euler_step {dt} streams={streams} cond={cond0}", fn=euler_step_kernel,
                       **_signature(euler_step_kernel, dt, consts), num_warps=4, num_stages=1)


def _signature(fn, dt: str, consts: dict) -> dict:
    """Tensors are pointers (sigma / loss coefficients / partials fp32), the rest i32."""
    def pointer(name):
        stem = name.rstrip("0123456789")
        if not stem.isupper() or stem in ("T", "S"):
            return None
        return "*fp32" if stem in ("SIGMA", "PARTIAL", "COEF", "GRAD") else f"*{dt}"
    return kernel_signature(fn, consts, pointer)
