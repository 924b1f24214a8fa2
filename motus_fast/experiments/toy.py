"""The toy-scale Meta-World pipeline shared by `motus-fast demo` and `motus-fast experiment`: scripted
demonstrations -> LeRobot v3 -> our loader's windows -> frozen stand-in encoders -> FlowBatches -> the real trainer.

Encoders: no pretrained weights. The VAE stand-in is a patch-PCA autoencoder fitted to the frames
(``PatchPCAEncoders``, saved inside each checkpoint so `motus-fast serve` finds it); text and VLM stand-ins are the
deterministic stubs of ``StubEncoders`` (umT5: a byte embedding of the instruction; VLM: a 4x4 grid of the image's
mean colours plus the instruction's bytes). Both stubs carry the task's identity through the instruction.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from motus_fast.flow import FlowBatch


@dataclass
class Window:
    """One training window, encoded: ``full`` has the whole clip (condition frame + future), ``cond`` the
    condition frame only (the action-only baseline's input)."""

    full: FlowBatch
    cond: FlowBatch
    episode: int
    instruction: str


def model_overrides(sample_steps: int) -> dict:
    """The tiny preset, sized for Meta-World: 4-D actions, 21-D state, 16-action chunks, room for prompts."""
    return {"action.action_dim": 4, "action.state_dim": 21, "action.chunk_size": 16, "video.text_len": 48,
            "flow.sample_steps": sample_steps}


def toy_model_config(sample_steps: int = 10):
    from motus_fast.config import get_preset
    return get_preset("tiny").override(model_overrides(sample_steps))


def record_demonstrations(root: Path, tasks: Sequence[str], episodes_per_task: int, seed: int, render) -> dict:
    """Scripted expert demonstrations written as a LeRobot v3 dataset at ``root``; returns the writer's summary."""
    from motus_fast.data.metaworld import write_lerobot_dataset
    from motus_fast.envs.metaworld import generate_demonstrations

    eps = generate_demonstrations(tasks, episodes_per_task, seed=seed, render=render)
    return write_lerobot_dataset(eps, root, overwrite=True)


def read_windows(data_root: Path, image_size: int, condition_stride: int):
    """The LeRobot dataset read back through our loader: every window (8 future frames at stride 2 = 16 actions)
    and the normalisation statistics. -> (samples, stats, DataConfig)"""
    from tqdm.auto import tqdm

    from motus_fast.data import DataConfig, DatasetSpec, WindowSpec
    from motus_fast.data.dataset import MotusDataset, compute_dataset_stats

    spec = DatasetSpec(root=str(data_root), name="metaworld")
    stats = compute_dataset_stats(spec, progress=False)
    window = WindowSpec(num_video_frames=8, video_action_freq_ratio=2, global_downsample_rate=1,
                        condition_stride=condition_stride)
    data_cfg = DataConfig(datasets=(spec,), window=window, height=image_size, width=image_size,
                          normalization="mean_std")
    ds = MotusDataset(spec, data_cfg, stats=stats)
    samples = [ds[i] for i in tqdm(range(len(ds)), desc="read windows", unit="win")]
    return samples, stats, data_cfg


def sample_clips(samples) -> torch.Tensor:
    """uint8 [N, 9, H, W, 3]: the frames of every window."""
    return torch.stack([s.frames.permute(0, 2, 3, 1) for s in samples])


def episode_of(sample) -> int:
    """The episode index in a sample's key "<dataset>/<episode>/<condition frame>"."""
    m = re.fullmatch(r".*/(\d+)/\d+", sample.key)
    if m is None:
        raise ValueError(f"cannot read the episode from the window key {sample.key!r}")
    return int(m.group(1))


def encode_windows(samples, clips: torch.Tensor, encoders, with_vlm: bool = True) -> list[Window]:
    """Every window through the frozen encoders, once (batches of 256)."""
    from motus_fast.model import Conditioning

    prompts = sorted({s.instruction for s in samples})
    text = dict(zip(prompts, encoders.encode_prompts(prompts)[0]))
    out = []
    for lo in range(0, len(samples), 256):
        chunk = samples[lo: lo + 256]
        lat = encoders.encode_frames(clips[lo: lo + 256])                                 # n, C, 3, h, w
        vlm = encoders.vlm_features(clips[lo: lo + 256, 0], [s.instruction for s in chunk])[0] if with_vlm else None
        for j, s in enumerate(chunk):
            cond = Conditioning(text=text[s.instruction][None], vlm=None if vlm is None else vlm[j: j + 1],
                                state=None if s.state is None else s.state[None])
            out.append(Window(FlowBatch(lat[j: j + 1], s.actions[None], cond),
                              FlowBatch(lat[j: j + 1, :, :1], s.actions[None], cond), episode_of(s), s.instruction))
    return out


def train_run(run_dir: Path, model_cfg, batches: Sequence[FlowBatch], *, steps: int, batch_size: int, lr: float,
              seed: int, encoders, extra: dict, stage: int = 3, init_from: Optional[str] = None,
              progress: bool = True):
    """The real trainer (FSDP2 on one process, fp32) on in-memory FlowBatches; the encoders are saved inside the
    checkpoint. -> (checkpoint dir, curves {loss, loss_video, loss_action})"""
    from motus_fast.config import TrainConfig
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.train.checkpoint import latest_checkpoint
    from motus_fast.train.trainer import Trainer

    tc = TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(50, steps // 4),
                     schedule="cosine", min_lr_ratio=0.1, param_dtype="fp32", activation_checkpointing=False,
                     save_every=steps, keep_last=1, log_every=10, logger="jsonl", seed=seed, init_from=init_from)
    records = Trainer(model_cfg, tc, list(batches), run_dir, extra=extra, progress=progress).run()
    ckpt = latest_checkpoint(run_dir)
    encoders.save(ckpt / PatchPCAEncoders.FILENAME)
    curve = {k: [r[k] for r in records] for k in ("loss", "loss_video", "loss_action")}
    return ckpt, curve


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def latent_frame_target(real: torch.Tensor) -> torch.Tensor:
    """Each latent frame after the first stands for the mean of its 4 raw frames: the target a decoded prediction
    is compared against, frame by frame. real: [9, H, W, 3] -> [9, H, W, 3] float."""
    real = real.float()
    return torch.cat([real[:1], real[1:].unflatten(0, (-1, 4)).mean(1).repeat_interleave(4, 0)])


def provenance(threads: int) -> dict:
    """Commit, versions, torch threads per process: what a reader needs to reproduce the numbers."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    def version(dist):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "numpy": np.__version__, "mujoco": version("mujoco"),
            "metaworld": version("metaworld"), "torch_threads": threads}
