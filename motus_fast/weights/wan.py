"""Load a pretrained Wan2.2 video DiT (TI2V-5B) into our video expert, from either public layout.

- **original** (the Wan2.2 release, ``WanModel``): ``config.json`` (``dim``, ``num_heads``, ``in_dim`` ...) and
  ``diffusion_pytorch_model*.safetensors`` (+ index json), keys ``patch_embedding``, ``text_embedding.0``,
  ``time_embedding.0``, ``time_projection.1``, ``blocks.i.{modulation, self_attn.{q,k,v,o,norm_q,norm_k}, norm3,
  cross_attn.*, ffn.0/2}``, ``head.{head, modulation}``. The same names sit under ``video_model.wan_model.`` in
  upstream Motus checkpoints (``motus_fast.weights.upstream`` reuses these rules).
- **diffusers** (``WanTransformer3DModel``, the ``transformer/`` folder of ``Wan2.2-TI2V-5B-Diffusers``):
  ``condition_embedder.{time_embedder.linear_1/2, time_proj, text_embedder.linear_1/2}``,
  ``blocks.i.{scale_shift_table, attn1.{to_q,to_k,to_v,to_out.0,norm_q,norm_k}, norm2 (the affine cross-attention
  norm, Wan's norm3), attn2.*, ffn.net.0.proj / ffn.net.2}``, ``proj_out``, ``scale_shift_table``.

Both are mapped strictly (every tensor used exactly once, every shape checked before any data is read) and lazily
(tensor by tensor from memory-mapped shards into a model built on the meta device).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from motus_fast.config import MotusConfig, VideoExpertConfig
from motus_fast.weights.mapping import CheckpointError, Rule, convert, linear_rules, mlp_rules
from motus_fast.weights.sources import find_weights_file, open_weights

log = logging.getLogger("motus_fast")

ORIGINAL, DIFFUSERS = "original", "diffusers"


# ---- key maps --------------------------------------------------------------------------------------------
def original_rules(num_layers: int, prefix: str = "") -> list[Rule]:
    """Our video-expert keys <- original Wan (``WanModel``) keys, optionally under `prefix`."""
    V = prefix
    R = [Rule("video.patch_embed.weight", (f"{V}patch_embedding.weight",), "patch"),
         Rule("video.patch_embed.bias", (f"{V}patch_embedding.bias",))]
    R += mlp_rules("video.text_embed", f"{V}text_embedding", (0, 2)) + mlp_rules("video.time.embed",
                                                                                  f"{V}time_embedding", (0, 2))
    R += linear_rules("video.time.project.1", f"{V}time_projection.1")
    R += [Rule("video.head_modulation", (f"{V}head.modulation",))] + linear_rules("video.head", f"{V}head.head")
    for i in range(num_layers):
        b, v = f"blocks.{i}.video", f"{V}blocks.{i}"
        R += [Rule(f"{b}.modulation", (f"{v}.modulation",))]
        for wb in ("weight", "bias"):
            R += [Rule(f"{b}.qkv.{wb}", tuple(f"{v}.self_attn.{n}.{wb}" for n in "qkv"), "cat"),
                  Rule(f"{b}.cross_attn.kv.{wb}", tuple(f"{v}.cross_attn.{n}.{wb}" for n in "kv"), "cat")]
        R += linear_rules(f"{b}.o", f"{v}.self_attn.o") + linear_rules(f"{b}.cross_norm", f"{v}.norm3")
        R += linear_rules(f"{b}.cross_attn.q", f"{v}.cross_attn.q") + linear_rules(f"{b}.cross_attn.o",
                                                                                    f"{v}.cross_attn.o")
        for n in ("q", "k"):
            R += [Rule(f"{b}.norm_{n}.weight", (f"{v}.self_attn.norm_{n}.weight",)),
                  Rule(f"{b}.cross_attn.norm_{n}.weight", (f"{v}.cross_attn.norm_{n}.weight",))]
        R += mlp_rules(f"{b}.ffn", f"{v}.ffn", (0, 2))
    return R


def diffusers_rules(num_layers: int) -> list[Rule]:
    """Our video-expert keys <- diffusers ``WanTransformer3DModel`` keys."""
    C = "condition_embedder"
    R = [Rule("video.patch_embed.weight", ("patch_embedding.weight",), "patch"),
         Rule("video.patch_embed.bias", ("patch_embedding.bias",))]
    R += linear_rules("video.text_embed.0", f"{C}.text_embedder.linear_1")
    R += linear_rules("video.text_embed.2", f"{C}.text_embedder.linear_2")
    R += linear_rules("video.time.embed.0", f"{C}.time_embedder.linear_1")
    R += linear_rules("video.time.embed.2", f"{C}.time_embedder.linear_2")
    R += linear_rules("video.time.project.1", f"{C}.time_proj")
    R += [Rule("video.head_modulation", ("scale_shift_table",))] + linear_rules("video.head", "proj_out")
    for i in range(num_layers):
        b, d = f"blocks.{i}.video", f"blocks.{i}"
        R += [Rule(f"{b}.modulation", (f"{d}.scale_shift_table",))]
        for wb in ("weight", "bias"):
            R += [Rule(f"{b}.qkv.{wb}", tuple(f"{d}.attn1.to_{n}.{wb}" for n in "qkv"), "cat"),
                  Rule(f"{b}.cross_attn.kv.{wb}", tuple(f"{d}.attn2.to_{n}.{wb}" for n in "kv"), "cat")]
        R += linear_rules(f"{b}.o", f"{d}.attn1.to_out.0") + linear_rules(f"{b}.cross_norm", f"{d}.norm2")
        R += linear_rules(f"{b}.cross_attn.q", f"{d}.attn2.to_q") + linear_rules(f"{b}.cross_attn.o",
                                                                                  f"{d}.attn2.to_out.0")
        for n in ("q", "k"):
            R += [Rule(f"{b}.norm_{n}.weight", (f"{d}.attn1.norm_{n}.weight",)),
                  Rule(f"{b}.cross_attn.norm_{n}.weight", (f"{d}.attn2.norm_{n}.weight",))]
        R += linear_rules(f"{b}.ffn.0", f"{d}.ffn.net.0.proj") + linear_rules(f"{b}.ffn.2", f"{d}.ffn.net.2")
    return R


def is_video_key(key: str) -> bool:
    """Whether one of our state-dict keys belongs to the video expert."""
    parts = key.split(".")
    return parts[0] == "video" or (parts[0] == "blocks" and parts[2] == "video")


# ---- reading a checkpoint --------------------------------------------------------------------------------
@dataclass(frozen=True)
class WanCheckpoint:
    """A located Wan checkpoint: its weights (file or index), config.json, layout and the sizes it implies."""

    weights: Path
    config_path: Path
    layout: str
    num_layers: int
    video: VideoExpertConfig

    def motus_config(self, base: Optional[MotusConfig] = None) -> MotusConfig:
        """`base` (default: the motus-8b preset) with the layer count and video expert of this checkpoint."""
        return dataclasses.replace(base or MotusConfig(), num_layers=self.num_layers, video=self.video)


def locate_wan(path: str | Path) -> WanCheckpoint:
    """Find the weights and config.json of a Wan checkpoint and read its configuration (no tensor data is read).

    `path`: a directory (original release folder, diffusers ``transformer/`` folder, or a diffusers pipeline folder
    with ``model_index.json``, whose ``transformer/`` is used), an index json, or a weights file with config.json
    beside it.
    """
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file() and (p / "transformer").is_dir():
        p = p / "transformer"
    folder = p if p.is_dir() else p.parent
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found; a Wan checkpoint needs its config.json (the number of heads "
                              "cannot be read from the tensor shapes)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    layout, num_layers, video = video_config_from_json(cfg, str(cfg_path))
    weights = p
    if p.is_dir():
        weights = find_weights_file(p, ("diffusion_pytorch_model", "model"))
    return WanCheckpoint(weights, cfg_path, layout, num_layers, video)


def video_config_from_json(cfg: dict, where: str = "config.json") -> tuple[str, int, VideoExpertConfig]:
    """(layout, num_layers, video expert config) from an original ``WanModel`` or a diffusers
    ``WanTransformer3DModel`` config.json. Features our video expert does not have are refused by name."""
    cls = cfg.get("_class_name")

    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{where}: field {key!r} is missing")
        return cfg[key]

    def refuse(cond: bool, what: str):
        if cond:
            raise CheckpointError(f"{where}: {what}; the Motus video expert is Wan2.2-TI2V style (text-conditioned, "
                                  "full attention, q/k RMSNorm over all heads, affine cross-attention norm)")

    if cls == "WanTransformer3DModel" or "num_attention_heads" in cfg:
        refuse(cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None,
               "image conditioning (image_dim / added_kv_proj_dim, Wan I2V) is not supported")
        refuse(cfg.get("pos_embed_seq_len") is not None, "pos_embed_seq_len is not supported")
        refuse(cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads",
               f"qk_norm={cfg.get('qk_norm')!r} is not supported")
        refuse(not cfg.get("cross_attn_norm", True), "cross_attn_norm=false is not supported")
        heads, head_dim = need("num_attention_heads"), need("attention_head_dim")
        video = VideoExpertConfig(dim=heads * head_dim, ffn_dim=need("ffn_dim"), num_heads=heads,
                                  in_channels=need("in_channels"),
                                  out_channels=cfg.get("out_channels") or cfg["in_channels"],
                                  patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), freq_dim=cfg.get("freq_dim", 256),
                                  text_dim=cfg.get("text_dim", 4096), text_len=512, eps=cfg.get("eps", 1e-6))
        return DIFFUSERS, need("num_layers"), video
    if cls == "WanModel" or "num_heads" in cfg:
        refuse(cfg.get("model_type", "ti2v") in ("i2v", "flf2v", "vace"),
               f"model_type={cfg.get('model_type')!r} (image/CLIP conditioning) is not supported")
        refuse(not cfg.get("qk_norm", True), "qk_norm=false is not supported")
        refuse(not cfg.get("cross_attn_norm", True), "cross_attn_norm=false is not supported")
        refuse(tuple(cfg.get("window_size", (-1, -1))) != (-1, -1), "local attention (window_size) is not supported")
        video = VideoExpertConfig(dim=need("dim"), ffn_dim=need("ffn_dim"), num_heads=need("num_heads"),
                                  in_channels=need("in_dim"), out_channels=need("out_dim"),
                                  patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), freq_dim=cfg.get("freq_dim", 256),
                                  text_dim=cfg.get("text_dim", 4096), text_len=cfg.get("text_len", 512),
                                  eps=cfg.get("eps", 1e-6))
        return ORIGINAL, need("num_layers"), video
    raise CheckpointError(f"{where}: neither a WanModel nor a WanTransformer3DModel config (_class_name={cls!r})")


def detect_layout(keys) -> Optional[str]:
    keys = set(keys)
    if "condition_embedder.time_proj.weight" in keys or "blocks.0.attn1.to_q.weight" in keys:
        return DIFFUSERS
    if "time_projection.1.weight" in keys or "blocks.0.self_attn.q.weight" in keys:
        return ORIGINAL
    return None


def load_wan_video(model, path: str | Path, dtype: Optional[torch.dtype] = None,
                   progress: bool = True) -> WanCheckpoint:
    """Assign the video expert of `model` (a ``Motus``, typically built on the meta device) from the Wan checkpoint
    at `path`, in `dtype` (None: as stored). The other experts are left untouched. Strict: raises
    ``CheckpointError`` naming every missing, unexpected or mis-shaped tensor and the file it is in, and for a
    configuration that differs from ``model.cfg.video`` the fields that differ.

    Tensors already stored in `dtype` that need no fusing stay copy-on-write memory maps of the shard files (no
    second copy in RAM; do not overwrite those files in place while the model is alive)."""
    ckpt = locate_wan(path)
    cfg = model.cfg
    ours = dataclasses.replace(cfg.video, text_len=ckpt.video.text_len)
    if ours != ckpt.video or cfg.num_layers != ckpt.num_layers:
        diff = [f"{f.name}: checkpoint {getattr(ckpt.video, f.name)!r}, model {getattr(ours, f.name)!r}"
                for f in dataclasses.fields(VideoExpertConfig) if getattr(ours, f.name) != getattr(ckpt.video, f.name)]
        if cfg.num_layers != ckpt.num_layers:
            diff.append(f"num_layers: checkpoint {ckpt.num_layers}, model {cfg.num_layers}")
        raise CheckpointError(f"{ckpt.config_path}: the Wan configuration differs from the model's: " + "; ".join(diff))
    rules = original_rules(ckpt.num_layers) if ckpt.layout == ORIGINAL else diffusers_rules(ckpt.num_layers)
    expected = {k: v.shape for k, v in model.state_dict().items() if is_video_key(k)}
    with open_weights(ckpt.weights) as src:
        found = detect_layout(src.keys())
        if found is not None and found != ckpt.layout:
            raise CheckpointError(f"{ckpt.weights}: the tensors are in the {found} layout but {ckpt.config_path} "
                                  f"describes the {ckpt.layout} layout")
        # one dtype for the whole expert: the one asked for, else the stored patch embedding's
        patch_key = rules[0].sources[0]
        if dtype is None and patch_key in src.keys():
            dtype = src.dtype(patch_key)
        tensors = convert(src, rules, expected, cfg, dtype, progress="wan" if progress else None,
                          header=f"{ckpt.weights}: Wan checkpoint ({ckpt.layout} layout) does not match the video "
                                 "expert:")
    result = model.load_state_dict(tensors, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys  # convert() returns exactly our video keys
    log.info("loaded the Wan video expert (%s layout, %d layers, %.2fB parameters) from %s", ckpt.layout,
             ckpt.num_layers, sum(math.prod(s) for s in expected.values()) / 1e9, ckpt.weights)
    return ckpt
