"""Collating single samples (each a FlowBatch of batch size 1) into a training batch.

Variable text and VLM lengths are right-padded with zeros and their true lengths recorded (``text_lens``,
``vlm_lens``), so the model never attends padding rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from motus_fast.flow import FlowBatch
from motus_fast.model.mot import Conditioning


def _pad_cat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, L_i, C] each -> ([B, max L, C] zero-padded, lengths [B])"""
    lens = torch.tensor([t.shape[1] for t in tensors])
    out = tensors[0].new_zeros(len(tensors), int(lens.max()), tensors[0].shape[-1])
    for i, t in enumerate(tensors):
        out[i, : t.shape[1]] = t[0]
    return out, lens


def collate_flow_batches(samples: Sequence[FlowBatch]) -> FlowBatch:
    """Concatenate FlowBatches along the batch axis (any batch size each), padding text/VLM to a common length."""
    def cat(get) -> Optional[torch.Tensor]:
        vals = [get(s) for s in samples]
        return None if vals[0] is None else torch.cat(vals)

    def rows(t: torch.Tensor):
        return [t[i: i + 1] for i in range(t.shape[0])]

    texts = [row for s in samples for row in rows(s.cond.text)]
    text, text_lens = _pad_cat(texts)
    vlm = vlm_lens = None
    if samples[0].cond.vlm is not None:
        vlms = [row for s in samples for row in rows(s.cond.vlm)]
        vlm, vlm_lens = _pad_cat(vlms)
    given_text = [s.cond.text_lens for s in samples]
    if all(g is not None for g in given_text):
        text_lens = torch.cat(given_text)
    given_vlm = [s.cond.vlm_lens for s in samples]
    if vlm is not None and all(g is not None for g in given_vlm):
        vlm_lens = torch.cat(given_vlm)
    has = None
    if any(s.has_actions is not None for s in samples):
        has = torch.cat([s.has_actions if s.has_actions is not None else torch.ones(s.video.shape[0], dtype=torch.bool)
                         for s in samples])
    cond = Conditioning(text=text, vlm=vlm, state=cat(lambda s: s.cond.state), text_lens=text_lens,
                        vlm_lens=vlm_lens)
    return FlowBatch(video=cat(lambda s: s.video), actions=cat(lambda s: s.actions), cond=cond, has_actions=has)
