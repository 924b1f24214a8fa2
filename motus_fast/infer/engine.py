"""The inference engine: load a checkpoint once, then per request compute only what changed.

What a request needs, and how often it changes (DESIGN.md section 8):

| input                                   | computed by                                   | cached per              |
|-----------------------------------------|-----------------------------------------------|-------------------------|
| umT5 states, their embedding, every     | ``encoders.encode_prompts`` ->                | instruction (LRU)       |
| layer's cross-attention K/V             | ``Motus.cache_conditioning``                  |                         |
| VLM features + und adapter output       | ``encoders.vlm_features`` -> ``und.embed``     | observation (LRU)       |
| condition latent (first frame)          | ``encoders.encode_frames``                    | observation (LRU)       |
| time embeddings (e, e6) of both streams | the time MLPs, for every step of the grid     | (mode, batch, steps,    |
|                                         |                                               | shift)                  |
| the denoise loop                        | ``motus_fast.flow.denoise``                   | CUDA graph per shapes   |

Every cache is exact: ``InferenceEngine.sample`` returns what ``motus_fast.flow.sample`` returns for the same
inputs, noise and sampler options, bit for bit on the same device (tests/infer/test_engine.py checks all five
modes), because each cached value is computed by the same code on the same inputs as the plain sampler computes it,
and the loop is the plain sampler's loop, ``flow.denoise``.

The batch size is a property of the request: tables and graphs are keyed by it, nothing in the model depends on it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from motus_fast.flow import (ACTION_MODES, GIVEN, MODE_TABLE, SampleResult, SamplerOptions, StepPlan,
                             check_and_draw_noise, check_fp8, check_mode_inputs, denoise, result, sampler_name,
                             step_plan)
from motus_fast.infer.cache import LRUCache
from motus_fast.infer.chunking import PrefixGuidance, guide_velocity
from motus_fast.encoders import Encoders
from motus_fast.infer.graphs import DenoiseGraphs
from motus_fast.infer.timing import NullTimer
from motus_fast.model.fp8 import quantize_video_linears, video_fp8_granularity
from motus_fast.model.mot import ConditionCache, Conditioning

log = logging.getLogger("motus_fast")
Tensor = torch.Tensor


@dataclass
class Instruction:
    """What one instruction (one prompt per sample) gives; depends on nothing else."""

    text: Tensor                    # umT5 states [B, L_t, text_dim] (model dtype)
    text_lens: Optional[Tensor]     # [B] or None (all rows attended, as upstream)
    ctx: Tensor                     # embedded context [B, L_t, Dv]
    kv: list                        # per layer (k, v) [B, L_t, H, D]


@dataclass
class Observation:
    """What one observation (images + prompts) gives through the VAE and the VLM."""

    cond_latent: Optional[Tensor]             # [B, C, 1, h, w] (None when the caller gives latents)
    vlm: Optional[Tensor]                     # VLM last hidden states [B, L_u, vlm_dim]
    vlm_lens: Optional[Tensor]
    und: Optional[tuple[Tensor, Tensor]]      # und adapter output: packed tokens [T_u, Du], cu_seqlens [B+1]


@dataclass
class Prepared:
    """Everything the denoise loop reads besides the streams: the conditioning and its cache."""

    cond: Conditioning
    cache: ConditionCache
    cond_latent: Optional[Tensor]


class InferenceEngine:
    """Owns a model (eval mode) and its encoders; thread-compatible, not thread-safe (one caller at a time).
    sampler: the denoise loop's options (exact by default); FP8 options convert the model's video layers in place."""

    def __init__(self, model, encoders: Optional[Encoders] = None, *, steps: Optional[int] = None,
                 shift: Optional[float] = None, cuda_graphs: Optional[bool] = None, instruction_cache: int = 64,
                 observation_cache: int = 4, plan_cache: int = 32, max_graphs: int = 8,
                 sampler: SamplerOptions = SamplerOptions()):
        self.model = model.eval()
        self.sampler = sampler
        if sampler.fp8_video is not None and sampler.fp8_video != video_fp8_granularity(model):
            quantize_video_linears(self.model, sampler.fp8_video)
        self.cfg = model.cfg
        self.encoders = encoders
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.steps = steps or self.cfg.flow.sample_steps
        self.shift = self.cfg.flow.sample_shift if shift is None else shift
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device (it is on {self.device})")
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        why_not = "disabled" if cuda_graphs is False else f"device {self.device.type}"
        self._graphs_allowed, self._max_graphs = use_graphs, max_graphs
        if use_graphs and sampler.host_decisions:
            use_graphs, why_not = False, "the velocity cache decides on the host"
        self.graphs = DenoiseGraphs(max_graphs) if use_graphs else None
        log.info("inference engine: %s %s, %d steps (shift %g), CUDA graphs %s, sampler %s", self.device, self.dtype,
                 self.steps, self.shift, "on" if use_graphs else f"off ({why_not})", sampler)
        self.instructions: LRUCache[Instruction] = LRUCache(instruction_cache)
        self.observations: LRUCache[Observation] = LRUCache(observation_cache)
        self.plans: LRUCache[StepPlan] = LRUCache(plan_cache)

    @property
    def sampler_name(self) -> str:
        return sampler_name(self.sampler)

    def set_sampler(self, sampler: SamplerOptions) -> None:
        """Run later requests with these options (FP8 converts the video layers in place, once; captured graphs
        are dropped)."""
        if sampler.fp8_video is not None and sampler.fp8_video != video_fp8_granularity(self.model):
            quantize_video_linears(self.model, sampler.fp8_video)
        elif sampler.fp8_video is None and video_fp8_granularity(self.model) is not None:
            raise ValueError("this engine's model holds FP8 video weights: build a new engine for a non-FP8 sampler")
        self.sampler = sampler
        use_graphs = self._graphs_allowed and not sampler.host_decisions
        self.graphs = DenoiseGraphs(self._max_graphs) if use_graphs else None
        log.info("inference engine: sampler %s (%s), CUDA graphs %s", self.sampler_name, sampler,
                 "on" if use_graphs else "off")

    @classmethod
    def from_checkpoint(cls, path: str | Path, encoders: Optional[Encoders] = None, *, device=None,
                        dtype: Optional[torch.dtype] = None, upstream_config=None, **kwargs) -> "InferenceEngine":
        """Our checkpoint directory (model.safetensors + config.json) or an official checkpoint (converted)."""
        from motus_fast.weights.native import load_model

        model, _ = load_model(path, dtype=dtype, device=device, upstream_config=upstream_config)
        return cls(model, encoders, **kwargs)

    # ---- conditioning (cached) ---------------------------------------------------------------------------
    @torch.inference_mode()
    def instruction(self, prompts: Sequence[str], timer=None) -> tuple[Instruction, bool]:
        """umT5 states and every layer's cross-attention K/V for these prompts (LRU by the prompts)."""
        def compute():
            with (timer or NullTimer()).stage("text"):
                text, lens = self._encoders().encode_prompts(list(prompts))
                return self._instruction_from_states(text, lens)
        return self.instructions.get_or_compute(("prompts", tuple(prompts)), compute)

    @torch.inference_mode()
    def observation(self, images: Tensor, prompts: Sequence[str], timer=None) -> tuple[Observation, bool]:
        """Condition latent (VAE) and VLM features + und adapter output for uint8 images [B, H, W, 3] (LRU by
        the images' bytes and the prompts)."""
        timer = timer or NullTimer()

        def compute():
            enc = self._encoders()
            with timer.stage("vae"):
                cond_latent = enc.encode_frames(images[:, None].to(self.device)).to(self.device, self.dtype)
            with timer.stage("vlm"):
                vlm, lens = (enc.vlm_features(images.to(self.device), list(prompts)) if self.model.cfg.und_stream
                             else (None, None))
                obs = self._observation_from_features(vlm, lens)
            obs.cond_latent = cond_latent
            return obs
        return self.observations.get_or_compute(("images", _digest(images, prompts)), compute)

    def prepare(self, images: Tensor, prompts: Sequence[str], state: Optional[Tensor], timer=None) -> Prepared:
        """An observation (uint8 images [B, H, W, 3], B prompts, model-space state [B, state_dim] or None) ->
        the loop's conditioning, from the caches where possible."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        instr, _ = self.instruction(prompts, timer)
        obs, _ = self.observation(images, prompts, timer)
        return self._assemble(instr, obs, state, obs.cond_latent)

    @torch.inference_mode()
    def prepare_tensors(self, cond: Conditioning, cond_latent: Optional[Tensor] = None, *,
                        text_key=None, obs_key=None) -> Prepared:
        """The tensor-level entry (encoder outputs given). ``text_key`` / ``obs_key`` name the content of
        cond.text (+ text_lens) / cond.vlm (+ vlm_lens): equal keys must mean equal tensors. None: no caching."""
        cond = cond.to(self.dtype)          # as the plain sampler

        def instr():
            return self._instruction_from_states(cond.text, cond.text_lens)

        def obs():
            return self._observation_from_features(cond.vlm, cond.vlm_lens)
        i = instr() if text_key is None else self.instructions.get_or_compute(("tensor", text_key), instr)[0]
        o = obs() if obs_key is None else self.observations.get_or_compute(("tensor", obs_key), obs)[0]
        return self._assemble(i, o, cond.state, cond_latent)

    def _instruction_from_states(self, text: Tensor, text_lens: Optional[Tensor]) -> Instruction:
        text = text.to(self.device, self.dtype)
        lens = None if text_lens is None else torch.as_tensor(text_lens, device=self.device)
        c = self.model.cache_conditioning(Conditioning(text=text, text_lens=lens))
        return Instruction(text=text, text_lens=lens, ctx=c.text_ctx, kv=c.text_kv)

    def _observation_from_features(self, vlm: Optional[Tensor], vlm_lens) -> Observation:
        if vlm is None or not self.model.cfg.und_stream:
            return Observation(cond_latent=None, vlm=None, vlm_lens=None, und=None)
        vlm = vlm.to(self.device, self.dtype)
        lens = None if vlm_lens is None else torch.as_tensor(vlm_lens, device=self.device)
        return Observation(cond_latent=None, vlm=vlm, vlm_lens=lens, und=self.model.und.embed(vlm, lens))

    def _assemble(self, instr: Instruction, obs: Observation, state, cond_latent) -> Prepared:
        if state is not None:
            state = state.to(self.device, self.dtype)
        cond = Conditioning(text=instr.text, vlm=obs.vlm, state=state, text_lens=instr.text_lens,
                            vlm_lens=obs.vlm_lens)
        return Prepared(cond=cond, cache=ConditionCache(text_ctx=instr.ctx, text_kv=instr.kv, und=obs.und),
                        cond_latent=cond_latent)

    def _encoders(self) -> Encoders:
        if self.encoders is None:
            raise RuntimeError("this engine has no encoders: give encoder outputs to prepare_tensors(), or build "
                               "the engine with encoders")
        return self.encoders

    # ---- the step grid (cached) ----------------------------------------------------------------------------
    @torch.inference_mode()
    def plan(self, mode: str, batch: int, steps: int, shift: float) -> StepPlan:
        """``flow.step_plan``: timesteps, dt and time embeddings of every step, as the plain sampler makes them."""
        return self.plans.get_or_compute(
            (mode, batch, steps, float(shift)),
            lambda: step_plan(self.model, mode, batch, steps, shift, self.dtype, self.device))[0]

    # ---- sampling --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, mode: str, prepared: Prepared, *, num_frames: Optional[int] = None,
               actions: Optional[Tensor] = None, video: Optional[Tensor] = None,
               noise_video: Optional[Tensor] = None, noise_action: Optional[Tensor] = None,
               steps: Optional[int] = None, shift: Optional[float] = None,
               guidance: Optional[PrefixGuidance] = None, generator: Optional[torch.Generator] = None,
               timer=None) -> SampleResult:
        """``motus_fast.flow.sample`` with this engine's sampler options on prepared conditioning (same arguments
        and results; in `idm` the condition frame is frame 0 of the given `video`). guidance: RTC prefix
        inpainting of the action stream (modes that integrate actions)."""
        if guidance is not None and mode in MODE_TABLE and mode not in ACTION_MODES:
            raise ValueError(f"action-prefix guidance needs a mode that generates actions {ACTION_MODES}, "
                             f"not {mode!r}")
        video_given = mode in MODE_TABLE and MODE_TABLE[mode].video == GIVEN      # idm: frame 0 of the clip
        cond_latent = check_mode_inputs(mode, actions, video, None if video_given else prepared.cond_latent)
        check_fp8(self.model, self.sampler)
        B, dtype = cond_latent.shape[0], self.dtype
        noise_video, noise_action = check_and_draw_noise(self.cfg.action, cond_latent, num_frames, actions, video,
                                                         noise_video, noise_action, generator, self.device, dtype)
        steps = steps or self.steps
        shift = self.shift if shift is None else shift
        plan = self.plan(mode, B, steps, shift)
        cond, cache = prepared.cond, prepared.cache
        spec = MODE_TABLE[mode]
        inputs = dict(
            x=(video if spec.video == GIVEN else noise_video).to(self.device, dtype),
            a=(actions if spec.action == GIVEN else noise_action).to(self.device, dtype),
            cond_latent=cond_latent.to(self.device), state=cond.state, text_lens=cond.text_lens,
            text_ctx=cache.text_ctx, text_kv=cache.text_kv, und=cache.und,
            guidance=None if guidance is None else (guidance.target.to(self.device, dtype),
                                                    guidance.weights.to(self.device, dtype)))
        loop = partial(self._loop, mode, plan)
        with (timer or NullTimer()).stage("denoise"):
            if self.graphs is None:
                x, a = loop(**inputs)
            else:
                key = (mode, steps, float(shift), guidance is not None) + _shape_key(inputs)
                # the conditioning tensors come from the caches, which never modify them in place
                (x, a), _ = self.graphs.run(key, loop, inputs, immutable=("text_ctx", "text_kv", "und"))
        return result(mode, x, a)

    def _loop(self, mode: str, plan: StepPlan, *, x, a, cond_latent, state, text_lens, text_ctx, text_kv, und,
              guidance):
        """``flow.denoise`` on cached conditioning and time tables; a pure function of its tensor arguments, so it
        can be captured as one CUDA graph."""
        cond = Conditioning(text=None, state=state, text_lens=text_lens)   # the cache replaces text and vlm
        cache = ConditionCache(text_ctx=text_ctx, text_kv=text_kv, und=und)
        guide = None if guidance is None else partial(guide_velocity, guidance=PrefixGuidance(*guidance))
        return denoise(self.model, mode, plan, x=x, a=a, cond_latent=cond_latent, cond=cond, cache=cache,
                       options=self.sampler, guide=guide)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def draw_noise(self, seed: int, batch: int, num_frames: int, latent_hw: tuple[int, int]):
        """Initial noise from a CPU generator seeded with `seed` (video first, then actions), moved to the
        device: the same seed gives the same noise on any device."""
        g = torch.Generator().manual_seed(seed)
        C = self.cfg.video.in_channels
        acfg = self.cfg.action
        nv = torch.randn((batch, C, num_frames, *latent_hw), generator=g, dtype=self.dtype)
        na = torch.randn((batch, acfg.chunk_size, acfg.action_dim), generator=g, dtype=self.dtype)
        return nv.to(self.device), na.to(self.device)

    def cache_stats(self) -> dict:
        out = {name: {"hits": c.hits, "misses": c.misses, "size": len(c)}
               for name, c in (("instructions", self.instructions), ("observations", self.observations),
                               ("plans", self.plans))}
        if self.graphs is not None:
            out["graphs"] = {"captures": self.graphs.captures, "replays": self.graphs.replays,
                             "eager_keys": len(self.graphs.failed)}
        return out


def _digest(images: Tensor, prompts: Sequence[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(images.shape), str(images.dtype), tuple(prompts))).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def _shape_key(inputs: dict) -> tuple:
    """Shapes (and None-ness) of every tensor the loop reads: a graph is valid for exactly these."""
    leaves, spec = tree_flatten(inputs)
    return (str(spec),) + tuple(None if t is None else (tuple(t.shape), str(t.dtype)) for t in leaves)
