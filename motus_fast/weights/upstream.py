"""Load official Motus checkpoints (thu-ml/Motus) into our model, strictly.

The official ``state_dict`` lists every tensor several times: under its owner (``video_model.wan_model.``,
``action_expert.``, ``und_expert.``) and again under wrapper aliases (``video_module.video_model.``,
``action_module.video_model.``, ``action_module.action_expert.``, ``und_module.und_expert.``). DeepSpeed files wrap
it as ``{"module": state_dict}``; a frozen Qwen3-VL may ride along under ``*vlm_model.`` (we load the VLM from its
own weights, so those keys are skipped and counted). Every other key must map onto exactly one of our parameters
with the expected shape, or we raise ``CheckpointError`` naming the missing, unexpected and mis-shaped keys.

Layout changes (ours are kernel-friendly): q/k/v Linears are fused into one ``qkv``; cross-attention k/v into
``kv``; the raw ``[3, N, D, head_dim]`` action/und projections become Linear weights ``[3*N*head_dim, D]``; the
Conv3d patch embedding becomes a Linear over flattened patches.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from motus_fast.config import ActionExpertConfig, MotusConfig, UndExpertConfig, VideoExpertConfig

log = logging.getLogger("motus_fast")

VIDEO = "video_model.wan_model."
ACTION = "action_expert."
UND = "und_expert."
ALIASES = {  # alias prefix -> owner prefix
    "video_module.video_model.": "video_model.",
    "action_module.video_model.": "video_model.",
    "action_module.action_expert.": "action_expert.",
    "und_module.und_expert.": "und_expert.",
}
VLM_PREFIXES = ("vlm_model.", "und_module.vlm_model.", "action_module.vlm_model.")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names every offending key or file."""


