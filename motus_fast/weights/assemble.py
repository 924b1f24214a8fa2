"""`motus-fast init`: a stage-1/2-ready Motus checkpoint from the public backbones.

The video expert comes from a Wan2.2-TI2V-5B checkpoint (original or diffusers layout, ``motus_fast.weights.wan``);
the action and understanding experts are fresh, initialised as upstream initialises them (read from thu-ml/Motus
``models/action_expert.py``, ``models/und_expert.py``, ``models/motus.py``):

- action expert (``ActionExpert.initialize_weights``): every Linear Xavier-uniform with zero bias (state/action
  encoders, o, FFN, time projection); the time-embedding MLP N(0, 0.02); the decoder head all zeros; registers
  N(0, 0.02); AdaLN tables (per layer and decoder) N(0, 1)/sqrt(dim); the raw ``wan_action_qkv`` [3, N, D, hd]
  N(0, 1)/sqrt(D*hd) (our fused Linear holds the same i.i.d. values, permuted); q/k RMSNorm weights one; the
  sin-cos position table fixed.
- und expert: upstream calls no init, so PyTorch's Linear defaults hold (weight Kaiming-uniform a=sqrt(5), i.e.
  U(+-1/sqrt(fan_in)), bias U(+-1/sqrt(fan_in))) for the VLM adapter, o and FFN; ``wan_und_qkv`` N(0, 1)/sqrt(D*hd);
  RMSNorm weights one.

The frozen backbones (Qwen3-VL, umT5, Wan VAE) are read here (headers and configs only) to prove they fit the model
(VLM width = und adapter input, umT5 width = video text_dim, VAE latent channels = video in_channels); the checkpoint
records where they are (``config.json`` -> ``extra.backbones``) rather than copying gigabytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from motus_fast.config import MotusConfig
from motus_fast.weights.mapping import CheckpointError

log = logging.getLogger("motus_fast")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- upstream's init of the fresh experts ----------------------------------------------------------------
class _Init:
    """Initialises parameters with one generator and remembers which, so nothing is left at a constructor default
    by accident."""

    def __init__(self, generator: torch.Generator):
        self.g, self.done = generator, set()

    def __call__(self, p: torch.Tensor, how: str, std: float = 0.0) -> None:
        g = self.g
        if how == "xavier":
            nn.init.xavier_uniform_(p, generator=g)
        elif how == "torch_default_weight":             # nn.Linear.reset_parameters
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
        elif how == "uniform_fan_in":                   # nn.Linear.reset_parameters' bias; std = 1/sqrt(fan_in)
            nn.init.uniform_(p, -std, std, generator=g)
        elif how == "normal":
            nn.init.normal_(p, 0.0, std, generator=g)
        elif how == "zeros":
            nn.init.zeros_(p)
        elif how == "ones":
            nn.init.ones_(p)
        else:
            raise AssertionError(how)
        self.done.add(id(p))

    def linear(self, m: nn.Linear, how: str = "xavier") -> None:
        if how == "xavier":
            self(m.weight, "xavier")
            if m.bias is not None:
                self(m.bias, "zeros")
        else:                                           # PyTorch's default
            self(m.weight, "torch_default_weight")
            if m.bias is not None:
                self(m.bias, "uniform_fan_in", 1 / math.sqrt(m.weight.shape[1]))

    def linears(self, module: nn.Module, how: str = "xavier") -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                self.linear(m, how)

    def check(self, *modules: nn.Module) -> None:
        left = [n for mod in modules for n, p in mod.named_parameters() if id(p) not in self.done]
        assert not left, f"parameters without an init rule: {left}"  # a bug here, not a user error


@torch.no_grad()
def fresh_experts_like_upstream(model, generator: Optional[torch.Generator] = None) -> None:
    """Replace the action and und experts of `model` (embeddings, heads and every layer) by new modules on the CPU,
    initialised as upstream initialises them (module docstring), in the dtype of the video expert."""
    from motus_fast.model.action import ActionExpert, ActionLayer
    from motus_fast.model.und import UndExpert, UndLayer

    cfg = model.cfg
    init = _Init(generator or torch.Generator().manual_seed(0))
    H, hd = cfg.num_heads, cfg.head_dim

    action = ActionExpert(cfg.action)
    init.linears(action)                                # the order of draws is ours; the distributions are upstream's
    for m in action.time.embed.modules():
        if isinstance(m, nn.Linear):
            init(m.weight, "normal", 0.02)
    init(action.head.weight, "zeros")
    init(action.head.bias, "zeros")
    if cfg.action.layout == "finetune":
        init(action.registers, "normal", 0.02)
    init(action.decoder_modulation, "normal", 1 / math.sqrt(cfg.action.dim))

    und = UndExpert(cfg.und)
    init.linears(und, "torch_default")

    new_layers = []
    for _ in range(cfg.num_layers):
        a = ActionLayer(cfg.action, H, hd)
        init.linears(a)
        init(a.qkv.weight, "normal", 1 / math.sqrt(cfg.action.dim * hd))
        init(a.modulation, "normal", 1 / math.sqrt(cfg.action.dim))
        u = UndLayer(cfg.und, H, hd)
        init.linears(u, "torch_default")
        init(u.qkv.weight, "normal", 1 / math.sqrt(cfg.und.dim * hd))
        for layer in (a, u):
            init(layer.norm_q.weight, "ones")
            init(layer.norm_k.weight, "ones")
        new_layers.append((a, u))
    init.check(action, und, *(m for pair in new_layers for m in pair))

    dtype = model.video.patch_embed.weight.dtype
    model.action, model.und = action.to(dtype), und.to(dtype)
    for blk, (a, u) in zip(model.blocks, new_layers):
        blk.action, blk.und = a.to(dtype), u.to(dtype)


def motus_from_wan(wan: str | Path, base: Optional[MotusConfig] = None, dtype: Optional[torch.dtype] = None,
                   generator: Optional[torch.Generator] = None, progress: bool = True):
    """A Motus whose video expert is the Wan checkpoint at `wan` and whose action/und experts are fresh (upstream
    init). The config is `base` (default: motus-8b) with Wan's layer count and video expert. Built on the meta
    device, so the Wan weights are held once."""
    from motus_fast.model import Motus
    from motus_fast.weights.wan import load_wan_video, locate_wan

    cfg = locate_wan(wan).motus_config(base)
    with torch.device("meta"):
        model = Motus(cfg)
    load_wan_video(model, wan, dtype, progress)
    fresh_experts_like_upstream(model, generator)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"tensors left on the meta device: {meta[:5]}"
    return model


# ---- the checkpoint --------------------------------------------------------------------------------------
def assemble(wan: str | Path, vlm: str | Path, t5: str | Path, vae: str | Path, out: str | Path,
             base: Optional[MotusConfig] = None, dtype: torch.dtype = torch.float32, seed: int = 0,
             progress: bool = True) -> Path:
    """Build the stage-1/2 checkpoint in `out` (our format: ``model.safetensors`` + ``config.json``) from the
    Wan, Qwen3-VL, umT5 and Wan-VAE folders. Returns `out`."""
    from motus_fast.encoders.load import describe_qwen3_vl, describe_umt5, describe_vae
    from motus_fast.weights.native import save_state_dict
    from motus_fast.weights.wan import locate_wan

    base = base or MotusConfig()
    ckpt = locate_wan(wan)
    backbones = {"wan": {"path": str(Path(wan).resolve()), "layout": ckpt.layout}}
    # the backbones first (headers and configs only): they decide the und adapter's input width, and a bad path
    # fails before the Wan load
    for kind, path, describe in (("vlm", vlm, describe_qwen3_vl), ("t5", t5, describe_umt5), ("vae", vae, describe_vae)):
        log.info("checking the %s backbone at %s", kind, path)
        info = describe(path)
        info.pop("problems", None)          # a missing tokenizer matters for serving (motus-fast check), not here
        backbones[kind] = info
    if backbones["vlm"]["hidden_size"] != base.und.vlm_dim:
        log.info("und adapter input width set to the VLM's hidden size %d", backbones["vlm"]["hidden_size"])
        base = dataclasses.replace(base, und=dataclasses.replace(base.und, vlm_dim=backbones["vlm"]["hidden_size"]))
    if backbones["t5"]["d_model"] != ckpt.video.text_dim:
        raise CheckpointError(f"{t5}: the umT5 width {backbones['t5']['d_model']} differs from the Wan text_dim "
                              f"{ckpt.video.text_dim} ({ckpt.config_path})")
    if backbones["vae"]["z_dim"] != ckpt.video.in_channels:
        raise CheckpointError(f"{vae}: the VAE has {backbones['vae']['z_dim']} latent channels, the Wan video expert "
                              f"takes {ckpt.video.in_channels} ({ckpt.config_path})")

    model = motus_from_wan(wan, base, dtype, torch.Generator().manual_seed(seed), progress)
    extra = {"backbones": backbones,
             "init": {"video": "wan", "action": "upstream", "und": "upstream", "seed": seed}}
    out = save_state_dict(model.state_dict(), model.cfg, out, dtype, extra, progress="write" if progress else None)
    counts = model.param_counts()
    log.info("wrote %s (%s)", out, ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    return out


# ---- CLI -------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("init", help="build a stage-1/2 checkpoint from Wan2.2, Qwen3-VL, umT5 and the Wan VAE",
                              description="Build a stage-1/2 Motus checkpoint: the video expert from Wan2.2-TI2V-5B, "
                              "fresh action/und experts (upstream init), the frozen backbones checked and recorded.")
    p.add_argument("--wan", required=True, metavar="PATH",
                   help="Wan2.2-TI2V-5B: the original release folder, or the diffusers transformer/ (or pipeline) "
                   "folder")
    p.add_argument("--vlm", required=True, metavar="PATH", help="Qwen3-VL-2B folder (transformers layout)")
    p.add_argument("--t5", required=True, metavar="PATH", help="umT5-XXL encoder: a transformers folder (e.g. "
                   "text_encoder/ of Wan2.2-TI2V-5B-Diffusers, or that pipeline folder) or the original release's "
                   "models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--vae", required=True, metavar="PATH", help="Wan2.2 VAE folder (diffusers AutoencoderKLWan, e.g. "
                   "vae/ of Wan2.2-TI2V-5B-Diffusers, or that pipeline folder)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--preset", default="motus-8b", help="sizes of the action/und experts (tiny, small, motus-8b); "
                   "the video expert and layer count always come from --wan")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set action.layout=pretrain (repeatable)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the written checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh action/und experts")
    p.set_defaults(func=_cmd_init)


def _cmd_init(args) -> None:
    from motus_fast.config import config_from_args
    out = assemble(args.wan, args.vlm, args.t5, args.vae, args.out, base=config_from_args(args),
                   dtype=DTYPES[args.dtype], seed=args.seed)
    print(f"wrote {out}/model.safetensors and {out}/config.json")
