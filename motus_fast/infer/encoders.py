"""What turns a robot observation into model inputs: the ``Encoders`` protocol, and ``StubEncoders``.

Motus reads three frozen encoders: the Wan2.2 VAE (frames <-> latents; the first latent frame is the clean
condition), umT5-XXL (instruction -> text states for the video expert's cross-attention) and Qwen3-VL (image +
instruction -> last hidden states for the und expert). A deployment plugs the real ones in through ``Encoders``.

``StubEncoders`` is NOT a model: fixed random projections, seeded, with the right shapes and the VAE's geometry
(16x16 pixels per latent cell, the first frame alone then 4 frames per latent frame). It lets the engine, the
server, the tests and the CPU demo run end to end without the encoders' weights; what it produces means nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from motus_fast.config import MotusConfig
from motus_fast.data.encoders import pixels_to_unit, unit_to_pixels

Tensor = torch.Tensor


@runtime_checkable
class Encoders(Protocol):
    """The encoders the inference engine calls (all frozen; inputs and outputs on the engine's device).

    Frames are uint8 RGB, channels last. A clip of F pixel frames maps to 1 + (F - 1) / frame_stride latent frames
    (causal VAE: frame 0 is encoded alone, so the first latent of a clip equals the latent of its first frame).
    """

    image_size: tuple[int, int]        # (H, W) of the frames the encoders take
    frame_stride: int                  # pixel frames per latent frame after the first

    def encode_frames(self, frames: Tensor) -> Tensor:
        """uint8 [B, F, H, W, 3] -> latents [B, C, 1 + (F-1)/frame_stride, H/16, W/16] (float)"""
        ...

    def decode_latents(self, latents: Tensor) -> Tensor:
        """[B, C, T, h, w] -> uint8 frames [B, 1 + (T-1)*frame_stride, H, W, 3]"""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        """B instructions -> (umT5 states [B, L_t, text_dim], valid lengths [B] or None: all rows count)"""
        ...

    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        """uint8 [B, H, W, 3] + B instructions -> (VLM last hidden states [B, L_u, vlm_dim], lengths [B] or None)"""
        ...


class StubEncoders:
    """Deterministic stand-ins for the VAE, umT5 and the VLM (see the module docstring: not models).

    - frames -> latents: each 16x16 RGB patch (of the mean of its group of frames) times a fixed [768, C] matrix;
      decode applies the pseudo-inverse and repeats latent frames ``frame_stride`` times.
    - prompt -> text states: a fixed embedding per UTF-8 byte plus a position table, truncated/zero-padded to the
      model's ``text_len`` (upstream pads umT5 states with zero rows and attends them).
    - image + prompt -> VLM states: the mean colour of a 4x4 grid of cells, projected, then up to 16 prompt-byte
      embeddings: 32 tokens.
    """

    patch = 16          # pixels per latent cell (Wan2.2 VAE)
    frame_stride = 4
    vlm_grid = 4
    vlm_prompt_tokens = 16

    def __init__(self, cfg: MotusConfig, image_size: tuple[int, int] = (64, 64), seed: int = 0, device=None):
        H, W = image_size
        ph, pw = cfg.video.patch_size[1:]
        if H % (self.patch * ph) or W % (self.patch * pw):
            raise ValueError(f"image_size {image_size} must be a multiple of {self.patch * ph}x{self.patch * pw} "
                             f"(16 pixels per latent cell, {ph}x{pw} latent cells per video token)")
        self.cfg, self.image_size = cfg, (H, W)
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
    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        # images: uint8 [B, H, W, 3] -> [B, grid^2 + prompt_tokens, vlm_dim]
        x = pixels_to_unit(images.to(self.vlm_colour.device).permute(0, 3, 1, 2))
        cells = F.adaptive_avg_pool2d(x, self.vlm_grid).flatten(2).transpose(1, 2)  # B, 16, 3
        ids, _ = self._bytes(prompts, self.vlm_prompt_tokens)
        return torch.cat([cells @ self.vlm_colour, self.vlm_bytes[ids]], dim=1), None


class PatchPCAEncoders(StubEncoders):
    """StubEncoders whose VAE stand-in is fitted to data: PCA of 16x16 RGB patches (of the mean of each group of
    frames), whitened, keeping as many components as the model has latent channels. It is a linear autoencoder,
    so decoded latents look like the frames they came from (up to the discarded components). The CPU demo fits one
    on its own demonstrations and ships it with the checkpoint (``encoders.safetensors``); the prompt and VLM
    stand-ins stay the stub's. Still not the Wan VAE: a real deployment plugs in the real encoders."""

    FILENAME = "encoders.safetensors"

    def __init__(self, cfg: MotusConfig, image_size: tuple[int, int], mean: Tensor, basis: Tensor, scale: Tensor,
                 seed: int = 0, device=None):
        super().__init__(cfg, image_size, seed=seed)
        C = cfg.video.in_channels
        if basis.shape != (3 * self.patch * self.patch, C) or mean.shape != (basis.shape[0],) or scale.shape != (C,):
            raise ValueError(f"PCA encoder tensors have shapes {tuple(mean.shape)}, {tuple(basis.shape)}, "
                             f"{tuple(scale.shape)}; the model needs {C} latent channels of {basis.shape[0]} pixels")
        self.patch_mean, self.basis, self.scale = mean.float(), basis.float(), scale.float()
        self.to_latent = self.basis / self.scale                  # whitened: latents have unit variance
        self.from_latent = (self.basis * self.scale).T
        self.to(device)

    def to(self, device) -> "PatchPCAEncoders":
        super().to(device)
        for name in ("patch_mean", "basis", "scale"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(self.device))
        return self

    @classmethod
    def fit(cls, cfg: MotusConfig, frames: Tensor, image_size: tuple[int, int], max_patches: int = 100_000,
            seed: int = 0) -> "PatchPCAEncoders":
        """frames: uint8 [N, H, W, 3] drawn from the data the model will see."""
        enc = StubEncoders(cfg, image_size)
        patches = enc._patches(frames[:, None]).reshape(-1, 3 * cls.patch * cls.patch)   # single-frame clips
        g = torch.Generator().manual_seed(seed)
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=g)[:max_patches]]
        mean = patches.mean(0)
        _, s, vh = torch.linalg.svd(patches - mean, full_matrices=False)
        C = cfg.video.in_channels
        scale = (s[:C] / (patches.shape[0] - 1) ** 0.5).clamp(min=1e-3)
        return cls(cfg, image_size, mean, vh[:C].T.contiguous(), scale, seed=seed)

    def encode_frames(self, frames: Tensor) -> Tensor:
        return ((self._patches(frames) - self.patch_mean) @ self.to_latent).permute(0, 4, 1, 2, 3).contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self._frames(latents.float().permute(0, 2, 3, 4, 1) @ self.from_latent + self.patch_mean)

    def save(self, path) -> None:
        from safetensors.torch import save_file
        save_file({"mean": self.patch_mean.cpu(), "basis": self.basis.cpu(), "scale": self.scale.cpu()}, str(path),
                  metadata={"kind": "patch_pca", "image_size": f"{self.image_size[0]},{self.image_size[1]}"})

    @classmethod
    def load(cls, cfg: MotusConfig, path, device=None) -> "PatchPCAEncoders":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != "patch_pca":
                raise ValueError(f"{path}: not a patch-PCA encoder file (kind={meta.get('kind')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        H, W = (int(v) for v in meta["image_size"].split(","))
        return cls(cfg, (H, W), t["mean"], t["basis"], t["scale"], device=device)


class FrozenEncoders:
    """The ``Encoders`` protocol over the training pipeline's frozen encoders (``motus_fast.data.encoders.Encoders``:
    a Wan VAE, a umT5 text encoder and a Qwen3-VL feature extractor, real or tiny), with the training path's
    preprocessing (``motus_fast.data.encode.BatchEncoder``): frames to [-1, 1] into the VAE, umT5 states
    zero-padded or truncated to ``text_len``, VLM prompts from the VLM's own prompt builder, and padding attended or
    masked as the model was trained (``attend_padding``; upstream attends it). A served model then sees exactly the
    inputs it was trained on.
    """

    def __init__(self, encoders, image_size: tuple[int, int], text_len: Optional[int], attend_padding: bool = True):
        if encoders.vlm is None:
            raise ValueError("FrozenEncoders needs a VLM (the und expert reads its features); got encoders.vlm=None")
        H, W = image_size
        stride = encoders.vae.spatial_stride
        if H % stride or W % stride:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE's spatial stride {stride}")
        self.encoders, self.image_size = encoders, (H, W)
        self.frame_stride = encoders.vae.temporal_stride
        self.text_len, self.attend_padding = text_len, attend_padding

    @torch.no_grad()
    def encode_frames(self, frames: Tensor) -> Tensor:
        # frames: uint8 [B, F, H, W, 3] -> normalised latents [B, C, 1 + (F-1)/stride, H/s, W/s]
        return self.encoders.vae.encode(pixels_to_unit(frames.permute(0, 4, 1, 2, 3)))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        # latents: [B, C, T, h, w] -> uint8 [B, F, H, W, 3]
        return unit_to_pixels(self.encoders.vae.decode(latents)).permute(0, 2, 3, 4, 1)   # from [B, 3, F, H, W]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        from motus_fast.data.encode import pad_text

        states = [s.float() for s in self.encoders.text(list(prompts))]
        text, lens = pad_text(states, self.text_len)
        return text, None if self.attend_padding else lens.to(text.device)

    @torch.no_grad()
    def vlm_features(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Optional[Tensor]]:
        vlm = self.encoders.vlm
        hidden, lens = vlm([vlm.prompt(img.cpu().numpy(), p) for img, p in zip(images, prompts)])
        return hidden, None if self.attend_padding else lens.to(hidden.device)
