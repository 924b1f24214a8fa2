"""The labelling and training commands end to end on tiny videos: files, frame spacing, values, metadata, and the
stage-2 reader of the data stack reading what was written."""

import json

import numpy as np
import pytest
import torch

from motus_fast.cli import main
from motus_fast.latent_action.checkpoint import load_latent_action_model, save_latent_action_model
from motus_fast.latent_action.config import get_preset
from motus_fast.latent_action.frames import VideoDirectory, read_video, step_pairs, write_video
from motus_fast.latent_action.model import LatentActionVAE, rgb_to_input
from motus_fast.latent_action.optical_flow import flow_images, make_flow_estimator
from motus_fast.latent_action.synthetic import moving_square_episodes

SPACING = 3


def tiny_cfg():
    return get_preset("tiny").override({"frame_spacing": SPACING, "model.hidden_dim": 32,
                                        "train.steps": 3, "train.batch_size": 4, "train.log_every": 1})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four mp4 episodes of different lengths (one shorter than a latent step) and their raw frames."""
    root = tmp_path_factory.mktemp("videos")
    eps = moving_square_episodes(3, 4, SPACING, size=64, seed=1)
    raw = {7: eps[0].frames, 12: eps[1].frames[:11], 30: eps[2].frames[:SPACING + 1], 31: eps[2].frames[:2]}
    for index, frames in raw.items():
        write_video(root / f"episode_{index:06d}.mp4", frames, fps=15)
    return root, raw


def test_video_round_trip_and_frame_step(videos):
    root, raw = videos
    frames, fps, n = read_video(root / "episode_000007.mp4", frame_step=SPACING)
    assert fps == 15 and n == len(raw[7]) and frames.shape == (len(raw[7][::SPACING]), 64, 64, 3)
    assert np.abs(frames.astype(int) - raw[7][::SPACING]).mean() < 8      # lossy H.264, but the same frames
    src = VideoDirectory(root, frame_step=SPACING)
    assert src.indices == [7, 12, 30, 31] and len(src) == 4
    ep = next(iter(src))
    first, second = step_pairs(ep)
    assert first.shape[0] == (len(raw[7]) - 1) // SPACING
    np.testing.assert_array_equal(second[:-1], first[1:])


def test_label_command_writes_what_the_model_computes(videos, tmp_path):
    root, raw = videos
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = LatentActionVAE(cfg).eval()
    model.token_std.fill_(2.0)
    save_latent_action_model(model, tmp_path / "ck", step=11)
    out = tmp_path / "labels"
    assert main(["label-latent-actions", "--dataset", str(root), "--checkpoint", str(tmp_path / "ck"),
                 "--out", str(out), "--batch-size", "2"]) == 0
    d = out / "latent_actions"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["dim"] == 14 and meta["frame_spacing"] == SPACING and meta["checkpoint_step"] == 11
    assert meta["config_hash"] == cfg.config_hash() and meta["too_short"] == [31]
    assert sorted(meta["episodes"]) == ["12", "30", "7"]
    est = make_flow_estimator(cfg.flow)
    all_rows = []
    for index in (7, 12, 30):
        rows = np.load(d / f"episode_{index:06d}.npy")
        n_steps = (len(raw[index]) - 1) // SPACING
        assert rows.dtype == np.float32 and rows.shape == (n_steps, 14)
        assert meta["episodes"][str(index)]["num_steps"] == n_steps
        # the same computation done by hand on the decoded video
        frames, _, _ = read_video(root / f"episode_{index:06d}.mp4", frame_step=SPACING)
        rgb = flow_images(frames[:n_steps], frames[1:n_steps + 1], cfg.flow, cfg.model.image_size, est)
        with torch.no_grad():
            want = model.encode(rgb_to_input(rgb))[0].numpy()
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
        all_rows.append(rows)
    all_rows = np.concatenate(all_rows)
    np.testing.assert_allclose(meta["stats"]["mean"], all_rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta["stats"]["std"], all_rows.std(0), rtol=1e-4, atol=1e-6)
    assert not (d / "episode_000031.npy").exists()

    # the stage-2 reader of the data stack reads these files
    latent_actions = pytest.importorskip("motus_fast.data.latent_actions")
    store = latent_actions.LatentActionStore(d)
    assert store.frame_spacing == SPACING and store.dim == 14
    np.testing.assert_array_equal(store.chunk(7, SPACING, 2), np.load(d / "episode_000007.npy")[1:3])

    # a second run refuses to mix with the first unless told to replace it
    with pytest.raises(FileExistsError, match="overwrite"):
        main(["label-latent-actions", "--dataset", str(root), "--checkpoint", str(tmp_path / "ck"), "--out", str(out)])
    assert main(["label-latent-actions", "--dataset", str(root), "--checkpoint", str(tmp_path / "ck"),
                 "--out", str(out), "--overwrite"]) == 0


def test_train_command_with_labels(videos, tmp_path):
    root, raw = videos
    labels = tmp_path / "labels"
    labels.mkdir()
    np.save(labels / "episode_000007.npy", np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32))
    sets = ["--set", f"frame_spacing={SPACING}", "--set", "model.hidden_dim=32", "--set", "train.steps=3",
            "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.labelled_fraction=0.5"]
    assert main(["train-latent-actions", "--dataset", str(root), "--out", str(tmp_path / "ck"),
                 "--labels", str(labels), *sets]) == 0
    log = [json.loads(x) for x in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("recon" in r and "kl" in r for r in log)
    model = load_latent_action_model(tmp_path / "ck")
    assert model.cfg.frame_spacing == SPACING and model.cfg.train.steps == 3

    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "episode_000007.npy", np.zeros((5, 2), np.float32))    # 4 latent steps in that video
    with pytest.raises(ValueError, match="episode 7"):
        main(["train-latent-actions", "--dataset", str(root), "--out", str(tmp_path / "ck2"), "--labels", str(bad),
              *sets])
    np.save(bad / "episode_000007.npy", np.zeros((4, 2), np.float32))
    np.save(bad / "episode_000099.npy", np.zeros((4, 2), np.float32))      # no such video
    with pytest.raises(ValueError, match=r"\[99\]"):
        main(["train-latent-actions", "--dataset", str(root), "--out", str(tmp_path / "ck2"), "--labels", str(bad),
              *sets])


def test_label_command_reads_a_lerobot_dataset(tmp_path):
    tiny = pytest.importorskip("motus_fast.data.tiny")
    root = tiny.write_tiny_lerobot(tmp_path / "ds", episodes=2, frames=13, height=64, width=64)
    torch.manual_seed(0)
    save_latent_action_model(LatentActionVAE(tiny_cfg()), tmp_path / "ck")
    assert main(["label-latent-actions", "--dataset", str(root), "--checkpoint", str(tmp_path / "ck")]) == 0
    meta = json.loads((root / "latent_actions" / "meta.json").read_text())
    assert sorted(meta["episodes"]) == ["0", "1"]
    assert all(e["num_steps"] == 12 // SPACING and e["fps"] == 10 for e in meta["episodes"].values())
