"""``StubEncoders``: deterministic stand-ins for the VAE, umT5 and the VLM, with the real ones' geometry.

NOT a model: fixed random projections, seeded, with the right shapes and the VAE's geometry (16x16 pixels per
latent cell, the first frame alone then 4 frames per latent frame). It lets the engine, the server, the tests and
the CPU demo run end to end without the encoders' weights; what it produces means nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from motus_fast.config import MotusConfig
from motus_fast.encoders.base import pixels_to_unit, unit_to_pixels, vlm_features

Tensor = torch.Tensor


class StubEncoders:
    """Deterministic stand-ins for the VAE, umT5 and the VLM (see the module docstring: not models).

    - frames -> latents: each 16x16 RGB patch (of the mean of its group of frames) times a fixed [768, C] matrix;
      decode applies the pseudo-inverse and repeats latent frames ``frame_stride`` times.
    - prompt -> text states: a fixed embedding per UTF-8 byte plus a position table, truncated/zero-padded to the
      model's ``text_len`` (upstream pads umT5 states with zero rows and attends them).
    - image + prompt -> VLM states: the mean colour of a 4x4 grid of cells, projected, then up to 16 prompt-byte
      embeddings: 32 tokens.
    """

    patch = spatial_stride = 16     # pixels per latent cell (Wan2.2 VAE)
    frame_stride = 4
    attend_padding = True           # lengths come back as None: every row is attended, as upstream
    vlm_grid = 4
    vlm_prompt_tokens = 16

    def __init__(self, cfg: MotusConfig, image_size: tuple[int, int] = (64, 64), seed: int = 0, device=None):
        H, W = image_size
        ph, pw = cfg.video.patch_size[1:]
        if H % (self.patch * ph) or W % (self.patch * pw):
            raise ValueError(f"image_size {image_size} must be a multiple of {self.patch * ph}x{self.patch * pw} "
                             f"(16 pixels per latent cell, {ph}x{pw} latent cells per video token)")
        self.cfg, self.image_size = cfg, (H, W)
        self.latent_channels, self.text_dim = cfg.video.in_channels, cfg.video.text_dim
        self.vlm_dim, self.text_len = cfg.und.vlm_dim, cfg.video.text_len
        g = torch.Generator().manual_seed(seed)
        C, p = cfg.video.in_channels, self.patch
        self.to_latent = torch.randn(3 * p * p, C, generator=g) / math.sqrt(3 * p * p)
        self.from_latent = torch.linalg.pinv(self.to_latent)                        # [C, 768]
        self.byte_table = torch.randn(256, cfg.video.text_dim, generator=g)
        self.text_pos = torch.randn(cfg.video.text_len, cfg.video.text_dim, generator=g) * 0.1
        self.vlm_colour = torch.randn(3, cfg.und.vlm_dim, generator=g)
        self.vlm_bytes = torch.randn(256, cfg.und.vlm_dim, generator=g)
        self.to(device)

    def to(self, device) -> "StubEncoders":
        for name in ("to_latent", "from_latent", "byte_table", "text_pos", "vlm_colour", "vlm_bytes"):
            setattr(self, name, getattr(self, name).to(device))
        self.device = torch.device(device or "cpu")
        return self

    # ---- VAE stand-in ---------------------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor) -> Tensor:
        # frames: uint8 [B, F, H, W, 3] -> [B, C, T, h, w]
        return (self._patches(frames) @ self.to_latent).permute(0, 4, 1, 2, 3).contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        # latents: [B, C, T, h, w] -> uint8 [B, 1 + (T-1)*stride, H, W, 3]
        return self._frames(latents.float().permute(0, 2, 3, 4, 1) @ self.from_latent)

    def _patches(self, frames: Tensor) -> Tensor:
        """uint8 [B, F, H, W, 3] -> [-1, 1] patches of each latent frame's group mean [B, T, h, w, 3*p*p]"""
        B, Fr, H, W, _ = frames.shape
        if (Fr - 1) % self.frame_stride:
            raise ValueError(f"a clip needs 1 + {self.frame_stride}k frames, got {Fr}")
        x = pixels_to_unit(frames.to(self.to_latent.device))
        groups = [x[:, :1]] + [x[:, i:i + self.frame_stride] for i in range(1, Fr, self.frame_stride)]
        x = torch.stack([grp.mean(dim=1) for grp in groups], dim=1)                 # B, T, H, W, 3
        p, T = self.patch, len(groups)
        return x.reshape(B, T, H // p, p, W // p, p, 3).permute(0, 1, 2, 4, 6, 3, 5).flatten(-3)

    def _frames(self, patches: Tensor) -> Tensor:
        """[B, T, h, w, 3*p*p] in [-1, 1] -> uint8 [B, 1 + (T-1)*stride, H, W, 3] (latent frames repeated)"""
        B, T, h, w, _ = patches.shape
        p = self.patch
        x = patches.unflatten(-1, (3, p, p)).permute(0, 1, 2, 5, 3, 6, 4).reshape(B, T, h * p, w * p, 3)
        x = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(self.frame_stride, dim=1)], dim=1)
        return unit_to_pixels(x)

    # ---- umT5 stand-in --------------------------------------------------------------------------------------
    def _bytes(self, prompts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        lens = torch.zeros(len(prompts), dtype=torch.long)
        for i, text in enumerate(prompts):
            b = list(text.encode("utf-8"))[:length]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
            lens[i] = len(b)
        return ids.to(self.byte_table.device), lens.to(self.byte_table.device)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        L = self.cfg.video.text_len
        ids, lens = self._bytes(prompts, L)
        valid = (torch.arange(L, device=ids.device)[None, :] < lens[:, None])[..., None]
        return torch.where(valid, self.byte_table[ids] + self.text_pos, 0.0), None

    # ---- VLM stand-in ---------------------------------------------------------------------------------------
    def vlm_prompt(self, image: np.ndarray, text: str) -> dict:
        return {"image": torch.as_tensor(np.asarray(image)), "text": text}

    def encode_vlm(self, inputs: Sequence[dict]) -> tuple[Tensor, Optional[Tensor]]:
        # images: uint8 [B, H, W, 3] -> [B, grid^2 + prompt_tokens, vlm_dim]
        images = torch.stack([it["image"] for it in inputs])
        x = pixels_to_unit(images.to(self.vlm_colour.device).permute(0, 3, 1, 2))
        cells = F.adaptive_avg_pool2d(x, self.vlm_grid).flatten(2).transpose(1, 2)  # B, 16, 3
        ids, _ = self._bytes([it["text"] for it in inputs], self.vlm_prompt_tokens)
        return torch.cat([cells @ self.vlm_colour, self.vlm_bytes[ids]], dim=1), None

    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        return vlm_features(self, images, prompts)
