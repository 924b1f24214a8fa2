"""Optical flow <-> RGB with the standard flow colour wheel (Baker et al., Middlebury), and its exact inverse.

Hue encodes direction, saturation encodes speed, white is "no motion". The wheel is the Middlebury one: 55 hues in
six ramps red -> yellow (15), yellow -> green (6), green -> cyan (4), cyan -> blue (11), blue -> magenta (13),
magenta -> red (6); a pixel with flow (u, v) takes the hue at angle atan2(-v, -u) and is blended towards white by
1 - |flow| / max_flow.

Three deliberate differences from the usual visualisation code, all so that the image can be decoded back into flow
(the latent-action decoder reconstructs this image, and tests check the round trip):

- **Fixed scale.** Speed is divided by a fixed ``max_flow`` (a config value), not by the largest speed in the
  image: per-image normalisation would throw away the absolute speed that a latent action must carry. Speeds
  above ``max_flow`` saturate (clipped), instead of being darkened.
- **Exact ramps.** The ramps are linear (i / n), without the 8-bit ``floor`` of the original table.
- **Closed circle.** The angle maps onto the whole wheel [0, 55) with wrap-around, so angle -pi and +pi give the same
  colour (the original maps onto [0, 54] and has a seam at pi).

Every wheel colour has one channel at 1, one at 0 and one on a ramp; the inverse reads which channel is which to find
the ramp, the ramp value to find the position on it, and the smallest channel (1 - speed) to find the speed.
"""

from __future__ import annotations

import numpy as np

# (length, channel held at 1, channel held at 0, ramping channel, ramp rises?) in wheel order; R=0, G=1, B=2
_RAMPS = (
    (15, 0, 2, 1, True),    # red -> yellow: G rises
    (6, 1, 2, 0, False),    # yellow -> green: R falls
    (4, 1, 0, 2, True),     # green -> cyan: B rises
    (11, 2, 0, 1, False),   # cyan -> blue: G falls
    (13, 2, 1, 0, True),    # blue -> magenta: R rises
    (6, 0, 1, 2, False),    # magenta -> red: B falls
)
_NUM_HUES = sum(r[0] for r in _RAMPS)  # 55
_STARTS = np.cumsum([0] + [r[0] for r in _RAMPS])[:-1]


def wheel_colour(position: np.ndarray) -> np.ndarray:
    """position: [...] in [0, 55) along the wheel -> RGB [..., 3] in [0, 1] (one channel 1, one 0)."""
    position = np.mod(position, _NUM_HUES)
    out = np.zeros(position.shape + (3,), dtype=np.float64)
    for (length, one, zero, ramp, rises), start in zip(_RAMPS, _STARTS):
        on = (position >= start) & (position < start + length)
        u = (position[on] - start) / length
        out[on, one] = 1.0
        out[on, zero] = 0.0
        out[on, ramp] = u if rises else 1.0 - u
    return out


def flow_to_rgb(flow: np.ndarray, max_flow: float) -> np.ndarray:
    """flow: [..., H, W, 2] (u right, v down; any unit) -> RGB float32 [..., H, W, 3] in [0, 1].

    Speeds are divided by max_flow (same unit as flow) and clipped to 1."""
    flow = np.asarray(flow)
    if flow.shape[-1] != 2:
        raise ValueError(f"flow must end in a (u, v) axis of size 2, got shape {flow.shape}")
    if not max_flow > 0:
        raise ValueError(f"max_flow must be > 0, got {max_flow}")
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    speed = np.minimum(np.hypot(u, v) / max_flow, 1.0)
    angle = np.arctan2(-v, -u) / np.pi                      # [-1, 1]
    hue = wheel_colour((angle + 1.0) / 2.0 * _NUM_HUES)     # [..., 3]
    rgb = 1.0 - speed[..., None] * (1.0 - hue)
    return rgb.astype(np.float32)


def rgb_to_flow(rgb: np.ndarray, max_flow: float, eps: float = 1e-6) -> np.ndarray:
    """Inverse of flow_to_rgb: RGB [..., H, W, 3] in [0, 1] (float) or uint8 -> flow float32 [..., H, W, 2].

    Exact for unclipped speeds on float input; uint8 input recovers flow to about max_flow / 255 per pixel where
    the speed is not tiny (a near-white pixel's hue is ill-defined and decodes to a near-zero flow)."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb must end in a channel axis of size 3, got shape {rgb.shape}")
    c = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    c = np.clip(c, 0.0, 1.0)
    speed = 1.0 - c.min(axis=-1)                              # the wheel colour's 0 channel
    hue = 1.0 - (1.0 - c) / np.maximum(speed, eps)[..., None]  # undo the blend towards white
    hi, lo = hue.argmax(axis=-1), hue.argmin(axis=-1)
    position = np.zeros(speed.shape, dtype=np.float64)
    for (length, one, zero, ramp, rises), start in zip(_RAMPS, _STARTS):
        on = (hi == one) & (lo == zero)
        r = hue[..., ramp][on]
        position[on] = start + length * (r if rises else 1.0 - r)
    angle = position / _NUM_HUES * 2.0 * np.pi - np.pi           # = atan2(-v, -u)
    mag = speed * max_flow
    flow = np.stack([-mag * np.cos(angle), -mag * np.sin(angle)], axis=-1)
    return flow.astype(np.float32)


def rgb_float_to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding (for saving or viewing a flow image)."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)
