"""The request schema and its strict validation.

A request is one msgpack map (openpi style: one observation, arrays unbatched) or a batch of B observations
(every per-sample field gets a leading B axis, prompts become a list of B strings). Every key, type, dtype, shape
and value range is checked before anything reaches the model; the first problem raises ``ValidationError`` whose
message names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from motus_fast.flow import ACTION_MODES, MODES, VIDEO_MODES
from motus_fast.serve.config import ServeConfig

FIELDS = {
    "image": "uint8 [H, W, 3] (batch: [B, H, W, 3]): the current camera frame at the server's image_shape",
    "prompt": "str (batch: list of B str): the instruction",
    "state": "float [state_dim] (batch: [B, state_dim]): robot state, raw units (finetune-layout models only)",
    "mode": f"str, one of {list(MODES)} (default: the server's default_mode)",
    "actions": "float [K, action_dim] (batch: [B, K, action_dim]): the given chunk, raw units (world_model only)",
    "future_frames": "uint8 [F, H, W, 3] (batch: [B, F, H, W, 3]), F a positive multiple of frame_stride: the "
                     "frames after `image` (idm only)",
    "num_frames": "int: latent frames of the video stream, condition frame included (not idm)",
    "steps": "int: Euler steps (default: the server's)",
    "noise_seed": "int >= 0: draw the initial noise from this seed (reproducible results)",
    "return_frames": "bool: decode the predicted video through the VAE into uint8 frames (joint, world_model, "
                     "video; default false: return latents)",
    "prev_actions": "float [P, action_dim] (batch: [B, P, action_dim]), 1 <= P <= K: the not-yet-executed rest of "
                    "the previous chunk, raw units (real-time chunking; joint, vla, idm)",
    "inference_delay": "int in 0..P: actions executed before this chunk arrives (real-time chunking)",
}
FLOAT_KINDS = ("f",)


class ValidationError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


@dataclass(frozen=True)
class RequestSpec:
    """What the served model accepts (fixed at start-up) plus the server's limits."""

    image_size: tuple[int, int]
    frame_stride: int
    horizon: int                    # K actions per chunk
    action_dim: int
    state_dim: Optional[int]        # None: pretrain layout (no state input)
    config: ServeConfig


@dataclass
class Request:
    mode: str
    batched: bool
    images: np.ndarray                      # uint8 [B, H, W, 3]
    prompts: list[str]
    state: Optional[np.ndarray]             # float64 [B, state_dim]
    actions: Optional[np.ndarray]           # float64 [B, K, action_dim] (world_model)
    future_frames: Optional[np.ndarray]     # uint8 [B, F, H, W, 3] (idm)
    num_frames: int                         # latent frames incl. the condition frame
    steps: Optional[int]
    noise_seed: Optional[int]
    return_frames: bool
    prev_actions: Optional[np.ndarray]      # float64 [B, P, action_dim]
    inference_delay: int

    @property
    def batch(self) -> int:
        return self.images.shape[0]


