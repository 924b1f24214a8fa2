"""Qwen3-VL, the frozen VLM in front of the understanding expert: the last hidden state of prompt + image tokens.

Upstream (``UndModule.extract_und_features``) embeds the prompt, scatters the vision tower's image features into the
image placeholder tokens, computes the multimodal RoPE positions and runs the language model with the DeepStack
visual features; the last hidden state (after the final norm) goes to the und adapter. transformers'
``Qwen3VLModel.forward`` is that same computation, so ``VLMFeatureExtractor`` calls it. Since transformers 5 the
M-RoPE positions need ``mm_token_type_ids`` (0 text, 1 image, 2 video); we derive them from the placeholder ids.

Weights: an official Motus checkpoint carries the Qwen3-VL it was trained with under ``vlm_model.`` (see
``motus_fast.weights.upstream.upstream_vlm_state_dict``); ``load_qwen3_vl(folder, weights=...)`` then takes only
the config, tokenizer, image processor and chat template from the Qwen3-VL folder and the weights from the
checkpoint, checking every shape against the folder's config.

Prompt: upstream's, one user message holding the image and the instruction, rendered with the chat template
(``add_generation_prompt=True``), the image placeholder expanded to one pad token per merged patch, as
``Qwen3VLProcessor`` does (built from the tokenizer and image processor: the full processor wants torchvision).
Output: ``[B, L_u, vlm_dim]`` with each sample's real tokens first, plus their count ``lens`` [B].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from motus_fast.encoders.files import component_dir, freeze, read_json, transformers_load
from motus_fast.weights.mapping import CheckpointError, Rule, convert
from motus_fast.weights.sources import DictSource

log = logging.getLogger("motus_fast")
Tensor = torch.Tensor


# ---- loading ------------------------------------------------------------------------------------------------------
def qwen3_vl_folder(path: str | Path) -> Path:
    folder = component_dir(path, "Qwen3-VL")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "qwen3_vl":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {model_type!r} is not 'qwen3_vl'")
    return folder


def load_qwen3_vl(path: str | Path, dtype: torch.dtype = torch.bfloat16, device=None,
                  weights: Optional[Mapping[str, Tensor]] = None, weights_name: str = "the Motus checkpoint"):
    """``Qwen3VLForConditionalGeneration`` (as upstream): frozen, eval, `dtype`. `weights`: the VLM tensors of a
    Motus checkpoint (transformers key names); the folder then gives only the config. Else the folder's weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    folder = qwen3_vl_folder(path)
    if weights is None:
        model = transformers_load(Qwen3VLForConditionalGeneration, folder, dtype, "Qwen3-VL")
        log.info("VLM weights: %s", folder)
    else:
        cfg = Qwen3VLConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration(cfg)
        tied = set(model._tied_weights_keys) if cfg.get_text_config().tie_word_embeddings else set()
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
        source = {k: v for k, v in weights.items() if k not in tied}
        tensors = convert(DictSource(source, weights_name), [Rule(k, (k,)) for k in expected], expected, None, dtype,
                          header=f"{weights_name}: its VLM weights (vlm_model.*) do not match the Qwen3-VL config "
                                 f"{folder / 'config.json'}:")
        model.load_state_dict(tensors, strict=False, assign=True)
        if tied:
            model.tie_weights()
        _rebuild_meta_buffers(model)
        model = freeze(model)
        log.info("VLM weights: the Motus checkpoint's vlm_model.* (%s); config, tokenizer and processor from %s",
                 weights_name, folder)
    return model if device is None else model.to(device)


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (the rotary ``inv_freq`` tables) are not in a state dict: a model built on the meta
    device gets them by rebuilding their (parameter-free) modules from their config on the CPU."""
    owners = {name.rpartition(".")[0] for name, b in model.named_buffers() if b.is_meta}
    for name in sorted(owners):
        old = model.get_submodule(name)
        cfg = getattr(old, "config", None)
        if cfg is None or any(True for _ in old.parameters()):
            raise RuntimeError(f"cannot rebuild the buffers of {name} ({type(old).__name__}) off the meta device")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, type(old)(cfg))


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


def load_qwen3_vl_prompt(path: str | Path) -> "Qwen3VLChatPrompt":
    """Upstream's prompt builder from a Qwen3-VL folder's tokenizer, image processor and chat template."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    folder = qwen3_vl_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no usable Qwen3-VL tokenizer (tokenizer.json / tokenizer_config.json): "
                              f"{e}") from e
    if not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{folder / 'preprocessor_config.json'}: not found (the Qwen3-VL image processor)")
    return Qwen3VLChatPrompt(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
                             chat_template=qwen3_vl_chat_template(folder, tokenizer))


