"""RMSNorm over the whole q/k row (all heads together) with a learned weight, then RoPE where the expert has it
(DESIGN.md section 5.2), for all experts of a Motus layer at once.

Each expert e gives an ``ExpertQK``: its q (None for a keys-only expert) and k rows [..., H*D] (typically strided
chunks of its fused qkv projection), its two norm weights [H*D], its eps, and for the video expert the 3-D RoPE
table (cos, sin) [L, D/2] (token l of a sample rotates by row l). The outputs are contiguous [..., H, D].

RoPE pairs are interleaved: (x[2j], x[2j+1]) = (real, imag) within each head. The reference rotates in float64 as
upstream does with complex128; the Triton kernel rotates in fp32 (reading the same float64 tables), which the
tolerance rule of DESIGN.md section 6 accepts (the fixture notes: complex64 costs 2.6e-7).

Faces: the reference below (the spec); Triton kernels (kernels/qk_norm_rope.py), one launch for all experts,
forward + backward including the weight gradients. ``rms_norm`` (one row, no RoPE) runs on the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from motus_fast.backend import choose
from motus_fast.ops.availability import (PlanCache, backend_setting, eager_call, launch_budget, needs_grad,
                                         triton_runs_on)
from motus_fast.ops.profiling import annotate

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)      # holds tensors: identity, not elementwise, equality
class ExpertQK:
    """One expert's share of qk_norm_rope. q/k: [..., H*D]; weights: [H*D]; rope: (cos, sin) [L, D/2] or None."""

    q: Optional[Tensor]
    k: Tensor
    weight_q: Optional[Tensor]
    weight_k: Tensor
    eps: float
    rope: Optional[tuple[Tensor, Tensor]] = None


