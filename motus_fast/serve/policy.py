"""A validated request -> the inference engine -> a response, with per-stage timings.

Stages (``server_timing``, milliseconds, device-synchronised): ``preprocess`` (normalisation, tensors, noise),
``text`` (umT5 + cross-attention K/V; 0 on an instruction-cache hit), ``vae`` (condition latent, and the given
clip in idm), ``vlm`` (VLM features + und adapter; 0 on an observation-cache hit), ``denoise`` (the flow loop),
``postprocess`` (un-normalisation, VAE decoding when frames are asked for, arrays out) and ``infer`` (all of it);
``batch_requests`` is the number of requests whose samples shared the denoise loop.

Micro-batching (``infer_batch``): each request is prepared alone (its own cache lookups, its own noise drawn from
its own seed), then the samples of requests whose loop inputs have equal shapes are concatenated and run through
one denoise loop, and each request's slice is post-processed alone. Every sample's computation is row-wise (joint
attention is per sample), so on CPU a request's result is bitwise what it gets alone (tests/serve/test_hostile.py
checks it; on a GPU, matmul kernels chosen per batch size may round differently). A request without
``noise_seed`` gets a seed drawn from torch's global generator: what running it alone does with fresh noise.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

import motus_fast
from motus_fast.flow import ACTION_MODES, MODES, VIDEO_MODES
from motus_fast.infer.cache import LRUCache
from motus_fast.infer.chunking import PrefixGuidance
from motus_fast.infer.engine import InferenceEngine, Prepared
from motus_fast.infer.timing import StageTimer
from motus_fast.model.mot import ConditionCache, Conditioning
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.normalization import Normalizer
from motus_fast.serve.schema import FIELDS, Request, RequestSpec

STAGES = ("preprocess", "text", "vae", "vlm", "denoise", "postprocess")
CACHE_SHARE = 0.05          # default budget of each conditioning cache: this share of the device's memory


@dataclass
class _Prepared:
    """One request, ready for the denoise loop (model space, on the device)."""

    req: Request
    timer: StageTimer
    prepared: Prepared
    noise_video: torch.Tensor
    noise_action: torch.Tensor
    actions: Optional[torch.Tensor]         # world_model
    video: Optional[torch.Tensor]           # idm: the given clip's latents
    guidance: Optional[PrefixGuidance]


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
        # the conditioning caches are bounded in bytes (one motus-8b prompt set of 8 holds ~1.6 GB of K/V)
        self.cache_budget = {"instructions": _cache_budget(config.instruction_cache_bytes, engine.device),
                             "observations": _cache_budget(config.observation_cache_bytes, engine.device)}
        engine.instructions = LRUCache(engine.instructions.capacity, max_bytes=self.cache_budget["instructions"])
        engine.observations = LRUCache(engine.observations.capacity, max_bytes=self.cache_budget["observations"])

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
                "max_num_frames": c.max_num_frames, "max_request_cost": c.max_request_cost,
                "request_cost": "batch x latent frames x steps, x 2 with return_frames",
                "cache_budget_bytes": dict(self.cache_budget), "normalization": self.normalizer.mode,
                "fields": dict(FIELDS)}

    def infer(self, req: Request) -> dict:
        """One request alone."""
        (result,) = self.infer_batch([req])
        if isinstance(result, Exception):
            raise result
        return result

    def infer_batch(self, requests: Sequence[Request]) -> list:
        """Requests -> one response dict (or the Exception that failed it) per request, in order. Requests whose
        denoise-loop inputs have equal shapes share one loop; the rest run in as many loops as needed."""
        t0 = time.perf_counter()
        results: list = [None] * len(requests)
        ready: dict[tuple, list[tuple[int, _Prepared]]] = {}
        for i, req in enumerate(requests):
            try:
                item = self._prepare(req)
            except Exception as e:  # noqa: BLE001  (one request's failure is its own)
                results[i] = e
                continue
            ready.setdefault(_loop_shapes(item, self.engine.steps), []).append((i, item))
        for group in ready.values():
            items = [item for _, item in group]
            try:
                outs, denoise_ms = self._sample_together(items)
            except Exception as e:  # noqa: BLE001  (the shared loop failed: every request in it failed)
                for i, _ in group:
                    results[i] = e
                continue
            for (i, item), (video, actions) in zip(group, outs):
                item.timer.ms["denoise"] = denoise_ms
                try:
                    results[i] = self._respond(item, video, actions, t0, len(items))
                except Exception as e:  # noqa: BLE001
                    results[i] = e
        return results

    def _prepare(self, req: Request) -> _Prepared:
        eng, norm = self.engine, self.normalizer
        timer = StageTimer(eng.device)
        with timer.stage("preprocess"):
            images = torch.from_numpy(np.array(req.images))         # a writable copy of the message bytes
            state = None if req.state is None else torch.from_numpy(norm.state_in(req.state))
            actions = None if req.actions is None else torch.from_numpy(norm.actions_in(req.actions))
            guidance = None
            if req.prev_actions is not None:
                prefix = torch.from_numpy(norm.actions_in(req.prev_actions)).to(eng.device, eng.dtype)
                guidance = PrefixGuidance.from_prefix(prefix, self.spec.horizon, req.inference_delay)
        prepared = eng.prepare(images, req.prompts, state, timer)
        with timer.stage("preprocess"):
            # unseeded: a seed from torch's global generator (reproducible under torch.manual_seed, as before)
            seed = int(torch.randint(2**62, ())) if req.noise_seed is None else req.noise_seed
            latent_hw = tuple(prepared.cond_latent.shape[-2:])
            noise_video, noise_action = eng.draw_noise(seed, req.batch, req.num_frames, latent_hw)
        video = None
        if req.mode == "idm":
            with timer.stage("vae"):
                clip = torch.from_numpy(np.concatenate([req.images[:, None], req.future_frames], axis=1))
                video = eng.encoders.encode_frames(clip.to(eng.device)).to(eng.device, eng.dtype)
        return _Prepared(req, timer, prepared, noise_video, noise_action, actions, video, guidance)

    def _sample_together(self, items: list[_Prepared]) -> tuple[list[tuple], float]:
        """One denoise loop over the concatenated samples of `items` -> per item (video, actions), and its ms."""
        first = items[0].req
        timer = StageTimer(self.engine.device)
        out = self.engine.sample(
            first.mode, _join_prepared([it.prepared for it in items]), num_frames=first.num_frames,
            actions=_cat([it.actions for it in items]), video=_cat([it.video for it in items]),
            noise_video=_cat([it.noise_video for it in items]), noise_action=_cat([it.noise_action for it in items]),
            steps=first.steps or self.engine.steps,
            guidance=None if items[0].guidance is None else PrefixGuidance(
                target=_cat([it.guidance.target for it in items]),
                weights=_cat([it.guidance.weights for it in items])),
            timer=timer)
        outs, start = [], 0
        for it in items:
            rows = slice(start, start + it.req.batch)
            start += it.req.batch
            outs.append((None if out.video is None else out.video[rows],
                         None if out.actions is None else out.actions[rows]))
        return outs, timer.ms.get("denoise", 0.0)

    def _respond(self, item: _Prepared, video, actions, t0: float, batch_requests: int) -> dict:
        eng, norm, req, timer = self.engine, self.normalizer, item.req, item.timer
        response: dict = {}
        with timer.stage("postprocess"):
            if req.mode in ACTION_MODES:
                response["actions"] = self._unbatch(req, norm.actions_out(actions.float().cpu().numpy()))
            if req.mode in VIDEO_MODES:
                if req.return_frames:
                    frames = eng.encoders.decode_latents(video).cpu().numpy()
                    response["frames"] = self._unbatch(req, frames)
                else:
                    response["video_latents"] = self._unbatch(req, video.float().cpu().numpy())
        timing = {f"{s}_ms": timer.ms.get(s, 0.0) for s in STAGES}
        timing["infer_ms"] = (time.perf_counter() - t0) * 1e3
        timing["batch_requests"] = batch_requests
        response["server_timing"] = timing
        return response

    @staticmethod
    def _unbatch(req: Request, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if req.batched else x[0])


def _cache_budget(configured: Optional[int], device: torch.device) -> int:
    """Bytes a conditioning cache may hold: as configured, else CACHE_SHARE of the device's memory."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * CACHE_SHARE)


