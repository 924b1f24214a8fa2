"""Embeddings shared by the experts: time sinusoids and MLPs, the action position table, patchify, AdaLN tables."""

from __future__ import annotations

import torch
from torch import nn


def time_sinusoid(t: torch.Tensor, width: int) -> torch.Tensor:
    """[cos(t f) | sin(t f)] with f_i = 10000^(-i/half), computed in float64 (as upstream) and returned as fp32.

    t: any shape, on the 0..1000 scale -> [*t.shape, width]
    """
    half = width // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def position_table(rows: int, width: int) -> torch.Tensor:
    """Fixed [sin | cos] table (note: the opposite order of the time sinusoid), float64 -> fp32. [1, rows, width]"""
    half = width // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()[None]


class TimeEmbedding(nn.Module):
    """sinusoid -> Linear -> SiLU -> Linear (= e), then SiLU -> Linear -> [chunks, dim] (the AdaLN table e6)."""

    def __init__(self, freq_dim: int, dim: int, chunks: int = 6):
        super().__init__()
        self.freq_dim, self.dim, self.chunks = freq_dim, dim, chunks
        self.embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.project = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # t: [B] or [B, L] (per-token) on the 0..1000 scale
        # -> e: [*t.shape, dim] (feeds the output head), e6: [*t.shape, chunks, dim] (feeds each block's AdaLN)
        dtype = self.embed[0].weight.dtype
        e = self.embed(time_sinusoid(t, self.freq_dim).to(dtype))
        e6 = self.project(e).unflatten(-1, (self.chunks, self.dim))
        return e, e6


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, F*H'*W', C*pt*ph*pw], tokens in (f, h, w) order, features in (c, pt, ph, pw) order."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent shape {(T, H, W)} is not divisible by the patch size {patch}")
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)                      # B, F, H', W', C, pt, ph, pw
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(y: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int):
    """[B, F*H'*W', pt*ph*pw*C] (channel fastest, as Wan's head) -> [B, C, F*pt, H'*ph, W'*pw]."""
    B = y.shape[0]
    F, Hp, Wp = grid
    pt, ph, pw = patch
    y = y.reshape(B, F, Hp, Wp, pt, ph, pw, channels)
    y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)                      # B, C, F, pt, H', ph, W', pw
    return y.reshape(B, channels, F * pt, Hp * ph, Wp * pw)


def modulation_chunks(table: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AdaLN parameters: block table [1, n, D] + time projection e [B, n, D] or [B, L, n, D].

    Returns n tensors broadcastable against tokens [B, L, D]: [B, 1, D] (per sample) or [B, L, D] (per token).
    """
    if e.dim() == 3:
        m = table + e                                          # B, n, D
        return m.unsqueeze(1).unbind(2)                        # each [B, 1, D]
    m = table.unsqueeze(0) + e                                 # B, L, n, D
    return m.unbind(2)
