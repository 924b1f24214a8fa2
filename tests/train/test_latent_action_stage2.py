"""Latent actions feed stage 2: train the optical-flow latent-action VAE on a tiny LeRobot dataset, label its
episodes with `motus-fast label-latent-actions`, then train stage 2 (pretrain layout) on those labels through the
data stack's loader."""

import json

import numpy as np
import torch

from motus_fast.cli import main
from motus_fast.config import TrainConfig, get_preset
from motus_fast.data import DataConfig, DatasetSpec, WindowSpec
from motus_fast.data.tiny import write_tiny_lerobot
from motus_fast.train.cli import build_dataset
from motus_fast.train.trainer import Trainer

SPACING = 2


def test_labelled_latent_actions_train_stage_2(tmp_path):
    root = write_tiny_lerobot(tmp_path / "videos", episodes=2, frames=48, height=64, width=64, state_dim=None,
                              action_dim=None, seed=0)
    sets = ["--set", f"frame_spacing={SPACING}", "--set", "model.hidden_dim=32", "--set", "train.steps=3",
            "--set", "train.batch_size=4"]
    assert main(["train-latent-actions", "--dataset", str(root), "--out", str(tmp_path / "la"), *sets]) == 0
    assert main(["label-latent-actions", "--dataset", str(root), "--checkpoint", str(tmp_path / "la")]) == 0
    labels = sorted((root / "latent_actions").glob("episode_*.npy"))
    assert len(labels) == 2 and np.load(labels[0]).shape[1] == 14

    data = DataConfig(datasets=(DatasetSpec(root=str(root), actions="latent"),),
                      window=WindowSpec(num_video_frames=8, video_action_freq_ratio=2, global_downsample_rate=SPACING),
                      height=64, width=64, action_dim=14).for_stage(2)
    spec = tmp_path / "stage2.json"
    spec.write_text(json.dumps(data.to_dict()))
    base = get_preset("tiny")
    data = build_dataset(str(spec), base, 2, seed=0)
    first = data.dataset[0]
    assert first.cond.state is None and torch.isfinite(first.actions).all()
    cfg = TrainConfig(stage=2, steps=2, batch_size=2, param_dtype="fp32", logger="jsonl", save_every=2,
                      warmup_steps=1, activation_checkpointing=False)
    recs = Trainer(base, cfg, data.dataset, tmp_path / "stage2", collate_fn=data.collate_fn, extra=data.extra,
                   mixture=data.mixture, progress=False).run()
    assert len(recs) == 2 and all(r["loss_action"] > 0 for r in recs)
