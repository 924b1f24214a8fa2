"""The upstream RoboTwin layout, and MotusDataset's windows on both formats: the frames, state, actions and text of
a sample are the ones upstream's formulas pick."""

import shutil

import numpy as np
import pytest
import torch

from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.dataset import MotusDataset, compute_dataset_stats
from motus_fast.data.errors import DataError
from motus_fast.data.image import resize_with_pad
from motus_fast.data.latent_actions import write_latent_actions
from motus_fast.data.norm import normalize
from motus_fast.data.robotwin import RoboTwinSource
from motus_fast.data.tiny import write_tiny_robotwin
from motus_fast.data.video import read_frames_by_index
from motus_fast.data.windows import WindowSpec


@pytest.fixture(scope="module")
def robotwin(tmp_path_factory):
    return write_tiny_robotwin(tmp_path_factory.mktemp("rt") / "robotwin", episodes=3, frames=40, text_dim=8)


def test_reader(robotwin):
    src = RoboTwinSource(robotwin)
    assert [e.length for e in src.episodes] == [40] * 3 and src.cameras == ["video"]
    d = robotwin / "clean" / "move_square"
    q = torch.load(d / "qpos" / "1.pt")
    assert np.array_equal(src.read_lowdim(1, "qpos"), q.numpy())
    assert src.instructions(1) == ["move the square to corner 1", "follow the path"]
    emb = torch.load(d / "umt5_wan" / "1.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.text_embeddings(1), emb))
    assert src.read_frames(0, "video", [3, 0]).shape == (2, 64, 64, 3)
    # the same root works from the split or the task directory
    assert len(RoboTwinSource(robotwin / "clean").episodes) == 3 and len(RoboTwinSource(d).episodes) == 3


def test_window_contents_robotwin(robotwin):
    window = WindowSpec(4, 2, 3)
    spec = DatasetSpec(root=str(robotwin))
    stats = {"robotwin": compute_dataset_stats(spec, progress=False)}
    cfg = DataConfig(datasets=(spec,), window=window, height=48, width=64, normalization="min_max")
    ds = MotusDataset(spec, cfg, stats["robotwin"])
    assert len(ds) == 3 * (40 - 24 - 1 + 1)
    src = ds.source
    d = robotwin / "clean" / "move_square"
    for index in (0, 17, len(ds) - 1):
        ep, cond = ds.locate(index)
        s = ds[(index, 1234)]
        q = torch.load(d / "qpos" / f"{ep}.pt").numpy()
        acts = [min(cond + (i + 1) * 3, 39) for i in range(8)]
        vids = [acts[(j + 1) * 2 - 1] for j in range(4)]
        qs = stats["robotwin"].state
        np.testing.assert_allclose(s.state.numpy(), (q[cond] - qs.min) / (qs.max - qs.min), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.actions.numpy(), normalize(q[acts], stats["robotwin"].action, "min_max"),
                                   rtol=1e-5, atol=1e-6)
        raw = read_frames_by_index(d / "videos" / f"{ep}.mp4", [cond] + vids)
        assert torch.equal(s.frames, torch.from_numpy(resize_with_pad(raw, 48, 64)).permute(0, 3, 1, 2))
        assert s.instruction in src.instructions(ep) and s.has_actions
        k = src.instructions(ep).index(s.instruction)
        assert torch.equal(s.text, src.text_embeddings(ep)[k])
        assert s.key == f"robotwin/clean/move_square/{ep}/{cond}"
    # the draw seed picks the instruction; the same (index, seed) always gives the same sample
    picks = {ds[(5, seed)].instruction for seed in range(20)}
    assert len(picks) == 2
    assert ds[(5, 7)].instruction == ds[(5, 7)].instruction


def test_latent_actions_and_action_free(tmp_path):
    from motus_fast.data.tiny import write_tiny_lerobot

    root = write_tiny_lerobot(tmp_path / "ds", episodes=2, frames=30, height=32, width=32)
    rng = np.random.default_rng(0)
    lat = {e: rng.normal(size=(14, 14)).astype(np.float32) for e in range(2)}
    write_latent_actions(root / "latent_actions", lat, frame_spacing=2)
    spec = DatasetSpec(root=str(root), actions="latent")
    cfg = DataConfig(datasets=(spec,), window=WindowSpec(2, 2, 2), height=32, width=32, with_state=False)
    ds = MotusDataset(spec, cfg)
    assert ds.condition_stride == 2
    for index in range(len(ds)):
        ep, cond = ds.locate(index)
        s = ds[index]
        rows = np.minimum(cond // 2 + np.arange(4), 13)
        assert cond % 2 == 0 and s.state is None and s.has_actions
        assert np.array_equal(s.actions.numpy(), lat[ep][rows])
    with pytest.raises(DataError, match="must match"):
        MotusDataset(spec, DataConfig(datasets=(spec,), window=WindowSpec(2, 2, 3), height=32, width=32))
    free = DatasetSpec(root=str(root), actions="none", instruction="watch")
    cfg = DataConfig(datasets=(free,), window=WindowSpec(2, 2, 2), height=32, width=32, action_dim=5, state_dim=3)
    s = MotusDataset(free, cfg)[3]
    assert not s.has_actions and s.instruction == "watch"
    assert torch.equal(s.actions, torch.zeros(4, 5)) and torch.equal(s.state, torch.zeros(3))
    with pytest.raises(DataError, match="action_dim"):
        MotusDataset(free, DataConfig(datasets=(free,), window=WindowSpec(2, 2, 2), height=32, width=32))


def test_corrupt_robotwin_files(robotwin, tmp_path):
    bad = tmp_path / "rt"
    shutil.copytree(robotwin, bad)
    d = bad / "clean" / "move_square"
    (d / "qpos" / "2.pt").write_bytes(b"not a tensor")
    with pytest.raises(DataError) as e:
        RoboTwinSource(bad)
    assert e.value.file == str(d / "qpos" / "2.pt") and "clean/move_square/2" in str(e.value)
    (d / "qpos" / "2.pt").unlink()
    video = d / "videos" / "1.mp4"
    video.write_bytes(video.read_bytes()[:500])
    spec = DatasetSpec(root=str(bad))
    ds = MotusDataset(spec, DataConfig(datasets=(spec,), window=WindowSpec(4, 2, 3), height=32, width=32))
    ep1 = int(ds.offsets[1])
    with pytest.raises(DataError) as e:
        ds[ep1]
    assert e.value.file == str(video) and e.value.episode == "clean/move_square/1"
