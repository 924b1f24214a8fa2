"""A validated request -> the inference engine -> a response, with per-stage timings.

Stages (``server_timing``, milliseconds, device-synchronised): ``preprocess`` (normalisation, tensors, noise),
``text`` (umT5 + cross-attention K/V; 0 on an instruction-cache hit), ``vae`` (condition latent, and the given
clip in idm), ``vlm`` (VLM features + und adapter; 0 on an observation-cache hit), ``denoise`` (the flow loop),
``postprocess`` (un-normalisation, VAE decoding when frames are asked for, arrays out) and ``infer`` (all of it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

import motus_fast
from motus_fast.flow import ACTION_MODES, MODES, VIDEO_MODES
from motus_fast.infer.chunking import PrefixGuidance
from motus_fast.infer.engine import InferenceEngine
from motus_fast.infer.timing import StageTimer
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.normalization import Normalizer
from motus_fast.serve.schema import FIELDS, Request, RequestSpec

STAGES = ("preprocess", "text", "vae", "vlm", "denoise", "postprocess")


class MotusPolicy:
    def __init__(self, engine: InferenceEngine, config: ServeConfig, normalizer: Optional[Normalizer] = None):
        if engine.encoders is None:
            raise ValueError("serving needs an engine with encoders (images and prompts come in, not features)")
        self.engine, self.config = engine, config
        self.normalizer = normalizer or Normalizer(mode="none")
        acfg = engine.cfg.action
        state_dim = acfg.state_dim if acfg.layout == "finetune" else None
        self.normalizer.check_dims(state_dim, acfg.action_dim)
        execute = config.execute_steps or acfg.chunk_size
        if not 1 <= execute <= acfg.chunk_size:
            raise ValueError(f"execute_steps must be in 1..{acfg.chunk_size} (the action horizon), got {execute}")
        enc = engine.encoders
        self.spec = RequestSpec(image_size=tuple(enc.image_size), frame_stride=enc.frame_stride,
                                horizon=acfg.chunk_size, action_dim=acfg.action_dim, state_dim=state_dim,
                                config=config)
        self.execute_steps = execute

    def metadata(self) -> dict:
        """Sent to every client on connect (openpi: ``get_server_metadata()``)."""
        H, W = self.spec.image_size
        c = self.config
        return {"server": "motus_fast", "version": motus_fast.__version__,
                "action_horizon": self.spec.horizon, "execute_steps": self.execute_steps,
                "action_dim": self.spec.action_dim, "state_dim": self.spec.state_dim,
                "image_shape": [H, W, 3], "frame_stride": self.spec.frame_stride,
                "modes": list(MODES), "default_mode": c.default_mode, "num_frames": c.num_frames,
                "steps": self.engine.steps, "sampler": self.engine.sampler_name,
                "sampler_options": dataclasses.asdict(self.engine.sampler),
                "max_batch": c.max_batch, "max_steps": c.max_steps,
                "max_num_frames": c.max_num_frames, "normalization": self.normalizer.mode,
                "fields": dict(FIELDS)}

    def infer(self, req: Request) -> dict:
        eng, norm = self.engine, self.normalizer
        timer = StageTimer(eng.device)
        t0 = time.perf_counter()
        with timer.stage("preprocess"):
            images = torch.from_numpy(np.array(req.images))         # a writable copy of the message bytes
            state = None if req.state is None else torch.from_numpy(norm.state_in(req.state))
            actions = None if req.actions is None else torch.from_numpy(norm.actions_in(req.actions))
            guidance = None
            if req.prev_actions is not None:
                prefix = torch.from_numpy(norm.actions_in(req.prev_actions)).to(eng.device, eng.dtype)
                guidance = PrefixGuidance.from_prefix(prefix, self.spec.horizon, req.inference_delay)
        prepared = eng.prepare(images, req.prompts, state, timer)
        noise_video = noise_action = None
        if req.noise_seed is not None:
            with timer.stage("preprocess"):
                latent_hw = tuple(prepared.cond_latent.shape[-2:])
                noise_video, noise_action = eng.draw_noise(req.noise_seed, req.batch, req.num_frames, latent_hw)
        video = None
        if req.mode == "idm":
            with timer.stage("vae"):
                clip = torch.from_numpy(np.concatenate([req.images[:, None], req.future_frames], axis=1))
                video = eng.encoders.encode_frames(clip.to(eng.device)).to(eng.device, eng.dtype)
        out = eng.sample(req.mode, prepared, num_frames=req.num_frames, actions=actions, video=video,
                         noise_video=noise_video, noise_action=noise_action, steps=req.steps, guidance=guidance,
                         timer=timer)
        response: dict = {}
        with timer.stage("postprocess"):
            if req.mode in ACTION_MODES:
                response["actions"] = self._unbatch(req, norm.actions_out(out.actions.float().cpu().numpy()))
            if req.mode in VIDEO_MODES:
                if req.return_frames:
                    frames = eng.encoders.decode_latents(out.video).cpu().numpy()
                    response["frames"] = self._unbatch(req, frames)
                else:
                    response["video_latents"] = self._unbatch(req, out.video.float().cpu().numpy())
        timing = {f"{s}_ms": timer.ms.get(s, 0.0) for s in STAGES}
        timing["infer_ms"] = (time.perf_counter() - t0) * 1e3
        response["server_timing"] = timing
        return response

    @staticmethod
    def _unbatch(req: Request, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if req.batched else x[0])
