"""3-D rotary position embedding of the video tokens (Wan2.2), as cos/sin tables.

Each head of width d is split into c = d/2 complex pairs (x[2j], x[2j+1]) (interleaved). The pairs are split
(c_t, c_h, c_w) = (c - 2*(c//3), c//3, c//3) over the latent frame, row and column of the token; within each
group pair j is rotated by pos * 10000^(-j/c_group). Upstream builds the table in complex float64; so do we.
"""

from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_angles(grid: tuple[int, int, int], head_dim: int, device=None) -> torch.Tensor:
    """Rotation angle of every (token, pair) for a (F, H', W') token grid, float64. -> [F*H'*W', head_dim/2]"""
    F, H, W = grid
    angles = []
    for n_pairs, size, axis in zip(rope_split(head_dim), (F, H, W), range(3)):
        freqs = torch.pow(10000.0, -torch.arange(n_pairs, dtype=torch.float64, device=device) / n_pairs)
        pos = torch.arange(size, dtype=torch.float64, device=device)
        a = pos[:, None] * freqs                                 # [size, n_pairs]
        shape = [1, 1, 1, n_pairs]
        shape[axis] = size
        angles.append(a.reshape(shape).expand(F, H, W, n_pairs))
    return torch.cat(angles, dim=-1).reshape(F * H * W, head_dim // 2)


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float64 [L, head_dim/2]."""
    a = rope_angles(grid, head_dim, device)
    return torch.cos(a), torch.sin(a)
