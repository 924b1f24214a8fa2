"""Frozen encoders at the data edge: the Wan2.2 VAE, the umT5 text encoder and the Qwen3-VL feature extractor.

Each is a small interface, so real weights plug in from anywhere (motus_fast/weights/ loaders, a diffusers or
transformers checkpoint) as long as the call signature matches:

- ``VideoVAE``: ``encode(video [B, 3, T, H, W] in [-1, 1]) -> latents [B, C, 1 + (T-1)/st, H/ss, W/ss]``,
  normalised as the Wan pipeline does ((mu - latents_mean) / latents_std, the posterior mode, not a sample);
  ``decode`` inverts it. ``WanVAE`` wraps any diffusers ``AutoencoderKLWan``.
- ``TextEncoder``: ``__call__(texts) -> list of [L_i, text_dim]``, each trimmed to its real tokens (EOS included),
  like Wan's ``T5EncoderModel``. ``UMT5TextEncoder`` wraps transformers ``UMT5EncoderModel`` + a tokenizer.
- ``VLMFeatures``: ``prompt(image uint8 [H, W, 3], text) -> dict`` (a light, picklable callable: it runs in the
  DataLoader workers) and ``__call__(list of those dicts) -> (hidden [B, L_u, vlm_dim], lens [B])``, the model's
  last hidden state (after the final norm) for the prompt "<image><instruction>". ``Qwen3VLFeatures`` wraps
  transformers ``Qwen3VLForConditionalGeneration`` (through ``motus_fast.model.vlm.VLMFeatureExtractor``) with
  either the model's own processor (chat template, as upstream) or a tokenizer-free prompt builder.

``build_tiny_encoders(cfg)`` makes tiny random versions in-process (no download) whose output widths match a
``MotusConfig`` (VAE latent channels = video.in_channels, umT5 width = video.text_dim, VLM width = und.vlm_dim).
Named text-encoder factories (``register_text_encoder``) let the CLI pick one: "tiny" is built in.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor


# ---- interfaces --------------------------------------------------------------------------------------------------
class VideoVAE(Protocol):
    temporal_stride: int
    spatial_stride: int
    latent_channels: int

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


class TextEncoder(Protocol):
    dim: int

    def __call__(self, texts: Sequence[str]) -> list[Tensor]: ...


class VLMFeatures(Protocol):
    dim: int
    prompt: Callable[[np.ndarray, str], dict]

    def __call__(self, inputs: Sequence[dict]) -> tuple[Tensor, Tensor]: ...


@dataclass
class Encoders:
    """The frozen encoders the BatchEncoder runs; ``vlm`` None: no und stream (e.g. stage 1)."""

    vae: VideoVAE
    text: TextEncoder
    vlm: Optional[VLMFeatures] = None


# ---- pixels <-> the VAE's range -----------------------------------------------------------------------------------
def pixels_to_unit(pixels: Tensor) -> Tensor:
    """uint8 pixels -> fp32 in [-1, 1] (upstream's frame * 2 - 1): what the VAE encodes."""
    return pixels.float() / 127.5 - 1.0


def unit_to_pixels(x: Tensor) -> Tensor:
    """Values in about [-1, 1] (a decoded video) -> uint8 pixels, clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---- the Wan VAE ---------------------------------------------------------------------------------------------------
class WanVAE(nn.Module):
    """diffusers ``AutoencoderKLWan`` (Wan2.1 or Wan2.2 style) with the Wan pipeline's latent normalisation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.latent_channels = int(c.z_dim)
        self.temporal_stride = int(getattr(c, "scale_factor_temporal", 4))
        self.spatial_stride = int(getattr(c, "scale_factor_spatial", 8))
        mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if mean.shape[1] != self.latent_channels or std.shape[1] != self.latent_channels:
            raise ValueError(f"VAE latents_mean/std have {mean.shape[1]}/{std.shape[1]} entries; z_dim is "
                             f"{self.latent_channels}")
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    def check_clip(self, T: int, H: int, W: int) -> None:
        if (T - 1) % self.temporal_stride:
            raise ValueError(f"the VAE encodes 1 + {self.temporal_stride}n frames; got a clip of {T} (set "
                             f"num_video_frames to a multiple of {self.temporal_stride})")
        if H % self.spatial_stride or W % self.spatial_stride:
            raise ValueError(f"frame size {H}x{W} is not divisible by the VAE stride {self.spatial_stride}")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, 1 + (T-1)/st, H/ss, W/ss] (fp32)."""
        self.check_clip(*video.shape[2:])
        dtype = next(self.vae.parameters()).dtype
        mu = self.vae.encode(video.to(dtype)).latent_dist.mode().float()
        return (mu - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents -> video [B, 3, T, H, W] in about [-1, 1] (fp32)."""
        dtype = next(self.vae.parameters()).dtype
        x = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(x.to(dtype)).sample.float()


# ---- text ----------------------------------------------------------------------------------------------------------
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


