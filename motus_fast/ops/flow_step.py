"""The rectified-flow step as fused ops (DESIGN.md section 5.4). Memory-bound: each is one pass, one launch.

- ``noise_and_target(x0, noise, sigma, clean_frames)`` -> (x_t, v): x_t = (1 - sigma_b) x0 + sigma_b noise with
  the first ``clean_frames`` latent frames kept clean (the condition frame), v = noise - x0 (the training target).
- ``masked_mse(pred, target, sample_weight, skip_frames)``: the flow loss of one stream. Frames t < skip_frames
  count as zero error but stay in the mean (upstream zeroes frame 0 of both sides, then averages over all
  elements); samples are weighted by ``sample_weight`` [B] (action-free samples weigh 0) and the loss is
  sum_b w_b mean_b / max(sum_b w_b, 1), which is the plain mean when no weight is given.
- ``euler_step(xs, vs, dt, conds)``: x + dt v for every integrated stream (video and action) in one launch,
  frames 0..Tc-1 of a stream re-clamped to its condition [B, C, Tc, H, W].

Latent layout: video [B, C, T, H, W] (frame axis 2); actions [B, K, A] (no frames: clean/skip frames must be 0).
Faces: the reference below (the spec); Triton kernels (kernels/flow_step.py; masked_mse has a backward, the other
two act on data, not on parameters); CUDA C++ for euler_step (csrc/euler_step.cu, inference).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from motus_fast.backend import choose
from motus_fast.ops.availability import (PlanCache, backend_setting, cuda_ops_run_on, eager_call, launch_budget,
                                         needs_grad, triton_runs_on)
from motus_fast.ops.profiling import annotate

Tensor = torch.Tensor


# ---- reference (the spec) -----------------------------------------------------------------------------------
def add_noise_reference(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """(1 - sigma) x0 + sigma noise with a per-sample sigma [B], in x0's dtype (upstream)."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def with_frames(x: Tensor, frames: Tensor) -> Tensor:
    """Replace the first frames.shape[2] latent frames of [B, C, T, ...] by `frames`."""
    return torch.cat([frames.to(x.dtype), x[:, :, frames.shape[2]:]], dim=2)


def noise_and_target_reference(x0: Tensor, noise: Tensor, sigma: Tensor, clean_frames: int = 0):
    x_t = add_noise_reference(x0, noise, sigma)
    if clean_frames:
        x_t = with_frames(x_t, x0[:, :, :clean_frames])
    return x_t, noise - x0


def masked_mse_reference(pred: Tensor, target: Tensor, sample_weight: Optional[Tensor] = None,
                         skip_frames: int = 0) -> Tensor:
    acc = torch.promote_types(pred.dtype, torch.float32)                # fp32 (fp64 for fp64 inputs)
    err = (pred.to(acc) - target.to(acc)).pow(2)
    if skip_frames:
        err = with_frames(err, torch.zeros_like(err[:, :, :skip_frames]))
    if sample_weight is None:
        return err.mean()
    w = sample_weight.to(err.dtype)
    return (err.flatten(1).mean(1) * w).sum() / w.sum().clamp(min=1)


def euler_step_reference(xs: Sequence[Tensor], vs: Sequence[Tensor], dt: Tensor,
                         conds: Optional[Sequence[Optional[Tensor]]] = None) -> list[Tensor]:
    out = []
    for i, (x, v) in enumerate(zip(xs, vs)):
        step = dt.reshape(-1, *([1] * (x.dim() - 1))) if dt.dim() else dt
        x = x + v * step.to(x.dtype)
        cond = None if conds is None else conds[i]
        out.append(x if cond is None else with_frames(x, cond))
    return out


