"""The frozen public backbones around Motus: Qwen3-VL-2B (und stream), umT5-XXL encoder (text context) and the
Wan2.2 VAE (video latents), loaded from the folders users download, strictly.

- Qwen3-VL and umT5 load through transformers ``from_pretrained(local_dir)``; the Wan2.2 VAE through diffusers
  ``AutoencoderKLWan`` (its ``config.json`` + weights; built on the meta device and assigned tensor by tensor, so it
  needs no ``accelerate``). A diffusers pipeline folder (``model_index.json``) is accepted too: its
  ``text_encoder/`` or ``vae/`` sub-folder is used. The original Wan release's umT5 encoder
  (``models_t5_umt5-xxl-enc-bf16.pth``) is mapped onto ``UMT5EncoderModel``; its ``Wan2.2_VAE.pth`` is not mapped
  yet (use the diffusers ``vae/`` folder).
- Before a library sees the files we open them ourselves (headers only): a missing shard or a truncated file fails
  naming the file. After loading, every missing, unexpected or mis-shaped tensor is an error naming the key (the
  libraries would re-initialise it at random and only warn).
- Every backbone comes back frozen (``requires_grad=False``), in eval mode, in the dtype asked for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from motus_fast.weights.mapping import CheckpointError, Rule, convert, report
from motus_fast.weights.sources import TORCH_SUFFIXES, open_weights

log = logging.getLogger("motus_fast")

Tensor = torch.Tensor


# ---- shared plumbing -------------------------------------------------------------------------------------
def component_dir(path: str | Path, what: str, subfolder: Optional[str] = None) -> Path:
    """The folder holding one model: `path` itself, or `path`/`subfolder` when `path` is a diffusers pipeline
    folder (it has ``model_index.json``). Refuses a single torch file by name, saying which folder to use."""
    p = Path(path)
    if p.is_file() and p.suffix in TORCH_SUFFIXES:
        hint = f" (e.g. the {subfolder}/ folder of Wan2.2-TI2V-5B-Diffusers)" if subfolder else ""
        raise CheckpointError(f"{p}: a single {p.suffix} file; {what} loads from a folder with config.json and "
                              f"safetensors weights{hint}")
    if subfolder and p.is_dir() and (p / "model_index.json").is_file() and (p / subfolder).is_dir():
        p = p / subfolder
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory ({what} loads from a folder with config.json and weights)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p / 'config.json'}: not found ({what} needs its config.json)")
    return p


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def check_files(folder: Path):
    """Open the weights in `folder` (headers only) so that a missing shard or a truncated file is reported by
    name before a library reads them. Returns {key: file name} for naming keys in later errors."""
    with open_weights(folder, prefer=("model", "diffusion_pytorch_model")) as src:
        return {k: src.where(k) for k in src.keys()}


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def _transformers_load(cls, folder: Path, dtype: torch.dtype, what: str):
    files = check_files(folder)
    try:
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: {what} cannot be loaded by transformers ({type(e).__name__}: {e})") from e
    where = lambda k: f"{k} (in {files[k]})" if k in files else k  # noqa: E731
    misshaped = [f"{where(k)}: checkpoint {list(c)}, model expects {list(m)}"
                 for k, c, m in sorted(info.get("mismatched_keys", ()))]
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing or unexpected or misshaped or info.get("error_msgs"):
        msg = report(missing, [where(k) for k in unexpected], misshaped,
                     f"{folder}: {what} checkpoint does not match its config.json:")
        raise CheckpointError("\n".join([msg, *info.get("error_msgs", [])]))
    return freeze(model)


# ---- Qwen3-VL --------------------------------------------------------------------------------------------
def load_qwen3_vl(path: str | Path, dtype: torch.dtype = torch.bfloat16, device=None):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``, as upstream) from a local folder: frozen, eval, `dtype`."""
    from transformers import Qwen3VLForConditionalGeneration

    folder = component_dir(path, "Qwen3-VL")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "qwen3_vl":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {model_type!r} is not 'qwen3_vl'")
    model = _transformers_load(Qwen3VLForConditionalGeneration, folder, dtype, "Qwen3-VL")
    return model if device is None else model.to(device)


def load_vlm_extractor(path: str | Path, dtype: torch.dtype = torch.bfloat16, device=None):
    """``VLMFeatureExtractor`` around the Qwen3-VL at `path`."""
    from motus_fast.model.vlm import VLMFeatureExtractor
    return VLMFeatureExtractor(load_qwen3_vl(path, dtype, device))


