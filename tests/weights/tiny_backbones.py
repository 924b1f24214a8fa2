"""Tiny random public-backbone checkpoints for the weights tests, written the way their libraries (or the original
Wan release) write them. Plain functions: the test modules wrap them in fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from motus_fast.config import ActionExpertConfig, MotusConfig, UndExpertConfig

# the non-video parts of the Motus the tiny Wan models are loaded into (their sizes do not matter here)
TINY_BASE = MotusConfig(num_layers=2, action=ActionExpertConfig(dim=16, ffn_dim=32, chunk_size=4, state_dim=3,
                                                                action_dim=3),
                        und=UndExpertConfig(dim=16, ffn_dim=32, vlm_dim=64))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (kept here rather than imported from conftest: several test folders have a
    conftest.py, and `from conftest import ...` resolves to whichever pytest imported first)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with random values of sensible scale (no zero or unit tables left, so a tensor
    mapped to the wrong place shows up): weights N(0, 1/fan_in), vectors N(0, 0.05^2), norm weights 1 + N(0, 0.2^2),
    AdaLN tables N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2 and "scale_shift_table" not in name:
            std = 1 / math.sqrt(p[0].numel())
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "norm" in name and name.endswith("weight") or name.endswith("gamma"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g) if "scale_shift_table" in name
                    else 0.05 * torch.randn(p.shape, generator=g))
    return module


def tiny_wan_diffusers(in_channels=4, text_dim=24, seed=0):
    """A random diffusers WanTransformer3DModel: 2 layers, 2 heads x 16, Wan2.2-TI2V structure."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                              in_channels=in_channels, out_channels=in_channels, text_dim=text_dim, freq_dim=32,
                              ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                              rope_max_seq_len=64)
    return randomize_(m, seed).eval()


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers WanTransformer3DModel state dict to the original Wan (WanModel) key names, spelled out
    here independently of motus_fast's key maps."""
    top = {"patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias",
           "condition_embedder.text_embedder.linear_1": "text_embedding.0",
           "condition_embedder.text_embedder.linear_2": "text_embedding.2",
           "condition_embedder.time_embedder.linear_1": "time_embedding.0",
           "condition_embedder.time_embedder.linear_2": "time_embedding.2",
           "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
           "scale_shift_table": "head.modulation"}
    block = {"scale_shift_table": "modulation", "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k",
             "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q",
             "attn1.norm_k": "self_attn.norm_k", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
             "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q",
             "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    out = {}
    for key, t in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            stem, leaf = (rest, "") if rest == "scale_shift_table" else rest.rsplit(".", 1)
            new = f"blocks.{i}.{block[stem]}" + (f".{leaf}" if leaf else "")
        else:
            stem, leaf = (key, "") if key in top else key.rsplit(".", 1)
            new = top[stem] + (f".{leaf}" if leaf and stem != key else "")
        out[new] = t.clone()
    return out


def original_wan_config(m) -> dict:
    """The WanModel config.json of the original release for a diffusers model's sizes."""
    c = m.config
    return {"_class_name": "WanModel", "model_type": "ti2v", "patch_size": list(c.patch_size), "text_len": 512,
            "in_dim": c.in_channels, "dim": c.num_attention_heads * c.attention_head_dim, "ffn_dim": c.ffn_dim,
            "freq_dim": c.freq_dim, "text_dim": c.text_dim, "out_dim": c.out_channels,
            "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "window_size": [-1, -1], "qk_norm": True,
            "cross_attn_norm": True, "eps": c.eps}


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], config: dict, shards: int = 3,
                  stem: str = "diffusion_pytorch_model") -> Path:
    """Write `sd` as `shards` safetensors shards + index json + config.json, as the Wan release does."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder
