"""Optical flow: DIS recovers known shifts; the flow-image front end keeps the motion; the learned-model hook."""

import sys
import types

import numpy as np
import pytest

from motus_fast.latent_action.colorwheel import rgb_to_flow
from motus_fast.latent_action.config import OpticalFlowConfig
from motus_fast.latent_action.optical_flow import DISFlow, flow_images, make_flow_estimator, resample_flow
from motus_fast.latent_action.synthetic import moving_square_episodes


def smooth_texture(rng, h, w):
    """Random texture with structure at several scales (what DIS's coarse-to-fine search needs)."""
    import cv2
    img = np.zeros((h, w, 3), np.float32)
    for cell in (4, 8, 16):
        noise = rng.uniform(0, 1, size=(h // cell + 1, w // cell + 1, 3)).astype(np.float32)
        img += cv2.resize(noise, (w + cell, h + cell), interpolation=cv2.INTER_CUBIC)[:h, :w]
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


@pytest.mark.parametrize("preset", ["ultrafast", "medium"])
@pytest.mark.parametrize("shift", [(3, -2), (-4, 1), (0, 5)])
def test_dis_recovers_a_global_shift(preset, shift):
    dx, dy = shift
    rng = np.random.default_rng([len(preset), dx + 10, dy + 10])
    big = smooth_texture(rng, 96 + 16, 128 + 16)
    first = big[8:8 + 96, 8:8 + 128]
    second = big[8 - dy:8 - dy + 96, 8 - dx:8 - dx + 128]   # content moves by (+dx, +dy)
    flow = DISFlow(preset)(first[None], second[None])[0]
    assert flow.shape == (96, 128, 2) and flow.dtype == np.float32
    interior = flow[12:-12, 12:-12].reshape(-1, 2)
    med = np.median(interior, axis=0)
    assert np.abs(med - np.array(shift)).max() < 0.25, med
    assert np.mean(np.abs(interior - np.array(shift)).max(-1) < 0.5) > 0.9


def test_dis_recovers_the_moving_square_of_synthetic_episodes():
    """The synthetic data the latent-action test trains on: DIS sees the square's true motion."""
    errs = []
    dis = DISFlow("ultrafast")
    for ep in moving_square_episodes(12, 3, 2, size=64, seed=3):
        f, c, s = ep.frames[::2], ep.corner[::2], ep.side
        flow = dis(f[:-1], f[1:])
        for k in range(len(flow)):
            x, y = c[k]
            errs.append(np.abs(np.median(flow[k, y + 2:y + s - 2, x + 2:x + s - 2].reshape(-1, 2), 0)
                               - ep.motion[k]).max())
    assert np.median(errs) < 0.25 and np.percentile(errs, 90) < 1.0, errs


def test_flow_images_keep_the_motion_through_resampling():
    """frames at 64 px -> flow -> 32 px image: decoding the colours gives the shift as a fraction of the image."""
    rng = np.random.default_rng(0)
    big = smooth_texture(rng, 80, 80)
    first, second = big[8:72, 8:72], big[8 - 2:72 - 2, 8 - 3:72 - 3]    # moves by (+3, +2) px at 64 px
    cfg = OpticalFlowConfig(dis_preset="medium", flow_size=None, max_flow=0.2)
    rgb = flow_images(first[None], second[None], cfg, (32, 32), DISFlow("medium"))
    assert rgb.shape == (1, 32, 32, 3) and 0.0 <= rgb.min() and rgb.max() <= 1.0
    back = rgb_to_flow(rgb[0], cfg.max_flow)[6:-6, 6:-6].reshape(-1, 2)
    np.testing.assert_allclose(np.median(back, 0), [3 / 64, 2 / 64], atol=0.25 / 64)


def test_resample_flow_rescales_vectors_per_axis():
    flow = np.zeros((2, 10, 20, 2), np.float32)
    flow[..., 0], flow[..., 1] = 4.0, -2.0
    out = resample_flow(flow, (5, 40))
    assert out.shape == (2, 5, 40, 2)
    np.testing.assert_allclose(out[..., 0], 8.0)
    np.testing.assert_allclose(out[..., 1], -1.0)


def test_learned_flow_model_hook(monkeypatch):
    """flow.method = "module:factory" builds the estimator from the factory; a bad spec names the field."""
    calls = []

    def factory(cfg):
        calls.append(cfg)
        return lambda a, b: np.full(a.shape[:3] + (2,), 1.5, np.float32)

    mod = types.ModuleType("fake_flow_net")
    mod.make = factory
    monkeypatch.setitem(sys.modules, "fake_flow_net", mod)
    cfg = OpticalFlowConfig(method="fake_flow_net:make", max_flow=1.0)
    est = make_flow_estimator(cfg)
    assert calls == [cfg]
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    rgb = flow_images(frames, frames, cfg, (16, 16), est)
    np.testing.assert_allclose(rgb_to_flow(rgb, 1.0), 1.5 / 16, atol=1e-6)

    with pytest.raises(ValueError, match="flow.method"):
        make_flow_estimator(OpticalFlowConfig(method="fake_flow_net:missing"))
    with pytest.raises(ValueError, match="flow.method"):
        OpticalFlowConfig(method="not-a-spec")
    with pytest.raises(ValueError, match="expected"):
        flow_images(frames, frames, cfg, (16, 16), lambda a, b: np.zeros((3, 8, 8, 2), np.float32))


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        DISFlow()(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        DISFlow()(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 9, 3), np.uint8))
