"""The action expert: one transformer layer per video layer, projecting into the video expert's head space.

Tokens (DESIGN.md section 3): finetune layout ``[state, K noisy actions, R registers]``, pretrain layout ``[K latent
actions]``, plus a fixed [sin | cos] position table. Each layer: AdaLN -> q,k,v = x @ W (no bias) -> RMSNorm over
H*D on q,k (no RoPE) -> [joint attention] -> o (no bias) -> gated residual -> AdaLN FFN, gated (its residual added
by the next layer's AdaLN, in one fused pass: ``Stream``).
Decoder: 2-way modulated LayerNorm from the time embedding -> Linear -> velocity of the K action tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from motus_fast.config import ActionExpertConfig
from motus_fast.model.embed import TimeEmbedding, modulation_chunks, position_table
from motus_fast.model.layers import RMSNorm, Stream, feed_forward, mlp3x_silu, split_heads
from motus_fast.ops import ExpertQK, adaln_modulate, gated_residual_adaln
from motus_fast.ops.profiling import annotate


class ActionLayer(nn.Module):
    def __init__(self, cfg: ActionExpertConfig, num_heads: int, head_dim: int):
        super().__init__()
        d, width = cfg.dim, num_heads * head_dim
        self.cfg, self.num_heads = cfg, num_heads
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / math.sqrt(d))
        self.qkv = nn.Linear(d, 3 * width, bias=False)
        self.norm_q = RMSNorm(width, cfg.eps)
        self.norm_k = RMSNorm(width, cfg.eps)
        self.o = nn.Linear(width, d, bias=False)
        self.ffn = feed_forward(d, cfg.ffn_dim)

    def modulated_input(self, x, e6):
        """The AdaLN-modulated input of this layer's attention (the velocity cache's indicator)."""
        mod = modulation_chunks(self.modulation, e6)
        return adaln_modulate(x, mod[0], mod[1], self.cfg.eps)

    @annotate("action.pre_attention")   # NVTX range with MOTUS_NVTX=1 (motus_fast/ops/profiling.py)
    def attention_inputs(self, a: Stream, e6):
        """a: the stream [B, L_a, dim] (its pending FFN branch added here, fused with this layer's AdaLN); e6:
        [B, 6, dim] -> the stream, q, k [B, L_a, H*D] as an ExpertQK (normalised by MotusBlock, no RoPE), v:
        [B, L_a, H, D], and the 6 modulation chunks."""
        mod = modulation_chunks(self.modulation, e6)
        a, h = a.modulate(mod[0], mod[1], self.cfg.eps)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        qk = ExpertQK(q, k, self.norm_q.weight, self.norm_k.weight, self.cfg.eps)
        return a, qk, split_heads(v, self.num_heads), mod

    @annotate("action.post_attention")
    def finish(self, a, attn, mod) -> Stream:
        """a: [B, L_a, dim]; attn: [B, L_a, H*D] -> the layer's output stream (gated FFN branch pending)"""
        a, h = gated_residual_adaln(a, self.o(attn), mod[2], mod[3], mod[4], self.cfg.eps)
        return Stream(a, self.ffn(h), mod[5])


class ActionExpert(nn.Module):
    """Input encoders, registers, position table, time embedding and decoder of the action stream."""

    def __init__(self, cfg: ActionExpertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        if cfg.layout == "finetune":
            self.state_encoder = mlp3x_silu(cfg.state_dim, d)
            self.registers = nn.Parameter(torch.randn(1, cfg.num_registers, d) * 0.02)
        self.action_encoder = mlp3x_silu(cfg.action_dim, d)
        # persistent: official checkpoints store it (bf16-rounded in bf16 checkpoints), we load what they hold
        self.register_buffer("pos_table", position_table(cfg.pos_table_rows, d))
        self.time = TimeEmbedding(cfg.freq_dim, d, chunks=6)
        self.decoder_modulation = nn.Parameter(torch.randn(1, 2, d) / math.sqrt(d))
        self.head = nn.Linear(d, cfg.action_dim)

    def embed(self, actions: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """actions: [B, K, action_dim]; state: [B, state_dim] (finetune) or None (pretrain) -> [B, L_a, dim]"""
        cfg = self.cfg
        B, K = actions.shape[:2]
        if K != cfg.chunk_size or actions.shape[-1] != cfg.action_dim:
            raise ValueError(f"actions have shape {tuple(actions.shape)}; expected [B, {cfg.chunk_size}, "
                             f"{cfg.action_dim}]")
        dtype = self.action_encoder[0].weight.dtype
        tokens = self.action_encoder(actions.to(dtype))
        if cfg.layout == "finetune":
            if state is None or state.shape != (B, cfg.state_dim):
                got = None if state is None else tuple(state.shape)
                raise ValueError(f"the finetune layout needs a state of shape [{B}, {cfg.state_dim}], got {got}")
            s = self.state_encoder(state.to(dtype))[:, None]
            tokens = torch.cat([s, tokens, self.registers.expand(B, -1, -1)], dim=1)
        elif state is not None:
            raise ValueError("the pretrain layout has no state token; pass state=None")
        return tokens + self.pos_table[:, : tokens.shape[1]].to(dtype)

    def unembed(self, a: Stream, e: torch.Tensor) -> torch.Tensor:
        """a: the last layer's stream [B, L_a, dim]; e: time embedding [B, dim] -> velocity of the action tokens
        [B, K, action_dim]"""
        shift, scale = (self.decoder_modulation + e[:, None]).unsqueeze(1).unbind(2)
        start = 1 if self.cfg.layout == "finetune" else 0     # drop the state row (and the registers after K)
        rows = slice(start, start + self.cfg.chunk_size)
        a = Stream(*(t if t is None or t.shape[1] == 1 else t[:, rows] for t in a))   # (a per-sample gate stays)
        return self.head(a.modulate(shift, scale, self.cfg.eps)[1])