# ---- reference (the spec) -----------------------------------------------------------------------------------
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, statistics in fp32 (fp64 for fp64 x) (Wan's RMSNorm)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs. x: [..., L, H, D]; cos/sin: [L, D/2] (float64). Returns x's dtype."""
    xd = x.to(torch.float64).unflatten(-1, (-1, 2))
    re, im = xd[..., 0], xd[..., 1]
    c, s = cos.to(torch.float64)[:, None, :], sin.to(torch.float64)[:, None, :]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_reference(experts: Sequence[ExpertQK], num_heads: int) -> list[tuple[Optional[Tensor], Tensor]]:
    out = []
    for e in experts:
        q = None if e.q is None else rms_norm_reference(e.q, e.weight_q, e.eps).unflatten(-1, (num_heads, -1))
        k = rms_norm_reference(e.k, e.weight_k, e.eps).unflatten(-1, (num_heads, -1))
        if e.rope is not None:
            q = None if q is None else apply_rope(q, *e.rope)
            k = apply_rope(k, *e.rope)
        out.append((q, k))
    return out


# ---- public API ---------------------------------------------------------------------------------------------
@annotate("motus_fast.qk_norm_rope")
def qk_norm_rope(experts: Sequence[ExpertQK], num_heads: int) -> list[tuple[Optional[Tensor], Tensor]]:
    """Normalise (and rotate) every expert's q and k in one launch. -> per expert (q, k), each [..., H, D]
    (q None where the expert gave none)."""
    if not eager_call():
        return _plan(experts, num_heads)(experts)
    grad = torch.is_grad_enabled()
    tensors = []
    for e in experts:
        tensors += (e.q, e.k, e.weight_q, e.weight_k, *(e.rope or _NO_ROPE))
    key = (num_heads, tuple([e.eps for e in experts]), grad, backend_setting())
    run = _PLANS.get(key, tensors)
    if run is None:
        run = _PLANS.put(key, tensors, _plan(experts, num_heads))
    return run(experts)


_NO_ROPE = (None, None)
_PLANS = PlanCache()


def _plan(experts: Sequence[ExpertQK], num_heads: int):
    """-> run(experts) for experts of this signature: checks, backend choice and launch arguments once."""
    _check(experts, num_heads)
    device = experts[0].k.device
    if choose("qk_norm_rope", {"triton": triton_runs_on(device), "cuda": False}, device.type) == "reference":
        return lambda experts: qk_norm_rope_reference(experts, num_heads)
    E, head_dim = len(experts), experts[0].k.shape[-1] // num_heads
    split = lambda t: t.unflatten(-1, (num_heads, -1))            # noqa: E731
    tensors = [e.q for e in experts] + [e.k for e in experts]
    if eager_call() and not needs_grad(*tensors, *(w for e in experts for w in (e.weight_q, e.weight_k))):
        forward = _direct(experts, head_dim)
        if forward is not None:   # eager inference: no dispatcher
            return forward

    def run(experts):
        # a keys-only expert passes its k (and weight_k) in q's place with has_q False: the op's tensor lists hold
        # no None, which would hide their tensors from autograd
        flat = torch.ops.motus_fast.qk_norm_rope(*_op_args(experts), head_dim)
        return [(None if e.q is None else split(flat[i]), split(flat[E + i])) for i, e in enumerate(experts)]
    return run


def _op_args(experts: Sequence[ExpertQK]) -> tuple:
    return ([e.k if e.q is None else e.q for e in experts], [e.k for e in experts],
            [e.weight_k if e.q is None else e.weight_q for e in experts], [e.weight_k for e in experts],
            [e.q is not None for e in experts], [None if e.rope is None else e.rope[0] for e in experts],
            [None if e.rope is None else e.rope[1] for e in experts], [float(e.eps) for e in experts])


def _direct(experts: Sequence[ExpertQK], head_dim: int):
    """-> forward(experts) -> [(q_out or None, k_out)], each [..., H, D], launch arguments computed once; None when
    some input would need a copy (then the custom op path copies per call)."""
    from motus_fast.kernels.qk_norm_rope import launcher, plan, qk_norm_rope_fwd_kernel

    q, k, wq, wk, has_q, cos, sin, eps = _op_args(experts)
    width = k[0].shape[-1]
    slots = _slots(q, k, wq, wk, has_q, cos, sin, eps)
    for s, e in zip(slots, experts):
        views = [(s["k"], e.k)] + ([] if e.q is None else [(s["q"], e.q)]) + (
            [] if e.rope is None else [(s["rope"][0], e.rope[0]), (s["rope"][1], e.rope[1])])
        if any(r.data_ptr() != t.data_ptr() for r, t in views):
            return None
    groups = []
    for g in range(0, len(slots), GROUP):
        group = slots[g:g + GROUP]
        block_r = plan(group, width, *launch_budget(k[0].device, reduction=False))
        groups.append((g, launcher(qk_norm_rope_fwd_kernel, group, width, head_dim, block_r, backward=False)))
    heads = (width // head_dim, head_dim)
    # output shapes as python ints: torch.empty(*ints) parses fastest
    outs = [(None if e.q is None else ((*e.q.shape[:-1], *heads), _out_dtype(e.q, e.weight_q)),
             ((*e.k.shape[:-1], *heads), _out_dtype(e.k, e.weight_k))) for e in experts]
    device = k[0].device

    def forward(experts):
        # the kernels take base pointers and the row strides fixed in the plan, so the tensors go in as they are:
        # inputs [..., W] (the plan checked they are their own row views), outputs allocated as [..., H, D]
        results, run_slots = [], []
        for e, (q_like, (k_shape, k_dtype)) in zip(experts, outs):
            qo = None if q_like is None else torch.empty(*q_like[0], dtype=q_like[1], device=device)
            ko = torch.empty(*k_shape, dtype=k_dtype, device=device)
            results.append((qo, ko))
            run_slots.append({"q": e.q, "k": e.k, "qo": qo, "ko": ko, "wq": e.weight_q, "wk": e.weight_k,
                              "rope": e.rope})
        for g, launch in groups:
            launch(run_slots[g:g + GROUP])
        return results
    return forward


@annotate("motus_fast.rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, fp32 statistics; x: [..., W], weight: [W]."""
    _check([ExpertQK(None, x, None, weight, eps)], 1)
    if choose("rms_norm", {"triton": triton_runs_on(x.device), "cuda": False}, x.device.type) == "reference":
        return rms_norm_reference(x, weight, eps)
    return torch.ops.motus_fast.qk_norm_rope([x], [x], [weight], [weight], [False], [None], [None], [float(eps)],
                                             x.shape[-1])[1]


def _check(experts: Sequence[ExpertQK], num_heads: int) -> None:
    if not experts:
        raise ValueError("qk_norm_rope needs at least one expert")
    width = experts[0].k.shape[-1]
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"qk_norm_rope: row width {width} is not divisible by num_heads={num_heads}")
    head_dim = width // num_heads
    dev = experts[0].k.device
    for i, e in enumerate(experts):
        for name, t, w in (("q", e.q, e.weight_q), ("k", e.k, e.weight_k)):
            if t is None:
                if w is not None:
                    raise ValueError(f"qk_norm_rope: expert {i} has weight_{name} but no {name}")
                continue
            if not t.is_floating_point() or t.shape[-1] != width or t.device != dev:
                raise ValueError(f"qk_norm_rope: expert {i} {name} is {t.dtype} {tuple(t.shape)} on {t.device}; "
                                 f"expected floating [..., {width}] on {dev}")
            if w is None or w.shape != (width,) or w.device != dev:
                got = None if w is None else (tuple(w.shape), str(w.device))
                raise ValueError(f"qk_norm_rope: expert {i} weight_{name} must be [{width}] on {dev}, got {got}")
        if e.q is not None and (e.q.shape != e.k.shape or e.q.dtype != e.k.dtype):
            raise ValueError(f"qk_norm_rope: expert {i} q {e.q.dtype} {tuple(e.q.shape)} and k {e.k.dtype} "
                             f"{tuple(e.k.shape)} differ")
        if e.rope is not None:
            cos, sin = e.rope
            L = e.k.shape[-2] if e.k.dim() >= 2 else -1
            if head_dim % 2 or cos.shape != (L, head_dim // 2) or sin.shape != cos.shape:
                raise ValueError(f"qk_norm_rope: expert {i} rope tables must be [L={L}, head_dim/2={head_dim // 2}] "
                                 f"(head_dim even), got cos {tuple(cos.shape)} sin {tuple(sin.shape)}")


# ---- Triton custom ops ----------------------------------------------------------------------------------------
GROUP = 3   # experts per launch (kernels/qk_norm_rope.py MAX_EXPERTS); more experts take more launches


def _rows(t: Optional[Tensor], width: int) -> Optional[Tensor]:
    """[..., W] -> a [rows, W] view with unit column stride (copies only if no such view exists)."""
    if t is None:
        return None
    r = t.reshape(-1, width)
    return r if r.stride(-1) == 1 or width == 1 else r.contiguous()


def _slots(q, k, wq, wk, has_q, cos, sin, eps):
    width = k[0].shape[-1]
    slots = []
    for e in range(len(k)):
        qr, kr = _rows(q[e] if has_q[e] else None, width), _rows(k[e], width)
        if qr is not None and qr.stride(0) != kr.stride(0) and kr.shape[0] > 1:
            qr, kr = qr.contiguous(), kr.contiguous()
        rope = None if cos[e] is None else (cos[e].contiguous(), sin[e].contiguous())
        slots.append(dict(q=qr, k=kr, wq=wq[e] if has_q[e] else None, wk=wk[e], rope=rope, rows=kr.shape[0],
                          stride=kr.stride(0), seq=1 if rope is None else rope[0].shape[0], eps=eps[e]))
    return slots


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The reference's output dtype: the normalised rows (x's dtype) times the weight, promoted."""
    return torch.promote_types(x.dtype, weight.dtype)


@torch.library.custom_op("motus_fast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: list[Tensor], k: list[Tensor], weight_q: list[Tensor], weight_k: list[Tensor],
                     has_q: list[bool], cos: list[Optional[Tensor]], sin: list[Optional[Tensor]], eps: list[float],
                     head_dim: int) -> list[Tensor]:
    """-> [q_out per expert (empty where not has_q)] + [k_out per expert], each contiguous like its input."""
    from motus_fast.kernels.qk_norm_rope import plan, qk_norm_rope_forward

    width = k[0].shape[-1]
    slots = _slots(q, k, weight_q, weight_k, has_q, cos, sin, eps)
    q_out = [torch.empty(*t.shape, dtype=_out_dtype(t, w), device=t.device) if h else k[0].new_empty(0)
             for t, w, h in zip(q, weight_q, has_q)]
    k_out = [torch.empty(*t.shape, dtype=_out_dtype(t, w), device=t.device) for t, w in zip(k, weight_k)]
    for s, qo, ko in zip(slots, q_out, k_out):
        s["qo"], s["ko"] = (None if s["q"] is None else qo.view(-1, width)), ko.view(-1, width)
    for g in range(0, len(slots), GROUP):
        group = slots[g:g + GROUP]
        block_r = plan(group, width, *launch_budget(k[0].device, reduction=False))
        qk_norm_rope_forward(group, width, head_dim, block_r)
    return q_out + k_out


@_qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, has_q, cos, sin, eps, head_dim):
    return [t.new_empty(t.shape, dtype=_out_dtype(t, w)) if h else k[0].new_empty(0)
            for t, w, h in zip(q, weight_q, has_q)] + [t.new_empty(t.shape, dtype=_out_dtype(t, w))
                                                      for t, w in zip(k, weight_k)]


@torch.library.custom_op("motus_fast::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(q: list[Tensor], k: list[Tensor], weight_q: list[Tensor], weight_k: list[Tensor],
                              has_q: list[bool], cos: list[Optional[Tensor]], sin: list[Optional[Tensor]],
                              eps: list[float], head_dim: int, dq_out: list[Tensor],
                              dk_out: list[Tensor]) -> list[Tensor]:
    """-> [dq per expert] + [dk] + [d weight_q] + [d weight_k]; an empty tensor where not has_q."""
    from motus_fast.kernels.qk_norm_rope import plan, qk_norm_rope_backward

    width = k[0].shape[-1]
    slots = _slots(q, k, weight_q, weight_k, has_q, cos, sin, eps)
    empty = lambda: k[0].new_empty(0)                                  # noqa: E731  (outputs must not alias)
    dq = [torch.empty(*t.shape, dtype=t.dtype, device=t.device) if h else empty() for t, h in zip(q, has_q)]
    dk = [torch.empty(*t.shape, dtype=t.dtype, device=t.device) for t in k]
    for e, s in enumerate(slots):
        s["dko"], s["dk"] = _rows(dk_out[e], width).contiguous(), dk[e].view(-1, width)
        if s["q"] is not None:
            s["dqo"], s["dq"] = _rows(dq_out[e], width).contiguous(), dq[e].view(-1, width)
    dwq, dwk = [], []
    for g in range(0, len(slots), GROUP):
        group = slots[g:g + GROUP]
        block_r = plan(group, width, *launch_budget(k[0].device, reduction=True))
        partial = torch.empty(sum(s["progs"] for s in group), 2, width, dtype=torch.float32, device=k[0].device)
        qk_norm_rope_backward(group, partial, width, head_dim, block_r)
        start = 0
        for s in group:
            part = partial[start:start + s["progs"]]
            start += s["progs"]
            dwq.append(empty() if s["q"] is None else part[:, 0].sum(0).to(s["wq"].dtype))
            dwk.append(part[:, 1].sum(0).to(s["wk"].dtype))
    return dq + dk + dwq + dwk


@_qk_norm_rope_backward_op.register_fake
def _(q, k, weight_q, weight_k, has_q, cos, sin, eps, head_dim, dq_out, dk_out):
    empty = lambda: k[0].new_empty(0)                                  # noqa: E731
    return ([t.new_empty(t.shape) if h else empty() for t, h in zip(q, has_q)] + [t.new_empty(t.shape) for t in k]
            + [w.new_empty(w.shape) if h else empty() for w, h in zip(weight_q, has_q)]
            + [w.new_empty(w.shape) for w in weight_k])


def _setup(ctx, inputs, output):
    q, k, weight_q, weight_k, has_q, cos, sin, eps, head_dim = inputs
    ctx.E, ctx.has_q, ctx.eps, ctx.head_dim = len(k), has_q, eps, head_dim
    ctx.save_for_backward(*q, *k, *weight_q, *weight_k, *cos, *sin)


def _backward(ctx, grads):
    E, has_q = ctx.E, ctx.has_q
    saved = ctx.saved_tensors
    q, k, wq, wk, cos, sin = (list(saved[i * E:(i + 1) * E]) for i in range(6))
    dq_out = [grads[e] if has_q[e] else grads[E + e] for e in range(E)]     # placeholders where there is no q
    flat = _qk_norm_rope_backward_op(q, k, wq, wk, has_q, cos, sin, ctx.eps, ctx.head_dim, dq_out, list(grads[E:]))
    dq, dk, dwq, dwk = (flat[i * E:(i + 1) * E] for i in range(4))
    only_q = lambda gs: [g if h else None for g, h in zip(gs, has_q)]       # noqa: E731
    # autograd mirrors the input structure: a tensor list gets a list of Nones, a list holding None one None
    no_grad = lambda ts: None if any(t is None for t in ts) else [None] * len(ts)  # noqa: E731
    return only_q(dq), dk, only_q(dwq), dwk, None, no_grad(cos), no_grad(sin), None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup)
