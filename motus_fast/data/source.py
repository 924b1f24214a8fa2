"""What every on-disk dataset format gives the windowing code: episodes, cameras, low-dim columns, instructions.

An ``EpisodeSource`` is cheap to construct (metadata only), picklable (DataLoader workers get a copy and open files
lazily), and reads by episode-local frame index. Two formats implement it: ``LeRobotV3Source`` (lerobot.py) and
``RoboTwinSource`` (robotwin.py); ``open_source`` picks one from what it finds at the root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class EpisodeInfo:
    """index: the dataset's own episode id; length: frames; tasks: its instructions where the metadata lists them
    (``EpisodeSource.instructions`` is the way to read them: some formats keep them in per-episode files)."""

    index: int
    length: int
    tasks: tuple[str, ...]


class EpisodeSource(Protocol):
    root: Path
    fps: float
    episodes: list[EpisodeInfo]

    @property
    def cameras(self) -> list[str]: ...

    @property
    def lowdim_keys(self) -> list[str]: ...

    def read_lowdim(self, episode: int, key: str, frames: Optional[Sequence[int]] = None) -> np.ndarray:
        """[n, d] rows of column ``key`` at episode-local ``frames`` (None: the whole episode), in the stored dtype
        (float, integer or bool: an int64 above 2^24 comes back exactly). ``episode`` is a position in ``episodes``."""
        ...

    def read_frames(self, episode: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        """uint8 [n, H, W, 3] RGB frames of ``camera`` at episode-local ``frames``."""
        ...

    def instructions(self, episode: int) -> list[str]:
        """The episode's instructions (at least one)."""
        ...

    def episode_name(self, episode: int) -> str:
        """How errors and caches name the episode."""
        ...

    def text_embeddings(self, episode: int) -> Optional[list]:
        """Pre-encoded umT5 states per instruction (aligned with ``episodes[episode].tasks``), if the format
        ships them (RoboTwin's umt5_wan/); else None."""
        ...


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if (root / "meta" / "info.json").is_file():
        return "lerobot"
    from motus_fast.data.robotwin import find_task_dirs
    if find_task_dirs(root):
        return "robotwin"
    raise FileNotFoundError(f"{root}: neither a LeRobot v3 dataset (meta/info.json) nor an upstream RoboTwin "
                            "layout (<task>/videos/*.mp4 + <task>/qpos/*.pt)")


def open_source(root: str | Path, fmt: str = "auto", **kwargs) -> EpisodeSource:
    """Open a dataset root. fmt: auto | lerobot | robotwin; kwargs go to the format's constructor."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "lerobot":
        from motus_fast.data.lerobot import LeRobotV3Source
        return LeRobotV3Source(root, **kwargs)
    if fmt == "robotwin":
        from motus_fast.data.robotwin import RoboTwinSource
        return RoboTwinSource(root, **kwargs)
    raise ValueError(f"unknown dataset format {fmt!r}; choose auto, lerobot or robotwin")
