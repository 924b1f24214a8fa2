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
from pathlib import Path
from typing import Optional

import torch

from motus_fast.config import ActionExpertConfig, MotusConfig, UndExpertConfig, VideoExpertConfig
from motus_fast.weights.mapping import CheckpointError, Rule, convert, report
from motus_fast.weights.mapping import linear_rules as _linear
from motus_fast.weights.mapping import mlp_rules as _mlp
from motus_fast.weights.sources import DictSource
from motus_fast.weights.wan import original_rules

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


def upstream_vlm_state_dict(sd: dict[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The frozen Qwen3-VL an official checkpoint carries (``vlm_model.*`` and its alias prefixes), by transformers'
    ``Qwen3VLForConditionalGeneration`` key names; aliases must hold the same tensor. {} when there is none."""
    out: dict[str, torch.Tensor] = {}
    for prefix in VLM_PREFIXES:          # the owner first: aliases are checked against it
        for key, t in sd.items():
            if not key.startswith(prefix):
                continue
            k = key[len(prefix):]
            if k not in out:
                out[k] = t
            elif out[k].data_ptr() != t.data_ptr() and (out[k].shape != t.shape or not torch.equal(out[k], t)):
                raise CheckpointError(f"{name}: {key!r} holds a different tensor than {VLM_PREFIXES[0] + k!r}")
    return out


# ---- the key map -----------------------------------------------------------------------------------------
def key_map(cfg: MotusConfig) -> list[Rule]:
    """Every parameter/buffer of our model and the upstream key(s) it comes from."""
    R = original_rules(cfg.num_layers, VIDEO)   # the video expert is a Wan2.2 model under its original key names
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
        b, a, u = f"blocks.{i}", f"{A}blocks.{i}", f"{UND}blocks.{i}"
        for n in ("q", "k"):
            R += [Rule(f"{b}.action.norm_{n}.weight", (f"{a}.wan_action_norm_{n}.weight",)),
                  Rule(f"{b}.und.norm_{n}.weight", (f"{u}.wan_und_norm_{n}.weight",))]
        R += [Rule(f"{b}.action.modulation", (f"{a}.modulation",)),
              Rule(f"{b}.action.qkv.weight", (f"{a}.wan_action_qkv",), "heads"),
              Rule(f"{b}.action.o.weight", (f"{a}.wan_action_o.weight",))] + _mlp(f"{b}.action.ffn", f"{a}.ffn", (0, 2))
        R += [Rule(f"{b}.und.qkv.weight", (f"{u}.wan_und_qkv",), "heads"),
              Rule(f"{b}.und.o.weight", (f"{u}.wan_und_o.weight",))] + _mlp(f"{b}.und.ffn", f"{u}.ffn", (0, 2))
    return R


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: MotusConfig,
                       expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map a canonical upstream state dict onto our keys. `expected`: our state dict's shapes. Strict."""
    return convert(DictSource(sd, "upstream checkpoint"), key_map(cfg), expected, cfg,
                   header="upstream checkpoint does not match the model configuration:")


def _report(missing, unexpected, misshaped, limit: int = 20) -> str:
    return report(missing, unexpected, misshaped, "upstream checkpoint does not match the model configuration:",
                  limit)


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
def upstream_model_config(sd: dict[str, torch.Tensor], upstream_config: Optional[str | Path | dict] = None):
    """MotusConfig of a canonical upstream state dict: from upstream config JSON values when given, else inferred
    from the tensor shapes."""
    if upstream_config is None:
        return infer_config(sd)
    if not isinstance(upstream_config, dict):
        upstream_config = json.loads(Path(upstream_config).read_text())
    return config_from_upstream_json(upstream_config)


def header_config(path: str | Path, upstream_config: Optional[str | Path | dict] = None):
    """What an official checkpoint holds, without converting it: (MotusConfig, Motus parameter count, stored
    dtypes, number of VLM tensors). Tensors are memory-mapped, not read."""
    raw = read_checkpoint(path)
    n_vlm = sum(1 for k in raw if k.startswith(VLM_PREFIXES))
    sd = canonical_state_dict(raw)
    cfg = upstream_model_config(sd, upstream_config)
    n = sum(t.numel() for t in sd.values())
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
    return cfg, n, dtypes, n_vlm


def load_upstream(path: str | Path, config: Optional[MotusConfig] = None, dtype: Optional[torch.dtype] = None,
                  upstream_config: Optional[str | Path | dict] = None):
    """Build a Motus from an official checkpoint. The config comes from `config`, else from `upstream_config`
    (upstream config JSON values), else is inferred from the tensor shapes (eps from the motus-8b preset)."""
    from motus_fast.model import Motus

    sd = canonical_state_dict(read_checkpoint(path))
    config = config or upstream_model_config(sd, upstream_config)
    with torch.device("meta"):
        model = Motus(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours = convert_state_dict(sd, config, expected)
    # one dtype for the whole model: the one asked for, else the stored weights' (bf16 in official files)
    dtype = dtype or ours["video.patch_embed.weight"].dtype
    ours = {k: v.to(dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model
