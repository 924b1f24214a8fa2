"""RMSNorm over the whole q/k row (all heads together) with a learned weight, then 3-D RoPE where the expert has it.

Reference implementation (the spec). RoPE pairs are interleaved (x[2j], x[2j+1]) = (real, imag) and rotate in
float64, as upstream does with complex128.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, statistics in fp32 (Wan's RMSNorm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs. x: [B, L, H, D]; cos/sin: [L, D/2] (float64). Returns x's dtype."""
    xd = x.to(torch.float64).unflatten(-1, (-1, 2))
    re, im = xd[..., 0], xd[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, num_heads: int,
                 rope: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """q, k: [B, L, H*D] -> normalised (and rotated) [B, L, H, D]. rope: (cos, sin) [L, D/2] or None."""
    q = rms_norm(q, weight_q, eps).unflatten(-1, (num_heads, -1))
    k = rms_norm(k, weight_k, eps).unflatten(-1, (num_heads, -1))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k
