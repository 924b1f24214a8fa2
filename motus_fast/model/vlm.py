"""The frozen VLM in front of the understanding expert: Qwen3-VL's last hidden state of the prompt + image tokens.

Upstream (``UndModule.extract_und_features``) embeds the prompt, scatters the vision tower's image features into the
image placeholder tokens, computes the multimodal RoPE positions and runs the language model with the DeepStack
visual features; the last hidden state (after the final norm) goes to the und adapter. transformers'
``Qwen3VLModel.forward`` is that same computation, so we call it. Since transformers 5 the M-RoPE positions need
``mm_token_type_ids`` (0 text, 1 image, 2 video); the processor returns them, and we derive them from the
placeholder token ids when a caller does not pass them.

Output: ``[B, L_u, vlm_dim]`` with each sample's real tokens first, plus their count ``lens`` [B]. The und expert
packs by ``vlm_lens`` so padding is not attended; passing ``vlm_lens=None`` instead attends every row, as upstream
does with its right-padded batches (und tokens carry no position, so moving padding rows behind the real tokens
changes nothing for upstream semantics).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor


class VLMFeatureExtractor(nn.Module):
    """A frozen, always-eval Qwen3-VL (a transformers ``Qwen3VLForConditionalGeneration`` or ``Qwen3VLModel``)."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.vlm.requires_grad_(False)
        self.vlm.eval()
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
