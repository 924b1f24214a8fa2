"""Tiny backbones in the real public folder layouts, written by the real libraries, plus a tiny official-format
Motus checkpoint (DeepSpeed ``module`` wrapper, alias prefixes, the frozen VLM under ``vlm_model.``).

Sizes fit the `tiny` preset of the Motus fixture (latent channels 48, text_dim 64, vlm_dim 96). The VAE is the
release-format fixture file ``upstream_wan22_tiny/Wan2.2_VAE.pth``; umT5 and Qwen3-VL are random.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(os.environ.get("MOTUS_FIXTURES", Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"))
WORDS = ["<unk>", "<pad>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "pick", "up", "the", "cube",
         "open", "drawer", "push", "button", "red", "blue"]
QWEN_SPECIAL = {"<|image_pad|>": 990, "<|video_pad|>": 991, "<|vision_start|>": 992, "<|vision_end|>": 993}
CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(special=None, eos: bool = False):
    """An in-process word-level fast tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update(special or {})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:                                  # umT5 appends EOS
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   additional_special_tokens=list(special or {}))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def tiny_umt5(d_model: int = 64, seed: int = 1):
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(vocab_size=len(WORDS), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return randomize_(UMT5EncoderModel(cfg), seed).eval()


def umt5_to_release(sd: dict) -> dict:
    """transformers UMT5EncoderModel keys -> the release's wan/modules/t5.py names (spelled out independently)."""
    leaf = {"0.SelfAttention.q": "attn.q", "0.SelfAttention.k": "attn.k", "0.SelfAttention.v": "attn.v",
            "0.SelfAttention.o": "attn.o", "0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
            "0.layer_norm": "norm1", "1.DenseReluDense.wi_0": "ffn.gate.0", "1.DenseReluDense.wi_1": "ffn.fc1",
            "1.DenseReluDense.wo": "ffn.fc2", "1.layer_norm": "norm2"}
    out = {"token_embedding.weight": sd["shared.weight"].to(torch.bfloat16),
           "norm.weight": sd["encoder.final_layer_norm.weight"].to(torch.bfloat16)}
    for key, t in sd.items():
        if key.startswith("encoder.block."):
            _, _, i, _, rest = key.split(".", 4)
            out[f"blocks.{i}.{leaf[rest.removesuffix('.weight')]}.weight"] = t.to(torch.bfloat16).clone()
    return out


def tiny_qwen3_vl(hidden: int = 96, seed: int = 2):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vcfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1])
    tcfg = dict(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                           "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(text_config=tcfg, vision_config=vcfg, image_token_id=990, video_token_id=991,
                        vision_start_token_id=992, vision_end_token_id=993, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return randomize_(Qwen3VLForConditionalGeneration(cfg), seed).eval()


def write_qwen_folder(folder: Path, model, tokenizer: bool = True) -> Path:
    """A Qwen3-VL folder as transformers writes it: config + weights, tokenizer with the chat template, image
    processor."""
    from transformers import Qwen2VLImageProcessorPil
    model.save_pretrained(folder)
    if tokenizer:
        tok = word_tokenizer(QWEN_SPECIAL)
        tok.chat_template = CHAT
        tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                             max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def write_wan_original(folder: Path, umt5) -> Path:
    """The original release layout: Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/."""
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "upstream_wan22_tiny" / "Wan2.2_VAE.pth", folder / "Wan2.2_VAE.pth")
    torch.save(umt5_to_release(umt5.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    word_tokenizer(eos=True).save_pretrained(folder / "google" / "umt5-xxl")
    return folder


def write_wan_diffusers(folder: Path, umt5) -> Path:
    """The diffusers layout of the same weights: model_index.json, vae/, text_encoder/, tokenizer/ (the VAE
    converted once with our loader and written by diffusers; umT5 written by transformers, in bf16 as released)."""
    from motus_fast.encoders import load_wan_vae
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    load_wan_vae(FIXTURES / "upstream_wan22_tiny" / "Wan2.2_VAE.pth", progress=False).save_pretrained(folder / "vae")
    umt5.to(torch.bfloat16).save_pretrained(folder / "text_encoder")
    umt5.float()
    word_tokenizer(eos=True).save_pretrained(folder / "tokenizer")
    return folder


def write_official_motus(folder: Path, vlm) -> Path:
    """An official-format Motus checkpoint: the fixture's upstream state dict (alias prefixes included) plus the
    frozen VLM under vlm_model. (and its alias und_module.vlm_model., sharing storage), wrapped as DeepSpeed does."""
    folder.mkdir(parents=True)
    sd = load_file(str(FIXTURES / "upstream_motus_tiny" / "model.safetensors"))
    for k, v in vlm.state_dict().items():
        sd[f"vlm_model.{k}"] = v
        sd[f"und_module.vlm_model.{k}"] = v
    torch.save({"module": sd}, folder / "mp_rank_00_model_states.pt")
    return folder


def build_stack(root: Path) -> dict:
    umt5 = tiny_umt5()
    trained_vlm, folder_vlm = tiny_qwen3_vl(seed=2), tiny_qwen3_vl(seed=3)
    return {"ckpt": write_official_motus(root / "motus", trained_vlm),
            "wan_original": write_wan_original(root / "Wan2.2-TI2V-5B", umt5),
            "wan_diffusers": write_wan_diffusers(root / "Wan2.2-TI2V-5B-Diffusers", umt5),
            "qwen": write_qwen_folder(root / "Qwen3-VL-2B-Instruct", folder_vlm),
            "trained_vlm": trained_vlm, "folder_vlm": folder_vlm, "umt5": umt5}
