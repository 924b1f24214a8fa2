"""The data edge: a ``RawBatch`` from the loader -> the ``FlowBatch`` the model trains on, on the training device.

    frames uint8 [B, T, 3, H, W] --(x / 127.5 - 1, as upstream's frame * 2 - 1)--> VAE --> video [B, C, T', H', W']
    instructions (or cached umT5 states) --> umT5 --> text [B, L_t, text_dim] (+ text_lens)
    condition frame + instruction --(VLM prompt, built in the workers)--> Qwen3-VL --> vlm [B, L_u, vlm_dim]
    actions, state, has_actions --> as they are

Upstream encodes the whole clip [condition | future] with the causal VAE and the condition frame alone again; the
first latent frame of the clip *is* the condition frame's encoding (the Wan VAE encodes frame 0 on its own), so
one encode gives both, and ``FlowBatch.video[:, :, :1]`` is the condition latent.

Padding: upstream zero-pads umT5 states to ``text_len`` (512) and right-pads VLM tokens, and attends to every
padding row. ``attend_padding=True`` (default) reproduces that (no lengths in ``Conditioning``);
``attend_padding=False`` passes ``text_lens`` / ``vlm_lens`` so the model masks padding.

``latent_cache`` (a ``LatentCache``) keeps each window's latents on disk, keyed by the sample's ``video_id``.
"""

from __future__ import annotations

from typing import Optional

import torch

from motus_fast.data.dataset import RawBatch
from motus_fast.data.encoders import Encoders, pixels_to_unit
from motus_fast.flow import FlowBatch
from motus_fast.model.mot import Conditioning

Tensor = torch.Tensor


def pad_text(states: list[Tensor], text_len: Optional[int]) -> tuple[Tensor, Tensor]:
    """Per-sample [L_i, D] -> ([B, text_len or max L_i, D] zero-padded (longer ones truncated, as upstream), lens)."""
    L = text_len if text_len is not None else max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), L, states[0].shape[1])
    lens = torch.empty(len(states), dtype=torch.long)
    for i, s in enumerate(states):
        n = min(s.shape[0], L)
        out[i, :n] = s[:n]
        lens[i] = n
    return out, lens


class BatchEncoder:
    """Runs the frozen encoders on a RawBatch. ``text_len``: pad/truncate umT5 states to this (upstream: the video
    expert's text_len); ``device``/``dtype``: where the FlowBatch goes (the encoders must already be there)."""

    def __init__(self, encoders: Encoders, *, text_len: Optional[int] = None, device=None,
                 dtype: torch.dtype = torch.float32, attend_padding: bool = True, latent_cache=None):
        self.encoders, self.text_len = encoders, text_len
        self.device, self.dtype, self.attend_padding = device, dtype, attend_padding
        self.latent_cache = latent_cache      # a LatentCache (optional)

    @torch.no_grad()
    def encode_video(self, frames: Tensor, video_ids: Optional[list[str]] = None) -> Tensor:
        """uint8 [B, T, 3, H, W] -> normalised latents [B, C, T', H', W'] (fp32); through the latent cache when
        one is set and ``video_ids`` name the clips."""
        cache = self.latent_cache if video_ids else None
        cached = [cache.get(v) for v in video_ids] if cache else [None] * frames.shape[0]
        todo = [i for i, c in enumerate(cached) if c is None]
        out: list[Optional[Tensor]] = [None if c is None else c.to(self.device) for c in cached]
        if todo:
            video = pixels_to_unit(frames[todo].to(self.device, non_blocking=True).permute(0, 2, 1, 3, 4))
            latents = self.encoders.vae.encode(video)
            for j, i in enumerate(todo):
                out[i] = latents[j]
                if cache:
                    cache.put(video_ids[i], latents[j])
        return torch.stack(out)

    @torch.no_grad()
    def encode_text(self, raw: RawBatch) -> tuple[Tensor, Tensor]:
        todo = [i for i, t in enumerate(raw.text) if t is None] if raw.text else list(range(len(raw)))
        states: list[Optional[Tensor]] = list(raw.text) if raw.text else [None] * len(raw)
        if todo:
            for i, s in zip(todo, self.encoders.text([raw.instructions[i] for i in todo])):
                states[i] = s
        states = [s.to(self.device, torch.float32) for s in states]
        widths = {s.shape[1] for s in states}
        if len(widths) != 1:
            raise ValueError(f"text states of one batch have widths {sorted(widths)} (a text cache or the "
                             "dataset's umt5_wan files from another encoder?)")
        return pad_text(states, self.text_len)

    @torch.no_grad()
    def __call__(self, raw: RawBatch) -> FlowBatch:
        video = self.encode_video(raw.frames, raw.video_ids)
        text, text_lens = self.encode_text(raw)
        vlm = vlm_lens = None
        if self.encoders.vlm is not None:
            if raw.vlm_inputs is None:
                raise ValueError("the encoders have a VLM but the batch has no VLM inputs (build the datasets with "
                                 "vlm_prompt=encoders.vlm.prompt)")
            vlm, vlm_lens = self.encoders.vlm(raw.vlm_inputs)
        dev, dt = self.device, self.dtype
        state = None if raw.state is None else raw.state.to(dev, dt)
        cond = Conditioning(text=text.to(dev, dt), vlm=None if vlm is None else vlm.to(dev, dt), state=state,
                            text_lens=None if self.attend_padding else text_lens.to(dev),
                            vlm_lens=None if self.attend_padding or vlm_lens is None else vlm_lens.to(dev))
        return FlowBatch(video=video.to(dev, dt), actions=raw.actions.to(dev, dt), cond=cond,
                         has_actions=raw.has_actions.to(dev))


class EncodedDataset(torch.utils.data.Dataset):
    """Wraps a dataset of ``Sample``s so each item is already a FlowBatch of batch size 1, encoded on the CPU in the
    DataLoader worker (for tiny encoders: CI, the demo, the stage smoke runs; real encoders belong on the device via
    ``collate`` + ``BatchEncoder``). Items collate with ``motus_fast.data.batch.collate_flow_batches``, which pads
    text/VLM rows again and records their lengths (so leave ``text_len`` None there: no padding to attend).
    Keep ``num_workers`` small: each worker holds a copy of the encoders."""

    def __init__(self, samples, encoders: Encoders, text_len: Optional[int] = None, attend_padding: bool = True):
        self.samples = samples
        self.encoder = BatchEncoder(encoders, text_len=text_len, device="cpu", attend_padding=attend_padding)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i) -> FlowBatch:
        from motus_fast.data.dataset import collate

        return self.encoder(collate([self.samples[i]]))
