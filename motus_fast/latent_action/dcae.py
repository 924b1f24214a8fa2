"""The DC-AE (deep-compression autoencoder, diffusers ``AutoencoderDC``) that turns a flow image into tokens.

A pretrained DC-AE is loaded from a local directory (``DCAEConfig.pretrained_path``: the folder holding its
``config.json`` and weights; nothing is downloaded). Without a path, a randomly initialised DC-AE of the configured
shape is built: enough for CI and for shape checks, not for real training.

Tokens: the latent ``[B, C, h, w]`` (times the DC-AE's ``scaling_factor``) read as ``h * w`` tokens of width ``C``.
The paper's DC-AE f128c512 at 256 x 256 gives 2 x 2 = 4 tokens of width 512.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from motus_fast.latent_action.config import DCAEConfig

log = logging.getLogger(__name__)


def _autoencoder_dc():
    try:
        from diffusers import AutoencoderDC
    except ImportError as e:
        raise ImportError("the latent-action model needs diffusers' AutoencoderDC: pip install diffusers "
                          "(pinned in requirements/cpu.txt)") from e
    return AutoencoderDC


def random_dcae_kwargs(cfg: DCAEConfig) -> dict:
    """AutoencoderDC constructor arguments for a random DC-AE of cfg's shape (ResBlocks, EfficientViT last)."""
    n = len(cfg.block_out_channels)
    if n == 0:
        raise ValueError("dcae.pretrained_path is not set and dcae.block_out_channels is empty: the 'motus' preset "
                         "needs a pretrained DC-AE (e.g. --set dcae.pretrained_path=/path/to/dc-ae-f128c512), or "
                         "give a shape for a random one")
    blocks = ("ResBlock",) * (n - 1) + ("EfficientViTBlock",)
    qkv = ((),) * (n - 1) + ((5,),)
    return dict(in_channels=3, latent_channels=cfg.latent_channels, attention_head_dim=cfg.attention_head_dim,
                encoder_block_types=blocks, decoder_block_types=blocks,
                encoder_block_out_channels=tuple(cfg.block_out_channels),
                decoder_block_out_channels=tuple(cfg.block_out_channels),
                encoder_layers_per_block=tuple(cfg.layers_per_block),
                decoder_layers_per_block=tuple(cfg.layers_per_block),
                encoder_qkv_multiscales=qkv, decoder_qkv_multiscales=qkv,
                decoder_norm_types=("batch_norm",) * (n - 1) + ("rms_norm",),
                decoder_act_fns=("relu",) * (n - 1) + ("silu",))


def build_dcae(cfg: DCAEConfig) -> nn.Module:
    """The configured DC-AE: loaded from cfg.pretrained_path (local only) or random of cfg's shape."""
    AutoencoderDC = _autoencoder_dc()
    if cfg.pretrained_path is not None:
        path = Path(cfg.pretrained_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"dcae.pretrained_path={str(path)!r}: no config.json there (expected a local "
                                    "diffusers AutoencoderDC directory)")
        dcae = AutoencoderDC.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
        log.info("DC-AE loaded from %s", path)
    else:
        dcae = AutoencoderDC(**random_dcae_kwargs(cfg))
        log.info("DC-AE: random, block_out_channels %s (no pretrained_path)", cfg.block_out_channels)
    return dcae


def dcae_from_config(config: dict) -> nn.Module:
    """An (uninitialised-weights) AutoencoderDC from a stored diffusers config dict (checkpoint loading)."""
    AutoencoderDC = _autoencoder_dc()
    return AutoencoderDC.from_config(config)


def token_grid(dcae: nn.Module, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(n_tokens, width, compression) of `dcae` at image_size (H, W); the size must be divisible by the
    compression."""
    f = int(dcae.spatial_compression_ratio)
    H, W = image_size
    if H % f or W % f:
        raise ValueError(f"model.image_size {tuple(image_size)} is not divisible by the DC-AE's spatial "
                         f"compression {f}")
    return (H // f) * (W // f), int(dcae.config.latent_channels), f


def encode_tokens(dcae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> tokens [B, h*w, C] (latent * scaling_factor, row-major over h, w)."""
    lat = dcae.encode(images).latent * dcae.config.scaling_factor     # [B, C, h, w]
    return lat.flatten(2).transpose(1, 2)


def decode_tokens(dcae: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """tokens [B, h*w, C] -> images [B, 3, H, W] (about [-1, 1]); grid = (h, w)."""
    B, N, C = tokens.shape
    lat = tokens.transpose(1, 2).reshape(B, C, *grid) / dcae.config.scaling_factor
    return dcae.decode(lat).sample
