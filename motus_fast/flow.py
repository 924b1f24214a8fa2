"""Rectified flow with UniDiffuser-style per-modality timesteps: noising, the training loss and the five modes.

Conventions (upstream): ``x_sigma = (1 - sigma) x0 + sigma * noise``, sigma = 1 is pure noise, the network predicts
``v = noise - x0``, time embeddings get ``t = 1000 * sigma``. Latent frame 0 is the clean condition frame: it is
re-imposed after every noising and every Euler step and excluded from the video loss (its terms are zero).

The five modes (DESIGN.md section 4) are ``MODE_TABLE``: per stream, integrated 1 -> 0, held at pure noise (t = 1)
or given clean (t = 0). ``denoise`` is THE Euler loop: ``sample`` runs it on a plain model, the inference engine
runs it on its caches (under CUDA graphs). ``SamplerOptions`` selects the steps in which the video and und streams
are skipped (their keys/values reused, only the action expert runs): exactly, for a model whose video/und queries
do not see actions, or approximately (action-only suffix, velocity cache, fewer video steps); and FP8 video weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from tqdm.auto import tqdm

from motus_fast.config import FlowConfig
from motus_fast.model.fp8 import video_fp8_granularity
from motus_fast.model.mot import Conditioning
from motus_fast.ops import euler_step, masked_mse, noise_and_target

Tensor = torch.Tensor
log = logging.getLogger("motus_fast")

INTEGRATE, NOISE, GIVEN = "integrate", "noise", "given"


@dataclass(frozen=True)
class ModeSpec:
    """What a mode does with each stream: integrate it 1 -> 0, hold it at pure noise (t = 1), or take it as given
    clean data (t = 0)."""

    video: Literal["integrate", "noise", "given"]
    action: Literal["integrate", "noise", "given"]


MODE_TABLE: dict[str, ModeSpec] = {
    "joint": ModeSpec(video=INTEGRATE, action=INTEGRATE),       # same t for both streams
    "vla": ModeSpec(video=NOISE, action=INTEGRATE),             # the policy
    "world_model": ModeSpec(video=INTEGRATE, action=GIVEN),
    "idm": ModeSpec(video=GIVEN, action=INTEGRATE),
    "video": ModeSpec(video=INTEGRATE, action=NOISE),
}
MODES = tuple(MODE_TABLE)
VIDEO_MODES = tuple(m for m, s in MODE_TABLE.items() if s.video == INTEGRATE)    # results with a video stream
ACTION_MODES = tuple(m for m, s in MODE_TABLE.items() if s.action == INTEGRATE)  # results with actions


# ---- noise schedule ---------------------------------------------------------------------------------------
def training_sigmas(cfg: FlowConfig) -> Tensor:
    """The training sigma grid (fp32, index 0 = sigma 1): s = linspace(1, 0, N+1)[:N], sigma = shift s/(1+(shift-1)s)."""
    s = torch.linspace(1.0, 0.0, cfg.num_train_timesteps + 1)[:-1]
    return cfg.train_shift * s / (1 + (cfg.train_shift - 1) * s)


def sampling_grid(steps: int, shift: float = 1.0, dtype=torch.float32, device=None) -> Tensor:
    """t_0 = 1 > t_1 > ... > t_N = 0 (the Euler time points), optionally shifted like the training grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device)
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def with_condition_frame(video: Tensor, cond_latent: Tensor) -> Tensor:
    """Replace latent frame 0 of [B, C, T, H, W] by the clean condition latent [B, C, 1, H, W]."""
    return torch.cat([cond_latent.to(video.dtype), video[:, :, 1:]], dim=2)


# ---- training ---------------------------------------------------------------------------------------------
@dataclass
class FlowBatch:
    """Clean training data. video: [B, C, T, H, W] latents (frame 0 = condition); actions: [B, K, action_dim]
    (None: no action stream, stage 1); has_actions: [B] bool, False for action-free samples (their action stream
    is fed at t = 1 and not scored)."""

    video: Tensor
    actions: Optional[Tensor]
    cond: Conditioning
    has_actions: Optional[Tensor] = None


