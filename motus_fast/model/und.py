"""The understanding expert: frozen VLM hidden states -> adapter -> layers that give the joint attention keys/values.

Per layer: LayerNorm (no affine, no modulation) -> q,k,v into the video head space (no bias) -> RMSNorm(H*D) on q,k
-> [joint attention] -> o (no bias), ungated residual -> LayerNorm -> FFN, ungated residual (added by the next
layer's LayerNorm, in one fused pass: ``Stream``). The und stream has no head: in the last layer only its keys and
values matter, so that layer skips its queries, output and FFN.

Und tokens are packed ([T_u, dim], samples concatenated, ``cu_seqlens``): variable VLM lengths cost no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from motus_fast.config import UndExpertConfig
from motus_fast.model.layers import RMSNorm, Stream, feed_forward, mlp3x_silu, split_heads
from motus_fast.ops import ExpertQK, gated_residual_adaln
from motus_fast.ops.profiling import annotate


class UndLayer(nn.Module):
    def __init__(self, cfg: UndExpertConfig, num_heads: int, head_dim: int):
        super().__init__()
        d, width = cfg.dim, num_heads * head_dim
        self.cfg, self.num_heads, self.width = cfg, num_heads, width
        self.qkv = nn.Linear(d, 3 * width, bias=False)
        self.norm_q = RMSNorm(width, cfg.eps)
        self.norm_k = RMSNorm(width, cfg.eps)
        self.o = nn.Linear(width, d, bias=False)
        self.ffn = feed_forward(d, cfg.ffn_dim)

    @annotate("und.pre_attention")   # NVTX range with MOTUS_NVTX=1 (motus_fast/ops/profiling.py)
    def attention_inputs(self, u: Stream, need_queries: bool = True):
        """u: the stream [T_u, dim] (its pending FFN branch added here, fused with the LayerNorm) -> the stream,
        q (None unless need_queries), k [T_u, H*D] as an ExpertQK (normalised by MotusBlock, no RoPE), v:
        [T_u, H, D]"""
        u, h = u.modulate(None, None, self.cfg.eps)
        if not need_queries:
            k, v = F.linear(h, self.qkv.weight[self.width:]).chunk(2, dim=-1)
            return u, ExpertQK(None, k, None, self.norm_k.weight, self.cfg.eps), split_heads(v, self.num_heads)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        qk = ExpertQK(q, k, self.norm_q.weight, self.norm_k.weight, self.cfg.eps)
        return u, qk, split_heads(v, self.num_heads)

    @annotate("und.post_attention")
    def finish(self, u, attn) -> Stream:
        """u: [T_u, dim]; attn: [T_u, H*D] -> the layer's output stream (ungated FFN branch pending)"""
        u, h = gated_residual_adaln(u, self.o(attn), None, None, None, self.cfg.eps)   # ungated residual + LN
        return Stream(u, self.ffn(h))


class UndExpert(nn.Module):
    """The VLM adapter (3-layer SiLU MLP) in front of the und layers."""

    def __init__(self, cfg: UndExpertConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter = mlp3x_silu(cfg.vlm_dim, cfg.dim)

    def embed(self, vlm_hidden: torch.Tensor, lens: torch.Tensor | None = None):
        """vlm_hidden: [B, L_u, vlm_dim]; lens: [B] real tokens per sample (None: all L_u rows, upstream's way)
        -> packed tokens [T_u, dim] and cu_seqlens int32 [B+1]"""
        B, L, C = vlm_hidden.shape
        if C != self.cfg.vlm_dim:
            raise ValueError(f"VLM hidden states have width {C}; the und adapter expects {self.cfg.vlm_dim}")
        dtype = self.adapter[0].weight.dtype
        if lens is None:
            packed = vlm_hidden.reshape(B * L, C)
            cu = torch.arange(B + 1, device=vlm_hidden.device, dtype=torch.int32) * L
        else:
            lens = torch.as_tensor(lens, device=vlm_hidden.device)
            if lens.shape != (B,) or bool((lens < 0).any()) or bool((lens > L).any()):
                raise ValueError(f"vlm_lens must be [B={B}] with values in 0..{L}, got {lens.tolist()}")
            keep = torch.arange(L, device=vlm_hidden.device)[None, :] < lens[:, None]
            packed = vlm_hidden[keep]
            cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        return self.adapter(packed.to(dtype)), cu