# ---- public API ---------------------------------------------------------------------------------------------
@annotate("motus_fast.noise_and_target")
def noise_and_target(x0: Tensor, noise: Tensor, sigma: Tensor, clean_frames: int = 0) -> tuple[Tensor, Tensor]:
    """x0, noise: [B, ...] (video [B, C, T, H, W]); sigma: [B] -> (x_t, v = noise - x0), both like x0."""
    _check_stream("noise_and_target", "x0", x0, clean_frames)
    _check_like("noise_and_target", "noise", noise, x0)
    _check_per_sample("noise_and_target", "sigma", sigma, x0)
    backend = choose("noise_and_target", {"triton": triton_runs_on(x0.device), "cuda": False}, x0.device.type)
    if backend == "reference":
        return noise_and_target_reference(x0, noise, sigma, clean_frames)
    x_t, v = torch.ops.motus_fast.noise_and_target(x0, noise, sigma, clean_frames)
    return x_t, v


@annotate("motus_fast.masked_mse")
def masked_mse(pred: Tensor, target: Tensor, sample_weight: Optional[Tensor] = None, skip_frames: int = 0) -> Tensor:
    """fp32 scalar flow loss of one stream (see the module docstring). pred, target: [B, ...]; weight: [B]."""
    _check_stream("masked_mse", "pred", pred, skip_frames)
    if target.shape != pred.shape or target.device != pred.device or not target.is_floating_point():
        raise ValueError(f"masked_mse: target is {target.dtype} {tuple(target.shape)} on {target.device}; "
                         f"expected floating {tuple(pred.shape)} on {pred.device}")
    if sample_weight is not None:
        _check_per_sample("masked_mse", "sample_weight", sample_weight, pred)
    backend = choose("masked_mse", {"triton": triton_runs_on(pred.device), "cuda": False}, pred.device.type)
    if backend == "reference":
        return masked_mse_reference(pred, target, sample_weight, skip_frames)
    return torch.ops.motus_fast.masked_mse(pred, target, sample_weight, skip_frames)


@annotate("motus_fast.euler_step")
def euler_step(xs: Sequence[Tensor], vs: Sequence[Tensor], dt: Tensor,
               conds: Optional[Sequence[Optional[Tensor]]] = None) -> list[Tensor]:
    """One Euler step of every stream: x + dt * v, condition frames re-clamped. xs[i], vs[i]: [B, ...];
    dt: 0-dim or [B] tensor; conds[i]: [B, C, Tc, ...] or None."""
    conds = list(conds) if conds is not None else [None] * len(xs)
    if not eager_call():
        return _euler_plan(xs, vs, dt, conds)(xs, vs, dt, conds)
    grad = torch.is_grad_enabled()
    key, tensors = (len(xs), len(vs), len(conds), grad, backend_setting()), (*xs, *vs, *conds, dt)
    run = _PLANS.get(key, tensors)
    if run is None:
        run = _PLANS.put(key, tensors, _euler_plan(xs, vs, dt, conds))
    return run(xs, vs, dt, conds)


_PLANS = PlanCache()


def _euler_plan(xs, vs, dt, conds):
    """-> run(xs, vs, dt, conds) for inputs of this signature: checks and backend choice once."""
    if not xs or len(vs) != len(xs) or len(conds) != len(xs):
        raise ValueError(f"euler_step needs one v (and cond, if given) per stream, got {len(xs)} xs, {len(vs)} vs, "
                         f"{len(conds)} conds")
    for i, x in enumerate(xs):
        _check_stream("euler_step", f"xs[{i}]", x, 0)
        _check_like("euler_step", f"vs[{i}]", vs[i], x)
        c = conds[i]
        if c is not None and (x.dim() < 4 or c.dim() != x.dim() or c.shape[:2] != x.shape[:2]
                              or c.shape[3:] != x.shape[3:] or c.shape[2] > x.shape[2] or c.device != x.device):
            raise ValueError(f"euler_step: conds[{i}] has shape {tuple(c.shape)}; expected [B, C, Tc <= "
                             f"{x.shape[2] if x.dim() > 2 else '?'}, ...] matching xs[{i}] {tuple(x.shape)}")
    if dt.dim() > 1 or (dt.dim() == 1 and dt.shape[0] != xs[0].shape[0]) or dt.device != xs[0].device:
        raise ValueError(f"euler_step: dt must be a 0-dim or [B={xs[0].shape[0]}] tensor on {xs[0].device}, got "
                         f"{tuple(dt.shape)} on {dt.device}")
    dev = xs[0].device
    grad = needs_grad(*xs, *vs)
    backend = choose("euler_step", {"triton": triton_runs_on(dev) and not grad,
                                    "cuda": cuda_ops_run_on(dev) and not grad}, dev.type)
    if backend == "reference":
        return euler_step_reference
    if backend == "triton" and eager_call() and all(t.is_contiguous() for t in (*xs, *vs, dt)):
        return _euler_direct(xs, conds, dt)     # eager: no dispatcher, launch arguments computed once
    op = torch.ops.motus_fast_cuda.euler_step if backend == "cuda" else torch.ops.motus_fast.euler_step
    return lambda xs, vs, dt, conds: list(op(list(xs), list(vs), dt, conds))


