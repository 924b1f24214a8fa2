"""Resize-with-pad and camera layouts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from motus_fast.data.image import compose, resize_with_pad


def rand(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w,H,W", [(48, 64, 64, 64), (64, 48, 64, 64), (30, 90, 32, 48), (64, 64, 64, 64),
                                     (100, 50, 40, 40)])
def test_resize_with_pad(h, w, H, W):
    x = rand(2, h, w)
    y = resize_with_pad(x, H, W)
    assert y.shape == (2, H, W, 3) and y.dtype == np.uint8
    scale = min(H / h, W / w)
    nh, nw = round(h * scale), round(w * scale)
    top, left = (H - nh) // 2, (W - nw) // 2
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(nh, nw), mode="bilinear",
                        antialias=True).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    region = y[:, top:top + nh, left:left + nw]
    if (h, w) == (H, W):
        assert np.array_equal(y, x)
    else:
        assert np.array_equal(region, ref.astype(np.uint8))
    mask = np.ones((H, W), bool)
    mask[top:top + nh, left:left + nw] = False
    assert (y[:, mask] == 0).all()     # black padding outside the picture


def test_layouts():
    top, left, right = rand(3, 40, 60, 1), rand(3, 20, 30, 2), rand(3, 30, 20, 3)
    t = compose([top, left, right], "t_shape")
    assert t.shape == (3, 60, 60, 3)
    assert np.array_equal(t[:, :40], top)
    assert np.array_equal(t[:, 40:, :30], left)                # already (h/2, w/2): placed as is
    h = compose([top, left], "horizontal")
    assert h.shape == (3, 40, 60 + 60, 3) and np.array_equal(h[:, :, :60], top)
    assert np.array_equal(compose([top], "single"), top)
    with pytest.raises(ValueError, match="3 cameras"):
        compose([top, left], "t_shape")
    with pytest.raises(ValueError, match="unknown camera layout"):
        compose([top], "grid")