# ---- features -----------------------------------------------------------------------------------------------------
class VLMFeatureExtractor(nn.Module):
    """A frozen, always-eval Qwen3-VL (``Qwen3VLForConditionalGeneration`` or ``Qwen3VLModel``)."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = freeze(vlm)
        cfg = vlm.config
        self.hidden_size: int = cfg.text_config.hidden_size
        self.image_token_id: int = cfg.image_token_id
        self.video_token_id: int = cfg.video_token_id

    def train(self, mode: bool = True) -> "VLMFeatureExtractor":
        # frozen: dropout and friends stay off whatever the surrounding model does
        return super().train(False)

    def mm_token_type_ids(self, input_ids: Tensor) -> Tensor:
        """0 for text, 1 for image placeholder, 2 for video placeholder tokens (what the processor returns)."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        return types

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                pixel_values: Optional[Tensor] = None, image_grid_thw: Optional[Tensor] = None,
                mm_token_type_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Processor outputs -> (features [B, L, hidden_size], lens int64 [B]).

        input_ids / attention_mask / mm_token_type_ids: [B, L] (padding on either side); pixel_values:
        [sum of patches, C*T*P*P] and image_grid_thw: [num_images, 3], as the Qwen3-VL processor returns them.
        Rows 0..lens[b]-1 of sample b are its real tokens in order; rows after them hold the padding positions.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if mm_token_type_ids is None:
            mm_token_type_ids = self.mm_token_type_ids(input_ids)
        base = getattr(self.vlm, "model", self.vlm)           # ForConditionalGeneration -> its Qwen3VLModel
        out = base(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False)
        hidden = out.last_hidden_state                          # after the final norm
        real = attention_mask.bool()
        # stable sort puts each sample's real tokens first, in order (identity for right padding)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        hidden = torch.gather(hidden, 1, order[..., None].expand_as(hidden))
        return hidden, real.sum(dim=1)


class Qwen3VLChatPrompt:
    """Upstream's prompt for real weights (module docstring). ``chat_template``: the model's when the tokenizer
    does not carry it. Picklable; runs in DataLoader workers."""

    def __init__(self, tokenizer, image_processor, chat_template: Optional[str] = None,
                 image_token: str = "<|image_pad|>"):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template, self.image_token = chat_template, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {image_token!r}")

    def __call__(self, image: np.ndarray, text: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        if chat.count(self.image_token) != 1:
            raise ValueError(f"the chat template rendered {chat.count(self.image_token)} image tokens, expected 1")
        px = self.image_processor(images=[np.asarray(image)], return_tensors="pt")
        n = int(px["image_grid_thw"].prod()) // int(self.image_processor.merge_size) ** 2
        chat = chat.replace(self.image_token, self.image_token * n)
        ids = self.tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if int((ids == self.image_token_id).sum()) != n:
            raise ValueError("the tokenizer split the image placeholder tokens (is the image token special?)")
        return {"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"],
                "mm_token_type_ids": (ids == self.image_token_id).long()}


def collate_vlm_inputs(items: Sequence[dict], pad_id: int = 0) -> dict:
    """Right-pad the token rows (pad id 0, mask 0, as upstream's collate) and concatenate the image patches."""
    L = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], mask[i, :n], mm[i, :n] = it["input_ids"], 1, it["mm_token_type_ids"]
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items])}


class Qwen3VLFeatures(nn.Module):
    """Frozen Qwen3-VL -> its language model's last hidden state per token: the prompt builder (run in the workers)
    plus ``VLMFeatureExtractor`` (run on the device)."""

    def __init__(self, model: nn.Module, prompt: Callable[[np.ndarray, str], dict]):
        super().__init__()
        self.extractor = VLMFeatureExtractor(model)
        self.prompt = prompt
        self.dim = int(self.extractor.hidden_size)

    @torch.no_grad()
    def forward(self, inputs: Sequence[dict]) -> tuple[Tensor, Tensor]:
        batch = collate_vlm_inputs(inputs)
        p = next(self.extractor.parameters())
        batch = {k: v.to(p.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(p.dtype)
        hidden, lens = self.extractor(**batch)
        return hidden.float(), lens
