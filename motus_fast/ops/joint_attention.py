"""Tri-modal joint attention: every token of a sample attends to that sample's tokens in all experts.

Layout (DESIGN.md section 5.1): each expert e keeps its own buffers q_e, k_e, v_e of shape [T_e, H, D] with the
samples concatenated; ``cu_seqlens[e]`` (int32 [B+1]) gives the boundaries. For sample b the keys are the union of
the experts' segments b, filtered by an optional expert-level visibility matrix ``visible[e_q, e_k]``. Outputs come
back per expert, in the same layout as the queries. ``q_e=None`` makes expert e a keys/values-only participant
(its output is None): the last Motus layer needs no und queries.

Three faces:
- the reference (``joint_attention_reference``, ``varlen_attention_reference``): per-sample SDPA, the spec;
- Triton kernels (kernels/joint_attention.py): one launch for all experts, forward + backward (dQ, dK, dV without
  atomics), wrapped as the ``motus_fast::attention_fwd`` / ``attention_bwd`` custom ops with fake implementations
  and autograd, so torch.compile and CUDA graphs trace through them;
- ``varlen_attention``: the single-buffer special case with flash_attn_varlen_func's signature, on the same
  kernels, so it can be compared with FlashAttention and torch's varlen attention directly.
``MOTUS_BACKEND`` chooses (motus_fast.backend). The Triton path runs on CUDA tensors in fp16/bf16 and, under
``TRITON_INTERPRET=1``, on CPU tensors (fp32 too); other cases use the reference, logged once.

Host syncs: the Triton path needs none if the caller passes ``max_seqlens`` (python ints, upper bounds of the
per-sample lengths; they size the grid) and ``visible`` as a CPU tensor or python bools (it becomes a compile-time
bitmask of the kernels; python bools also keep torch.compile graphs free of breaks). Without
``max_seqlens`` we read the lengths from the device once per call. CPU ``cu_seqlens`` are validated (boundaries,
bounds); device ones are the caller's promise, as in flash_attn_varlen_func.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from motus_fast.backend import choose, requested_backend
from motus_fast.kernels import interpreting
from motus_fast.ops import attention_dispatch
from motus_fast.ops.availability import (PlanCache, autocast_dtype, backend_setting, eager_call, needs_grad,
                                         triton_runs_on)
from motus_fast.ops.profiling import annotate

Tensor = torch.Tensor

MAX_TRITON_EXPERTS = 3
TRITON_HEAD_DIMS = (64, 128)       # kernels/joint_attention.py HEAD_DIMS (importing it needs triton)


# ---- public API -------------------------------------------------------------------------------------------------
@annotate("motus_fast.joint_attention")
def joint_attention(
    q: Sequence[Optional[Tensor]],
    k: Sequence[Tensor],
    v: Sequence[Tensor],
    cu_seqlens: Sequence[Tensor],
    visible=None,
    softmax_scale: Optional[float] = None,
    max_seqlens: Optional[Sequence[int]] = None,
    return_lse: bool = False,
):
    """Joint attention over E experts. q/k/v[e]: [T_e, H, D]; cu_seqlens[e]: int32 [B+1]; visible: bool [E, E]
    tensor or nested python bools (visible[e_q][e_k]; None = all visible; python bools keep torch.compile graphs
    whole, a tensor is read on the host); max_seqlens[e]: an upper bound of expert e's per-sample lengths (python
    int), or None (read from the device).

    Returns one [T_e, H, D] output per expert with a query (None where q[e] is None); with ``return_lse`` also the
    per-expert natural-log LSE, fp32 [T_e, H] (-inf for a query that sees no key; its output is 0).
    """
    autocast = autocast_dtype(k[0])
    if autocast is not None:   # as SDPA under autocast: in the autocast dtype
        q, k, v = _autocast_inputs(q, k, v, autocast)
    if max_seqlens is not None and not isinstance(visible, Tensor) and eager_call():
        # the checks, backend choice and launch arguments depend only on these parameters and the tensors'
        # signatures: built once
        grad = torch.is_grad_enabled()
        key = (None if visible is None else tuple(map(tuple, visible)), tuple(max_seqlens), softmax_scale, grad,
               backend_setting())
        tensors = (*q, *k, *v, *cu_seqlens)
        plan = _PLANS.get(key, tensors)
        if plan is None:   # (the first call checks the boundary values in check_joint_inputs)
            plan = _PLANS.put(key, tensors, (_joint_plan(q, k, v, cu_seqlens, visible, softmax_scale, max_seqlens),
                                             _boundary_check(cu_seqlens, k, max_seqlens)))
        elif plan[1] is not None:   # values, not signature: checked for each new CPU tensor (device ones are trusted)
            plan[1](cu_seqlens)
        run = plan[0]
    else:
        run = _joint_plan(q, k, v, cu_seqlens, visible, softmax_scale, max_seqlens)
    out, lse = run(q, k, v, cu_seqlens, return_lse)
    return (out, lse) if return_lse else out


_PLANS = PlanCache()


def _autocast_inputs(q, k, v, dtype):
    """q, k, v in the autocast dtype (torch's autocast casts SDPA's inputs so; one-process bf16 training)."""
    cast = lambda ts: [t if t is None or t.dtype == dtype else t.to(dtype) for t in ts]  # noqa: E731
    return cast(q), cast(k), cast(v)


def _boundary_check(cu_seqlens, k, max_seqlens):
    """-> check(cu_seqlens) of the CPU boundaries' values for later calls of this signature (None: none on CPU).
    The common case is one comparison per boundary; a failure goes to _check_boundaries for its message. A tensor
    found valid is not read again while it is the one passed and its version counter (bumped by every in-place
    torch op; not by writes through .numpy() or .data, which the boundaries must not get after their first use)
    is unchanged: the model passes one set to every layer. (Tensors made under torch.inference_mode have no
    counter: they are read every call. The plan holds the last valid tensors weakly.)"""
    cpu = [(e, k[e].shape[0], max_seqlens[e]) for e, c in enumerate(cu_seqlens) if c.device.type == "cpu"]
    if not cpu:
        return None
    valid = [(None, None)] * len(cu_seqlens)   # per expert: the last tensor found valid (weakly), its version

    def check(cu_seqlens):
        for e, total, bound in cpu:
            c = cu_seqlens[e]
            seen, version = valid[e]
            if version is not None and seen() is c and version == c._version:
                continue
            b = c.tolist()
            prev = b[0]
            ok = prev == 0 and b[-1] == total
            for x in b:
                ok = ok and prev <= x <= prev + bound
                prev = x
            if not ok:
                _check_boundaries(f"cu_seqlens[{e}]", c, total, bound, f"max_seqlens[{e}]")
            valid[e] = (weakref.ref(c), None if c.is_inference() else c._version)
    return check


def _joint_plan(q, k, v, cu_seqlens, visible, softmax_scale, max_seqlens):
    """-> run(q, k, v, cu_seqlens, return_lse) -> (out, lse) per expert, for inputs of this signature."""
    check_joint_inputs(q, k, v, cu_seqlens, visible, max_seqlens)
    E, D = len(k), k[0].shape[-1]
    visible = visibility_rows(visible)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    backend = choose("joint_attention", {"triton": _triton_can_run(k[0], E), "cuda": False}, k[0].device.type)
    candidate = "triton"
    if backend == "triton" and requested_backend() == "auto" and max_seqlens is not None:
        candidate = attention_dispatch.select("joint_attention", k[0].device, k[0].dtype, visible, max_seqlens,
                                              inputs=(q, k, v))
    if backend == "reference" or candidate == "sdpa":
        return lambda q, k, v, cu, return_lse: joint_attention_reference(q, k, v, cu, visible, scale, return_lse)
    if candidate == "flex":
        return attention_dispatch.flex_joint(q, k, v, cu_seqlens, visible, scale, max_seqlens)
    ours = _triton_plan(q, k, v, cu_seqlens, visible, scale, max_seqlens, hopper=candidate == "triton_hopper")
    if candidate == "flash_attn" and all(t is not None for t in q):
        bounds = list(max_seqlens)
        return lambda q, k, v, cu, return_lse: (ours(q, k, v, cu, True) if return_lse else (
            attention_dispatch.flash_attn_joint(q, k, v, cu, bounds, scale), [None] * E))
    return ours


def _triton_plan(q, k, v, cu_seqlens, visible, scale, max_seqlens, hopper=False):
    from motus_fast.kernels.joint_attention import forward_launcher, visibility_bits
    if hopper:   # the Hopper forward (kernels/joint_attention_hopper.py) for eager inference; same contract
        from motus_fast.kernels.joint_attention_hopper import forward_launcher

    E, dev = len(k), k[0].device
    as_int32 = lambda cu: [c if c.dtype == torch.int32 and c.device == dev  # noqa: E731
                           else c.to(device=dev, dtype=torch.int32) for c in cu]
    bits = visibility_bits(visible, E)
    q_experts = [e for e in range(E) if q[e] is not None]
    direct = (eager_call() and max_seqlens is not None and not needs_grad(*q, *k, *v)
              and all(t is None or t.stride(2) == 1 or t.numel() == 0 for t in (*q, *k, *v)))
    if hopper and not direct:
        attention_dispatch.fall_back("joint_attention", "triton_hopper", "it serves the eager inference forward "
                                     "only; autograd and torch.compile run the portable kernels")
    if direct:   # eager inference: no dispatcher, launch arguments computed once
        # (the plan keeps no tensor: a launcher is built from the tensors of the call that first needs it)
        launcher = functools.partial(forward_launcher, max_q=list(max_seqlens), visible_bits=bits,
                                     softmax_scale=float(scale))
        launch = launcher(q, k, v, cu_seqlens, cu_seqlens, write_lse=False)   # no LSE asked: none written
        with_lse = []                                                          # built when first asked for

        def launch_lse(q, k, v, cu_q, cu_k, out):
            if not with_lse:
                with_lse.append(launcher(q, k, v, cu_q, cu_k, write_lse=True))
            return with_lse[0](q, k, v, cu_q, cu_k, out)
        convert = any(c.dtype != torch.int32 or c.device != dev for c in cu_seqlens)
        # outputs: empty_like a contiguous q (half torch.empty's cost), else a contiguous [T, H, D]
        like_q = [t is not None and t.is_contiguous() for t in q]
        shapes = [None if t is None else tuple(t.shape) for t in q]
        dtype = k[0].dtype
        if all(like_q) and not convert:   # the common case without the per-expert choices (~0.3 us less)
            def run_contiguous(q, k, v, cu, return_lse):
                return (launch_lse if return_lse else launch)(q, k, v, cu, cu, [torch.empty_like(t) for t in q])
            return run_contiguous

        def run(q, k, v, cu, return_lse):
            if convert:
                cu = as_int32(cu)
            out = [torch.empty_like(t) if like else None if t is None else torch.empty(*s, dtype=dtype, device=dev)
                   for t, like, s in zip(q, like_q, shapes)]
            return (launch_lse if return_lse else launch)(q, k, v, cu, cu, out)
        return run

    def run(q, k, v, cu, return_lse):   # the custom op: autograd and torch.compile
        cu = as_int32(cu)
        bounds = list(max_seqlens) if max_seqlens is not None else _max_lengths(cu)
        res = torch.ops.motus_fast.attention_fwd(
            [q[e] for e in q_experts], q_experts, list(k), list(v), cu, cu,
            [bounds[e] if q[e] is not None else 0 for e in range(E)], bounds, bits, float(scale), False)
        n = len(q_experts)
        out: list[Optional[Tensor]] = [None] * E
        lse: list[Optional[Tensor]] = [None] * E
        for i, e in enumerate(q_experts):
            out[e], lse[e] = res[i], res[n + i]
        return out, lse
    return run


@annotate("motus_fast.varlen_attention")
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False, *, return_lse: bool = False):
    """flash_attn_varlen_func's signature: q [T_q, H, D], k/v [T_k, H, D], cu_seqlens_* int32 [B+1],
    max_seqlen_* upper bounds of the per-sample lengths. ``causal`` aligns the mask to the bottom right (query i
    of a sample sees key j iff j <= i + len_k - len_q), as FlashAttention >= 2.1. Dropout is not supported.

    Returns out [T_q, H, D] (and, with ``return_lse``, fp32 LSE [T_q, H]; FlashAttention's is [H, T_q]). A query
    that sees no key gets output 0 and LSE -inf.
    """
    if dropout_p != 0.0:
        raise ValueError(f"varlen_attention: dropout_p must be 0.0 (no dropout in Motus), got {dropout_p}")
    _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = choose("varlen_attention", {"triton": _triton_can_run(k, 1), "cuda": False}, k.device.type)
    if backend == "reference":
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
        return (out, lse) if return_lse else out
    dev = k.device
    cu_q, cu_k = (c.to(device=dev, dtype=torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    out, lse = torch.ops.motus_fast.attention_fwd([q], [0], [k], [v], [cu_q], [cu_k], [int(max_seqlen_q)],
                                                  [int(max_seqlen_k)], 1, float(scale), bool(causal))
    return (out, lse) if return_lse else out


def _triton_can_run(t: Tensor, num_experts: int) -> bool:
    """fp16/bf16 CUDA tensors (fp32 needs the exact-fp32 dot, which spills on sm_90: the reference is better),
    any float dtype under the interpreter; supported head dims; at most three experts."""
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if interpreting() else ())
    return (triton_runs_on(t.device) and t.dtype in dtypes and t.shape[-1] in TRITON_HEAD_DIMS
            and num_experts <= MAX_TRITON_EXPERTS)


def _max_lengths(cu: Sequence[Tensor]) -> list[int]:
    """Per-expert max segment length, read from the device in one transfer (a sync; pass max_seqlens to avoid)."""
    if cu[0].numel() <= 1:
        return [0] * len(cu)
    return [int(x) for x in torch.stack([(c[1:] - c[:-1]).max() for c in cu]).tolist()]


# ---- input checks -----------------------------------------------------------------------------------------------
def check_joint_inputs(q, k, v, cu_seqlens, visible, max_seqlens=None) -> None:
    E = len(k)
    if not (len(q) == len(v) == len(cu_seqlens) == E) or E == 0:
        raise ValueError(f"joint_attention needs one q/k/v/cu_seqlens per expert, got {len(q)}/{E}/{len(v)}/"
                         f"{len(cu_seqlens)}")
    H, D = k[0].shape[1:]
    B = cu_seqlens[0].numel() - 1
    for e in range(E):
        for name, t in (("q", q[e]), ("k", k[e]), ("v", v[e])):
            if t is None and name == "q":
                continue
            if t.dim() != 3 or t.shape[1:] != (H, D) or t.shape[0] != k[e].shape[0]:
                raise ValueError(f"{name}[{e}] has shape {tuple(t.shape)}; expected [{k[e].shape[0]}, {H}, {D}]")
            if t.dtype != k[0].dtype or t.device != k[0].device:
                raise ValueError(f"{name}[{e}] is {t.dtype} on {t.device}; expected {k[0].dtype} on {k[0].device}")
        cu = cu_seqlens[e]
        if cu.dim() != 1 or cu.numel() != B + 1 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens[{e}] must be int32 [B+1={B + 1}], got {cu.dtype} {tuple(cu.shape)}")
    if isinstance(visible, Tensor) and (visible.shape != (E, E) or visible.dtype != torch.bool):
        raise ValueError(f"visible must be a bool [{E}, {E}] matrix, got {visible.dtype} {tuple(visible.shape)}")
    if visible is not None and not isinstance(visible, Tensor) and (
            len(visible) != E or any(len(row) != E for row in visible)):
        raise ValueError(f"visible must be a bool [{E}, {E}] matrix, got {visible!r}")
    if max_seqlens is not None and len(max_seqlens) != E:
        raise ValueError(f"max_seqlens needs one bound per expert ({E}), got {list(max_seqlens)}")
    for e in range(E):
        _check_boundaries(f"cu_seqlens[{e}]", cu_seqlens[e], k[e].shape[0],
                          None if max_seqlens is None else max_seqlens[e], f"max_seqlens[{e}]")


def visibility_rows(visible) -> Optional[list[list[bool]]]:
    """visible (tensor or nested sequence) -> python rows; None stays None (all visible)."""
    if visible is None:
        return None
    rows = visible.tolist() if isinstance(visible, Tensor) else visible
    return [[bool(x) for x in row] for row in rows]


def _check_boundaries(name: str, cu: Tensor, total: int, bound: Optional[int], bound_name: str) -> None:
    """Boundaries on the CPU are checked (free); device ones would cost a sync, so they are trusted."""
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return
    b = cu.tolist()
    lengths = [t - s for s, t in zip(b[:-1], b[1:])]
    if b[0] != 0 or b[-1] != total or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must rise from 0 to the buffer length {total}, got {b}")
    if bound is not None and lengths and max(lengths) > bound:
        raise ValueError(f"{bound_name}={bound} is below the longest segment of {name} ({max(lengths)})")


def _check_varlen_inputs(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != k.shape[1:] or t.dtype != k.dtype or t.device != k.device:
            raise ValueError(f"varlen_attention: {name} is {t.dtype} {tuple(t.shape)} on {t.device}; expected "
                             f"[T, {k.shape[1]}, {k.shape[2]}] {k.dtype} on {k.device}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"varlen_attention: v has {v.shape[0]} rows, k has {k.shape[0]}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dim() != 1 or cu.numel() != cu_q.numel() or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"varlen_attention: {name} must be int32 [B+1={cu_q.numel()}], got {cu.dtype} "
                             f"{tuple(cu.shape)}")
    _check_boundaries("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q")
    _check_boundaries("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")


# ---- reference (the spec) ---------------------------------------------------------------------------------------
def joint_attention_reference(q, k, v, cu_seqlens, visible=None, softmax_scale=None, return_lse=False):
    """Per-sample SDPA over the concatenated visible keys. Returns (outputs, lse) per expert. A query that sees no
    key gets output 0 and lse -inf. lse (natural log, fp32 [T_e, H]; fp64 for fp64 inputs) is computed only if
    `return_lse`."""
    E = len(k)
    H, D = k[0].shape[1:]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = [c.tolist() for c in cu_seqlens]
    B = len(bounds[0]) - 1
    lse_dtype = torch.promote_types(k[0].dtype, torch.float32)
    vis = torch.ones(E, E, dtype=torch.bool) if visible is None else torch.as_tensor(visible, dtype=torch.bool).cpu()
    # query experts with the same visibility row share one attention call
    groups: dict[tuple[bool, ...], list[int]] = {}
    for e in range(E):
        if q[e] is not None:
            groups.setdefault(tuple(vis[e].tolist()), []).append(e)
    out_parts = {e: [] for e in range(E)}
    lse_parts = {e: [] for e in range(E)}
    for b in range(B):
        for row, q_experts in groups.items():
            segs = [(e, bounds[e][b], bounds[e][b + 1]) for e in q_experts]
            keys = [(e, bounds[e][b], bounds[e][b + 1]) for e in range(E) if row[e]]
            n_keys = sum(t - s for _, s, t in keys)
            qq = torch.cat([q[e][s:t] for e, s, t in segs])
            if n_keys == 0 or qq.shape[0] == 0:           # nothing visible: output 0, lse -inf
                o = torch.zeros_like(qq)
                l = qq.new_full(qq.shape[:2], -math.inf, dtype=lse_dtype)
            else:
                kk = torch.cat([k[e][s:t] for e, s, t in keys])
                vv = torch.cat([v[e][s:t] for e, s, t in keys])
                o = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                                   scale=scale).transpose(0, 1)
                l = None
                if return_lse:
                    with torch.no_grad():
                        logits = torch.einsum("qhd,khd->hqk", qq.to(lse_dtype), kk.to(lse_dtype)) * scale
                        l = torch.logsumexp(logits, dim=-1).transpose(0, 1)
            i = 0
            for e, s, t in segs:
                out_parts[e].append(o[i:i + t - s])
                lse_parts[e].append(None if l is None else l[i:i + t - s])
                i += t - s
    out = [None if q[e] is None else torch.cat(out_parts[e]) if B else q[e][:0] for e in range(E)]
    lse = [None if q[e] is None or not return_lse else torch.cat(lse_parts[e]) if B
           else q[e].new_empty((0, H), dtype=lse_dtype) for e in range(E)]
    return out, lse


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Per-sample SDPA (bottom-right causal mask if `causal`). Returns (out [T_q, H, D], lse [T_q, H]); a query
    that sees no key gets output 0 and lse -inf."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lse_dtype = torch.promote_types(k.dtype, torch.float32)
    outs, lses = [], []
    for b in range(len(bq) - 1):
        qq, kk, vv = q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]]
        Lq, Lk = qq.shape[0], kk.shape[0]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:
            mask = torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
        seen = mask.any(1)                                                    # queries that see some key
        if Lk == 0 or not bool(seen.any()):
            outs.append(torch.zeros_like(qq))
            lses.append(qq.new_full(qq.shape[:2], -math.inf, dtype=lse_dtype))
            continue
        o = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                           attn_mask=mask | ~seen[:, None], scale=scale).transpose(0, 1)
        outs.append(torch.where(seen[:, None, None], o, torch.zeros_like(o)))
        with torch.no_grad():
            logits = torch.einsum("qhd,khd->hqk", qq.to(lse_dtype), kk.to(lse_dtype)) * scale
            lses.append(torch.logsumexp(logits.masked_fill(~mask, -math.inf), dim=-1).transpose(0, 1))
    if not outs:
        return q[:0], q.new_empty((0, q.shape[1]), dtype=lse_dtype)
    return torch.cat(outs), torch.cat(lses)


# ---- Triton custom ops ------------------------------------------------------------------------------------------
# One pair of ops serves joint and varlen attention. Lists are per expert (E = len(k)); q holds only the experts
# listed in q_experts (an Optional in a tensor list would drop out of autograd). Outputs: [out..., lse...] for the
# query experts; the backward returns [dq..., dk..., dv...].
def _full(xs: Sequence[Tensor], q_experts: Sequence[int], E: int) -> list[Optional[Tensor]]:
    full: list[Optional[Tensor]] = [None] * E
    for x, e in zip(xs, q_experts):
        full[e] = x
    return full


@torch.library.custom_op("motus_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: list[Tensor], q_experts: list[int], k: list[Tensor], v: list[Tensor], cu_q: list[Tensor],
                      cu_k: list[Tensor], max_q: list[int], max_k: list[int], visible_bits: int,
                      softmax_scale: float, causal: bool) -> list[Tensor]:
    from motus_fast.kernels.joint_attention import attention_forward

    E = len(k)
    out, lse = attention_forward(_full(q, q_experts, E), k, v, cu_q, cu_k, max_q, visible_bits=visible_bits,
                                 softmax_scale=softmax_scale, causal=causal)
    return [out[e] for e in q_experts] + [lse[e] for e in q_experts]


@_attention_fwd_op.register_fake
def _(q, q_experts, k, v, cu_q, cu_k, max_q, max_k, visible_bits, softmax_scale, causal):
    return [t.new_empty(t.shape) for t in q] + [t.new_empty(t.shape[:2], dtype=torch.float32) for t in q]


@torch.library.custom_op("motus_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(do: list[Tensor], q: list[Tensor], q_experts: list[int], k: list[Tensor], v: list[Tensor],
                      out: list[Tensor], lse: list[Tensor], cu_q: list[Tensor], cu_k: list[Tensor],
                      max_q: list[int], max_k: list[int], visible_bits: int, softmax_scale: float,
                      causal: bool) -> list[Tensor]:
    from motus_fast.kernels.joint_attention import attention_backward

    E = len(k)
    dq, dk, dv = attention_backward(_full(do, q_experts, E), _full(q, q_experts, E), k, v,
                                    _full(out, q_experts, E), _full(lse, q_experts, E), cu_q, cu_k, max_q, max_k,
                                    visible_bits=visible_bits, softmax_scale=softmax_scale, causal=causal)
    return [dq[e] for e in q_experts] + dk + dv


@_attention_bwd_op.register_fake
def _(do, q, q_experts, k, v, out, lse, cu_q, cu_k, max_q, max_k, visible_bits, softmax_scale, causal):
    return [t.new_empty(t.shape) for t in (*q, *k, *v)]


def _setup_context(ctx, inputs, output):
    q, q_experts, k, v, cu_q, cu_k, max_q, max_k, visible_bits, softmax_scale, causal = inputs
    n, E = len(q), len(k)
    ctx.sizes = (n, E, E, n, n, E, E)                # q, k, v, out, lse, cu_q, cu_k as saved below
    ctx.params = (list(q_experts), list(max_q), list(max_k), visible_bits, softmax_scale, causal)
    ctx.save_for_backward(*q, *k, *v, *output, *cu_q, *cu_k)
    ctx.mark_non_differentiable(*output[n:])        # the LSE is a by-product for the backward and for tests


def _backward(ctx, grads):
    saved, groups = list(ctx.saved_tensors), []
    for size in ctx.sizes:
        groups.append(saved[:size])
        saved = saved[size:]
    q, k, v, out, lse, cu_q, cu_k = groups
    n, E = len(q), len(k)
    q_experts, max_q, max_k, bits, scale, causal = ctx.params
    do = [torch.zeros_like(o) if g is None else g.contiguous() for g, o in zip(grads[:n], out)]
    res = torch.ops.motus_fast.attention_bwd(do, q, q_experts, k, v, out, lse, cu_q, cu_k, max_q, max_k, bits,
                                             scale, causal)
    dq, dk, dv = res[:n], res[n:n + E], res[n + E:]
    # one entry per forward input: q, q_experts, k, v, cu_q, cu_k, max_q, max_k, visible_bits, scale, causal
    return dq, None, dk, dv, [None] * E, [None] * E, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)
