"""Optical flow between frame pairs, and the flow image the DC-AE sees.

The default estimator is OpenCV's DIS (dense inverse search): no weights, ~1 ms per 128 x 128 pair on one core.
A learned model plugs in through ``OpticalFlowConfig.method = "package.module:factory"``: ``factory(flow_cfg)``
returns any callable with the ``FlowEstimator`` signature below (batched, so a network can run a whole batch).

``flow_images`` is the full front end: frames -> (resize to flow_size) -> flow in pixels -> resampled to the model's
image size and expressed as a fraction of the image's longer side -> colour wheel (fixed scale ``max_flow``) -> RGB
in [0, 1].
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional, Protocol

import numpy as np

from motus_fast.latent_action.colorwheel import flow_to_rgb
from motus_fast.latent_action.config import DIS_PRESETS, OpticalFlowConfig

log = logging.getLogger(__name__)


class FlowEstimator(Protocol):
    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """first, second: uint8 [N, H, W, 3] RGB -> flow float32 [N, H, W, 2] in pixels (u right, v down): the
        motion that carries a pixel of `first` to its place in `second`."""
        ...


def _cv2():
    try:
        import cv2
    except ImportError as e:  # a clear message instead of a bare ModuleNotFoundError deep in a call
        raise ImportError("OpenCV is needed for DIS optical flow: pip install opencv-python-headless "
                          "(pinned in requirements/cpu.txt)") from e
    return cv2


class DISFlow:
    """OpenCV DIS optical flow on grayscale frames (a `FlowEstimator`)."""

    def __init__(self, preset: str = "medium"):
        cv2 = _cv2()
        if preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {DIS_PRESETS}, got {preset!r}")
        code = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset]
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(code)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        cv2 = _cv2()
        first, second = _check_pair(first, second)
        out = np.empty(first.shape[:3] + (2,), dtype=np.float32)
        for i in range(first.shape[0]):
            g0 = cv2.cvtColor(first[i], cv2.COLOR_RGB2GRAY)
            g1 = cv2.cvtColor(second[i], cv2.COLOR_RGB2GRAY)
            out[i] = self._dis.calc(g0, g1, None)
        return out


def make_flow_estimator(cfg: OpticalFlowConfig) -> FlowEstimator:
    """The estimator `cfg.method` names: DIS, or a learned model's factory("package.module:factory")(cfg)."""
    if cfg.method == "dis":
        return DISFlow(cfg.dis_preset)
    module_name, _, attr = cfg.method.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"flow.method={cfg.method!r}: cannot import {attr!r} from {module_name!r} ({e})") from e
    estimator = factory(cfg)
    if not callable(estimator):
        raise TypeError(f"flow.method={cfg.method!r}: the factory returned {type(estimator).__name__}, "
                        "which is not a callable FlowEstimator")
    log.info("optical flow: %s", cfg.method)
    return estimator


def _check_pair(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first), np.asarray(second)
    for name, a in (("first", first), ("second", second)):
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"{name} frames must be uint8 [N, H, W, 3], got {a.dtype} {list(a.shape)}")
    if first.shape != second.shape:
        raise ValueError(f"frame pairs differ in shape: {list(first.shape)} vs {list(second.shape)}")
    return np.ascontiguousarray(first), np.ascontiguousarray(second)


def resize_frames(frames: np.ndarray, size: Optional[tuple[int, int]]) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, *size, 3] (area interpolation when shrinking); size None = unchanged."""
    if size is None or tuple(frames.shape[1:3]) == tuple(size):
        return frames
    cv2 = _cv2()
    h, w = size
    interp = cv2.INTER_AREA if h <= frames.shape[1] and w <= frames.shape[2] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def resample_flow(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """flow [N, h, w, 2] in pixels of an h x w image -> [N, H, W, 2] in pixels of an H x W image (field resampled,
    vectors rescaled per axis)."""
    n, h, w, _ = flow.shape
    H, W = size
    if (h, w) == (H, W):
        return flow
    cv2 = _cv2()
    interp = cv2.INTER_AREA if H <= h and W <= w else cv2.INTER_LINEAR
    out = np.stack([cv2.resize(f, (W, H), interpolation=interp) for f in flow]).astype(np.float32)
    out[..., 0] *= W / w
    out[..., 1] *= H / h
    return out


def flow_images(first: np.ndarray, second: np.ndarray, cfg: OpticalFlowConfig, image_size: tuple[int, int],
                estimator: FlowEstimator) -> np.ndarray:
    """Frame pairs uint8 [N, H, W, 3] -> flow images float32 [N, *image_size, 3] in [0, 1] (colour wheel, speed
    measured as a fraction of the image's longer side and saturating at cfg.max_flow)."""
    first, second = _check_pair(first, second)
    first, second = resize_frames(first, cfg.flow_size), resize_frames(second, cfg.flow_size)
    flow = estimator(first, second)
    if flow.shape != first.shape[:3] + (2,):
        raise ValueError(f"flow estimator returned {list(flow.shape)}, expected {list(first.shape[:3]) + [2]}")
    flow = resample_flow(np.asarray(flow, dtype=np.float32), image_size)
    return flow_to_rgb(flow / max(image_size), cfg.max_flow)
