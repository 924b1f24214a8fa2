"""Fine-tuning from the command line with the real encoder classes (tiny, in the release layouts):
LeRobot v3 dataset -> `motus-fast stats` -> `encode` (2 gloo ranks under torchrun) -> `train --cache` -> the run
serves; `train --cache` and `train --wan --vlm` (online encoders) give identical losses (tolerance: exact; each
window and instruction is encoded alone on both paths); a killed `encode` resumes to the same cache; stale caches,
corrupt shards, mismatched encoders and missing cameras are refused by name before training; latent-action
labelling sharded over 2 ranks equals one process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from motus_fast.cli import main
from motus_fast.data.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from real_stack import tiny_qwen3_vl, tiny_umt5, write_qwen_folder, write_wan_original  # noqa: E402

TRAIN = ["--preset", "tiny", "--train", "stage=3", "--train", "steps=3", "--train", "batch_size=2",
         "--train", "logger=jsonl", "--train", "param_dtype=fp32", "--train", "save_every=3", "--train",
         "warmup_steps=1", "--train", "log_every=1"]


def torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29500 + os.getpid() % 1000), "-m", "motus_fast.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Backbone folders, a LeRobot v3 dataset, its stats and DataConfig, and a cache encoded by 2 ranks."""
    from motus_fast.data.tiny import write_tiny_lerobot

    root = tmp_path_factory.mktemp("lab")
    write_wan_original(root / "wan", tiny_umt5())
    write_qwen_folder(root / "qwen", tiny_qwen3_vl())
    write_tiny_lerobot(root / "lerobot", episodes=3, frames=24)
    cfg = {"datasets": [{"root": str(root / "lerobot")}], "height": 64, "width": 64, "normalization": "mean_std",
           "window": {"num_video_frames": 8, "video_action_freq_ratio": 2, "global_downsample_rate": 1},
           "stats_path": str(root / "stats.json")}
    (root / "data.json").write_text(json.dumps(cfg))
    assert main(["stats", "--config", str(root / "data.json"), "--out", str(root / "stats.json")]) == 0
    out = torchrun("encode", "--data", str(root / "data.json"), "--wan", str(root / "wan"), "--vlm",
                   str(root / "qwen"), "--encoder-dtype", "fp32", "--quiet", "--out", str(root / "cache"))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "rank 0/2: encoded 2 episode(s)" in out.stdout and "rank 1/2: encoded 1 episode(s)" in out.stdout
    return root


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cache_tensors(cache: Path) -> dict:
    out = {}
    for p in sorted(cache.glob("*/*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({f"{p.parent.name}/{p.stem}/{k}": f.get_tensor(k) for k in f.keys()})
    return out


def test_cache_and_online_encoders_train_identically_and_the_run_serves(lab):
    data = str(lab / "data.json")
    assert main(["train", "--data", data, "--cache", str(lab / "cache"), "--out", str(lab / "run_cache"), *TRAIN]) == 0
    assert main(["train", "--data", data, "--wan", str(lab / "wan"), "--vlm", str(lab / "qwen"), "--encoder-dtype",
                 "fp32", "--out", str(lab / "run_online"), *TRAIN]) == 0
    cached, online = losses(lab / "run_cache"), losses(lab / "run_online")
    assert len(cached) == 3 and all(np.isfinite(cached))
    assert cached == online
    # the run serves with the encoders it was trained with
    from motus_fast.serve.build import PolicySpec, build_policy, check_policy
    from motus_fast.serve.schema import validate
    spec = PolicySpec(checkpoint=str(lab / "run_cache"), wan=str(lab / "wan"), vlm=str(lab / "qwen"), steps=2)
    assert check_policy(spec).ok
    policy = build_policy(spec)[0]
    assert policy.engine.encoders.attend_padding is False and policy.spec.image_size == (64, 64)
    obs = {"image": np.zeros((64, 64, 3), np.uint8), "prompt": "move the square left",
           "state": np.zeros(14, np.float32), "noise_seed": 1}
    assert np.isfinite(policy.infer(validate(obs, policy.spec))["actions"]).all()


def test_killed_encode_resumes_to_the_same_cache(lab, tmp_path):
    args = [sys.executable, "-m", "motus_fast.cli", "encode", "--data", str(lab / "data.json"), "--wan",
            str(lab / "wan"), "--vlm", str(lab / "qwen"), "--encoder-dtype", "fp32", "--quiet", "--out",
            str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1")   # as under torchrun: float results depend on the thread count
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()                                    # SIGKILL after the first shard
    proc.wait()
    assert not (tmp_path / "cache" / "index.json").exists()
    assert subprocess.run(args, capture_output=True, timeout=300, env=env).returncode == 0
    want, got = cache_tensors(lab / "cache"), cache_tensors(tmp_path / "cache")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_stale_or_broken_caches_and_bad_encoders_are_refused_by_name(lab, tmp_path):
    import shutil

    data = json.loads((lab / "data.json").read_text())
    # the data changed since encoding (another frame size): the cache no longer fits
    (tmp_path / "data32.json").write_text(json.dumps({**data, "height": 32, "width": 32}))
    with pytest.raises(DataError, match="clip_fingerprint"):
        main(["train", "--data", str(tmp_path / "data32.json"), "--cache", str(lab / "cache"), "--out",
              str(tmp_path / "run"), *TRAIN])
    # resuming an encode with other encoders
    shutil.copytree(lab / "cache", tmp_path / "cache")
    with pytest.raises(DataError, match="encoders.dtype"):
        main(["encode", "--data", str(lab / "data.json"), "--wan", str(lab / "wan"), "--vlm", str(lab / "qwen"),
              "--encoder-dtype", "bf16", "--quiet", "--out", str(tmp_path / "cache")])
    # a corrupt shard, before training starts
    shard = sorted((tmp_path / "cache").glob("*/*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=shard.name):
        main(["train", "--data", str(lab / "data.json"), "--cache", str(tmp_path / "cache"), "--out",
              str(tmp_path / "run"), *TRAIN])
    assert not (tmp_path / "run" / "checkpoints").exists()
    # encoders whose widths do not match the model
    write_qwen_folder(tmp_path / "qwen64", tiny_qwen3_vl(hidden=64))
    from motus_fast.weights import CheckpointError
    with pytest.raises(CheckpointError, match="und.vlm_dim is 96"):
        main(["train", "--data", str(lab / "data.json"), "--wan", str(lab / "wan"), "--vlm", str(tmp_path / "qwen64"),
              "--out", str(tmp_path / "run"), *TRAIN])
    # a camera the dataset does not have
    (tmp_path / "cam.json").write_text(json.dumps({**data, "datasets": [{**data["datasets"][0],
                                                                        "cameras": ["observation.images.top"]}]}))
    with pytest.raises(DataError, match="observation.images.top"):
        main(["train", "--data", str(tmp_path / "cam.json"), "--cache", str(lab / "cache"), "--out",
              str(tmp_path / "run"), *TRAIN])


def test_sharded_labelling_equals_one_process(tmp_path):
    from motus_fast.latent_action.checkpoint import save_latent_action_model
    from motus_fast.latent_action.config import get_preset
    from motus_fast.latent_action.frames import write_video
    from motus_fast.latent_action.model import LatentActionVAE
    from motus_fast.latent_action.synthetic import moving_square_episodes

    (tmp_path / "videos").mkdir()
    for i, ep in enumerate(moving_square_episodes(5, 4, 3, size=64, seed=2)):
        write_video(tmp_path / "videos" / f"episode_{i:06d}.mp4", ep.frames, fps=15)
    torch.manual_seed(0)
    model = LatentActionVAE(get_preset("tiny").override({"frame_spacing": 3, "model.hidden_dim": 32})).eval()
    save_latent_action_model(model, tmp_path / "ck", step=1)
    common = ["label-latent-actions", "--dataset", str(tmp_path / "videos"), "--checkpoint", str(tmp_path / "ck")]
    one_process = subprocess.run([sys.executable, "-m", "motus_fast.cli", *common, "--out", str(tmp_path / "one")],
                                 capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))   # the ranks' thread count
    assert one_process.returncode == 0, one_process.stderr[-4000:]
    out = torchrun(*common, "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-4000:]
    one, two = tmp_path / "one" / "latent_actions", tmp_path / "two" / "latent_actions"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in one.glob("*.npy"):
        np.testing.assert_array_equal(np.load(p), np.load(two / p.name))
    m1, m2 = json.loads((one / "meta.json").read_text()), json.loads((two / "meta.json").read_text())
    assert m1 == m2 and len(m1["episodes"]) == 5
