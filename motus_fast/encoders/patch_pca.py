"""``PatchPCAEncoders``: a VAE stand-in fitted to data (PCA of 16x16 RGB patches), shipped with the demo's checkpoint.

Still not the Wan VAE: the prompt and VLM stand-ins are ``StubEncoders``'; a real deployment uses the real encoders.
"""

from __future__ import annotations

import torch

from motus_fast.config import MotusConfig
from motus_fast.encoders.stub import StubEncoders

Tensor = torch.Tensor


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
