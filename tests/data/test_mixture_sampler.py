"""The pyramid mixture, the deterministic sampler and the loader's exact resume."""

import dataclasses

import numpy as np
import pytest

from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.mixture import MixtureDataset, MixtureSampler, MixtureView, ResumableLoader, build_mixture
from motus_fast.data.tiny import tiny_pyramid
from motus_fast.data.windows import WindowSpec


class FakeDataset:
    """What the sampler reads of a MotusDataset (no files)."""

    def __init__(self, windows, balance="window"):
        self.windows_per_episode = np.asarray(windows)
        self.offsets = np.concatenate([[0], np.cumsum(windows)])
        self.spec = DatasetSpec(root="x", balance=balance)

    def __len__(self):
        return int(self.offsets[-1])


def test_level_weights():
    specs = (DatasetSpec(root="a", level="video", weight=1), DatasetSpec(root="b", level="video", weight=3),
             DatasetSpec(root="c", level="robot", weight=5))
    cfg = DataConfig(datasets=specs)
    np.testing.assert_allclose(cfg.mixture_weights(), [1 / 9, 3 / 9, 5 / 9])
    cfg = dataclasses.replace(cfg, level_weights=(("video", 1.0), ("robot", 3.0)))
    np.testing.assert_allclose(cfg.mixture_weights(), [0.25 / 4, 0.75 / 4, 3 / 4])
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unique"):
        DataConfig(datasets=(DatasetSpec(root="x/a"), DatasetSpec(root="y/a")))


def test_sampler_is_deterministic_weighted_and_partitioned():
    m = MixtureDataset([FakeDataset([10, 20]), FakeDataset([5] * 6, "episode"), FakeDataset([7])], [0.5, 0.3, 0.2])
    s = MixtureSampler(m, seed=3, samples_per_epoch=20000)
    a, sa = s.draws(0)
    b, sb = MixtureSampler(m, seed=3, samples_per_epoch=20000).draws(0)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert not np.array_equal(a, s.draws(1)[0]) and not np.array_equal(a, MixtureSampler(m, 4, 20000).draws(0)[0])
    which = np.searchsorted(m.offsets, a, side="right") - 1
    freq = np.bincount(which, minlength=3) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)
    # window balance cycles permutations: counts per window differ by at most one
    counts = np.bincount(a[which == 0], minlength=30)
    assert counts.max() - counts.min() <= 1
    # episode balance: episodes equally likely
    ep = (a[which == 1] - m.offsets[1]) // 5
    np.testing.assert_allclose(np.bincount(ep) / len(ep), [1 / 6] * 6, atol=0.03)
    # ranks partition the epoch
    ranks = [list(MixtureSampler(m, 3, 20000, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 6666 for r in ranks)
    merged = [ranks[p % 3][p // 3][0] for p in range(3 * 6666)]
    assert merged == a[: 3 * 6666].tolist()


def test_single_dataset_epoch_is_a_permutation():
    m = MixtureDataset([FakeDataset([4, 9, 3])], [1.0])
    idx, _ = MixtureSampler(m, seed=0).draws(0)
    assert sorted(idx.tolist()) == list(range(16))


@pytest.fixture(scope="module")
def stage_cfgs(tmp_path_factory):
    return tiny_pyramid(tmp_path_factory.mktemp("pyr"), window=WindowSpec(4, 2, 2), height=32, width=32,
                        episodes=2, frames=24)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(stage_cfgs, workers):
    mix = build_mixture(stage_cfgs[1])
    kw = dict(batch_size=2, seed=5, samples_per_epoch=12, num_workers=workers)
    ref = ResumableLoader(mix, **kw)
    ref_keys = [next(ref).keys for _ in range(9)]           # 6 batches per epoch: crosses into epoch 1
    assert ref.epoch == 1
    first = ResumableLoader(mix, **kw)
    for _ in range(4):
        next(first)
    state = first.state_dict()
    resumed = ResumableLoader(mix, **kw)
    resumed.load_state_dict(state)
    assert [next(resumed).keys for _ in range(5)] == ref_keys[4:]
    # an epoch is a different order of the same kind of draws
    assert ref_keys[6:9] != ref_keys[0:3]


def test_resume_on_another_world_size(stage_cfgs):
    mix = build_mixture(stage_cfgs[1])
    one = ResumableLoader(mix, batch_size=2, seed=1, samples_per_epoch=24)
    seen = [k for _ in range(4) for k in next(one).keys]      # 8 global samples consumed
    two = [ResumableLoader(mix, batch_size=2, seed=1, samples_per_epoch=24, rank=r, world_size=2) for r in range(2)]
    for L in two:
        L.load_state_dict(one.state_dict())
    nxt = [next(L).keys for L in two]
    global_next = [nxt[p % 2][p // 2] for p in range(4)]
    ref = ResumableLoader(mix, batch_size=2, seed=1, samples_per_epoch=24)
    all_keys = [k for _ in range(6) for k in next(ref).keys]
    assert all_keys[:8] == seen and all_keys[8:12] == global_next
    bad = dict(one.state_dict(), seed=2)
    with pytest.raises(ValueError, match="seed"):
        two[0].load_state_dict(bad)


def test_view_and_stage_contents(stage_cfgs):
    for stage, cfg in stage_cfgs.items():
        mix = build_mixture(cfg)
        view = MixtureView(mix, seed=0, size=10)
        assert len(view) == 10
        s = view[3]
        assert s.key == view[3].key
        raw = next(ResumableLoader(mix, batch_size=4, seed=0))
        assert raw.frames.shape == (4, 5, 3, 32, 32) and raw.actions.shape == (4, 8, 14)
        if stage == 1:
            assert raw.state is None and not raw.has_actions.any()
        if stage == 2:
            assert raw.state is None
            assert all(h == (k.startswith("robots/")) for h, k in zip(raw.has_actions.tolist(), raw.keys))
        if stage == 3:
            assert raw.state.shape == (4, 14) and raw.has_actions.all()
