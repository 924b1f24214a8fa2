"""AdaLN: ``h = N(x) * (1 + scale) + shift`` and the gated residual that precedes it (DESIGN.md section 5.3).

N is LayerNorm without affine parameters (biased variance) or, with ``norm="rms"``, RMSNorm without a weight;
statistics are fp32. Modulation is per sample ([B, 1, D]), per token ([B, L, D]) or absent (None: plain N(x)).

- ``adaln_modulate(x, shift, scale, eps)`` -> h
- ``gated_residual_adaln(x, y, gate, shift, scale, eps)`` -> (x' = x + gate * y, h = N(x') * (1 + scale) + shift);
  gate None is an ungated residual (the video FFN after cross-attention, the und stream).
- ``layer_norm(x, eps)`` = adaln_modulate without modulation.

Three faces: the plain-PyTorch reference below (the spec), Triton kernels (kernels/adaln.py, forward + backward,
as ``torch.ops.motus_fast.*`` custom ops) and CUDA C++ (csrc/adaln.cu, forward only, for inference).
``MOTUS_BACKEND`` chooses (motus_fast.backend); the CUDA ops are used only where no gradient is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from motus_fast.backend import choose
from motus_fast.ops.availability import (PlanCache, autocast_dtype, backend_setting, cuda_ops_run_on, eager_call,
                                         launch_budget, needs_grad, triton_runs_on)
from motus_fast.ops.profiling import annotate

Tensor = torch.Tensor
NORMS = ("layer", "rms")


# ---- reference (the spec) -----------------------------------------------------------------------------------
def normalise_reference(x: Tensor, eps: float, norm: str = "layer") -> Tensor:
    """N(x) over the last dim (no affine) in fp32 (fp64 for fp64 x: the tests' exact reference)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if norm == "layer":
        return F.layer_norm(xf, xf.shape[-1:], eps=eps)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def adaln_modulate_reference(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                             norm: str = "layer") -> Tensor:
    """N(x) * (1 + scale) + shift in fp32 (fp64 for fp64 x), cast back to x's dtype."""
    h = normalise_reference(x, eps, norm)
    if shift is not None:
        h = h * (1 + scale.to(h.dtype)) + shift.to(h.dtype)
    return h.to(x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Optional[Tensor]) -> Tensor:
    """x + y * gate (gate None: x + y) in x's dtype, as upstream: the residual half of gated_residual_adaln."""
    return x + (y if gate is None else y * gate.to(x.dtype))


def gated_residual_adaln_reference(x: Tensor, y: Tensor, gate: Optional[Tensor], shift: Optional[Tensor],
                                   scale: Optional[Tensor], eps: float, norm: str = "layer"):
    """x' = gated_residual(x, y, gate); h = adaln_modulate(x'). Returns (x', h)."""
    x = gated_residual(x, y, gate)
    return x, adaln_modulate_reference(x, shift, scale, eps, norm)


# ---- public API ---------------------------------------------------------------------------------------------
@annotate("motus_fast.layer_norm")
def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine parameters (biased variance), statistics in fp32."""
    return adaln_modulate(x, None, None, eps)


@annotate("motus_fast.adaln_modulate")
def adaln_modulate(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                   norm: str = "layer") -> Tensor:
    """x: [B, L, D] (or [T, D] without modulation); shift/scale: [B|1, 1|L, D] or both None -> h like x."""
    if not eager_call():
        return _plan("adaln_modulate", x, None, None, shift, scale, eps, norm)(x, None, None, shift, scale)[1]
    # the plan of this input signature: checks, backend choice and launch arguments, built once
    grad = torch.is_grad_enabled()
    key, tensors = ("adaln_modulate", norm, eps, grad, backend_setting()), (x, shift, scale)
    run = _PLANS.get(key, tensors) or _PLANS.put(key, tensors,
                                                 _plan("adaln_modulate", x, None, None, shift, scale, eps, norm))
    return run(x, None, None, shift, scale)[1]


@annotate("motus_fast.gated_residual_adaln")
def gated_residual_adaln(x: Tensor, y: Tensor, gate: Optional[Tensor], shift: Optional[Tensor],
                         scale: Optional[Tensor], eps: float, norm: str = "layer") -> tuple[Tensor, Tensor]:
    """x' = x + y * gate (gate None: x + y); h = N(x') * (1 + scale) + shift. x, y: [B, L, D] (or [T, D] without
    gate/modulation); gate/shift/scale: [B|1, 1|L, D] or None. Returns (x', h). Under autocast a branch y of
    another dtype (a bf16 projection beside an fp32 stream) is cast to x's: the stream keeps its dtype."""
    if y is not None and y.dtype != x.dtype and autocast_dtype(x) is not None:
        y = y.to(x.dtype)
    if not eager_call():
        return _plan("gated_residual_adaln", x, y, gate, shift, scale, eps, norm)(x, y, gate, shift, scale)
    grad = torch.is_grad_enabled()
    key, tensors = ("gated_residual_adaln", norm, eps, grad, backend_setting()), (x, y, gate, shift, scale)
    run = _PLANS.get(key, tensors) or _PLANS.put(key, tensors,
                                                 _plan("gated_residual_adaln", x, y, gate, shift, scale, eps, norm))
    return run(x, y, gate, shift, scale)


_PLANS = PlanCache()


def _plan(op, x, y, gate, shift, scale, eps, norm):
    """-> run(x, y, gate, shift, scale) -> (x' or None, h) for inputs of this signature."""
    _check(op, x, y, gate, shift, scale, norm)
    backend = _backend(op, x, y, gate, shift, scale)
    if backend == "reference":
        if y is None:
            return lambda x, y, gate, shift, scale: (None, adaln_modulate_reference(x, shift, scale, eps, norm))
        return lambda x, y, gate, shift, scale: gated_residual_adaln_reference(x, y, gate, shift, scale, eps, norm)
    rms = norm == "rms"
    if backend == "triton" and eager_call() and not needs_grad(x, y, gate, shift, scale):
        return _direct(x, y, gate, shift, scale, eps, rms)
    ops = torch.ops.motus_fast_cuda if backend == "cuda" else torch.ops.motus_fast   # autograd, compile, CUDA
    if y is None:
        impl = lambda x, y, gate, shift, scale: (None, ops.adaln_modulate(x, shift, scale, eps, rms))  # noqa: E731
    else:
        impl = lambda x, y, gate, shift, scale: ops.gated_residual_adaln(x, y, gate, shift, scale, eps, rms)  # noqa
    if x.dim() == 3:
        return impl

    def flat(x, y, gate, shift, scale):   # [T, D] rows without modulation: one sample of T rows
        xr, h = impl(x.unsqueeze(0), None if y is None else y.unsqueeze(0), gate, shift, scale)
        return (None if xr is None else xr.view(x.shape)), h.view(x.shape)
    return flat


def _backend(op: str, x: Tensor, *tensors: Optional[Tensor]) -> str:
    return choose(op, {"triton": triton_runs_on(x.device),
                       "cuda": cuda_ops_run_on(x.device) and not needs_grad(x, *tensors)}, x.device.type)


def _check(op: str, x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], shift: Optional[Tensor],
           scale: Optional[Tensor], norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{op}: norm must be one of {NORMS}, got {norm!r}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating tensor, got {x.dtype}")
    if (shift is None) != (scale is None):
        raise ValueError(f"{op}: give both shift and scale, or neither")
    modulated = [(n, t) for n, t in (("gate", gate), ("shift", shift), ("scale", scale)) if t is not None]
    if x.dim() != 3 and not (x.dim() == 2 and not modulated):
        raise ValueError(f"{op}: x must be [B, L, D] (or [T, D] without gate/shift/scale), got {tuple(x.shape)}")
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype or y.device != x.device):
        raise ValueError(f"{op}: y is {y.dtype} {tuple(y.shape)} on {y.device}; expected x's {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    for name, t in modulated:
        B, L, D = x.shape
        if (t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] not in (1, L) or t.shape[2] != D
                or t.device != x.device or not t.is_floating_point()):
            raise ValueError(f"{op}: {name} must be a floating [B|1, 1|L, D] = [{B}|1, 1|{L}, {D}] tensor on "
                             f"{x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"{op}: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ in shape")


# ---- Triton custom ops ----------------------------------------------------------------------------------------
def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _per_token(L: int, *mods: Optional[Tensor]) -> bool:
    return L > 1 and any(t is not None and t.shape[1] == L for t in mods)


_LAUNCHES = PlanCache()


def _forward(x, y, gate, shift, scale, eps, rms):
    x, y, gate, shift, scale = map(_unit_last, (x, y, gate, shift, scale))
    key, tensors = (eps, rms), (x, y, gate, shift, scale)
    launch = _LAUNCHES.get(key, tensors)
    if launch is None:
        launch = _LAUNCHES.put(key, tensors, _launcher(x, y, gate, shift, scale, eps, rms))
    h = torch.empty(*x.shape, dtype=x.dtype, device=x.device)
    x_out = None if y is None else torch.empty(*x.shape, dtype=x.dtype, device=x.device)
    launch(x, y, gate, shift, scale, x_out, h)
    return x_out, h


def _direct(x, y, gate, shift, scale, eps, rms):
    """Eager inference: allocate the outputs and launch, with no dispatcher in between (the custom ops would only
    add autograd and tracing support, neither needed here). [T, D] rows run as one sample of T rows: the kernel
    takes base pointers and the strides fixed here, so the tensors go in without views."""
    if any(_unit_last(t) is not t for t in (x, y, gate, shift, scale)):
        return lambda x, y, gate, shift, scale: _forward(x, y, gate, shift, scale, eps, rms)
    rows = (lambda t: t if t is None else t.unsqueeze(0)) if x.dim() == 2 else (lambda t: t)  # noqa: E731
    launch = _launcher(rows(x), rows(y), gate, shift, scale, eps, rms)
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    # a contiguous x makes empty_like contiguous too (the layout the launcher assumes), at half torch.empty's cost
    like_x = x.is_contiguous()

    if y is None:
        def run(x, y, gate, shift, scale):
            h = torch.empty_like(x) if like_x else torch.empty(*shape, dtype=dtype, device=device)
            launch(x, None, gate, shift, scale, None, h)
            return None, h
        return run

    def run_residual(x, y, gate, shift, scale):
        if like_x:
            x_out, h = torch.empty_like(x), torch.empty_like(x)
        else:
            x_out, h = (torch.empty(*shape, dtype=dtype, device=device) for _ in range(2))
        launch(x, y, gate, shift, scale, x_out, h)
        return x_out, h
    return run_residual


def _launcher(x, y, gate, shift, scale, eps, rms):
    from motus_fast.kernels.adaln import forward_launcher, plan, strides_of

    B, L, D = x.shape
    out = torch.empty(x.shape, device="meta")          # the outputs' strides: torch.empty is contiguous
    strides = strides_of(L, x, y, gate, shift, scale, None if y is None else out, out)
    return forward_launcher((B, L, D), strides, y is not None, gate is not None, shift is not None,
                            _per_token(L, gate, shift, scale), rms, eps,
                            plan(B, L, D, *launch_budget(x.device, reduction=False)))


@torch.library.custom_op("motus_fast::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                       rms: bool) -> Tensor:
    return _forward(x, None, None, shift, scale, eps, rms)[1]


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps, rms):
    return x.new_empty(x.shape)


@torch.library.custom_op("motus_fast::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(x: Tensor, y: Tensor, gate: Optional[Tensor], shift: Optional[Tensor],
                             scale: Optional[Tensor], eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    return _forward(x, y, gate, shift, scale, eps, rms)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, eps, rms):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a [B, L, D] (or [B, P, D] partial) gradient over the dims `like` broadcasts, cast to like's dtype."""
    dims = [d for d in (0, 1) if like.shape[d] == 1 and grad.shape[d] != 1]
    return (grad.sum(dims, keepdim=True) if dims else grad).to(like.dtype)


@torch.library.custom_op("motus_fast::adaln_backward", mutates_args=())
def _adaln_backward_op(xr: Tensor, y: Optional[Tensor], gate: Optional[Tensor], shift: Optional[Tensor],
                       scale: Optional[Tensor], dh: Tensor, dxr: Optional[Tensor], eps: float,
                       rms: bool) -> list[Tensor]:
    """-> [dx, dy, d_gate, d_shift, d_scale]; an empty tensor where the input is absent."""
    from motus_fast.kernels.adaln import adaln_backward, plan

    xr, y, gate, scale, dh, dxr = map(_unit_last, (xr, y, gate, scale, dh, dxr))
    B, L, D = xr.shape
    per_token = _per_token(L, gate, scale)
    tiling = plan(B, L, D, *launch_budget(xr.device, reduction=True))
    f32 = dict(dtype=torch.float32, device=xr.device)
    token_grad = lambda t: None if t is None else (                     # noqa: E731
        torch.empty(B, L, D, **f32) if per_token else torch.zeros(B, tiling[2], D, **f32))
    dx = torch.empty(*xr.shape, dtype=xr.dtype, device=xr.device)
    dy = None if y is None else torch.empty_like(dx)
    dgate = token_grad(gate)
    dshift, dscale = token_grad(scale), token_grad(scale)
    adaln_backward(xr, y, gate, scale, dh, dxr, eps, rms, dx, dy, dgate, dshift, dscale, per_token, tiling)
    empty = lambda: xr.new_empty(0)                                    # noqa: E731  (outputs must not alias)
    return [dx, empty() if dy is None else dy,
            empty() if gate is None else _reduce_to(dgate, gate),
            empty() if shift is None else _reduce_to(dshift, shift),
            empty() if scale is None else _reduce_to(dscale, scale)]


@_adaln_backward_op.register_fake
def _(xr, y, gate, shift, scale, dh, dxr, eps, rms):
    return [xr.new_empty(xr.shape)] + [xr.new_empty(0) if t is None else t.new_empty(t.shape)
                                       for t in (y, gate, shift, scale)]


def _grad_if(grad: Tensor, inp: Optional[Tensor]) -> Optional[Tensor]:
    """The backward op returns an empty tensor for an absent input; autograd wants None there."""
    return grad if inp is not None else None


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, eps, rms = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps, ctx.rms = eps, rms


def _adaln_grad(ctx, dh):
    x, shift, scale = ctx.saved_tensors
    dx, _, _, dshift, dscale = _adaln_backward_op(x, None, None, shift, scale, dh, None, ctx.eps, ctx.rms)
    return dx, _grad_if(dshift, shift), _grad_if(dscale, scale), None, None


_adaln_modulate_op.register_autograd(_adaln_grad, setup_context=_adaln_setup)


def _gated_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps, rms = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale)
    ctx.eps, ctx.rms = eps, rms


def _gated_grad(ctx, dxr, dh):
    xr, y, gate, shift, scale = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _adaln_backward_op(xr, y, gate, shift, scale, dh, dxr, ctx.eps, ctx.rms)
    return (dx, dy, _grad_if(dgate, gate), _grad_if(dshift, shift), _grad_if(dscale, scale),
            None, None)


_gated_residual_adaln_op.register_autograd(_gated_grad, setup_context=_gated_setup)
