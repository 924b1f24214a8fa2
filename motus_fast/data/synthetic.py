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
