"""Small building blocks shared by the three experts."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from motus_fast.ops import adaln_modulate, gated_residual_adaln, rms_norm
from motus_fast.ops.adaln import gated_residual


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight, over the whole row (for q/k: all heads together, as Wan does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Stream(NamedTuple):
    """An expert's residual stream between layers: ``x + branch * gate``, the last residual branch (a layer's FFN)
    not yet added. The next AdaLN adds it in the same pass (``gated_residual_adaln``), so a layer boundary is one
    launch instead of three (multiply, add, normalise) and one read of the stream instead of three. branch None:
    x is the stream (fresh embeddings); gate None: an ungated branch (the und stream)."""

    x: torch.Tensor
    branch: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None

    def modulate(self, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float):
        """-> (the stream, its AdaLN ``N(stream) * (1 + scale) + shift``; shift/scale None: plain LayerNorm)."""
        if self.branch is None:
            return self.x, adaln_modulate(self.x, shift, scale, eps)
        return gated_residual_adaln(self.x, self.branch, self.gate, shift, scale, eps)

    def settled(self) -> "Stream":
        """The stream with its branch added (torch ops), nothing pending."""
        return self if self.branch is None else Stream(self.value())

    def value(self) -> torch.Tensor:
        """The stream itself, for a caller that needs it without a following AdaLN (in x's dtype, as upstream)."""
        return self.x if self.branch is None else gated_residual(self.x, self.branch, self.gate)


def feed_forward(dim: int, ffn_dim: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear, the FFN of every expert."""
    return nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))


def mlp3x_silu(in_dim: int, dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear -> SiLU -> Linear (upstream's `mlp3x_silu` encoders and VLM adapter)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., H*D] -> [..., H, D]"""
    return x.unflatten(-1, (num_heads, -1))


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None):
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D]; lens: [B] valid keys per sample or None (all keys). -> [B, Lq, H, D]"""
    mask = None
    if lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)
