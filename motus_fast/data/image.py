"""Image preparation: multi-camera layouts and resize-with-pad to the model's frame size.

``resize_with_pad`` keeps the aspect ratio: scale by min(H/h, W/w), bilinear with antialiasing, round to uint8,
centre on a black canvas (upstream ``resize_with_padding``: the LeRobot loader converts to uint8 around it too).

Camera layouts (``compose``), all on uint8 frames [N, h, w, 3]:

| layout       | cameras | picture                                                                             |
|--------------|---------|-------------------------------------------------------------------------------------|
| `single`     | 1       | the camera as is                                                                     |
| `t_shape`    | 3       | camera 0 on top at its size; cameras 1 and 2 below, each resized to (h/2, w/2)       |
|              |         | (upstream's RoboTwin converter: head on top, left and right wrists below)           |
| `horizontal` | >= 1    | side by side, each resized to camera 0's height                                      |

(Upstream's LeRobot wrapper stitches three cameras like `t_shape` but keeps the wrists' own height; with
equal-size cameras that is a 2h-tall frame instead of 1.5h. We follow the converter, whose frames the released
RoboTwin checkpoints saw.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

LAYOUTS = ("single", "t_shape", "horizontal")


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, H, W, 3] (bilinear, antialiased)."""
    if frames.shape[1:3] == tuple(size):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_with_pad(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, height, width, 3]: aspect-preserving resize, centred, black padding."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_with_pad expects uint8 [N, h, w, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    resized = _resize(frames, (nh, nw))
    out = np.zeros((n, height, width, 3), dtype=np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top:top + nh, left:left + nw] = resized
    return out


def compose(frames: Sequence[np.ndarray], layout: str) -> np.ndarray:
    """Per-camera uint8 [N, h_i, w_i, 3] (in the layout's camera order) -> one uint8 [N, H, W, 3] picture."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown camera layout {layout!r}; choose from {LAYOUTS}")
    frames = [np.asarray(f) for f in frames]
    if layout == "single":
        if len(frames) != 1:
            raise ValueError(f"layout 'single' takes 1 camera, got {len(frames)}")
        return frames[0]
    if layout == "t_shape":
        if len(frames) != 3:
            raise ValueError(f"layout 't_shape' takes 3 cameras (top, bottom-left, bottom-right), got {len(frames)}")
        top, left, right = frames
        h, w = top.shape[1:3]
        half = (max(1, h // 2), max(1, w // 2))
        bottom = np.concatenate([_resize(left, half), _resize(right, (half[0], w - half[1]))], axis=2)
        return np.concatenate([top, bottom], axis=1)
    h = frames[0].shape[1]
    parts = [f if f.shape[1] == h else _resize(f, (h, max(1, round(f.shape[2] * h / f.shape[1]))))
             for f in frames]
    return np.concatenate(parts, axis=2)
