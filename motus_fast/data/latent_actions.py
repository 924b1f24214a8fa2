"""Latent-action labels for stage 2, stored next to a dataset (written by ``motus_fast.latent_action``).

Layout (one file per episode; ``episode`` is the source's ``EpisodeInfo.index``: LeRobot's episode_index, the scan
position for the RoboTwin layout)::

    <dir>/meta.json                 {"frame_spacing": s, "dim": 14, ...}
    <dir>/episode_000123.npy        float32 [n, dim]; row j = the motion from raw frame j*s to (j+1)*s

A window whose actions come from here needs ``global_downsample_rate == s`` (one latent action per action step)
and condition frames on multiples of s; action i of a window with condition frame c is row c/s + i (clamped to
the last row like upstream clamps raw indices at the episode end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from motus_fast.data.errors import DataError

META = "meta.json"


class LatentActionStore:
    def __init__(self, directory: str | Path, root=None):
        self.dir = Path(directory)
        self.root = root
        meta_path = self.dir / META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read latent-action metadata ({e})", root=root, file=meta_path) from e
        if "frame_spacing" not in meta or "dim" not in meta:
            raise DataError("latent-action meta.json needs 'frame_spacing' and 'dim'", root=root, file=meta_path)
        self.frame_spacing, self.dim = int(meta["frame_spacing"]), int(meta["dim"])
        self.meta = meta

    def path(self, episode: int) -> Path:
        return self.dir / f"episode_{int(episode):06d}.npy"

    def read(self, episode: int) -> np.ndarray:
        path = self.path(episode)
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read latent actions ({type(e).__name__}: {e})", root=self.root, file=path,
                            episode=episode) from e
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise DataError(f"latent actions must be [n >= 1, {self.dim}], got {x.shape}", root=self.root,
                            file=path, episode=episode)
        return x

    def chunk(self, episode: int, cond: int, chunk_size: int) -> np.ndarray:
        """The K latent actions after condition frame ``cond`` (a multiple of frame_spacing) -> float32 [K, dim]."""
        if cond % self.frame_spacing:
            raise DataError(f"condition frame {cond} is not a multiple of the latent frame spacing "
                            f"{self.frame_spacing}", root=self.root, file=self.path(episode), episode=episode)
        x = self.read(episode)
        rows = np.minimum(cond // self.frame_spacing + np.arange(chunk_size), len(x) - 1)
        return np.asarray(x[rows], dtype=np.float32)


def write_latent_actions(directory: str | Path, actions: dict[int, np.ndarray], frame_spacing: int,
                         **meta) -> Path:
    """Write a store (the labeller's output format; used by tests and tools)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dims = {np.asarray(a).shape[1] for a in actions.values()}
    if len(dims) != 1:
        raise ValueError(f"latent actions of all episodes need one width, got {sorted(dims)}")
    for ep, a in actions.items():
        np.save(d / f"episode_{int(ep):06d}.npy", np.asarray(a, dtype=np.float32))
    (d / META).write_text(json.dumps({"frame_spacing": int(frame_spacing), "dim": dims.pop(), **meta}, indent=2))
    return d
