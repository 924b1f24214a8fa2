"""Tiny random encoders, in-process (no download), whose output widths match a ``MotusConfig``: the real classes
(diffusers ``AutoencoderKLWan``, transformers ``UMT5EncoderModel`` and ``Qwen3VLForConditionalGeneration``) at toy
sizes, with tokenizer-free prompts (``HashTokenizer``). For CI, the demo and smoke runs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence

import numpy as np
import torch

from motus_fast.encoders.frozen import FrozenEncoders
from motus_fast.encoders.qwen3_vl import Qwen3VLFeatures
from motus_fast.encoders.umt5 import UMT5TextEncoder
from motus_fast.encoders.wan_vae import WanVAE

Tensor = torch.Tensor


class HashTokenizer:
    """A deterministic tokenizer for tiny random models (no vocabulary file): lower-cased words and punctuation
    hashed into ids ``first_id .. vocab_size - 1``, then EOS. Ids 0 (pad) and 1 (EOS) are reserved, like T5's."""

    pad_id, eos_id = 0, 1

    def __init__(self, vocab_size: int, first_id: int = 2, reserved_top: int = 0):
        self.vocab_size, self.first_id = int(vocab_size), int(first_id)
        self.span = self.vocab_size - self.first_id - int(reserved_top)
        if self.span < 1:
            raise ValueError("HashTokenizer: vocabulary too small")

    def encode(self, text: str, max_length: Optional[int] = None) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        ids = [self.first_id + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
               % self.span for w in words]
        ids.append(self.eos_id)
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.eos_id]
        return ids

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """-> (input_ids [B, L], attention_mask [B, L]), right-padded to the longest."""
        rows = [self.encode(t, max_length) for t in texts]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


class Qwen3VLPrompt:
    """Tokenizer-free Qwen3-VL inputs for tiny models: ``[vision_start, image_pad x n, vision_end] + text ids``,
    with pixel patches from a transformers Qwen2-VL image processor (picklable; runs in workers)."""

    def __init__(self, image_processor, tokenizer: HashTokenizer, image_token_id: int, vision_start_id: int,
                 vision_end_id: int, max_text: int = 64):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token_id, self.vision_start_id, self.vision_end_id = image_token_id, vision_start_id, vision_end_id
        self.max_text = max_text

    def __call__(self, image: np.ndarray, text: str) -> dict:
        px = self.image_processor(images=[np.asarray(image)], return_tensors="pt")
        grid = px["image_grid_thw"]
        n = int(grid.prod()) // int(self.image_processor.merge_size) ** 2
        ids = torch.tensor([self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id]
                           + self.tokenizer.encode(text, self.max_text), dtype=torch.long)
        return {"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": grid,
                "mm_token_type_ids": (ids == self.image_token_id).long()}


TINY_VOCAB = 1000
TINY_QWEN_IDS = dict(image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)


def tiny_wan_vae(latent_channels: int, seed: int = 0) -> WanVAE:
    """A Wan2.2-style AutoencoderKLWan (spatial stride 16, temporal 4, 12-channel patchified input)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=24, z_dim=latent_channels, dim_mult=[1, 2, 2, 2],
                           num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                           in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                           latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels)
    return WanVAE(vae)


def tiny_umt5(dim: int, max_length: int = 512, seed: int = 0) -> UMT5TextEncoder:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=TINY_VOCAB, d_model=dim, d_kv=16, d_ff=2 * dim, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
    return UMT5TextEncoder(UMT5EncoderModel(cfg), HashTokenizer(TINY_VOCAB), max_length)


def tiny_qwen3vl(dim: int, image_pixels: int = 64 * 64, seed: int = 0) -> Qwen3VLFeatures:
    """Tiny random Qwen3-VL whose hidden width is ``dim`` (a multiple of 8); images are resized to about
    ``image_pixels`` pixels (multiples of 32)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if dim % 8:
        raise ValueError(f"tiny Qwen3-VL width must be a multiple of 8, got {dim}")
    torch.manual_seed(seed)
    vcfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=dim, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1])
    tcfg = dict(vocab_size=TINY_VOCAB, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=tcfg, vision_config=vcfg, **TINY_QWEN_IDS))
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                         max_pixels=max(32 * 32, image_pixels), image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)
    prompt = Qwen3VLPrompt(processor, HashTokenizer(TINY_VOCAB, reserved_top=TINY_VOCAB - 990),
                           TINY_QWEN_IDS["image_token_id"], TINY_QWEN_IDS["vision_start_token_id"],
                           TINY_QWEN_IDS["vision_end_token_id"])
    return Qwen3VLFeatures(model, prompt)


def build_tiny_encoders(cfg, seed: int = 0, use_vlm: bool = True, image_pixels: int = 64 * 64,
                        text_len: Optional[int] = None, image_size: Optional[tuple[int, int]] = None,
                        attend_padding: bool = True) -> FrozenEncoders:
    """Tiny random encoders whose widths match ``cfg`` (a MotusConfig): for CI and the demo, no downloads.
    ``text_len`` None: text states padded to the longest of each batch (training's per-sample encoding)."""
    return FrozenEncoders(tiny_wan_vae(cfg.video.in_channels, seed),
                          tiny_umt5(cfg.video.text_dim, max(cfg.video.text_len, 8), seed),
                          tiny_qwen3vl(cfg.und.vlm_dim, image_pixels, seed) if use_vlm else None,
                          text_len=text_len, image_size=image_size, attend_padding=attend_padding)