def _cat(tensors: list) -> Optional[torch.Tensor]:
    return None if tensors[0] is None else torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _join_prepared(parts: list[Prepared]) -> Prepared:
    """Samples of several prepared requests as one batch (the und tokens are packed: offsets shift)."""
    if len(parts) == 1:
        return parts[0]
    conds, caches = [p.cond for p in parts], [p.cache for p in parts]
    und = None
    if caches[0].und is not None:
        cu, offset = [caches[0].und[1][:1]], 0
        for c in caches:
            cu.append(c.und[1][1:] + offset)
            offset += int(c.und[1][-1])
        und = (torch.cat([c.und[0] for c in caches]), torch.cat(cu))
    kv = None if caches[0].text_kv is None else [
        (torch.cat([c.text_kv[layer][0] for c in caches]), torch.cat([c.text_kv[layer][1] for c in caches]))
        for layer in range(len(caches[0].text_kv))]
    cond = Conditioning(text=_cat([c.text for c in conds]), vlm=_cat([c.vlm for c in conds]),
                        state=_cat([c.state for c in conds]), text_lens=_cat([c.text_lens for c in conds]),
                        vlm_lens=_cat([c.vlm_lens for c in conds]))
    return Prepared(cond=cond, cache=ConditionCache(text_ctx=_cat([c.text_ctx for c in caches]), text_kv=kv, und=und),
                    cond_latent=_cat([p.cond_latent for p in parts]))


def _loop_shapes(item: _Prepared, default_steps: int) -> tuple:
    """What must agree for requests to share one loop: mode, step count, and every loop input's shape past the
    batch axis (and None-ness). The und tokens are packed, so their count may differ."""
    req, p = item.req, item.prepared
    tensors = (p.cond.text, p.cond.vlm, p.cond.state, p.cond.text_lens, p.cond.vlm_lens, p.cache.text_ctx,
               p.cond_latent, item.noise_video, item.noise_action, item.actions, item.video,
               None if item.guidance is None else item.guidance.target,
               None if p.cache.text_kv is None else p.cache.text_kv[0][0],
               None if p.cache.und is None else p.cache.und[0])
    return (req.mode, req.num_frames, req.steps or default_steps, len(p.cache.text_kv or ())) + tuple(
        None if t is None else (tuple(t.shape[1:]), t.dtype) for t in tensors)
