"""Our LeRobot v3 reader on datasets written by lerobot 0.6.1 itself (../shared/fixtures/lerobot_v3_written), and
our writer against lerobot's metadata schema for the same features, read from those fixtures."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from motus_fast.data.lerobot import LeRobotV3Source, LeRobotV3Writer
from motus_fast.data.norm import load_stats
from motus_fast.data.video import VideoCodec

FIX = Path(os.environ.get("MOTUS_FIXTURES", Path(__file__).resolve().parents[2].parent / "shared" / "fixtures")) \
    / "lerobot_v3_written"
NAMES = ("basic", "rollover", "images_in_parquet", "language")


def fixture(name):
    if not FIX.is_dir():
        pytest.fail(f"fixture not found at {FIX} (set MOTUS_FIXTURES)")
    return (FIX / name, load_file(str(FIX / f"{name}.expected.safetensors")),
            json.loads((FIX / f"{name}.expected.json").read_text(encoding="utf-8")))


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.mark.parametrize("name", NAMES)
def test_reads_what_lerobot_reads(name):
    root, exp, meta = fixture(name)
    src = LeRobotV3Source(root)
    assert [e.index for e in src.episodes] == [ep["episode_index"] for ep in meta["episodes"]]
    assert [e.length for e in src.episodes] == [ep["length"] for ep in meta["episodes"]]
    assert set(src.lowdim_keys) == set(meta["numeric_features"])            # language columns are not low-dim
    assert sorted(src.cameras) == sorted(meta["cameras"])
    for pos, ep in enumerate(meta["episodes"]):
        a, b = ep["dataset_from_index"], ep["dataset_to_index"]
        assert src.instructions(pos)[: len(ep["tasks"])] == ep["tasks"]
        for key, f in meta["numeric_features"].items():
            got = src.read_lowdim(pos, key)
            want = exp[f"data/{key}"][a:b]
            assert got.dtype == want.dtype == np.dtype(f["dtype"]), key
            np.testing.assert_array_equal(got.reshape(want.shape), want)
    for j in range(len(exp["frames/index"])):
        e, k = int(exp["frames/episode_index"][j]), int(exp["frames/frame_index"][j])
        pos = [x.index for x in src.episodes].index(e)
        for cam in meta["cameras"]:
            got = src.read_frames(pos, cam, [k])[0]
            want = exp[f"frames/{cam}"][j]
            assert got.shape == want.shape
            if meta["cameras"][cam]["dtype"] == "image":
                np.testing.assert_array_equal(got, want)                    # PNG: lossless
            else:
                assert psnr(got, want) >= 40, (cam, e, k, psnr(got, want))   # README: exact or >= 40 dB


def test_language_annotations_become_instructions():
    root, _, meta = fixture("language")
    src = LeRobotV3Source(root)
    persistent = meta["language"]["persistent_by_episode"]
    for pos, ep in enumerate(meta["episodes"]):
        rows = persistent[str(ep["episode_index"])] if isinstance(persistent, dict) else persistent[pos]
        aug = [r["content"] for r in rows if r["style"] == "task_aug"]
        assert aug and src.instructions(pos) == ep["tasks"] + [t for t in aug if t not in ep["tasks"]]
    assert src.read_lowdim(0, "action").shape == (meta["episodes"][0]["length"], 7)


def test_lerobot_stats_json_is_read_for_training():
    root, _, _ = fixture("basic")
    stats = load_stats(root / "meta" / "stats.json")["basic"]
    doc = json.loads((root / "meta" / "stats.json").read_text())
    np.testing.assert_array_equal(stats.action.q10, doc["action"]["q10"])
    assert stats.state.count == doc["observation.state"]["count"][0] and stats.state.dim == 14


def _shape(v):
    return np.shape(v) if not isinstance(v, dict) else {k: _shape(x) for k, x in v.items()}


def test_writer_metadata_schema_equals_lerobots(tmp_path):
    """The same features as lerobot's `basic` -> the same info.json keys, stats keys and shapes, and the same
    meta/episodes columns and types."""
    root, _, meta = fixture("basic")
    info = json.loads((root / "meta" / "info.json").read_text())
    user = {k: {kk: v for kk, v in f.items() if kk != "info"} for k, f in info["features"].items()
            if k not in ("timestamp", "frame_index", "episode_index", "index", "task_index")}
    rng = np.random.default_rng(0)
    with LeRobotV3Writer(tmp_path / "ours", info["fps"], user, robot_type=info["robot_type"],
                         codec=VideoCodec()) as w:
        for ep in meta["episodes"]:
            T = ep["length"]
            data = {k: (rng.integers(0, 256, (T, *f["shape"]), dtype=np.uint8) if f["dtype"] == "video"
                        else rng.standard_normal((T, *f["shape"])).astype(f["dtype"])) for k, f in user.items()}
            w.add_episode(data, ep["tasks"])
    ours = json.loads((tmp_path / "ours" / "meta" / "info.json").read_text())
    assert set(ours) == set(info)
    assert set(ours["features"]) == set(info["features"])
    for k, f in info["features"].items():
        assert set(ours["features"][k]) == set(f), k
        if "info" in f:
            assert set(ours["features"][k]["info"]) == set(f["info"]), k
    theirs_stats = json.loads((root / "meta" / "stats.json").read_text())
    our_stats = json.loads((tmp_path / "ours" / "meta" / "stats.json").read_text())
    assert _shape(our_stats) == _shape(theirs_stats)
    theirs_ep = pq.read_schema(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    ours_ep = pq.read_schema(tmp_path / "ours" / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert set(ours_ep.names) == set(theirs_ep.names)
    for n in theirs_ep.names:
        assert ours_ep.field(n).type == theirs_ep.field(n).type, n
