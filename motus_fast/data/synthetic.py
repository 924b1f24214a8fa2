"""Synthetic batches with the right shapes for a config: for tests, the demo and benchmarks."""

from __future__ import annotations

from typing import Optional

import torch

from motus_fast.config import MotusConfig
from motus_fast.flow import FlowBatch
from motus_fast.model.mot import Conditioning


def synthetic_batch(cfg: MotusConfig, batch: int = 2, latent_frames: int = 3, latent_hw: tuple[int, int] = (12, 8),
                    text_len: Optional[int] = None, vlm_len: int = 10, generator: Optional[torch.Generator] = None,
                    dtype=torch.float32, device=None) -> FlowBatch:
    """Gaussian latents/actions/conditions. latent_frames counts the condition frame; latent_hw is (H, W) of the
    latent grid (divisible by the patch size)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    v, a, u = cfg.video, cfg.action, cfg.und
    H, W = latent_hw
    state = randn(batch, a.state_dim) if a.layout == "finetune" else None
    cond = Conditioning(text=randn(batch, text_len or v.text_len, v.text_dim), vlm=randn(batch, vlm_len, u.vlm_dim),
                        state=state)
    return FlowBatch(video=randn(batch, v.in_channels, latent_frames, H, W),
                     actions=randn(batch, a.chunk_size, a.action_dim), cond=cond)


class SyntheticDataset(torch.utils.data.Dataset):
    """A map-style dataset of `size` synthetic samples; sample i is the same on every call and every process
    (drawn from a generator seeded by (seed, i)), so training on it is reproducible and resumable."""

    def __init__(self, cfg: MotusConfig, size: int = 64, seed: int = 0, latent_frames: int = 3,
                 latent_hw: tuple[int, int] = (12, 8), text_len: int = 8, vlm_len: int = 6):
        self.cfg, self.size, self.seed = cfg, size, seed
        self.shape = dict(latent_frames=latent_frames, latent_hw=latent_hw, text_len=text_len, vlm_len=vlm_len)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> FlowBatch:
        if not 0 <= i < self.size:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return synthetic_batch(self.cfg, batch=1, generator=g, **self.shape)