@dataclass
class FlowDraws:
    """The random draws of one training step (sampled if not given): timestep indices into the training grid
    and the Gaussian noise, per modality. Upstream draws them in the order video ids, video noise, action ids,
    action noise."""

    video_ids: Tensor
    video_noise: Tensor
    action_ids: Optional[Tensor] = None
    action_noise: Optional[Tensor] = None

    @staticmethod
    def sample(batch: FlowBatch, cfg: FlowConfig, generator: Optional[torch.Generator] = None) -> "FlowDraws":
        B, dev = batch.video.shape[0], batch.video.device
        n = cfg.num_train_timesteps
        video_ids = torch.randint(0, n, (B,), generator=generator, device=dev)
        video_noise = torch.randn(batch.video.shape, generator=generator, device=dev, dtype=batch.video.dtype)
        if batch.actions is None:
            return FlowDraws(video_ids, video_noise)
        action_ids = torch.randint(0, n, (B,), generator=generator, device=dev)
        action_noise = torch.randn(batch.actions.shape, generator=generator, device=dev, dtype=batch.actions.dtype)
        if cfg.timesteps == "shared":   # the joint diffuser: one timestep for both streams (same draws consumed)
            action_ids = video_ids
        return FlowDraws(video_ids, video_noise, action_ids, action_noise)


