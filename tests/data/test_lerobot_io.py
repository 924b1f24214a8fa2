"""LeRobot v3 writer -> reader round trip, and clear errors for corrupt or truncated files."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_helpers import FEATURES, T_EP, TASKS, episodes, write
from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.dataset import MotusDataset, collate
from motus_fast.data.errors import DataError
from motus_fast.data.lerobot import LeRobotV3Source
from motus_fast.data.video import VideoCodec, VideoWriter
from motus_fast.data.windows import WindowSpec


def test_round_trip_is_identical(lerobot_ds):
    root, eps = lerobot_ds
    src = LeRobotV3Source(root)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 3 * T_EP
    # v3 packs episodes: 2 per file here, so files 000 (episodes 0, 1) and 001 (episode 2)
    assert len(list((root / "data").glob("chunk-000/file-*.parquet"))) == 2
    assert len(list((root / "videos" / "observation.images.wrist").glob("chunk-000/*.mp4"))) == 2
    assert [e.length for e in src.episodes] == [T_EP] * 3
    assert sorted(src.cameras) == ["observation.images.top", "observation.images.wrist"]
    for e, ep in enumerate(eps):
        assert src.instructions(e) == TASKS[e]
        for key in ("observation.state", "action"):
            got = src.read_lowdim(e, key)
            assert got.dtype == np.float32 and np.array_equal(got, ep[key]), (e, key)
        for cam in src.cameras:
            frames = src.read_frames(e, cam, range(T_EP))
            assert np.array_equal(frames, ep[cam]), (e, cam)
    # random order with repeats comes back in the order asked
    idx = [39, 0, 17, 17, 3]
    assert np.array_equal(src.read_frames(2, "observation.images.top", idx), eps[2]["observation.images.top"][idx])
    stats = json.loads((root / "meta" / "stats.json").read_text())
    allx = np.concatenate([ep["action"] for ep in eps]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(allx, 0.99, axis=0), rtol=1e-6)
    # the task table is readable the way lerobot reads it (pandas index "task")
    meta = pq.read_table(root / "meta" / "tasks.parquet").schema.pandas_metadata
    assert meta["index_columns"] == ["task"]


def test_lossy_codec_is_close(tmp_path):
    eps = episodes(1, n=1)
    # smooth content (noise does not survive yuv420p): a horizontal gradient that moves
    x = np.arange(64, dtype=np.float32)
    for ep in eps:
        for cam in ("observation.images.top", "observation.images.wrist"):
            T, H, W, _ = ep[cam].shape
            g = (np.arange(T)[:, None, None] * 3 + x[None, None, :W] * 3) % 256
            ep[cam] = np.repeat(np.broadcast_to(g, (T, H, W))[..., None], 3, axis=-1).astype(np.uint8)
    root = write(tmp_path / "ds", eps, codec=VideoCodec())
    got = LeRobotV3Source(root).read_frames(0, "observation.images.top", range(T_EP)).astype(np.float64)
    mse = np.mean((got - eps[0]["observation.images.top"]) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 35


def _dataset(root):
    spec = DatasetSpec(root=str(root), cameras=("observation.images.top",))
    cfg = DataConfig(datasets=(spec,), window=WindowSpec(4, 2, 2), height=32, width=32)
    return MotusDataset(spec, cfg)


def test_truncated_mp4_names_file_and_episode(lerobot_ds, tmp_path):
    root, _ = lerobot_ds
    bad = tmp_path / "ds"
    shutil.copytree(root, bad)
    video = bad / "videos" / "observation.images.top" / "chunk-000" / "file-001.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    ds = _dataset(bad)
    ds[0]                                      # episode 0 lives in the intact file
    with pytest.raises(DataError) as e:
        ds[len(ds) - 1]                        # episode 2 lives in the truncated one
    err = e.value
    assert err.file == str(video) and err.episode == 2 and err.root == str(bad)
    assert "file-001.mp4" in str(err) and "episode 2" in str(err)
    # the same error crosses a DataLoader worker with its message
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=[len(ds) - 1], num_workers=1, collate_fn=collate)
    with pytest.raises(Exception, match=r"file-001\.mp4.*episode 2"):
        next(iter(loader))


def test_short_video_names_missing_frames(lerobot_ds, tmp_path):
    root, eps = lerobot_ds
    bad = tmp_path / "ds"
    shutil.copytree(root, bad)
    video = bad / "videos" / "observation.images.top" / "chunk-000" / "file-001.mp4"
    w = VideoWriter(video, 10, VideoCodec.lossless())       # a valid mp4 with 10 of the 40 frames
    w.write(eps[2]["observation.images.top"][:10])
    w.close()
    src = LeRobotV3Source(bad)
    assert np.array_equal(src.read_frames(2, "observation.images.top", [9]), eps[2]["observation.images.top"][[9]])
    with pytest.raises(DataError, match="not in the video") as e:
        src.read_frames(2, "observation.images.top", [5, 30])
    assert e.value.file == str(video) and e.value.episode == 2


def test_corrupt_parquet_names_file_and_episode(lerobot_ds, tmp_path):
    root, _ = lerobot_ds
    bad = tmp_path / "ds"
    shutil.copytree(root, bad)
    data = bad / "data" / "chunk-000" / "file-000.parquet"
    data.write_bytes(data.read_bytes()[:200])
    with pytest.raises(DataError) as e:
        _dataset(bad)[0]                       # (the dataset reads episode 0's widths when it is built)
    assert e.value.file == str(data) and e.value.episode == 0 and "parquet" in str(e.value)
    meta = bad / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    meta.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError) as e:
        LeRobotV3Source(bad)
    assert e.value.file == str(meta)


def test_rows_missing_from_data_file(lerobot_ds, tmp_path):
    """A data file with fewer rows than the metadata says (a truncated rewrite) is caught, not read short."""
    root, _ = lerobot_ds
    bad = tmp_path / "ds"
    shutil.copytree(root, bad)
    data = bad / "data" / "chunk-000" / "file-001.parquet"
    table = pq.read_table(data)
    pq.write_table(table.slice(0, T_EP - 5), data)
    with pytest.raises(DataError, match="35 rows") as e:
        LeRobotV3Source(bad).read_lowdim(2, "action")
    assert e.value.episode == 2


def test_writer_rejects_bad_episodes(tmp_path):
    from motus_fast.data.lerobot import LeRobotV3Writer

    w = LeRobotV3Writer(tmp_path / "x", fps=10, features=FEATURES)
    ep = episodes(0, n=1)[0]
    with pytest.raises(ValueError, match="same length"):
        w.add_episode({**ep, "action": ep["action"][:-1]}, "t")
    with pytest.raises(ValueError, match="differ from the features"):
        w.add_episode({k: v for k, v in ep.items() if k != "action"}, "t")
    with pytest.raises(FileExistsError):
        w.add_episode(ep, "t")
        w.finish()
        LeRobotV3Writer(tmp_path / "x", fps=10, features=FEATURES)


def test_image_features_in_parquet(lerobot_ds, tmp_path):
    """LeRobot datasets may store frames as PNG bytes in the parquet (dtype "image") instead of mp4."""
    import io

    import pyarrow as pa
    from PIL import Image

    root, eps = lerobot_ds
    ds = tmp_path / "ds"
    shutil.copytree(root, ds)
    for f, ep_ids in (("file-000", [0, 1]), ("file-001", [2])):
        path = ds / "data" / "chunk-000" / f"{f}.parquet"
        table = pq.read_table(path)
        cells = []
        for e in ep_ids:
            for frame in eps[e]["observation.images.wrist"]:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="PNG")
                cells.append({"bytes": buf.getvalue(), "path": None})
        col = pa.array(cells, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(table.append_column("observation.images.cam_png", col), path)
    info = json.loads((ds / "meta" / "info.json").read_text())
    info["features"]["observation.images.cam_png"] = {"dtype": "image", "shape": [32, 48, 3], "names": None}
    (ds / "meta" / "info.json").write_text(json.dumps(info))
    src = LeRobotV3Source(ds)
    assert "observation.images.cam_png" in src.cameras
    got = src.read_frames(2, "observation.images.cam_png", [0, 39, 7])
    assert np.array_equal(got, eps[2]["observation.images.wrist"][[0, 39, 7]])


def test_scalar_and_bool_features(tmp_path):
    from motus_fast.data.lerobot import LeRobotV3Writer

    feats = {"observation.images.top": {"dtype": "video", "shape": [32, 32, 3], "names": None},
             "next.success": {"dtype": "bool", "shape": [1], "names": None},
             "reward": {"dtype": "float32", "shape": [1], "names": None}}
    rng = np.random.default_rng(0)
    ep = {"observation.images.top": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
          "next.success": (np.arange(12) > 8)[:, None], "reward": rng.normal(size=(12, 1)).astype(np.float32)}
    with LeRobotV3Writer(tmp_path / "ds", fps=5, features=feats, codec=VideoCodec.lossless()) as w:
        w.add_episode(ep, "t")
    table = pq.read_table(tmp_path / "ds" / "data" / "chunk-000" / "file-000.parquet")
    assert str(table.schema.field("next.success").type) == "bool"      # scalar columns, as lerobot writes them
    src = LeRobotV3Source(tmp_path / "ds")
    assert np.array_equal(src.read_lowdim(0, "next.success"), ep["next.success"].astype(np.float32))
    assert np.array_equal(src.read_lowdim(0, "reward"), ep["reward"])
