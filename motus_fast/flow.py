"""Rectified flow with UniDiffuser-style per-modality timesteps: noising, the training loss and the five modes.

Conventions (upstream): ``x_sigma = (1 - sigma) x0 + sigma * noise``, sigma = 1 is pure noise, the network predicts
``v = noise - x0``, time embeddings get ``t = 1000 * sigma``. Latent frame 0 is the clean condition frame: it is
re-imposed after every noising and every Euler step and excluded from the video loss (its terms are zero).

Modes (DESIGN.md section 4):

| mode          | video stream               | action stream              |
|---------------|----------------------------|----------------------------|
| `joint`       | integrate 1 -> 0           | integrate 1 -> 0 (same t)  |
| `vla`         | held at pure noise, t = 1  | integrate 1 -> 0           |
| `world_model` | integrate 1 -> 0           | given actions, t = 0       |
| `idm`         | given latents, t = 0       | integrate 1 -> 0           |
| `video`       | integrate 1 -> 0           | held at pure noise, t = 1  |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from motus_fast.config import FlowConfig
from motus_fast.model.mot import Conditioning
from motus_fast.ops import euler_step, masked_mse, noise_and_target

Tensor = torch.Tensor
MODES = ("joint", "vla", "world_model", "idm", "video")


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
        return FlowDraws(video_ids, video_noise, action_ids, action_noise)


def training_loss(model, batch: FlowBatch, draws: Optional[FlowDraws] = None,
                  generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Rectified-flow loss on both streams with independent timesteps. Returns loss, loss_video, loss_action."""
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


@torch.no_grad()
def sample(model, mode: str = "vla", *, cond: Conditioning, cond_latent: Optional[Tensor] = None, num_frames: Optional[int] = None,
           actions: Optional[Tensor] = None, video: Optional[Tensor] = None, steps: Optional[int] = None,
           shift: Optional[float] = None, noise_video: Optional[Tensor] = None,
           noise_action: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
           progress: bool = False) -> SampleResult:
    """Euler sampler for the five modes.

    cond: text/VLM/state; cond_latent: clean first-frame latent [B, C, 1, H, W] (in `idm` it is the given clip's
    frame 0 and may be omitted); num_frames: latent frames T
    (including the condition frame; taken from `noise_video` or `video` if those are given); actions: the given
    chunk in `world_model`; video: the given clip [B, C, T, H, W] in `idm`; steps/shift: Euler steps on
    ``sampling_grid`` (config defaults: 10, unshifted); noise_*: initial noise (drawn with `generator` if None).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    flow: FlowConfig = model.cfg.flow
    acfg = model.cfg.action
    dtype = next(model.parameters()).dtype
    if mode == "world_model" and actions is None:
        raise ValueError("mode 'world_model' needs the given `actions` [B, K, action_dim]")
    if mode == "idm":
        if video is None:
            raise ValueError("mode 'idm' needs the given `video` latents [B, C, T, H, W]")
        if cond_latent is None:
            cond_latent = video[:, :, :1]
        elif not torch.equal(cond_latent, video[:, :, :1]):
            raise ValueError("mode 'idm': cond_latent differs from frame 0 of the given video (omit it)")
    if cond_latent is None:
        raise ValueError(f"mode {mode!r} needs cond_latent, the clean first-frame latent [B, C, 1, H, W]")
    B = cond_latent.shape[0]
    dev = cond_latent.device
    noise_video, noise_action = check_and_draw_noise(acfg, cond_latent, num_frames, actions, video, noise_video,
                                                     noise_action, generator, dev, dtype)

    integrate_video = mode in ("joint", "world_model", "video")
    integrate_action = mode in ("joint", "vla", "idm")
    x = video.to(dtype) if mode == "idm" else with_condition_frame(noise_video.to(dtype), cond_latent)
    a = actions.to(dtype) if mode == "world_model" else noise_action.to(dtype)
    cond = cond.to(dtype)
    cache = model.cache_conditioning(cond)            # text K/V and und tokens: once per call, not per step
    t_grid = sampling_grid(steps or flow.sample_steps, flow.sample_shift if shift is None else shift, dtype, dev)
    full = torch.full((B,), float(flow.num_train_timesteps), dtype=dtype, device=dev)
    t_scaled, dts = t_grid * flow.num_train_timesteps, t_grid[1:] - t_grid[:-1]   # per-step inputs, made once
    for i in tqdm(range(len(t_grid) - 1), desc=f"sample[{mode}]", disable=not progress, leave=False):
        t_now = t_scaled[i].expand(B)
        t_v = t_now if integrate_video else (full if mode == "vla" else torch.zeros_like(full))
        t_a = t_now if integrate_action else (full if mode == "video" else torch.zeros_like(full))
        v_video, v_action = model(x, t_v, a, t_a, cond, cache=cache)
        # x + dt v for the integrated streams in one launch; the condition frame is re-clamped
        xs, vs, conds = [], [], []
        if integrate_video:
            xs, vs, conds = [x], [v_video], [cond_latent]
        if integrate_action:
            xs, vs, conds = xs + [a], vs + [v_action], conds + [None]
        stepped = euler_step(xs, vs, dts[i], conds)
        x = stepped[0] if integrate_video else x
        a = stepped[-1] if integrate_action else a
    return SampleResult(video=None if mode == "vla" else x, actions=None if mode == "video" else a)
