"""Flow colour wheel: render -> inverse round-trips; the wheel is continuous and follows the Middlebury hues."""

import numpy as np
import pytest

from motus_fast.latent_action.colorwheel import flow_to_rgb, rgb_float_to_uint8, rgb_to_flow, wheel_colour


@pytest.mark.parametrize("shape,max_flow", [((17, 23), 1.0), ((3, 5, 9), 0.1), ((1, 1), 7.5)])
def test_render_then_inverse_round_trips(shape, max_flow):
    rng = np.random.default_rng(sum(shape))
    # speeds strictly below saturation, any direction
    speed = rng.uniform(0.0, 0.999, size=shape) * max_flow
    angle = rng.uniform(-np.pi, np.pi, size=shape)
    flow = np.stack([speed * np.cos(angle), speed * np.sin(angle)], -1).astype(np.float32)
    rgb = flow_to_rgb(flow, max_flow)
    assert rgb.shape == shape + (3,) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    back = rgb_to_flow(rgb, max_flow)
    assert np.abs(back - flow).max() <= 2e-6 * max_flow

    # 8-bit images: exact up to quantisation where the hue is defined (speed not tiny)
    back8 = rgb_to_flow(rgb_float_to_uint8(rgb), max_flow)
    fast = speed > 0.2 * max_flow
    err = np.abs(back8 - flow)[fast]
    assert err.max() <= 0.02 * max_flow, err.max() / max_flow


def test_saturates_above_max_flow():
    flow = np.array([[[3.0, 4.0], [0.3, 0.4]]])   # speed 5 and 0.5, same direction
    rgb = flow_to_rgb(flow, max_flow=1.0)
    back = rgb_to_flow(rgb, 1.0)
    np.testing.assert_allclose(back[0, 0], [0.6, 0.8], atol=1e-6)   # clipped to max_flow along its direction
    np.testing.assert_allclose(back[0, 1], [0.3, 0.4], atol=1e-6)


def test_zero_flow_is_white_and_hues_follow_the_wheel():
    assert np.allclose(flow_to_rgb(np.zeros((2, 2, 2)), 1.0), 1.0)
    # Middlebury convention: hue at angle atan2(-v, -u); flow to the right is red, to the left cyan-blue, downwards
    # orange-yellow, upwards purple-blue
    right, left, down, up = (flow_to_rgb(np.array([[v]], dtype=np.float32), 1.0)[0, 0]
                             for v in ([1, 0], [-1, 0], [0, 1], [0, -1]))
    np.testing.assert_allclose(right, [1, 0, 0], atol=1e-6)
    assert left[2] == 1.0 and left[0] == 0.0 and 0.5 < left[1] < 1.0
    assert down[0] == 1.0 and down[2] == 0.0 and down[1] > 0.8
    assert up[2] == 1.0 and up[1] == 0.0 and 0.0 < up[0] < 0.5


def test_wheel_is_continuous_including_the_seam():
    pos = np.linspace(0.0, 55.0, 55 * 400 + 1)
    c = wheel_colour(pos)
    steps = np.abs(np.diff(c, axis=0)).max()
    assert steps <= 1.0 / 4 / 400 * 1.01          # steepest ramp (4 hues) over one sample
    assert np.allclose(c[0], c[-1])                # position 55 wraps to 0
    assert np.all(c.max(-1) == 1.0) and np.all(c.min(-1) == 0.0)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="size 2"):
        flow_to_rgb(np.zeros((4, 4, 3)), 1.0)
    with pytest.raises(ValueError, match="max_flow"):
        flow_to_rgb(np.zeros((4, 4, 2)), 0.0)
    with pytest.raises(ValueError, match="size 3"):
        rgb_to_flow(np.zeros((4, 4, 2)), 1.0)
