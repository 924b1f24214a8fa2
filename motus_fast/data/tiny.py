"""Tiny on-disk datasets for CI, the demo and the stage 1 -> 2 -> 3 smoke runs (seconds to write, no download).

Episodes are smooth random trajectories: the state is a sum of slow sinusoids, the action at frame t is the state
at t + 1, and each camera shows a coloured square whose position follows the first two state dims, so video and
actions are related and learnable. ``tiny_pyramid`` writes one dataset per pyramid level and returns the
``DataConfig`` of each training stage:

| dataset      | format   | level   | actions                      | used in stages |
|--------------|----------|---------|------------------------------|----------------|
| `videos`     | LeRobot  | video   | none (action-free video)     | 1, 2           |
| `robots`     | LeRobot  | latent  | 14-D latent actions (stored) | 1, 2           |
| `target`     | RoboTwin | target  | qpos (real actions + state)  | 1, 3           |
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.latent_actions import write_latent_actions
from motus_fast.data.lerobot import LeRobotV3Writer
from motus_fast.data.video import VideoCodec, VideoWriter
from motus_fast.data.windows import WindowSpec


def trajectory(rng: np.random.Generator, frames: int, dim: int) -> np.ndarray:
    """A smooth [frames + 1, dim] float32 trajectory in about [-1, 1]."""
    t = np.arange(frames + 1)[:, None]
    freq = rng.uniform(0.02, 0.12, size=(3, dim))
    phase = rng.uniform(0, 2 * np.pi, size=(3, dim))
    amp = rng.uniform(0.2, 0.5, size=(3, dim))
    return sum(amp[k] * np.sin(2 * np.pi * freq[k] * t + phase[k]) for k in range(3)).astype(np.float32)


def render(state: np.ndarray, height: int, width: int, color: tuple[int, int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3]: a square at a position given by state dims 0 and 1 on a dim grey background."""
    T = len(state)
    out = np.full((T, height, width, 3), 40, dtype=np.uint8)
    s = max(2, min(height, width) // 5)
    ys = ((state[:, 0] + 1) / 2 * (height - s)).clip(0, height - s).astype(int)
    xs = ((state[:, 1 % state.shape[1]] + 1) / 2 * (width - s)).clip(0, width - s).astype(int)
    for i in range(T):
        out[i, ys[i]: ys[i] + s, xs[i]: xs[i] + s] = color
    return out


def write_tiny_lerobot(root: str | Path, episodes: int = 3, frames: int = 40, height: int = 64, width: int = 64,
                       state_dim: Optional[int] = 14, action_dim: Optional[int] = 14, cameras: int = 1,
                       fps: int = 10, episodes_per_file: int = 2, lossless: bool = True, seed: int = 0,
                       overwrite: bool = True) -> Path:
    """A LeRobot v3 dataset; ``state_dim``/``action_dim`` None leaves the column out (action-free video)."""
    rng = np.random.default_rng(seed)
    names = [f"observation.images.cam{i}" for i in range(cameras)]
    features = {n: {"dtype": "video", "shape": [height, width, 3], "names": None} for n in names}
    if state_dim:
        features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": None}
    if action_dim:
        features["action"] = {"dtype": "float32", "shape": [action_dim], "names": None}
    codec = VideoCodec.lossless() if lossless else VideoCodec()
    with LeRobotV3Writer(root, fps, features, robot_type="tiny", codec=codec, episodes_per_file=episodes_per_file,
                         overwrite=overwrite) as w:
        for e in range(episodes):
            traj = trajectory(rng, frames, max(state_dim or 2, action_dim or 2, 2))
            ep = {}
            for i, n in enumerate(names):
                ep[n] = render(traj[:frames], height, width, (200, 60 + 60 * i, 60 + 120 * (e % 2)))
            if state_dim:
                ep["observation.state"] = traj[:frames, :state_dim]
            if action_dim:
                ep["action"] = traj[1:, :action_dim]
            w.add_episode(ep, [f"move the square {['left', 'right', 'up'][e % 3]}", "follow the path"])
    return Path(root)


def write_tiny_robotwin(root: str | Path, task: str = "move_square", episodes: int = 3, frames: int = 40,
                        height: int = 64, width: int = 64, dim: int = 14, text_dim: Optional[int] = None,
                        lossless: bool = True, seed: int = 0) -> Path:
    """The upstream RoboTwin layout under ``root/clean/<task>/`` (umt5_wan/ only when ``text_dim`` is given)."""
    import torch

    rng = np.random.default_rng(seed)
    d = Path(root) / "clean" / task
    for sub in ("videos", "qpos", "metas") + (("umt5_wan",) if text_dim else ()):
        (d / sub).mkdir(parents=True, exist_ok=True)
    codec = VideoCodec.lossless() if lossless else VideoCodec()
    for e in range(episodes):
        traj = trajectory(rng, frames - 1, dim)
        w = VideoWriter(d / "videos" / f"{e}.mp4", 30, codec)
        w.write(render(traj, height, width, (60, 200, 60 + 80 * (e % 2))))
        w.close()
        torch.save(torch.from_numpy(traj), d / "qpos" / f"{e}.pt")
        lines = [f"move the square to corner {e}", "follow the path"]
        (d / "metas" / f"{e}.txt").write_text("\n".join(lines) + "\n")
        if text_dim:
            torch.save([torch.randn(3 + i, text_dim) for i in range(len(lines))], d / "umt5_wan" / f"{e}.pt")
    return Path(root)


def tiny_pyramid(root: str | Path, window: WindowSpec = WindowSpec(8, 2, 1), height: int = 64, width: int = 64,
                 episodes: int = 3, frames: int = 40, dim: int = 14, seed: int = 0) -> dict[int, DataConfig]:
    """Write the three tiny datasets under ``root`` and return ``{stage: DataConfig}`` for stages 1, 2, 3."""
    root = Path(root)
    write_tiny_lerobot(root / "videos", episodes, frames, height, width, state_dim=None, action_dim=None, seed=seed)
    write_tiny_lerobot(root / "robots", episodes, frames, height, width, state_dim=dim, action_dim=dim,
                       seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    spacing = window.global_downsample_rate
    write_latent_actions(root / "robots" / "latent_actions",
                         {e: rng.normal(size=((frames - 1) // spacing, dim)).astype(np.float32)
                          for e in range(episodes)}, frame_spacing=spacing, source="motus_fast.data.tiny (random)")
    write_tiny_robotwin(root / "target", episodes=episodes, frames=frames, height=height, width=width, dim=dim,
                        seed=seed + 3)
    videos = DatasetSpec(root=str(root / "videos"), level="video", actions="none", instruction="a moving square")
    robots = DatasetSpec(root=str(root / "robots"), level="latent", actions="latent")
    target = DatasetSpec(root=str(root / "target"), level="target", actions="dataset")
    base = DataConfig(datasets=(videos, robots, target), window=window, height=height, width=width,
                      action_dim=dim, state_dim=dim)
    return {1: base.for_stage(1),
            2: dataclasses.replace(base, datasets=(videos, robots)).for_stage(2),
            3: dataclasses.replace(base, datasets=(target,)).for_stage(3)}