# ---- umT5 ------------------------------------------------------------------------------------------------
def load_umt5(path: str | Path, dtype: torch.dtype = torch.bfloat16, device=None, progress: bool = True):
    """The umT5 encoder as transformers ``UMT5EncoderModel``: frozen, eval, `dtype`. `path`: a transformers folder
    (e.g. ``text_encoder/`` of Wan2.2-TI2V-5B-Diffusers, or that pipeline folder), or the original Wan release's
    ``models_t5_umt5-xxl-enc-bf16.pth`` (mapped, see ``wan_t5_rules``)."""
    from transformers import UMT5EncoderModel

    p = Path(path)
    if p.is_file() and p.suffix in TORCH_SUFFIXES:
        model = _load_wan_t5(p, dtype, progress)
    else:
        folder = component_dir(p, "the umT5 encoder", "text_encoder")
        model_type = read_json(folder / "config.json").get("model_type")
        if model_type not in ("umt5", "t5"):
            raise CheckpointError(f"{folder / 'config.json'}: model_type {model_type!r} is not 'umt5'")
        model = _transformers_load(UMT5EncoderModel, folder, dtype, "umT5 encoder")
    return model if device is None else model.to(device)


def wan_t5_rules(num_layers: int) -> list[Rule]:
    """transformers ``UMT5EncoderModel`` keys <- the original Wan T5 encoder's (``wan/modules/t5.py``): the same
    network (RMS norms, unscaled attention with a per-layer bidirectional relative bias of max distance 128,
    gated-GELU(tanh) FFN ``fc2(fc1(x) * gelu(gate(x)))``), other names."""
    R = [Rule("shared.weight", ("token_embedding.weight",)), Rule("encoder.final_layer_norm.weight", ("norm.weight",))]
    for i in range(num_layers):
        hf, wan = f"encoder.block.{i}.layer", f"blocks.{i}"
        R += [Rule(f"{hf}.0.SelfAttention.{n}.weight", (f"{wan}.attn.{n}.weight",)) for n in "qkvo"]
        R += [Rule(f"{hf}.0.SelfAttention.relative_attention_bias.weight",
                   (f"{wan}.pos_embedding.embedding.weight",)),
              Rule(f"{hf}.0.layer_norm.weight", (f"{wan}.norm1.weight",)),
              Rule(f"{hf}.1.DenseReluDense.wi_0.weight", (f"{wan}.ffn.gate.0.weight",)),
              Rule(f"{hf}.1.DenseReluDense.wi_1.weight", (f"{wan}.ffn.fc1.weight",)),
              Rule(f"{hf}.1.DenseReluDense.wo.weight", (f"{wan}.ffn.fc2.weight",)),
              Rule(f"{hf}.1.layer_norm.weight", (f"{wan}.norm2.weight",))]
    return R


def _load_wan_t5(p: Path, dtype: torch.dtype, progress: bool):
    """The original Wan T5 encoder .pth: sizes read from the tensor shapes (the file has no config), built on the
    meta device and assigned from the memory-mapped file."""
    from transformers import UMT5Config, UMT5EncoderModel

    with open_weights(p) as src:
        keys = set(src.keys())
        for key in ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                    "blocks.0.pos_embedding.embedding.weight"):
            if key not in keys:
                raise CheckpointError(f"{p}: no {key!r}; not an original Wan umT5 encoder checkpoint (a transformers "
                                      "folder loads as such)")
        vocab, dim = src.shape("token_embedding.weight")
        dim_attn = src.shape("blocks.0.attn.q.weight")[0]
        buckets, heads = src.shape("blocks.0.pos_embedding.embedding.weight")
        layers = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        cfg = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads,
                         d_ff=src.shape("blocks.0.ffn.fc1.weight")[0],
                         num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                         relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                         dropout_rate=0.0)
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg)
        tied = set(UMT5EncoderModel._tied_weights_keys)           # encoder.embed_tokens is `shared`: one copy
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
        tensors = convert(src, wan_t5_rules(layers), expected, None, dtype, progress="umt5" if progress else None,
                          header=f"{p}: Wan umT5 encoder checkpoint does not match the sizes read from it:")
    result = model.load_state_dict(tensors, strict=False, assign=True)
    assert set(result.missing_keys) == tied and not result.unexpected_keys, result
    model.tie_weights()
    return freeze(model)


@torch.no_grad()
def umt5_features(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Wan's text context: encoder states of the real tokens, padding rows set to zero (Wan trims each prompt to
    its length and zero-pads to ``text_len``). input_ids / attention_mask: [B, L] right-padded, as the tokenizer
    returns them -> (context [B, L, d_model], lens [B])."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return states * attention_mask[..., None].to(states.dtype), attention_mask.sum(dim=1)


