"""The video expert: a Wan2.2-TI2V transformer whose self-attention is the shared joint attention.

Per layer (DESIGN.md section 3): AdaLN -> q,k,v (bias) -> RMSNorm over the full width on q,k -> 3-D RoPE -> [joint
attention] -> o -> gated residual; cross-attention to the umT5 context (affine LayerNorm pre-norm, ungated); AdaLN
FFN with a gated residual (added by the next layer's AdaLN, in one fused pass: ``Stream``). ``VideoExpert`` holds
the embeddings and the output head, ``VideoLayer`` one layer; ``motus_fast.model.mot.MotusBlock`` runs the layers of
the three experts around their joint attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from motus_fast.config import VideoExpertConfig
from motus_fast.model.embed import TimeEmbedding, modulation_chunks, patchify, unpatchify
from motus_fast.model.layers import RMSNorm, Stream, feed_forward, masked_cross_attention, split_heads
from motus_fast.ops import ExpertQK, adaln_modulate, gated_residual_adaln
from motus_fast.ops.profiling import annotate


class CrossAttention(nn.Module):
    """Video queries attend to the text context; q/k RMS-normalised over the full width."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.o = nn.Linear(dim, dim)

    def context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx: [B, L_t, dim] -> k, v: [B, L_t, H, D]. Depends only on the instruction: cacheable."""
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return split_heads(self.norm_k(k), self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x, kv, text_lens=None):
        # x: [B, L, dim]; kv: context_kv(ctx) -> [B, L, dim]
        q = split_heads(self.norm_q(self.q(x)), self.num_heads)
        return self.o(masked_cross_attention(q, *kv, text_lens).flatten(-2))


class VideoLayer(nn.Module):
    def __init__(self, cfg: VideoExpertConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / math.sqrt(d))
        self.qkv = nn.Linear(d, 3 * d)
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)
        self.o = nn.Linear(d, d)
        self.cross_norm = nn.LayerNorm(d, eps=cfg.eps)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = feed_forward(d, cfg.ffn_dim)

    def modulated_input(self, x, e6):
        """The AdaLN-modulated input of this layer's attention (the velocity cache's indicator)."""
        mod = modulation_chunks(self.modulation, e6)
        return adaln_modulate(x, mod[0], mod[1], self.cfg.eps)

    @annotate("video.pre_attention")   # NVTX range with MOTUS_NVTX=1 (motus_fast/ops/profiling.py)
    def attention_inputs(self, x: Stream, e6, rope):
        """x: the stream [B, L, dim] (the previous layer's FFN branch still to add: added here, fused with this
        layer's AdaLN); e6: [B, 6, dim] or [B, L, 6, dim]; rope: (cos, sin) [L, D/2]
        -> the stream [B, L, dim], q, k [B, L, H*D] as an ExpertQK (MotusBlock normalises and rotates the q/k of
        all experts in one qk_norm_rope call), v: [B, L, H, D], and the 6 modulation chunks."""
        mod = modulation_chunks(self.modulation, e6)
        x, h = x.modulate(mod[0], mod[1], self.cfg.eps)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        qk = ExpertQK(q, k, self.norm_q.weight, self.norm_k.weight, self.cfg.eps, rope)
        return x, qk, split_heads(v, self.cfg.num_heads), mod

    @annotate("video.post_attention")
    def finish(self, x, attn, mod, text, text_lens=None) -> Stream:
        """x: [B, L, dim]; attn: joint attention output [B, L, H*D]; text: embedded context [B, L_t, dim] or its
        cached (k, v) -> the layer's output stream (its gated FFN branch left for the next AdaLN)."""
        x = x + self.o(attn) * mod[2]
        kv = text if isinstance(text, tuple) else self.cross_attn.context_kv(text)
        # ungated cross-attention residual fused with the FFN's AdaLN
        x, h = gated_residual_adaln(x, self.cross_attn(self.cross_norm(x), kv, text_lens), None, mod[3], mod[4],
                                    self.cfg.eps)
        return Stream(x, self.ffn(h), mod[5])


class VideoExpert(nn.Module):
    """Patch embedding, text embedding, time embedding and output head of the video stream."""

    def __init__(self, cfg: VideoExpertConfig):
        super().__init__()
        self.cfg = cfg
        d, patch = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_channels * math.prod(patch), d)
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time = TimeEmbedding(cfg.freq_dim, d, chunks=6)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, d) / math.sqrt(d))
        self.head = nn.Linear(d, math.prod(patch) * cfg.out_channels)

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        T, H, W = latent_shape[-3:]
        pt, ph, pw = self.cfg.patch_size
        return T // pt, H // ph, W // pw

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> tokens [B, F*H'*W', dim] in (f, h, w) order."""
        if latents.shape[1] != self.cfg.in_channels:
            raise ValueError(f"video latents have {latents.shape[1]} channels; the model expects "
                             f"{self.cfg.in_channels}")
        return self.patch_embed(patchify(latents, self.cfg.patch_size).to(self.patch_embed.weight.dtype))

    def unembed(self, x: Stream, e: torch.Tensor, grid) -> torch.Tensor:
        """x: the last layer's stream [B, L, dim]; e: time embedding [B, dim] or [B, L, dim] -> velocity
        [B, C_out, T, H, W]."""
        e = e[:, None] if e.dim() == 2 else e
        shift, scale = (self.head_modulation[:, None] + e[:, :, None]).unbind(2)
        y = self.head(x.modulate(shift, scale, self.cfg.eps)[1])
        return unpatchify(y, grid, self.cfg.patch_size, self.cfg.out_channels)

