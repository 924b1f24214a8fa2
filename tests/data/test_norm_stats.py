"""Normalisation: every mode inverts exactly, maps the data where it says, guards tiny spreads; stats round-trip."""

import numpy as np
import pytest
import torch

from motus_fast.data.norm import (MODES, DatasetStats, FeatureStats, load_stats, normalize, save_stats,
                                  unnormalize)


def data(seed=0, n=500):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 100, 0]
    x[:, 4] = 0.25          # a constant dimension (tiny spread)
    return x.astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_inverse_and_range(mode):
    x = data()
    s = FeatureStats.compute(x, "x")
    for arr in (x, torch.from_numpy(x), torch.from_numpy(x).double()):
        y = normalize(arr, s, mode)
        assert type(y) is type(arr) and y.dtype == arr.dtype
        back = unnormalize(y, s, mode)
        np.testing.assert_allclose(np.asarray(back, dtype=np.float64), np.asarray(arr, dtype=np.float64),
                                   rtol=1e-5, atol=1e-4)
    y = np.asarray(normalize(x.astype(np.float64), s, mode))
    assert np.isfinite(y).all()
    live = slice(0, 4)
    if mode == "min_max":
        np.testing.assert_allclose(y[:, live].min(0), 0, atol=1e-6)
        np.testing.assert_allclose(y[:, live].max(0), 1, atol=1e-6)
    if mode == "mean_std":
        np.testing.assert_allclose(y[:, live].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(y[:, live].std(0), 1, atol=1e-5)
    if mode == "quantile":
        q = np.quantile(y[:, live], [0.01, 0.99], axis=0)
        np.testing.assert_allclose(q, [[-1] * 4, [1] * 4], atol=1e-5)
    if mode != "none":
        np.testing.assert_allclose(y[:, 4], 0, atol=1e-6)     # constant dim: shifted to 0, not blown up


def test_stats_match_numpy_and_round_trip(tmp_path):
    x = data(1).astype(np.float64)
    s = FeatureStats.compute(x, "observation.state")
    np.testing.assert_allclose(s.mean, x.mean(0))
    np.testing.assert_allclose(s.std, x.std(0))
    np.testing.assert_allclose(s.q01, np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(s.max, x.max(0))
    path = save_stats({"a": DatasetStats(state=s, action=s), "b": DatasetStats(action=s)}, tmp_path / "s.json")
    back = load_stats(path)
    assert back["b"].state is None and back["a"].state.key == "observation.state" and back["a"].state.count == 500
    np.testing.assert_array_equal(back["a"].action.q99, s.q99)


def test_errors():
    s = FeatureStats.compute(data(), "x")
    with pytest.raises(ValueError, match="last dimension"):
        normalize(np.zeros((2, 3)), s, "mean_std")
    with pytest.raises(ValueError, match="needs statistics"):
        normalize(np.zeros((2, 5)), None, "min_max")
    with pytest.raises(ValueError, match="non-finite"):
        FeatureStats.compute(np.array([[0.0], [np.nan]]), "x")
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize(np.zeros((2, 5)), s, "minmax")