# ---- reading files ---------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint: a DeepSpeed dir or ``mp_rank_00_model_states.pt``, a ``.pt``/``.bin`` state
    dict (loaded with ``weights_only=True``: no pickled code runs), or ``.safetensors``. Returns the raw state dict."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted(p.glob("mp_rank_00_model_states.pt")) or sorted(p.glob("*.safetensors")) or \
            sorted(p.glob("*.pt")) + sorted(p.glob("*.bin"))
        if len(candidates) != 1:
            raise CheckpointError(f"{p}: expected one checkpoint file (mp_rank_00_model_states.pt, *.safetensors, "
                                  f"*.pt or *.bin), found {[c.name for c in candidates]}")
        p = candidates[0]
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                                  f"{e})") from e
        sd = obj.get("module", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{p}: no state dict of tensors found (looked at the top level, 'module' and "
                                  "'state_dict')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def canonical_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold alias keys onto their owners (checking that both hold the same tensor) and drop VLM keys."""
    out: dict[str, torch.Tensor] = {}
    aliased: dict[str, tuple[str, torch.Tensor]] = {}
    n_vlm = 0
    for key, t in sd.items():
        if key.startswith(VLM_PREFIXES):
            n_vlm += 1
            continue
        for alias, owner in ALIASES.items():
            if key.startswith(alias):
                aliased[owner + key[len(alias):]] = (key, t)
                break
        else:
            out[key] = t
    for key, (alias_key, t) in aliased.items():
        if key not in out:
            out[key] = t
        elif out[key].shape != t.shape or not torch.equal(out[key], t):
            raise CheckpointError(f"alias {alias_key!r} holds a different tensor than {key!r}")
    if n_vlm:
        log.info("upstream checkpoint: skipped %d frozen VLM tensors (the VLM loads from its own weights)", n_vlm)
    return out


# ---- the key map -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    ours: str
    sources: tuple[str, ...]
    kind: str = "copy"  # copy | cat | heads (raw [3,N,D,hd]) | patch (Conv3d -> Linear)


def _linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",))]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def _mlp(ours: str, theirs: str, idx=(0, 2, 4)) -> list[Rule]:
    return [r for i in idx for r in _linear(f"{ours}.{i}", f"{theirs}.{i}")]


def key_map(cfg: MotusConfig) -> list[Rule]:
    """Every parameter/buffer of our model and the upstream key(s) it comes from."""
    V = VIDEO
    R = [Rule("video.patch_embed.weight", (f"{V}patch_embedding.weight",), "patch"),
         Rule("video.patch_embed.bias", (f"{V}patch_embedding.bias",))]
    R += _mlp("video.text_embed", f"{V}text_embedding", (0, 2)) + _mlp("video.time.embed", f"{V}time_embedding", (0, 2))
    R += _linear("video.time.project.1", f"{V}time_projection.1")
    R += [Rule("video.head_modulation", (f"{V}head.modulation",))] + _linear("video.head", f"{V}head.head")
    A = ACTION
    if cfg.action.layout == "finetune":
        R += [Rule("action.registers", (f"{A}registers",))] + \
            _mlp("action.state_encoder", f"{A}input_encoder.state_encoder")
    R += [Rule("action.pos_table", (f"{A}input_encoder.pos_embedding",))]
    R += _mlp("action.action_encoder", f"{A}input_encoder.action_encoder")
    R += _mlp("action.time.embed", f"{A}time_embedding", (0, 2)) + _linear("action.time.project.1", f"{A}time_projection.1")
    R += [Rule("action.decoder_modulation", (f"{A}decoder.modulation",))] + \
        _linear("action.head", f"{A}decoder.action_head.0")
    R += _mlp("und.adapter", f"{UND}vlm_adapter")
    for i in range(cfg.num_layers):
        b, v, a, u = f"blocks.{i}", f"{V}blocks.{i}", f"{A}blocks.{i}", f"{UND}blocks.{i}"
        R += [Rule(f"{b}.video.modulation", (f"{v}.modulation",))]
        for wb in ("weight", "bias"):
            R += [Rule(f"{b}.video.qkv.{wb}", tuple(f"{v}.self_attn.{n}.{wb}" for n in "qkv"), "cat"),
                  Rule(f"{b}.video.cross_attn.kv.{wb}", tuple(f"{v}.cross_attn.{n}.{wb}" for n in "kv"), "cat")]
        R += _linear(f"{b}.video.o", f"{v}.self_attn.o") + _linear(f"{b}.video.cross_norm", f"{v}.norm3")
        R += _linear(f"{b}.video.cross_attn.q", f"{v}.cross_attn.q") + _linear(f"{b}.video.cross_attn.o",
                                                                                f"{v}.cross_attn.o")
        for n in ("q", "k"):
            R += [Rule(f"{b}.video.norm_{n}.weight", (f"{v}.self_attn.norm_{n}.weight",)),
                  Rule(f"{b}.video.cross_attn.norm_{n}.weight", (f"{v}.cross_attn.norm_{n}.weight",)),
                  Rule(f"{b}.action.norm_{n}.weight", (f"{a}.wan_action_norm_{n}.weight",)),
                  Rule(f"{b}.und.norm_{n}.weight", (f"{u}.wan_und_norm_{n}.weight",))]
        R += _mlp(f"{b}.video.ffn", f"{v}.ffn", (0, 2))
        R += [Rule(f"{b}.action.modulation", (f"{a}.modulation",)),
              Rule(f"{b}.action.qkv.weight", (f"{a}.wan_action_qkv",), "heads"),
              Rule(f"{b}.action.o.weight", (f"{a}.wan_action_o.weight",))] + _mlp(f"{b}.action.ffn", f"{a}.ffn", (0, 2))
        R += [Rule(f"{b}.und.qkv.weight", (f"{u}.wan_und_qkv",), "heads"),
              Rule(f"{b}.und.o.weight", (f"{u}.wan_und_o.weight",))] + _mlp(f"{b}.und.ffn", f"{u}.ffn", (0, 2))
    return R


def _source_shapes(rule: Rule, shape: tuple[int, ...], cfg: MotusConfig) -> list[tuple[int, ...]]:
    if rule.kind == "copy":
        return [shape]
    if rule.kind == "cat":
        n = len(rule.sources)
        return [(shape[0] // n,) + tuple(shape[1:])] * n
    if rule.kind == "heads":
        return [(3, cfg.num_heads, shape[1], cfg.head_dim)]
    if rule.kind == "patch":
        return [(shape[0], cfg.video.in_channels) + tuple(cfg.video.patch_size)]
    raise AssertionError(rule.kind)


def _apply(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "cat":
        return torch.cat(tensors, dim=0)
    if rule.kind == "heads":                    # q[..., n, e] = sum_d x[d] W[i, n, d, e]  ->  Linear row i*N*hd + n*hd + e
        w = tensors[0]
        return w.permute(0, 1, 3, 2).reshape(-1, w.shape[2])
    if rule.kind == "patch":
        return tensors[0].reshape(tensors[0].shape[0], -1)
    raise AssertionError(rule.kind)


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: MotusConfig,
                       expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map a canonical upstream state dict onto our keys. `expected`: our state dict's shapes. Strict."""
    rules = key_map(cfg)
    missing_ours = sorted(set(expected) - {r.ours for r in rules})
    assert not missing_ours, f"key map does not cover {missing_ours[:5]}"  # a bug in this file, not in the input
    out, used, missing, misshaped = {}, set(), [], []
    for rule in rules:
        want = _source_shapes(rule, tuple(expected[rule.ours]), cfg)
        srcs = []
        for key, shape in zip(rule.sources, want):
            if key not in sd:
                missing.append(key)
                continue
            used.add(key)
            if tuple(sd[key].shape) != shape:
                misshaped.append(f"{key}: checkpoint {list(sd[key].shape)}, model expects {list(shape)}")
            srcs.append(sd[key])
        if len(srcs) == len(rule.sources) and not misshaped:
            out[rule.ours] = _apply(rule, srcs)
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or misshaped:
        raise CheckpointError(_report(missing, unexpected, misshaped))
    return out


def _report(missing, unexpected, misshaped, limit: int = 20) -> str:
    lines = ["upstream checkpoint does not match the model configuration:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines.append(f"  {len(items)} {title} key(s):")
            lines += [f"    {k}" for k in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


# ---- configuration ---------------------------------------------------------------------------------------
def config_from_upstream_json(d: dict) -> MotusConfig:
    """MotusConfig from upstream configuration values: the WanModel ``config.json`` (``wan_config_json``) plus the
    MotusConfig fields (``motus_config``), as in ../shared/fixtures/upstream_motus_tiny/config.json."""
    wan, m = d["wan_config_json"], d["motus_config"]
    K = m["num_video_frames"] * m["video_action_freq_ratio"]
    video = VideoExpertConfig(dim=wan["dim"], ffn_dim=wan["ffn_dim"], num_heads=wan["num_heads"],
                              in_channels=wan["in_dim"], out_channels=wan["out_dim"], patch_size=tuple(wan["patch_size"]),
                              freq_dim=wan["freq_dim"], text_dim=wan["text_dim"], text_len=wan["text_len"], eps=wan["eps"])
    action = ActionExpertConfig(dim=m["action_expert_dim"], ffn_dim=m["action_expert_dim"] *
                                m["action_expert_ffn_dim_multiplier"], state_dim=m["action_state_dim"],
                                action_dim=m["action_dim"], chunk_size=K, layout=m["training_mode"],
                                eps=m["action_expert_norm_eps"])
    und = UndExpertConfig(dim=m["und_expert_hidden_size"], ffn_dim=m["und_expert_hidden_size"] *
                          m["und_expert_ffn_dim_multiplier"], vlm_dim=m["vlm_adapter_input_dim"],
                          eps=m["und_expert_norm_eps"])
    return MotusConfig(num_layers=wan["num_layers"], video=video, action=action, und=und)


def infer_config(sd: dict[str, torch.Tensor], base: Optional[MotusConfig] = None) -> MotusConfig:
    """Read every size a canonical upstream state dict determines; take what it cannot (norm eps, text_len, flow
    settings) from `base` (default: the motus-8b preset)."""
    base = base or MotusConfig()

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"cannot infer the configuration: key {key!r} is missing")
        return tuple(sd[key].shape)

    V, A, U = VIDEO, ACTION, UND
    dim, cin, *patch = shape(f"{V}patch_embedding.weight")
    _, N, Da, hd = shape(f"{A}blocks.0.wan_action_qkv")
    num_layers = len({k.split(".")[3] for k in sd if k.startswith(f"{V}blocks.")})
    video = VideoExpertConfig(dim=dim, ffn_dim=shape(f"{V}blocks.0.ffn.0.weight")[0], num_heads=N, in_channels=cin,
                              out_channels=shape(f"{V}head.head.weight")[0] // math.prod(patch),
                              patch_size=tuple(patch), freq_dim=shape(f"{V}time_embedding.0.weight")[1],
                              text_dim=shape(f"{V}text_embedding.0.weight")[1], text_len=base.video.text_len,
                              eps=base.video.eps)
    finetune = f"{A}input_encoder.state_encoder.0.weight" in sd
    rows = shape(f"{A}input_encoder.pos_embedding")[1]
    R = shape(f"{A}registers")[1] if finetune else base.action.num_registers
    action = ActionExpertConfig(dim=Da, ffn_dim=shape(f"{A}blocks.0.ffn.0.weight")[0],
                                state_dim=shape(f"{A}input_encoder.state_encoder.0.weight")[1] if finetune
                                else base.action.state_dim,
                                action_dim=shape(f"{A}input_encoder.action_encoder.0.weight")[1],
                                chunk_size=rows - 2 - R if finetune else rows, num_registers=R,
                                layout="finetune" if finetune else "pretrain",
                                freq_dim=shape(f"{A}time_embedding.0.weight")[1], eps=base.action.eps)
    und = UndExpertConfig(dim=shape(f"{U}blocks.0.wan_und_qkv")[2], ffn_dim=shape(f"{U}blocks.0.ffn.0.weight")[0],
                          vlm_dim=shape(f"{U}vlm_adapter.0.weight")[1], eps=base.und.eps)
    if dim != N * hd:
        raise CheckpointError(f"video dim {dim} != heads {N} x head_dim {hd} (from {A}blocks.0.wan_action_qkv)")
    return MotusConfig(num_layers=num_layers, video=video, action=action, und=und, flow=base.flow)


# ---- entry points ----------------------------------------------------------------------------------------
def load_upstream(path: str | Path, config: Optional[MotusConfig] = None, dtype: Optional[torch.dtype] = None,
                  upstream_config: Optional[str | Path | dict] = None):
    """Build a Motus from an official checkpoint. The config comes from `config`, else from `upstream_config`
    (upstream config JSON values), else is inferred from the tensor shapes (eps from the motus-8b preset)."""
    from motus_fast.model import Motus

    sd = canonical_state_dict(read_checkpoint(path))
    if config is None:
        if upstream_config is not None:
            if not isinstance(upstream_config, dict):
                upstream_config = json.loads(Path(upstream_config).read_text())
            config = config_from_upstream_json(upstream_config)
        else:
            config = infer_config(sd)
    with torch.device("meta"):
        model = Motus(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours = convert_state_dict(sd, config, expected)
    # one dtype for the whole model: the one asked for, else the stored weights' (bf16 in official files)
    dtype = dtype or ours["video.patch_embed.weight"].dtype
    ours = {k: v.to(dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model
