"""The latent-action VAE (paper section 4.2).

    flow image [B, 3, H, W] --DC-AE encoder--> tokens [B, N, C] --TokenEncoder--> mean, log-variance [B, 14]
    z = mean + exp(logvar / 2) * eps --TokenDecoder--> tokens [B, N, C] --DC-AE decoder--> flow image

    loss = L_recon + lambda_a * ||a_real - a_pred||^2 (labelled samples only) + beta * KL(q(z | x) || N(0, I))

- L_recon: mean squared error between the decoded and the input flow image (pixels in [-1, 1]).
- a_pred is the posterior mean: the same deterministic vector the labelling command writes out, so labelled
  latents land in the real action space. Real actions may have fewer dimensions than the latent (e.g. a 7-D arm
  under a 14-D latent): they are aligned with the leading dimensions. Normalise them (zero mean, unit scale)
  before training; the latents then share that scale.
- The per-sample loss is averaged over the batch, unlabelled samples contributing 0 to the alignment term; so the
  logged "align" (mean over the labelled samples) enters the total as lambda_a * (n_labelled / B) * align.
- KL is summed over latent dimensions, averaged over the batch.

The token encoder/decoder are MLPs over all tokens at once (generic in the token count N and width C, which follow
from the DC-AE and the image size): a latent action is a global summary of where and how things move, so the
encoder sees the token layout. Tokens are standardised per channel with statistics fitted on data before training
(``fit_token_stats``), so the same learning rate suits a random CI DC-AE and a pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from motus_fast.latent_action.config import LatentActionConfig, LatentActionTrainConfig
from motus_fast.latent_action.dcae import build_dcae, decode_tokens, encode_tokens, token_grid

LOGVAR_RANGE = (-30.0, 20.0)   # keeps exp(logvar) finite in fp32
LOGVAR_INIT = -6.0             # initial posterior std exp(-3) ~ 0.05


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class TokenEncoder(nn.Module):
    """tokens [B, N, C] -> (mean, logvar), each [B, latent_dim]."""

    def __init__(self, n_tokens: int, width: int, proj_dim: int, hidden_dim: int, num_layers: int, latent_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, proj_dim)
        self.mlp = _mlp([n_tokens * proj_dim] + [hidden_dim] * num_layers + [2 * latent_dim])
        # start with a narrow posterior: at beta = 1e-6 training ends there anyway, and unit-variance noise at the
        # start would drown latents aligned to unit-scale actions, slowing the alignment
        with torch.no_grad():
            self.mlp[-1].bias[latent_dim:].fill_(LOGVAR_INIT)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: [B, N, C]
        h = F.silu(self.proj(tokens)).flatten(1)          # [B, N * proj]
        mean, logvar = self.mlp(h).chunk(2, dim=-1)       # [B, latent] x 2
        return mean, logvar.clamp(*LOGVAR_RANGE)


class TokenDecoder(nn.Module):
    """z [B, latent_dim] -> tokens [B, N, C]."""

    def __init__(self, n_tokens: int, width: int, proj_dim: int, hidden_dim: int, num_layers: int, latent_dim: int):
        super().__init__()
        self.n_tokens, self.proj_dim = n_tokens, proj_dim
        self.mlp = _mlp([latent_dim] + [hidden_dim] * num_layers + [n_tokens * proj_dim])
        self.out = nn.Linear(proj_dim, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, latent]
        h = self.mlp(z).view(z.shape[0], self.n_tokens, self.proj_dim)   # [B, N, proj]
        return self.out(F.silu(h))                                       # [B, N, C]


@dataclass
class LatentActionOutput:
    mean: torch.Tensor      # [B, latent_dim]
    logvar: torch.Tensor    # [B, latent_dim]
    z: torch.Tensor         # [B, latent_dim] (the mean when not sampling)
    recon: torch.Tensor     # [B, 3, H, W] decoded flow image


class LatentActionVAE(nn.Module):
    def __init__(self, cfg: LatentActionConfig, dcae: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.dcae = dcae if dcae is not None else build_dcae(cfg.dcae)
        if not cfg.dcae.trainable:
            self.dcae.requires_grad_(False)
        n_tokens, width, f = token_grid(self.dcae, m.image_size)
        self.grid = (m.image_size[0] // f, m.image_size[1] // f)
        self.n_tokens, self.width = n_tokens, width
        self.encoder = TokenEncoder(n_tokens, width, m.token_proj_dim, m.hidden_dim, m.num_hidden_layers,
                                    m.latent_dim)
        self.decoder = TokenDecoder(n_tokens, width, m.token_proj_dim, m.hidden_dim, m.num_hidden_layers,
                                    m.latent_dim)
        # per-channel token standardisation, fitted on data (fit_token_stats) and saved with the model
        self.register_buffer("token_mean", torch.zeros(width))
        self.register_buffer("token_std", torch.ones(width))
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.dcae.trainable:
            self.dcae.eval()     # a frozen DC-AE keeps its batch-norm statistics
        return self

    # ---- the two halves ------------------------------------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> standardised tokens [B, N, C]."""
        self._check_images(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.dcae.trainable):
            tok = encode_tokens(self.dcae, images)
        return (tok - self.token_mean) / self.token_std

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (mean, logvar) [B, latent_dim]."""
        return self.encoder(self.tokens(images))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_dim] -> flow image [B, 3, H, W]."""
        tok = self.decoder(z) * self.token_std + self.token_mean
        return decode_tokens(self.dcae, tok, self.grid)

    def forward(self, images: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> LatentActionOutput:
        # images: [B, 3, H, W] in [-1, 1]
        mean, logvar = self.encode(images)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return LatentActionOutput(mean=mean, logvar=logvar, z=z, recon=self.decode(z))

    @torch.no_grad()
    def fit_token_stats(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Set the per-channel token mean/std from images [N, 3, H, W] (any float dtype, in [-1, 1])."""
        was_training = self.training
        self.eval()
        raw = torch.cat([encode_tokens(self.dcae, images[i:i + batch_size].float()).flatten(0, 1)
                         for i in range(0, images.shape[0], batch_size)])          # [N * n_tokens, C]
        self.token_mean.copy_(raw.mean(0))
        self.token_std.copy_(raw.std(0).clamp_min(1e-6))
        self.train(was_training)

    def _check_images(self, images: torch.Tensor) -> None:
        H, W = self.cfg.model.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, H, W):
            raise ValueError(f"flow images must be [B, 3, {H}, {W}] (model.image_size), got {list(images.shape)}")


def latent_action_loss(out: LatentActionOutput, images: torch.Tensor, actions: Optional[torch.Tensor],
                       labelled: Optional[torch.Tensor], cfg: LatentActionTrainConfig) -> dict[str, torch.Tensor]:
    """images [B, 3, H, W]; actions [B, A] (A <= latent_dim; rows of unlabelled samples are ignored);
    labelled bool [B]. Returns loss, recon, kl, align (mean over labelled samples; 0 when none), labelled (count)."""
    B, latent_dim = out.mean.shape
    recon = F.mse_loss(out.recon, images)
    kl = (-0.5 * (1.0 + out.logvar - out.mean.square() - out.logvar.exp()).sum(-1)).mean()
    zero = out.mean.new_zeros(())
    if actions is None or labelled is None or not bool(labelled.any()):
        align_per_sample, n_lab = out.mean.new_zeros(B), zero
    else:
        if actions.ndim != 2 or actions.shape[0] != B or actions.shape[1] > latent_dim:
            raise ValueError(f"actions must be [B={B}, A<={latent_dim}], got {list(actions.shape)}")
        err = (out.mean[:, :actions.shape[1]] - actions.to(out.mean.dtype)).square().sum(-1)   # [B]
        align_per_sample = torch.where(labelled, err, zero)
        n_lab = labelled.sum().to(out.mean.dtype)
    loss = recon + cfg.lambda_a * align_per_sample.sum() / B + cfg.beta * kl
    return {"loss": loss, "recon": recon, "kl": kl, "align": align_per_sample.sum() / n_lab.clamp_min(1.0),
            "labelled": n_lab}


def rgb_to_input(rgb: np.ndarray) -> torch.Tensor:
    """Flow images float [N, H, W, 3] in [0, 1] -> model input float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
