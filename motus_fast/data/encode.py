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
an encoders bundle with ``attend_padding=False`` passes ``text_lens`` / ``vlm_lens`` so the model masks padding.

``latent_cache`` (a ``LatentCache``) keeps each window's latents on disk, keyed by the sample's ``video_id``.
"""

from __future__ import annotations

from typing import Optional

import torch

from motus_fast.data.dataset import RawBatch
from motus_fast.encoders import Encoders, pad_text
from motus_fast.flow import FlowBatch
from motus_fast.model.mot import Conditioning

Tensor = torch.Tensor


class BatchEncoder:
    """Runs the frozen encoders (any ``motus_fast.encoders.Encoders``) on a RawBatch. Padding and masking follow
    the encoders (``text_len``, ``attend_padding``); ``device``/``dtype``: where the FlowBatch goes (the encoders
    must already be there)."""

    def __init__(self, encoders: Encoders, *, device=None, dtype: torch.dtype = torch.float32, latent_cache=None):
        self.encoders, self.device, self.dtype = encoders, device, dtype
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
            latents = self.encoders.encode_frames(frames[todo].permute(0, 1, 3, 4, 2)).to(self.device)
            for j, i in enumerate(todo):
                out[i] = latents[j]
                if cache:
                    cache.put(video_ids[i], latents[j])
        return torch.stack(out)

    @torch.no_grad()
    def encode_text(self, raw: RawBatch) -> tuple[Tensor, Optional[Tensor]]:
        """umT5 states [B, L, D] (cached per sample in ``raw.text`` where present) and lengths (None: attended)."""
        states: list[Optional[Tensor]] = list(raw.text) if raw.text else [None] * len(raw)
        todo = [i for i, s in enumerate(states) if s is None]
        if todo:
            text, lens = self.encoders.encode_prompts([raw.instructions[i] for i in todo])
            for j, i in enumerate(todo):
                states[i] = text[j] if lens is None else text[j, : int(lens[j])]
        states = [s.to(self.device, torch.float32) for s in states]
        widths = {s.shape[1] for s in states}
        if len(widths) != 1:
            raise ValueError(f"text states of one batch have widths {sorted(widths)} (a text cache or the "
                             "dataset's umt5_wan files from another encoder?)")
        text, lens = pad_text(states, self.encoders.text_len)
        return text, None if self.encoders.attend_padding else lens.to(self.device)

    @torch.no_grad()
    def __call__(self, raw: RawBatch) -> FlowBatch:
        video = self.encode_video(raw.frames, raw.video_ids)
        text, text_lens = self.encode_text(raw)
        vlm = vlm_lens = None
        if self.encoders.vlm_dim is not None:
            if raw.vlm_inputs is None:
                raise ValueError("the encoders have a VLM but the batch has no VLM inputs (build the datasets with "
                                 "vlm_prompt=encoders.vlm_prompt)")
            vlm, vlm_lens = self.encoders.encode_vlm(raw.vlm_inputs)
        dev, dt = self.device, self.dtype
        state = None if raw.state is None else raw.state.to(dev, dt)
        cond = Conditioning(text=text.to(dev, dt), vlm=None if vlm is None else vlm.to(dev, dt), state=state,
                            text_lens=text_lens, vlm_lens=None if vlm_lens is None else vlm_lens.to(dev))
        return FlowBatch(video=video.to(dev, dt), actions=raw.actions.to(dev, dt), cond=cond,
                         has_actions=raw.has_actions.to(dev))


class EncodedDataset(torch.utils.data.Dataset):
    """Wraps a dataset of ``Sample``s so each item is already a FlowBatch of batch size 1, encoded on the CPU in the
    DataLoader worker (for tiny encoders: CI, the demo, the stage smoke runs; real encoders belong on the device via
    ``collate`` + ``BatchEncoder``). Items collate with ``motus_fast.data.batch.collate_flow_batches``, which pads
    text/VLM rows again and records their lengths (so give the encoders ``text_len=None``: no padding to attend).
    Keep ``num_workers`` small: each worker holds a copy of the encoders."""

    def __init__(self, samples, encoders: Encoders):
        self.samples = samples
        self.encoder = BatchEncoder(encoders, device="cpu")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i) -> FlowBatch:
        from motus_fast.data.dataset import collate

        return self.encoder(collate([self.samples[i]]))
