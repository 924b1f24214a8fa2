"""``FrozenEncoders``: the ``Encoders`` protocol over the real (or tiny) Wan VAE, umT5 and Qwen3-VL modules.

One preprocessing path for training, serving, evaluation and the demo: frames -> [-1, 1] -> the VAE (normalised
latents); instructions -> umT5 states trimmed to their tokens, zero-padded or truncated to ``text_len``; image +
instruction -> the VLM's chat prompt (built by ``vlm_prompt``, cheap, in DataLoader workers for training) -> the
VLM's last hidden states. ``attend_padding`` (upstream: True) says whether lengths are handed on for masking.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from motus_fast.encoders.base import pad_text, pixels_to_unit, unit_to_pixels, vlm_features
from motus_fast.encoders.qwen3_vl import Qwen3VLFeatures
from motus_fast.encoders.umt5 import UMT5TextEncoder
from motus_fast.encoders.wan_vae import WanVAE

Tensor = torch.Tensor


class FrozenEncoders:
    """The frozen encoders Motus is fed by. ``vlm`` None: no und stream (stage 1). ``image_size``: the frame size
    this bundle is served at (None: any multiple of the VAE's stride)."""

    def __init__(self, vae: WanVAE, text: UMT5TextEncoder, vlm: Optional[Qwen3VLFeatures] = None, *,
                 text_len: Optional[int] = None, image_size: Optional[tuple[int, int]] = None,
                 attend_padding: bool = True):
        self.vae, self.text, self.vlm = vae, text, vlm
        self.frame_stride, self.spatial_stride = vae.temporal_stride, vae.spatial_stride
        self.latent_channels, self.text_dim = vae.latent_channels, text.dim
        self.vlm_dim = None if vlm is None else vlm.dim
        self.text_len, self.attend_padding = text_len, attend_padding
        if image_size is not None:
            H, W = image_size
            if H % self.spatial_stride or W % self.spatial_stride:
                raise ValueError(f"image_size {image_size} is not divisible by the VAE's spatial stride "
                                 f"{self.spatial_stride}")
            image_size = (int(H), int(W))
        self.image_size = image_size

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text, self.vlm) if m is not None]

    def to(self, device=None, dtype=None) -> "FrozenEncoders":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # ---- video -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, frames: Tensor) -> Tensor:
        # frames: uint8 [B, F, H, W, 3] -> normalised latents [B, C, 1 + (F-1)/stride, H/s, W/s]
        if self.image_size is not None and tuple(frames.shape[2:4]) != self.image_size:
            raise ValueError(f"frames of {tuple(frames.shape[2:4])} pixels; these encoders take {self.image_size}")
        return self.vae.encode(pixels_to_unit(frames.to(self.device).permute(0, 4, 1, 2, 3)))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        # latents: [B, C, T, h, w] -> uint8 [B, F, H, W, 3]
        return unit_to_pixels(self.vae.decode(latents.to(self.device))).permute(0, 2, 3, 4, 1)

    # ---- text ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        text, lens = pad_text(self.text(list(prompts)), self.text_len)
        return text, None if self.attend_padding else lens.to(text.device)

    # ---- VLM -----------------------------------------------------------------------------------------------------
    def vlm_prompt(self, image: np.ndarray, text: str) -> dict:
        if self.vlm is None:
            raise ValueError("these encoders have no VLM (stage 1: video only)")
        return self.vlm.prompt(image, text)

    @torch.no_grad()
    def encode_vlm(self, inputs: Sequence[dict]) -> tuple[Tensor, Optional[Tensor]]:
        if self.vlm is None:
            raise ValueError("these encoders have no VLM (stage 1: video only)")
        hidden, lens = self.vlm(inputs)
        return hidden, None if self.attend_padding else lens.to(hidden.device)

    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        return vlm_features(self, images, prompts)
