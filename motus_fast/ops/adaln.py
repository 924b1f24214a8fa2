"""AdaLN: ``LN(x) * (1 + scale) + shift`` and the gated residual that precedes it.

Modulation is per sample ([B, 1, D]) or per token ([B, L, D]); statistics are fp32. This file holds the reference
(the spec); the fused Triton/CUDA kernels attach here, selected by ``MOTUS_BACKEND``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim without affine parameters (biased variance), statistics in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LN(x) * (1 + scale) + shift, in fp32, cast back to x's dtype. x: [B, L, D]; shift/scale: [B, 1|L, D]."""
    return (F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual_adaln(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float):
    """x' = x + y * gate; h = LN(x') * (1 + scale) + shift. Returns (x', h)."""
    x = x + y * gate.to(x.dtype)
    return x, adaln_modulate(x, shift, scale, eps)
