"""The one protocol every frozen encoder bundle implements, and the preprocessing all of them share.

Motus reads three frozen encoders: the Wan2.2 VAE (frames <-> latents; the first latent frame is the clean
condition), umT5-XXL (instruction -> text states for the video expert's cross-attention) and Qwen3-VL (image +
instruction -> last hidden states for the und expert). Training (``motus_fast.data.encode.BatchEncoder``), serving
(``motus_fast.infer.InferenceEngine``), evaluation and the demo call them only through ``Encoders``:

- frames are uint8 RGB, channels last; ``pixels_to_unit`` maps them to [-1, 1] (upstream's ``frame * 2 - 1``);
- a clip of F pixel frames maps to 1 + (F - 1) / frame_stride latent frames (causal VAE: frame 0 is encoded
  alone, so the first latent of a clip equals the latent of its first frame);
- text states are zero-padded or truncated to ``text_len`` rows (upstream pads umT5 states with zero rows);
- lengths come back as a tensor when padding is to be masked, None when every row is attended (upstream parity:
  the bundle's ``attend_padding``).

Implementations: ``FrozenEncoders`` (real or tiny Wan VAE / umT5 / Qwen3-VL modules), ``StubEncoders`` and
``PatchPCAEncoders`` (stand-ins, not models).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

Tensor = torch.Tensor


@runtime_checkable
class Encoders(Protocol):
    """The frozen encoders the model is fed by (inputs and outputs on the bundle's device)."""

    image_size: Optional[tuple[int, int]]   # (H, W) the bundle takes; None: any multiple of spatial_stride
    frame_stride: int                       # pixel frames per latent frame after the first
    spatial_stride: int                     # pixels per latent cell
    latent_channels: int
    text_dim: int
    vlm_dim: Optional[int]                  # None: no VLM (video-only stage 1)
    text_len: Optional[int]                 # rows of the padded text states; None: the longest in the batch
    attend_padding: bool                    # True: lengths come back as None (upstream attends padding rows)

    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 [B, F, H, W, 3] -> latents [B, C, 1 + (F-1)/frame_stride, H/s, W/s] (float32)"""
        ...

    def decode_latents(self, latents: Tensor) -> Tensor:
        """[B, C, T, h, w] -> uint8 frames [B, 1 + (T-1)*frame_stride, H, W, 3]"""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        """B instructions -> (text states [B, text_len, text_dim], valid lengths [B] or None: all rows count)"""
        ...

    def vlm_prompt(self, image: np.ndarray, text: str) -> dict:
        """One observation -> the VLM's inputs (light and picklable: runs in DataLoader workers)"""
        ...

    def encode_vlm(self, inputs: Sequence[dict]) -> tuple[Tensor, Optional[Tensor]]:
        """B ``vlm_prompt`` outputs -> (VLM last hidden states [B, L_u, vlm_dim], lengths [B] or None)"""
        ...

    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        """uint8 [B, H, W, 3] + B instructions -> ``encode_vlm`` of their prompts"""
        ...


def pixels_to_unit(pixels: Tensor) -> Tensor:
    """uint8 pixels -> fp32 in [-1, 1] (upstream's frame * 2 - 1): what the VAE encodes."""
    return pixels.float() / 127.5 - 1.0


def unit_to_pixels(x: Tensor) -> Tensor:
    """Values in about [-1, 1] (a decoded video) -> uint8 pixels, clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pad_text(states: Sequence[Tensor], text_len: Optional[int]) -> tuple[Tensor, Tensor]:
    """Per-sample [L_i, D] -> ([B, text_len or max L_i, D] zero-padded (longer ones truncated, as upstream), lens)."""
    L = text_len if text_len is not None else max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), L, states[0].shape[1])
    lens = torch.empty(len(states), dtype=torch.long)
    for i, s in enumerate(states):
        n = min(s.shape[0], L)
        out[i, :n] = s[:n]
        lens[i] = n
    return out, lens


def vlm_features(encoders: Encoders, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
    """The protocol's ``vlm_features`` in terms of its ``vlm_prompt`` and ``encode_vlm`` (one definition for all)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return encoders.encode_vlm([encoders.vlm_prompt(img.cpu().numpy(), p) for img, p in zip(images, prompts)])
