"""The pyramid mixture, the one step-indexed sampler, and exact resume through a DataLoader (also on another world
size)."""

import dataclasses

import numpy as np
import pytest

from motus_fast.data.config import DataConfig, DatasetSpec
from torch.utils.data import DataLoader

from motus_fast.data.dataset import collate
from motus_fast.data.mixture import MixtureDataset, StepSampler, build_mixture
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
    a, sa = m.draws(3, 0, 20000)
    b, sb = m.draws(3, 0, 20000)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert not np.array_equal(a, m.draws(3, 1, 20000)[0]) and not np.array_equal(a, m.draws(4, 0, 20000)[0])
    which = np.searchsorted(m.offsets, a, side="right") - 1
    freq = np.bincount(which, minlength=3) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)
    # window balance cycles permutations: counts per window differ by at most one
    counts = np.bincount(a[which == 0], minlength=30)
    assert counts.max() - counts.min() <= 1
    # episode balance: episodes equally likely
    ep = (a[which == 1] - m.offsets[1]) // 5
    np.testing.assert_allclose(np.bincount(ep) / len(ep), [1 / 6] * 6, atol=0.03)
    # ranks partition the epoch, and the sampler yields the epoch's (index, draw seed) pairs in order
    kw = dict(batch_size=1, steps=6666, seed=3, world_size=3, mixture=m, samples_per_epoch=20000)
    ranks = [[b[0] for b in StepSampler(len(m), rank=r, **kw)] for r in range(3)]
    assert all(len(r) == 6666 for r in ranks)
    merged = [ranks[p % 3][p // 3] for p in range(3 * 6666)]
    assert merged == list(zip(a[: 3 * 6666].tolist(), sa[: 3 * 6666].tolist()))


def test_single_dataset_epoch_is_a_permutation():
    m = MixtureDataset([FakeDataset([4, 9, 3])], [1.0])
    idx, _ = m.draws(0, 0)
    assert sorted(idx.tolist()) == list(range(16))
    # the sampler crosses into a fresh epoch: the next 16 positions are another permutation
    items = [b[0][0] for b in StepSampler(16, batch_size=1, steps=32, seed=0, mixture=m)]
    assert items[:16] == idx.tolist() and sorted(items[16:]) == list(range(16)) and items[16:] != items[:16]


@pytest.fixture(scope="module")
def stage_cfgs(tmp_path_factory):
    return tiny_pyramid(tmp_path_factory.mktemp("pyr"), window=WindowSpec(4, 2, 2), height=32, width=32,
                        episodes=2, frames=24)


def keys(mix, steps, start=0, rank=0, world=1, batch=2, workers=0, seed=5, per_epoch=12):
    """The sample keys of each micro-batch a DataLoader over StepSampler yields for this rank."""
    sampler = StepSampler(len(mix), batch_size=batch, steps=steps, seed=seed, rank=rank, world_size=world,
                          start_step=start, mixture=mix, samples_per_epoch=per_epoch)
    return [raw.keys for raw in DataLoader(mix, batch_sampler=sampler, collate_fn=collate, num_workers=workers)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(stage_cfgs, workers):
    mix = build_mixture(stage_cfgs[1])
    ref = keys(mix, 9, workers=workers)                       # 6 batches per epoch: crosses into epoch 1
    assert keys(mix, 9, start=4, workers=workers) == ref[4:]
    # an epoch is a different order of the same kind of draws
    assert ref[6:9] != ref[0:3]


def test_resume_on_another_world_size(stage_cfgs):
    mix = build_mixture(stage_cfgs[1])
    one = keys(mix, 6, batch=2, seed=1, per_epoch=24)          # 12 global samples, batch 2 on one process
    two = [keys(mix, 6, start=4, rank=r, world=2, batch=1, seed=1, per_epoch=24) for r in range(2)]
    global_next = [k for step in range(2) for r in range(2) for k in two[r][step]]
    assert [k for b in one[4:] for k in b] == global_next
    with pytest.raises(ValueError, match="mixture"):
        StepSampler(len(mix) + 1, batch_size=1, steps=1, mixture=mix)


def test_stage_contents(stage_cfgs):
    for stage, cfg in stage_cfgs.items():
        mix = build_mixture(cfg)
        assert mix[(3, 7)].key == mix[(3, 7)].key
        raw = collate([mix[item] for item in next(iter(StepSampler(len(mix), batch_size=4, steps=1, mixture=mix)))])
        assert raw.frames.shape == (4, 5, 3, 32, 32) and raw.actions.shape == (4, 8, 14)
        if stage == 1:
            assert raw.state is None and not raw.has_actions.any()
        if stage == 2:
            assert raw.state is None
            assert all(h == (k.startswith("robots/")) for h, k in zip(raw.has_actions.tolist(), raw.keys))
        if stage == 3:
            assert raw.state.shape == (4, 14) and raw.has_actions.all()