def validate(obs: Any, spec: RequestSpec) -> Request:
    cfg = spec.config
    if not isinstance(obs, dict):
        raise ValidationError("<message>", f"a request must be a map of fields, got {type(obs).__name__}")
    unknown = [k for k in obs if k not in FIELDS]
    if unknown:
        raise ValidationError(str(unknown[0]), f"unknown field; allowed: {sorted(FIELDS)}")

    mode = obs.get("mode", cfg.default_mode)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValidationError("mode", f"must be one of {list(MODES)}, got {_show(mode)}")

    H, W = spec.image_size
    image = _array(obs, "image", required=True)
    if image.dtype != np.uint8:
        raise ValidationError("image", f"must be uint8, got {image.dtype}")
    if image.ndim not in (3, 4) or image.shape[-3:] != (H, W, 3):
        raise ValidationError("image", f"must have shape [{H}, {W}, 3] or [B, {H}, {W}, 3], got {list(image.shape)}")
    batched = image.ndim == 4
    B = image.shape[0] if batched else 1
    if not 1 <= B <= cfg.max_batch:
        raise ValidationError("image", f"batch size must be in 1..{cfg.max_batch}, got {B}")
    images = image if batched else image[None]

    prompts = _prompts(obs.get("prompt"), batched, B, cfg.max_prompt_chars)

    state = None
    if spec.state_dim is None:
        if "state" in obs:
            raise ValidationError("state", "this model (pretrain layout) takes no state")
    else:
        state = _floats(obs, "state", (spec.state_dim,), batched, B, cfg.max_abs_value, required=True)

    actions = None
    if mode == "world_model":
        actions = _floats(obs, "actions", (spec.horizon, spec.action_dim), batched, B, cfg.max_abs_value,
                          required=True)
    elif "actions" in obs:
        raise ValidationError("actions", "is only used by mode 'world_model'")

    future = None
    if mode == "idm":
        future = _array(obs, "future_frames", required=True)
        lead = (B,) if batched else ()
        if (future.dtype != np.uint8 or future.ndim != len(lead) + 4 or future.shape[:len(lead)] != lead
                or future.shape[-3:] != (H, W, 3)):
            raise ValidationError("future_frames", f"must be uint8 [{'B, ' if batched else ''}F, {H}, {W}, 3], got "
                                  f"{future.dtype} {list(future.shape)}")
        F = future.shape[-4]
        if F < 1 or F % spec.frame_stride or 1 + F // spec.frame_stride > cfg.max_num_frames:
            raise ValidationError("future_frames", f"F={F} must be a positive multiple of {spec.frame_stride} with "
                                  f"1 + F/{spec.frame_stride} <= {cfg.max_num_frames} latent frames")
        future = future if batched else future[None]
        if "num_frames" in obs:
            raise ValidationError("num_frames", "is set by future_frames in mode 'idm'")
        num_frames = 1 + F // spec.frame_stride
    else:
        if "future_frames" in obs:
            raise ValidationError("future_frames", "is only used by mode 'idm'")
        num_frames = _int(obs, "num_frames", 1, cfg.max_num_frames, cfg.num_frames)
        if num_frames < 2 and mode != "vla":
            raise ValidationError("num_frames", f"mode {mode!r} predicts video: it needs >= 2 latent frames (only "
                                  "'vla' runs on the condition frame alone)")

    steps = _int(obs, "steps", 1, cfg.max_steps, None)
    seed = _int(obs, "noise_seed", 0, 2**63 - 1, None)

    return_frames = obs.get("return_frames", False)
    if not isinstance(return_frames, (bool, np.bool_)):
        raise ValidationError("return_frames", f"must be a bool, got {_show(return_frames)}")
    if return_frames and mode not in VIDEO_MODES:
        raise ValidationError("return_frames", f"mode {mode!r} predicts no video (modes with video: {VIDEO_MODES})")

    prev = None
    delay = 0
    if "prev_actions" in obs:
        if mode not in ACTION_MODES:
            raise ValidationError("prev_actions", f"mode {mode!r} generates no actions (modes with actions: "
                                  f"{ACTION_MODES})")
        prev = _floats(obs, "prev_actions", (None, spec.action_dim), batched, B, cfg.max_abs_value, required=True)
        P = prev.shape[1]
        if not 1 <= P <= spec.horizon:
            raise ValidationError("prev_actions", f"must hold 1..{spec.horizon} actions (the horizon), got {P}")
        delay = _int(obs, "inference_delay", 0, P, 0)
    elif "inference_delay" in obs:
        raise ValidationError("inference_delay", "needs prev_actions")

    return Request(mode=mode, batched=batched, images=images, prompts=prompts, state=state, actions=actions,
                   future_frames=future, num_frames=num_frames, steps=steps, noise_seed=seed,
                   return_frames=bool(return_frames), prev_actions=prev, inference_delay=delay)


# ---- field helpers -------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array {value.dtype} {list(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _array(obs: dict, field: str, required: bool) -> Optional[np.ndarray]:
    value = obs.get(field)
    if value is None:
        if required:
            raise ValidationError(field, f"is required: {FIELDS[field]}")
        return None
    if not isinstance(value, np.ndarray):
        raise ValidationError(field, f"must be an array ({FIELDS[field]}), got {_show(value)}")
    return value


def _floats(obs: dict, field: str, shape: tuple, batched: bool, B: int, max_abs: float,
            required: bool) -> Optional[np.ndarray]:
    """A float array of `shape` (None = any length on that axis), [B, *shape] if batched -> float64 [B, *shape]."""
    x = _array(obs, field, required)
    if x is None:
        return None
    want = ((B,) if batched else ()) + shape
    text = "[" + ", ".join("B" if i == 0 and batched else ("*" if n is None else str(n))
                           for i, n in enumerate(want)) + "]"
    if x.dtype.kind not in FLOAT_KINDS:
        raise ValidationError(field, f"must be a float array {text}, got dtype {x.dtype}")
    if x.ndim != len(want) or any(n is not None and n != m for n, m in zip(want, x.shape)):
        raise ValidationError(field, f"must have shape {text}, got {list(x.shape)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValidationError(field, "contains NaN or infinity")
    if x.size and np.abs(x).max() > max_abs:
        raise ValidationError(field, f"has values beyond +-{max_abs:g} (max |x| = {np.abs(x).max():.3g})")
    return x if batched else x[None]


def _int(obs: dict, field: str, lo: int, hi: int, default: Optional[int]) -> Optional[int]:
    if field not in obs:
        return default
    value = obs[field]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValidationError(field, f"must be an int, got {_show(value)}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValidationError(field, f"must be in {lo}..{hi}, got {value}")
    return value


def _prompts(value: Any, batched: bool, B: int, max_chars: int) -> list[str]:
    if value is None:
        raise ValidationError("prompt", f"is required: {FIELDS['prompt']}")
    prompts = value if batched else [value]
    if batched and (not isinstance(value, list) or len(value) != B):
        raise ValidationError("prompt", f"a batch of {B} images needs a list of {B} prompts, got {_show(value)}")
    for p in prompts:
        if not isinstance(p, str):
            raise ValidationError("prompt", f"must be a str, got {_show(p)}")
        if len(p) > max_chars:
            raise ValidationError("prompt", f"is {len(p)} characters long; the limit is {max_chars}")
    return list(prompts)
