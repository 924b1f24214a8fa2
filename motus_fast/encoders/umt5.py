"""umT5-XXL, the video expert's text encoder, as transformers ``UMT5EncoderModel``.

``load_umt5`` reads either public layout into the same transformers module:
- the original release file ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 encoder; no config, so the sizes are
  read from the tensor shapes), renamed onto transformers' keys (``wan_t5_rules``): the same network (RMS norms
  with eps 1e-6, attention without 1/sqrt(d) scaling, a relative-position bias table per layer with 32
  bidirectional buckets and max distance 128, gated-GELU(tanh) FFN ``fc2(fc1(x) * gelu(gate(x)))``);
- a transformers folder (``text_encoder/`` of Wan2.2-TI2V-5B-Diffusers, or the pipeline folder itself).

``UMT5TextEncoder`` adds the tokenizer and returns each text's states trimmed to its real tokens (EOS included), as
Wan's ``T5EncoderModel`` does; the bundle zero-pads them to ``text_len``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from motus_fast.encoders.files import component_dir, freeze, is_torch_file, read_json, transformers_load
from motus_fast.weights.mapping import CheckpointError, Rule, convert
from motus_fast.weights.sources import open_weights

Tensor = torch.Tensor
ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def resolve_umt5_path(path: str | Path) -> Path:
    """A ``.pth`` file, a transformers folder, a diffusers pipeline folder (its ``text_encoder/``) or an original
    release folder (its ``models_t5_umt5-xxl-enc-bf16.pth``)."""
    p = Path(path)
    if p.is_dir() and (p / ORIGINAL_T5_FILE).is_file():
        return p / ORIGINAL_T5_FILE
    if p.is_dir() and (p / "model_index.json").is_file() and (p / "text_encoder").is_dir():
        return p / "text_encoder"
    return p


def umt5_folder(path: Path) -> tuple[Path, dict]:
    """A transformers umT5 folder and its config, checked to be a (u)T5 encoder."""
    folder = component_dir(path, "the umT5 encoder", "text_encoder")
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") not in ("umt5", "t5"):
        raise CheckpointError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not 'umt5'")
    return folder, cfg


def load_umt5(path: str | Path, dtype: torch.dtype = torch.bfloat16, device=None, progress: bool = True):
    """The umT5 encoder as transformers ``UMT5EncoderModel``: frozen, eval, `dtype`, from either layout."""
    from transformers import UMT5EncoderModel

    p = resolve_umt5_path(path)
    if is_torch_file(p):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        model = _load_wan_t5(p, dtype, progress)
    else:
        folder, _ = umt5_folder(p)
        model = transformers_load(UMT5EncoderModel, folder, dtype, "umT5 encoder")
    return model if device is None else model.to(device)


def wan_t5_rules(num_layers: int) -> list[Rule]:
    """transformers ``UMT5EncoderModel`` keys <- the original Wan T5 encoder's (``wan/modules/t5.py``)."""
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


def original_t5_config(src, name: str):
    """``UMT5Config`` of an original Wan umT5 encoder file, read from its tensor shapes."""
    from transformers import UMT5Config

    keys = set(src.keys())
    for key in ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.pos_embedding.embedding.weight"):
        if key not in keys:
            raise CheckpointError(f"{name}: no {key!r}; not an original Wan umT5 encoder checkpoint (a transformers "
                                  "folder loads as such)")
    vocab, dim = src.shape("token_embedding.weight")
    dim_attn = src.shape("blocks.0.attn.q.weight")[0]
    buckets, heads = src.shape("blocks.0.pos_embedding.embedding.weight")
    layers = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    return UMT5Config(vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads, d_ff=src.shape("blocks.0.ffn.fc1.weight")[0],
                      num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                      dropout_rate=0.0)


def _load_wan_t5(p: Path, dtype: torch.dtype, progress: bool):
    """Built on the meta device and assigned from the memory-mapped file."""
    from transformers import UMT5EncoderModel

    with open_weights(p) as src:
        cfg = original_t5_config(src, str(p))
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg)
        tied = set(UMT5EncoderModel._tied_weights_keys)           # encoder.embed_tokens is `shared`: one copy
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
        tensors = convert(src, wan_t5_rules(cfg.num_layers), expected, None, dtype,
                          progress="umt5" if progress else None,
                          header=f"{p}: Wan umT5 encoder checkpoint does not match the sizes read from it:")
    result = model.load_state_dict(tensors, strict=False, assign=True)
    assert set(result.missing_keys) == tied and not result.unexpected_keys, result
    model.tie_weights()
    return freeze(model)


def umt5_tokenizer_dir(t5: str | Path) -> Path:
    """Where umT5's tokenizer lives for an encoder at `t5`: the folder itself, a diffusers pipeline's
    ``tokenizer/`` (beside ``text_encoder/``), or the original release's ``google/umt5-xxl/`` beside its .pth."""
    p = Path(t5)
    base = p.parent if p.is_file() or is_torch_file(p) else p
    candidates = [base, base / "tokenizer", base.parent / "tokenizer", base / "google" / "umt5-xxl"]
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in TOKENIZER_FILES):
            return c
    raise CheckpointError(f"{p}: no umT5 tokenizer found (looked for {' or '.join(TOKENIZER_FILES)} in "
                          f"{', '.join(str(c) for c in candidates)})")


class HFTokenize:
    """Adapts a transformers tokenizer to ``(texts, max_length) -> (input_ids, attention_mask)``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


class UMT5TextEncoder(nn.Module):
    """An encoder-only T5 (``UMT5EncoderModel``, or any module taking input_ids/attention_mask and returning
    ``last_hidden_state``) + a tokenizer -> per-text states trimmed to their real tokens."""

    def __init__(self, model: nn.Module, tokenize: Callable[[Sequence[str], int], tuple[Tensor, Tensor]],
                 max_length: int = 512):
        super().__init__()
        self.model = freeze(model)
        self.tokenize, self.max_length = tokenize, int(max_length)
        self.dim = int(model.config.d_model)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> list[Tensor]:
        if not texts:
            return []
        dev = next(self.model.parameters()).device
        ids, mask = self.tokenize(list(texts), self.max_length)
        states = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float()
        return [s[: int(n)] for s, n in zip(states, mask.sum(1))]