def _check_stream(op: str, name: str, x: Tensor, frames: int) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{op}: {name} must be a floating [B, ...] tensor, got {x.dtype} {tuple(x.shape)}")
    if frames < 0 or (frames and (x.dim() < 4 or frames > x.shape[2])):
        raise ValueError(f"{op}: {frames} condition frames do not fit {name} of shape {tuple(x.shape)} "
                         f"(frames are axis 2 of latents [B, C, T, H, W])")


def _check_like(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.shape != x.shape or t.device != x.device or not t.is_floating_point():
        raise ValueError(f"{op}: {name} is {t.dtype} {tuple(t.shape)} on {t.device}; expected floating "
                         f"{tuple(x.shape)} on {x.device}")


def _check_per_sample(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.shape != (x.shape[0],) or t.device != x.device:
        raise ValueError(f"{op}: {name} must be [B={x.shape[0]}] on {x.device}, got {tuple(t.shape)} on {t.device}")


def _layout(x: Tensor) -> tuple[int, int, int]:
    """(elements per sample, frames T, elements per frame S) of [B, C, T, ...] ([B, ...] below 3 dims: T = 1)."""
    per_sample = x[0].numel() if x.shape[0] else 0
    if x.dim() < 3:
        return per_sample, 1, max(per_sample, 1)
    return per_sample, x.shape[2], max(x[0, 0, 0].numel(), 1)


# ---- Triton custom ops ----------------------------------------------------------------------------------------
@torch.library.custom_op("motus_fast::noise_and_target", mutates_args=())
def _noise_and_target_op(x0: Tensor, noise: Tensor, sigma: Tensor, clean_frames: int) -> tuple[Tensor, Tensor]:
    from motus_fast.kernels import flow_step as K

    x0, noise, sigma = x0.contiguous(), noise.contiguous(), sigma.contiguous()
    x_t, v = torch.empty_like(x0), torch.empty_like(x0)
    K.noise_and_target(x0, noise, sigma, x_t, v, *_layout(x0), clean_frames)
    return x_t, v


@_noise_and_target_op.register_fake
def _(x0, noise, sigma, clean_frames):
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape)


def _loss_coef(sample_weight: Optional[Tensor], B: int, per_sample: int, device) -> Tensor:
    """coef_b with loss = sum_b coef_b * sum_i err_bi: w_b / (per_sample * max(sum w, 1)); 1 / (B * per_sample)."""
    if sample_weight is None:
        return torch.full((B,), 1.0 / max(B * per_sample, 1), dtype=torch.float32, device=device)
    w = sample_weight.to(torch.float32)
    return w / (w.sum().clamp(min=1) * max(per_sample, 1))


@torch.library.custom_op("motus_fast::masked_mse", mutates_args=())
def _masked_mse_op(pred: Tensor, target: Tensor, sample_weight: Optional[Tensor], skip_frames: int) -> Tensor:
    from motus_fast.kernels import flow_step as K

    pred, target = pred.contiguous(), target.contiguous()
    B = pred.shape[0]
    per_sample, T, S = _layout(pred)
    progs = max(1, min(launch_budget(pred.device, reduction=True)[0] // max(B, 1), -(-per_sample // K.BLOCK)))
    partial = torch.empty(B, progs, dtype=torch.float32, device=pred.device)
    K.masked_sq_err(pred, target, partial, per_sample, T, S, skip_frames)
    return (partial.sum(1) * _loss_coef(sample_weight, B, per_sample, pred.device)).sum()


@_masked_mse_op.register_fake
def _(pred, target, sample_weight, skip_frames):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("motus_fast::masked_mse_backward", mutates_args=())
def _masked_mse_backward_op(pred: Tensor, target: Tensor, sample_weight: Optional[Tensor], skip_frames: int,
                            grad: Tensor) -> Tensor:
    from motus_fast.kernels import flow_step as K

    pred, target = pred.contiguous(), target.contiguous()
    per_sample, T, S = _layout(pred)
    d_pred = torch.empty_like(pred)
    K.masked_sq_err_backward(pred, target, _loss_coef(sample_weight, pred.shape[0], per_sample, pred.device),
                             grad.to(torch.float32), d_pred, per_sample, T, S, skip_frames)
    return d_pred


@_masked_mse_backward_op.register_fake
def _(pred, target, sample_weight, skip_frames, grad):
    return pred.new_empty(pred.shape)


def _mse_setup(ctx, inputs, output):
    pred, target, sample_weight, skip_frames = inputs
    ctx.save_for_backward(pred, target, sample_weight)
    ctx.skip_frames = skip_frames


def _mse_grad(ctx, grad):
    pred, target, sample_weight = ctx.saved_tensors
    d_pred = _masked_mse_backward_op(pred, target, sample_weight, ctx.skip_frames, grad)
    # the target is data (noise - x0): its gradient is -d_pred where asked for
    return d_pred, (-d_pred).to(target.dtype) if ctx.needs_input_grad[1] else None, None, None


_masked_mse_op.register_autograd(_mse_grad, setup_context=_mse_setup)


def _euler_direct(xs, conds, dt):
    """launch per group of MAX_STREAMS streams, arguments computed once; -> run(xs, vs, dt, conds) (xs, vs
    contiguous). A condition is read through its strides (typically a frame slice of the latents: no copy) when
    each of its frames is contiguous; otherwise it is copied per call."""
    from motus_fast.kernels import flow_step as K

    copy = [c is not None and c.numel() > 0 and not c[0, 0, 0].is_contiguous() for c in conds]
    strided = [None if c is None else c.contiguous() if cp else c for c, cp in zip(conds, copy)]
    metas = [(x.shape[0], _layout(x), c is not None, 0 if c is None else c.shape[2],
              (0, 0, 0) if c is None else c.stride()[:3]) for x, c in zip(xs, strided)]
    groups = [(g, K.euler_launcher(metas[g:g + K.MAX_STREAMS], 1 if dt.dim() else 0))
              for g in range(0, len(xs), K.MAX_STREAMS)]
    copies = any(copy)
    single = groups[0][1] if len(groups) == 1 else None

    def run(xs, vs, dt, conds):
        if copies:
            conds = [c.contiguous() if cp else c for c, cp in zip(conds, copy)]
        outs = [torch.empty_like(x) for x in xs]     # xs are contiguous: so are these
        if single is not None:
            single(xs, vs, conds, outs, dt)
            return outs
        for g, launch in groups:
            end = g + K.MAX_STREAMS
            launch(xs[g:end], vs[g:end], conds[g:end], outs[g:end], dt)
        return outs
    return run


@torch.library.custom_op("motus_fast::euler_step", mutates_args=())
def _euler_step_op(xs: list[Tensor], vs: list[Tensor], dt: Tensor, conds: list[Optional[Tensor]]) -> list[Tensor]:
    xs, vs = [x.contiguous() for x in xs], [v.contiguous() for v in vs]
    return _euler_direct(xs, conds, dt)(xs, vs, dt.contiguous(), conds)


@_euler_step_op.register_fake
def _(xs, vs, dt, conds):
    return [x.new_empty(x.shape) for x in xs]