# ---- Wan2.2 VAE ------------------------------------------------------------------------------------------
def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device=None, progress: bool = True):
    """The Wan2.2 VAE as diffusers ``AutoencoderKLWan`` from a local folder (``vae/`` of Wan2.2-TI2V-5B-Diffusers):
    frozen, eval, `dtype`. Built on the meta device and filled tensor by tensor from the memory-mapped weights."""
    from diffusers import AutoencoderKLWan

    folder = component_dir(path, "the Wan VAE", "vae")
    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name") != "AutoencoderKLWan":
        raise CheckpointError(f"{folder / 'config.json'}: _class_name {cfg.get('_class_name')!r} is not "
                              "'AutoencoderKLWan'")
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(cfg)
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    rules = [Rule(k, (k,)) for k in expected]
    with open_weights(folder, prefer=("diffusion_pytorch_model",)) as src:
        tensors = convert(src, rules, expected, None, dtype, progress="vae" if progress else None,
                          header=f"{folder}: Wan VAE checkpoint does not match its config.json:")
    vae.load_state_dict(tensors, strict=True, assign=True)
    vae = freeze(vae)
    return vae if device is None else vae.to(device)


# ---- the three together, as the data pipeline and the server use them ------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def umt5_tokenizer_dir(t5: str | Path) -> Path:
    """Where umT5's tokenizer lives for an encoder at `t5`: the folder itself, a diffusers pipeline's
    ``tokenizer/`` (beside ``text_encoder/``), or the original Wan release's ``google/umt5-xxl/`` beside its .pth."""
    p = Path(t5)
    base = p.parent if p.is_file() else p
    candidates = [base, base / "tokenizer", base.parent / "tokenizer", base / "google" / "umt5-xxl"]
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in TOKENIZER_FILES):
            return c
    raise CheckpointError(f"{p}: no umT5 tokenizer found (looked in {', '.join(str(c) for c in candidates)}); "
                          "pass its folder as t5_tokenizer")


def qwen3_vl_chat_template(folder: Path, tokenizer) -> str:
    """The chat template: the tokenizer's, else chat_template.jinja / chat_template.json in the model folder."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return read_json(folder / "chat_template.json")["chat_template"]
    raise CheckpointError(f"{folder}: no chat template (tokenizer_config.json, chat_template.jinja or "
                          "chat_template.json)")


def load_frozen_encoders(vae: str | Path, t5: str | Path, vlm: str | Path, *, t5_tokenizer: str | Path | None = None,
                         dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32, device=None,
                         text_max_length: int = 512, progress: bool = True):
    """The Wan2.2 VAE, the umT5 encoder and Qwen3-VL from local folders as ``motus_fast.data.encoders.Encoders``:
    what ``BatchEncoder`` runs in training and ``motus_fast.infer.FrozenEncoders`` in serving. Tokenizers and the
    image processor come from the same folders (see ``umt5_tokenizer_dir``); upstream's chat prompt is used."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from motus_fast.data.encoders import (Encoders, HFTokenize, Qwen3VLChatPrompt, Qwen3VLFeatures,
                                          UMT5TextEncoder, WanVAE)

    video_vae = WanVAE(load_wan_vae(vae, vae_dtype, device, progress))
    tokenizer = AutoTokenizer.from_pretrained(str(t5_tokenizer or umt5_tokenizer_dir(t5)))
    text = UMT5TextEncoder(load_umt5(t5, dtype, device, progress), HFTokenize(tokenizer), text_max_length)
    folder = component_dir(vlm, "Qwen3-VL")
    vlm_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = Qwen3VLChatPrompt(vlm_tokenizer, Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
                               chat_template=qwen3_vl_chat_template(folder, vlm_tokenizer))
    return Encoders(vae=video_vae, text=text, vlm=Qwen3VLFeatures(load_qwen3_vl(vlm, dtype, device), prompt))


def summary(kind: str, path: str | Path, model: nn.Module) -> dict:
    """What a stage checkpoint records about a backbone: where it is and the sizes Motus depends on."""
    cfg = model.config
    out = {"path": str(Path(path).resolve()), "class": type(model).__name__,
           "parameters": sum(p.numel() for p in model.parameters())}
    if kind == "vlm":
        out["hidden_size"] = cfg.text_config.hidden_size
    elif kind == "t5":
        out["d_model"] = cfg.d_model
    elif kind == "vae":
        out["z_dim"] = cfg.z_dim
        out["scale_factor_spatial"], out["scale_factor_temporal"] = cfg.scale_factor_spatial, cfg.scale_factor_temporal
    return out
