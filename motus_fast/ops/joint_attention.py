"""Tri-modal joint attention: every token of a sample attends to that sample's tokens in all experts.

Layout (DESIGN.md section 5.1): each expert e keeps its own buffers q_e, k_e, v_e of shape [T_e, H, D] with the
samples concatenated; ``cu_seqlens[e]`` (int32 [B+1]) gives the boundaries. For sample b the keys are the union of
the experts' segments b, filtered by an optional expert-level visibility matrix ``visible[e_q, e_k]``. Outputs come
back per expert, in the same layout as the queries. ``q_e=None`` makes expert e a keys/values-only participant
(its output is None): the last Motus layer needs no und queries.

This file holds the public entry point and the reference implementation (the spec); the Triton kernels live in
``motus_fast.kernels`` once they exist, selected by ``MOTUS_BACKEND``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from motus_fast.backend import choose

Tensor = torch.Tensor


def joint_attention(
    q: Sequence[Optional[Tensor]],
    k: Sequence[Tensor],
    v: Sequence[Tensor],
    cu_seqlens: Sequence[Tensor],
    visible: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> list[Optional[Tensor]]:
    """Joint attention over E experts. q/k/v[e]: [T_e, H, D]; cu_seqlens[e]: int [B+1]; visible: bool [E, E].

    Returns one [T_e, H, D] output per expert with a query (None where q[e] is None).
    """
    check_joint_inputs(q, k, v, cu_seqlens, visible)
    choose("joint_attention", {"triton": False, "cuda": False}, k[0].device.type)
    out, _ = joint_attention_reference(q, k, v, cu_seqlens, visible, softmax_scale)
    return out


def check_joint_inputs(q, k, v, cu_seqlens, visible) -> None:
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
    if visible is not None and (visible.shape != (E, E) or visible.dtype != torch.bool):
        raise ValueError(f"visible must be a bool [{E}, {E}] matrix, got {visible.dtype} {tuple(visible.shape)}")


def joint_attention_reference(q, k, v, cu_seqlens, visible=None, softmax_scale=None, return_lse=False):
    """Per-sample SDPA over the concatenated visible keys. Returns (outputs, lse) per expert. A query that sees no
    key gets output 0 and lse -inf. lse (natural log, fp32 [T_e, H]) is computed only if `return_lse`."""
    E = len(k)
    H, D = k[0].shape[1:]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = [c.tolist() for c in cu_seqlens]
    B = len(bounds[0]) - 1
    vis = torch.ones(E, E, dtype=torch.bool) if visible is None else visible.cpu()
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
                l = qq.new_full(qq.shape[:2], -math.inf, dtype=torch.float32)
            else:
                kk = torch.cat([k[e][s:t] for e, s, t in keys])
                vv = torch.cat([v[e][s:t] for e, s, t in keys])
                o = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                                   scale=scale).transpose(0, 1)
                l = None
                if return_lse:
                    with torch.no_grad():
                        logits = torch.einsum("qhd,khd->hqk", qq.float(), kk.float()) * scale
                        l = torch.logsumexp(logits, dim=-1).transpose(0, 1)
            i = 0
            for e, s, t in segs:
                out_parts[e].append(o[i:i + t - s])
                lse_parts[e].append(None if l is None else l[i:i + t - s])
                i += t - s
    out = [None if q[e] is None else torch.cat(out_parts[e]) if B else q[e][:0] for e in range(E)]
    lse = [None if q[e] is None or not return_lse else torch.cat(lse_parts[e]) if B
           else q[e].new_empty((0, H), dtype=torch.float32) for e in range(E)]
    return out, lse