class HFTokenize:
    """Adapts a transformers tokenizer to ``(texts, max_length) -> (input_ids, attention_mask)``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


class UMT5TextEncoder(nn.Module):
    """An encoder-only T5 (transformers ``UMT5EncoderModel``, or any module taking input_ids/attention_mask and
    returning ``last_hidden_state``) -> per-text states trimmed to their real tokens."""

    def __init__(self, model: nn.Module, tokenize: Callable[[Sequence[str], int], tuple[Tensor, Tensor]],
                 max_length: int = 512):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenize, self.max_length = tokenize, int(max_length)
        self.dim = int(model.config.d_model)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> list[Tensor]:
        if not texts:
            return []
        dev = next(self.model.parameters()).device
        ids, mask = self.tokenize(list(texts), self.max_length)
        states = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float()
        return [s[: int(n)] for s, n in zip(states, mask.sum(1))]


# ---- the VLM -------------------------------------------------------------------------------------------------------
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


class Qwen3VLChatPrompt:
    """Upstream's prompt for real weights: one user message holding the image and the instruction, rendered with
    the chat template (``add_generation_prompt=True``), the image placeholder expanded to one pad token per merged
    patch, as ``Qwen3VLProcessor`` does. Built from the tokenizer and the image processor (``Qwen2VLImageProcessor``
    or its PIL twin) because the full processor also wants torchvision for videos. ``chat_template``: the model's
    (chat_template.json / the processor's) when the tokenizer does not carry it. Picklable; runs in workers."""

    def __init__(self, tokenizer, image_processor, chat_template: Optional[str] = None,
                 image_token: str = "<|image_pad|>"):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template, self.image_token = chat_template, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {image_token!r}")

    def __call__(self, image: np.ndarray, text: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        if chat.count(self.image_token) != 1:
            raise ValueError(f"the chat template rendered {chat.count(self.image_token)} image tokens, expected 1")
        px = self.image_processor(images=[np.asarray(image)], return_tensors="pt")
        n = int(px["image_grid_thw"].prod()) // int(self.image_processor.merge_size) ** 2
        chat = chat.replace(self.image_token, self.image_token * n)
        ids = self.tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if int((ids == self.image_token_id).sum()) != n:
            raise ValueError("the tokenizer split the image placeholder tokens (is the image token special?)")
        return {"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"],
                "mm_token_type_ids": (ids == self.image_token_id).long()}


def collate_vlm_inputs(items: Sequence[dict], pad_id: int = 0) -> dict:
    """Right-pad the token rows (pad id 0, mask 0, as upstream's collate) and concatenate the image patches."""
    L = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], mask[i, :n], mm[i, :n] = it["input_ids"], 1, it["mm_token_type_ids"]
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items])}


class Qwen3VLFeatures(nn.Module):
    """Frozen Qwen3-VL -> the last hidden state of its language model (post final norm), per token: the prompt
    builder (run in the workers) plus ``motus_fast.model.vlm.VLMFeatureExtractor`` (run on the device)."""

    def __init__(self, model: nn.Module, prompt: Callable[[np.ndarray, str], dict]):
        super().__init__()
        from motus_fast.model.vlm import VLMFeatureExtractor

        self.extractor = VLMFeatureExtractor(model)
        self.prompt = prompt
        self.dim = int(self.extractor.hidden_size)

    @torch.no_grad()
    def forward(self, inputs: Sequence[dict]) -> tuple[Tensor, Tensor]:
        batch = collate_vlm_inputs(inputs)
        p = next(self.extractor.parameters())
        batch = {k: v.to(p.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(p.dtype)
        hidden, lens = self.extractor(**batch)
        return hidden.float(), lens


# ---- tiny random encoders (CI) ---------------------------------------------------------------------------------------
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


def build_tiny_encoders(cfg, seed: int = 0, use_vlm: bool = True, image_pixels: int = 64 * 64) -> Encoders:
    """Tiny random encoders whose widths match ``cfg`` (a MotusConfig): for CI and the demo, no downloads."""
    return Encoders(vae=tiny_wan_vae(cfg.video.in_channels, seed),
                    text=tiny_umt5(cfg.video.text_dim, max(cfg.video.text_len, 8), seed),
                    vlm=tiny_qwen3vl(cfg.und.vlm_dim, image_pixels, seed) if use_vlm else None)


# ---- named text encoders for the CLI ---------------------------------------------------------------------------------
TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {}


def register_text_encoder(name: str, factory: Callable[..., TextEncoder]) -> None:
    """factory(cfg: MotusConfig, device, dtype) -> TextEncoder. The weights loaders register "umt5-xxl" etc."""
    TEXT_ENCODERS[name] = factory


def build_text_encoder(name: str, cfg, device=None, dtype=torch.float32) -> TextEncoder:
    """A registered name, or "package.module:function" (called like a registered factory)."""
    if name in TEXT_ENCODERS:
        factory = TEXT_ENCODERS[name]
    elif ":" in name:
        module, fn = name.split(":", 1)
        factory = getattr(importlib.import_module(module), fn)
    else:
        raise KeyError(f"unknown text encoder {name!r}; registered: {sorted(TEXT_ENCODERS)} (or give "
                       "'package.module:function')")
    return factory(cfg, device, dtype)


def _tiny_text_factory(cfg, device=None, dtype=torch.float32) -> TextEncoder:
    return tiny_umt5(cfg.video.text_dim, max(cfg.video.text_len, 8)).to(device=device, dtype=dtype)


register_text_encoder("tiny", _tiny_text_factory)
