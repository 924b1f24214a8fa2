"""FP8 (e4m3) weights for the video expert's Linear layers (approximate: ``SamplerOptions.fp8_video``).

The video expert holds ~90% of the model's FLOPs per step, all in its Linear layers and attention. On Hopper an FP8
GEMM has twice the bf16 peak: each Linear of a video layer (q/k/v, o, the cross-attention's q, kv and o, the FFN)
keeps its weight in e4m3 with a scale, quantises its input the same way per call, and multiplies with
``torch._scaled_mm`` (fp32 accumulation, the scales applied to the result). Scales are per tensor (one for the
weight, one for the input) or per row (one per output channel of the weight, one per token of the input).

On any other device the same numbers are emulated: quantise, dequantise, multiply in fp32. The embeddings, the
heads and the other experts stay in the model dtype. A converted model is for inference only (the FP8 buffers are
not parameters; save the original).
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("motus_fast")
Tensor = torch.Tensor
Granularity = Literal["tensor", "row"]
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max          # 448
VIDEO_LINEARS = ("qkv", "o", "cross_attn.q", "cross_attn.kv", "cross_attn.o", "ffn.0", "ffn.2")   # in a VideoLayer


def quantize(x: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 values, fp32 scale) with x ~= values * scale; the scale is 0-d ("tensor") or [..., 1]
    ("row", one per row). Each scale maps its block's largest magnitude to the e4m3 maximum."""
    xf = x.float()
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp_min(1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(values: Tensor, scale: Tensor) -> Tensor:
    return values.float() * scale


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in e4m3 (see the module docstring)."""

    def __init__(self, linear: nn.Linear, granularity: Granularity):
        super().__init__()
        if granularity not in ("tensor", "row"):
            raise ValueError(f"FP8 scale granularity must be 'tensor' or 'row', got {granularity!r}")
        self.granularity = granularity
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        w, s = quantize(linear.weight.detach(), granularity)             # [N, K], scale 0-d or [N, 1]
        self.register_buffer("weight_fp8", w)
        self.register_buffer("weight_scale", s)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xq, xs = quantize(x.reshape(-1, self.in_features), self.granularity)
        if x.is_cuda:
            y = self._scaled_mm(xq, xs)
        else:       # emulated: the same quantised numbers, multiplied in fp32
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(dequantize(xq, xs), dequantize(self.weight_fp8, self.weight_scale), bias)
        return y.to(self.out_dtype).reshape(*lead, self.out_features)

    def _scaled_mm(self, xq: Tensor, xs: Tensor) -> Tensor:
        # the weight's transpose is column-major, as _scaled_mm wants its second operand
        w_scale = self.weight_scale if self.granularity == "tensor" else self.weight_scale.t()
        # row-wise scaling needs a bf16 result; the bias is added afterwards (fp32 results take no fused bias)
        out_dtype = torch.bfloat16 if self.granularity == "row" else self.out_dtype
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=w_scale, out_dtype=out_dtype)
        return y if self.bias is None else y + self.bias.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, e4m3 weights, {self.granularity}-wise scales"


def quantize_video_linears(model, granularity: Granularity) -> None:
    """Replace, in place, every video layer's Linear layers by ``Fp8Linear`` (inference only)."""
    for blk in model.blocks:
        for name in VIDEO_LINEARS:
            parent_name, _, leaf = name.rpartition(".")
            parent = blk.video.get_submodule(parent_name) if parent_name else blk.video
            lin = getattr(parent, leaf)
            if isinstance(lin, Fp8Linear):
                raise ValueError(f"the video layers are already FP8 ({lin.granularity}-wise)")
            setattr(parent, leaf, Fp8Linear(lin, granularity))
    log.info("video expert Linear layers: FP8 e4m3 weights, %s-wise scales", granularity)


def video_fp8_granularity(model) -> Optional[str]:
    """'tensor' / 'row' if the video layers hold FP8 weights, else None."""
    qkv = model.blocks[0].video.qkv if len(model.blocks) else None
    return qkv.granularity if isinstance(qkv, Fp8Linear) else None