def training_loss(model, batch: FlowBatch, draws: Optional[FlowDraws] = None,
                  generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Rectified-flow loss on both streams with independent timesteps (or one shared timestep, see
    ``FlowConfig.timesteps``). Returns loss, loss_video, loss_action."""
    cfg: FlowConfig = model.cfg.flow
    draws = draws or FlowDraws.sample(batch, cfg, generator)
    sigmas = training_sigmas(cfg).to(batch.video.device)
    sigma_v = sigmas[draws.video_ids]
    # x_t with the clean condition frame 0 kept, and the target noise - x0, in one pass
    video_in, target_v = noise_and_target(batch.video, draws.video_noise, sigma_v, clean_frames=1)
    if batch.actions is None:   # video stream alone
        pred_v, _ = model(video_in, sigma_v * cfg.num_train_timesteps, None, None, batch.cond)
        loss_video = masked_mse(pred_v, target_v, skip_frames=1)
        return {"loss": cfg.video_loss_weight * loss_video, "loss_video": loss_video,
                "loss_action": torch.zeros_like(loss_video)}

    sigma_a = sigmas[draws.action_ids]
    has_actions = batch.has_actions
    if has_actions is not None:
        sigma_a = torch.where(has_actions.to(sigma_a.device), sigma_a, torch.ones_like(sigma_a))
    actions_in, target_a = noise_and_target(batch.actions, draws.action_noise, sigma_a)
    pred_v, pred_a = model(video_in, sigma_v * cfg.num_train_timesteps, actions_in,
                           sigma_a * cfg.num_train_timesteps, batch.cond)

    # video: frame 0's terms are zero but still count in the mean (upstream); actions: action-free samples weigh 0
    loss_video = masked_mse(pred_v, target_v, skip_frames=1)
    loss_action = masked_mse(pred_a, target_a, None if has_actions is None else has_actions.to(pred_a.device))
    loss = cfg.video_loss_weight * loss_video + cfg.action_loss_weight * loss_action
    return {"loss": loss, "loss_video": loss_video, "loss_action": loss_action}


# ---- sampling -----------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    """video: [B, C, T, H, W] latents (None in `vla`: not generated); actions: [B, K, action_dim] (None in
    `video`). A stream given as a condition comes back unchanged."""

    video: Optional[Tensor]
    actions: Optional[Tensor]


@dataclass(frozen=True)
class SamplerOptions:
    """How the denoise loop spends its work. The default is exact; every shortcut is off unless set.

    context_cache: exact. For a model whose video/und queries do not see actions (``video_und_see_actions``
      False), in `vla` and `idm` the video and und streams do not change over the steps: run them once, keep every
      layer's keys/values, and run only the action expert per step.
    action_only_after: (a) approximate, in modes that do not integrate video (`vla`, `idm`). Full steps before
      step s, then only the action expert, reading the video/und keys/values of step s - 1. s >= 1.
    velocity_threshold: (b) approximate, TeaCache-style. Skip the video/und streams (reuse their keys/values and the
      video velocity) while the accumulated relative L1 change of the first layer's modulated inputs since the last
      full step stays below this threshold.
    video_steps: (c) approximate. In modes that integrate video, the video stream takes this many Euler steps
      (evaluated at evenly spread points of the step grid, its velocity held in between); the action stream keeps
      every step.
    fp8_video: (d) approximate. FP8 (e4m3) weights for the video expert's Linear layers, scaled "tensor"-wise or
      "row"-wise (``motus_fast.model.fp8``; the model must be converted first, the engine does it).
    """

    context_cache: bool = True
    action_only_after: Optional[int] = None
    velocity_threshold: Optional[float] = None
    video_steps: Optional[int] = None
    fp8_video: Optional[Literal["tensor", "row"]] = None

    def __post_init__(self):
        if self.action_only_after is not None and self.action_only_after < 1:
            raise ValueError(f"SamplerOptions.action_only_after must be >= 1 (one full step gives the keys/values "
                             f"to reuse), got {self.action_only_after}")
        if self.velocity_threshold is not None and self.velocity_threshold <= 0:
            raise ValueError(f"SamplerOptions.velocity_threshold must be > 0, got {self.velocity_threshold}")
        if self.video_steps is not None and self.video_steps < 1:
            raise ValueError(f"SamplerOptions.video_steps must be >= 1, got {self.video_steps}")
        if self.fp8_video not in (None, "tensor", "row"):
            raise ValueError(f"SamplerOptions.fp8_video must be None, 'tensor' or 'row', got {self.fp8_video!r}")

    @property
    def exact(self) -> bool:
        return (self.action_only_after, self.velocity_threshold, self.video_steps, self.fp8_video) == (None,) * 4

    @property
    def host_decisions(self) -> bool:
        """Whether the loop decides on the host from device values (the velocity cache): no CUDA graph."""
        return self.velocity_threshold is not None


# named presets (``motus-fast serve --sampler NAME``); "fast" is chosen from bench/results/policy_speed_cpu.md
SAMPLERS: dict[str, SamplerOptions] = {
    "exact": SamplerOptions(),
    "fast": SamplerOptions(action_only_after=1),
}


def sampler_name(options: SamplerOptions) -> str:
    """The preset these options are ("exact", "fast"), or "custom"."""
    return next((name for name, o in SAMPLERS.items() if o == options), "custom")


def get_sampler(name: str) -> SamplerOptions:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise KeyError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}") from None


@dataclass
class StepPlan:
    """The fixed step grid of one (mode, batch, steps, shift): per step the timesteps fed to each stream [B]
    (0..1000), the noise level at its start and its Euler dt (0-d), and the time-MLP outputs
    ((e_v, e6_v), (e_a, e6_a)) that ``Motus.forward`` takes as time_emb."""

    t_video: list[Tensor] = field(default_factory=list)
    t_action: list[Tensor] = field(default_factory=list)
    sigma: list[Tensor] = field(default_factory=list)
    dt: list[Tensor] = field(default_factory=list)
    emb: list[tuple] = field(default_factory=list)


def step_plan(model, mode: str, batch: int, steps: int, shift: float, dtype, device) -> StepPlan:
    """The timesteps of every step per the mode table, and their time embeddings."""
    spec = MODE_TABLE[mode]
    n = model.cfg.flow.num_train_timesteps
    t_grid = sampling_grid(steps, shift, dtype, device)
    held = {NOISE: torch.full((batch,), float(n), dtype=dtype, device=device),
            GIVEN: torch.zeros((batch,), dtype=dtype, device=device)}
    t_scaled, dts = t_grid * n, t_grid[1:] - t_grid[:-1]
    plan = StepPlan()
    for i in range(steps):
        t_now = t_scaled[i].expand(batch)
        t_v = t_now if spec.video == INTEGRATE else held[spec.video]
        t_a = t_now if spec.action == INTEGRATE else held[spec.action]
        plan.t_video.append(t_v)
        plan.t_action.append(t_a)
        plan.sigma.append(t_grid[i])
        plan.dt.append(dts[i])
        plan.emb.append((model.video.time(t_v), model.action.time(t_a)))
    return plan


def uses_context_cache(model, mode: str, options: SamplerOptions) -> bool:
    """Whether the exact video/und cache applies: the streams are constant over the steps and blind to actions."""
    spec = MODE_TABLE[mode]
    return (options.context_cache and not model.cfg.video_und_see_actions and spec.video != INTEGRATE
            and spec.action == INTEGRATE)


def video_step_points(steps: int, video_steps: int) -> set[int]:
    """The steps (of `steps`) at which a stream with `video_steps` Euler steps is evaluated: evenly spread."""
    n = min(video_steps, steps)
    return {int(j * steps // n) for j in range(n)}


def denoise(model, mode: str, plan: StepPlan, *, x: Tensor, a: Tensor, cond_latent: Tensor, cond: Conditioning,
            cache, options: SamplerOptions = SamplerOptions(),
            guide: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
            progress: bool = False) -> tuple[Tensor, Tensor]:
    """THE Euler loop of the five modes. x: video [B, C, T, H, W] (noise, or the given clip in `idm`); a: actions
    [B, K, D] (noise, or the given chunk in `world_model`); cache: ``Motus.cache_conditioning(cond)``; guide:
    optional (a, v_action, sigma) -> guided action velocity (real-time chunking). -> (x, a) after the last step.

    A step is "full" (every expert runs; the video/und keys/values are kept) or "action-only" (the action expert
    alone reads the kept keys/values; an integrated video stream reuses its last velocity). The exact default makes
    every step full, except with the exact context cache (``SamplerOptions.context_cache``)."""
    spec = MODE_TABLE[mode]
    steps = len(plan.dt)
    if spec.video != GIVEN:
        x = with_condition_frame(x, cond_latent)
    exact_context = uses_context_cache(model, mode, options)
    video_points = (video_step_points(steps, options.video_steps)
                    if options.video_steps is not None and spec.video == INTEGRATE else None)
    suffix_applies = options.action_only_after is not None and spec.video != INTEGRATE
    skips = not exact_context and (suffix_applies or video_points is not None
                                   or options.velocity_threshold is not None)
    context = model.context_kv(x, plan.t_video[0], cond, cache, time_emb=plan.emb[0][0]) if exact_context else None
    v_video = indicator_prev = None
    accumulated = 0.0
    for i in tqdm(range(steps), desc=f"sample[{mode}]", disable=not progress, leave=False):
        full = not exact_context
        if skips:
            skip = ((suffix_applies and i >= options.action_only_after)
                    or (video_points is not None and i not in video_points))
            if options.velocity_threshold is not None:
                indicator = model.first_layer_inputs(x, a, cond, plan.emb[i])
                accumulated += relative_l1_change(indicator, indicator_prev)
                indicator_prev = indicator
                skip = skip or accumulated < options.velocity_threshold
            full = context is None or not skip
        if full:
            kv = [] if skips else None
            v_video, v_action = model(x, plan.t_video[i], a, plan.t_action[i], cond, cache=cache,
                                      time_emb=plan.emb[i], kv_out=kv)
            context, accumulated = kv, 0.0
        elif spec.action == INTEGRATE:
            v_action = model.action_velocity(a, plan.t_action[i], cond, cache, context, time_emb=plan.emb[i][1])
        # x + dt v for the integrated streams in one launch; the condition frame is re-clamped
        xs, vs, conds = [], [], []
        if spec.video == INTEGRATE:
            xs, vs, conds = [x], [v_video], [cond_latent]
        if spec.action == INTEGRATE:
            if guide is not None:
                v_action = guide(a, v_action, plan.sigma[i])
            xs, vs, conds = xs + [a], vs + [v_action], conds + [None]
        stepped = euler_step(xs, vs, plan.dt[i], conds)
        x = stepped[0] if spec.video == INTEGRATE else x
        a = stepped[-1] if spec.action == INTEGRATE else a
    return x, a


def relative_l1_change(now: list[Tensor], before: Optional[list[Tensor]]) -> float:
    """max over the streams of mean|now - before| / mean|before| (0 for the first call): the velocity cache's
    indicator. A host value: the loop decides on it."""
    if before is None:
        return 0.0
    return max(float((n - b).abs().mean() / b.abs().mean().clamp_min(1e-12)) for n, b in zip(now, before))


def check_and_draw_noise(acfg, cond_latent: Tensor, num_frames: Optional[int], actions: Optional[Tensor],
                         video: Optional[Tensor], noise_video: Optional[Tensor], noise_action: Optional[Tensor],
                         generator: Optional[torch.Generator], device, dtype) -> tuple[Tensor, Tensor]:
    """The given tensors of one sampling call checked against the condition latent [B, C, 1, H, W] (num_frames taken
    from `noise_video` or `video` if not given), and the missing noise drawn: video first, then actions (the order
    `sample` and the inference engine share, so both draw the same numbers). -> (noise_video, noise_action)"""
    B, C, _, H, W = cond_latent.shape
    for name, ref in (("noise_video", noise_video), ("video", video)):
        if ref is not None:
            num_frames = ref.shape[2] if num_frames is None else num_frames
            if tuple(ref.shape) != (B, C, num_frames, H, W):
                raise ValueError(f"{name} has shape {tuple(ref.shape)}; expected {(B, C, num_frames, H, W)}")
    if num_frames is None:
        raise ValueError("give num_frames (latent frames, condition included) or noise_video")
    a_shape = (B, acfg.chunk_size, acfg.action_dim)
    if actions is not None and tuple(actions.shape) != a_shape:
        raise ValueError(f"actions have shape {tuple(actions.shape)}; expected {a_shape}")
    if noise_video is None:
        noise_video = torch.randn((B, C, num_frames, H, W), generator=generator, device=device, dtype=dtype)
    if noise_action is None:
        noise_action = torch.randn(a_shape, generator=generator, device=device, dtype=dtype)
    return noise_video, noise_action


def check_mode_inputs(mode: str, actions: Optional[Tensor], video: Optional[Tensor],
                      cond_latent: Optional[Tensor]) -> Tensor:
    """The mode's given streams are present; -> the condition latent (in `idm`: frame 0 of the given clip)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    spec = MODE_TABLE[mode]
    if spec.action == GIVEN and actions is None:
        raise ValueError(f"mode {mode!r} needs the given `actions` [B, K, action_dim]")
    if spec.video == GIVEN:
        if video is None:
            raise ValueError(f"mode {mode!r} needs the given `video` latents [B, C, T, H, W]")
        if cond_latent is None:
            cond_latent = video[:, :, :1]
        elif not torch.equal(cond_latent, video[:, :, :1]):
            raise ValueError(f"mode {mode!r}: cond_latent differs from frame 0 of the given video (omit it)")
    if cond_latent is None:
        raise ValueError(f"mode {mode!r} needs cond_latent, the clean first-frame latent [B, C, 1, H, W]")
    return cond_latent


def check_fp8(model, options: SamplerOptions) -> None:
    """The model's video layers hold the FP8 weights the options ask for (or none when they ask for none)."""
    have = video_fp8_granularity(model)
    if have != options.fp8_video:
        raise ValueError(f"SamplerOptions.fp8_video={options.fp8_video!r} but the model's video expert Linear layers "
                         f"are {'FP8 ' + repr(have) if have else 'not FP8'}: convert it with "
                         "motus_fast.model.fp8.quantize_video_linears(model, granularity) (InferenceEngine does)")


def result(mode: str, x: Tensor, a: Tensor) -> SampleResult:
    spec = MODE_TABLE[mode]
    return SampleResult(video=None if spec.video == NOISE else x, actions=None if spec.action == NOISE else a)


@torch.no_grad()
def sample(model, mode: str = "vla", *, cond: Conditioning, cond_latent: Optional[Tensor] = None,
           num_frames: Optional[int] = None, actions: Optional[Tensor] = None, video: Optional[Tensor] = None,
           steps: Optional[int] = None, shift: Optional[float] = None, noise_video: Optional[Tensor] = None,
           noise_action: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
           options: SamplerOptions = SamplerOptions(), progress: bool = False) -> SampleResult:
    """Euler sampler for the five modes.

    cond: text/VLM/state; cond_latent: clean first-frame latent [B, C, 1, H, W] (in `idm` it is the given clip's
    frame 0 and may be omitted); num_frames: latent frames T
    (including the condition frame; taken from `noise_video` or `video` if those are given); actions: the given
    chunk in `world_model`; video: the given clip [B, C, T, H, W] in `idm`; steps/shift: Euler steps on
    ``sampling_grid`` (config defaults: 10, unshifted); noise_*: initial noise (drawn with `generator` if None);
    options: exact by default, see ``SamplerOptions``.
    """
    cond_latent = check_mode_inputs(mode, actions, video, cond_latent)
    check_fp8(model, options)
    flow: FlowConfig = model.cfg.flow
    dtype = next(model.parameters()).dtype
    B, dev = cond_latent.shape[0], cond_latent.device
    noise_video, noise_action = check_and_draw_noise(model.cfg.action, cond_latent, num_frames, actions, video,
                                                     noise_video, noise_action, generator, dev, dtype)
    spec = MODE_TABLE[mode]
    x = video.to(dtype) if spec.video == GIVEN else noise_video.to(dtype)
    a = actions.to(dtype) if spec.action == GIVEN else noise_action.to(dtype)
    cond = cond.to(dtype)
    cache = model.cache_conditioning(cond)            # text K/V and und tokens: once per call, not per step
    plan = step_plan(model, mode, B, steps or flow.sample_steps, flow.sample_shift if shift is None else shift,
                     dtype, dev)
    x, a = denoise(model, mode, plan, x=x, a=a, cond_latent=cond_latent, cond=cond, cache=cache, options=options,
                   progress=progress)
    return result(mode, x, a)
