"""The official Motus RoboTwin 2.0 layout (what upstream's converter writes and ``RobotWinTaskDataset`` reads)::

    <root>/[clean|randomized/]<task>/videos/<N>.mp4     the three cameras pre-stitched in a T shape (head on top,
                                                        both wrists at half size below), one file per episode
    <root>/[clean|randomized/]<task>/qpos/<N>.pt        torch tensor [T, 14]: joint positions, both state and action
    <root>/[clean|randomized/]<task>/umt5_wan/<N>.pt    list of umT5 states [L_i, 4096], one per instruction
    <root>/[clean|randomized/]<task>/metas/<N>.txt      the instructions, one per line (same order as umt5_wan)

``root`` may be the dataset root (with clean/ and randomized/), one split, or one task directory. Episodes are the
qpos files that have a video; the episode length is the qpos length (the video must have at least that many
frames: a shorter one fails with ``DataError`` when a missing frame is read). Frames are read by decode position,
as upstream's decord/OpenCV reader does. The low-dim key is ``qpos``; the camera is ``video``.

Scanning many thousands of episodes reads every qpos file once; pass ``index_cache=`` (a JSON path) to keep the
scan between runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from motus_fast.data.errors import DataError
from motus_fast.data.source import EpisodeInfo
from motus_fast.data.video import read_frames_by_index

logger = logging.getLogger(__name__)
CAMERA = "video"
QPOS = "qpos"


def _is_task_dir(d: Path) -> bool:
    return (d / "videos").is_dir() and (d / "qpos").is_dir()


def find_task_dirs(root: str | Path) -> list[Path]:
    """Task directories at root, root/*, or root/*/* (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    if _is_task_dir(root):
        return [root]
    found = [d for d in sorted(root.iterdir()) if d.is_dir() and _is_task_dir(d)]
    for split in sorted(root.iterdir()):
        if split.is_dir() and not _is_task_dir(split):
            found += [d for d in sorted(split.iterdir()) if d.is_dir() and _is_task_dir(d)]
    return found


def _episode_sort_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _load_pt(path: Path, root, episode):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot load tensor file ({type(e).__name__}: {e})", root=root, file=path,
                        episode=episode) from e


class RoboTwinSource:
    """Read the upstream RoboTwin layout. ``tasks``: optional subset of task names; ``max_episodes_per_task``:
    take the first N episodes of each task (upstream's ``randomized_limit_per_task``, applied to all splits)."""

    def __init__(self, root: str | Path, tasks: Optional[Sequence[str]] = None,
                 max_episodes_per_task: Optional[int] = None, fps: float = 30.0,
                 index_cache: Optional[str | Path] = None):
        from tqdm.auto import tqdm

        self.root = Path(root)
        self.fps = float(fps)
        task_dirs = find_task_dirs(self.root)
        if tasks is not None:
            wanted = set(tasks)
            task_dirs = [d for d in task_dirs if d.name in wanted]
            missing = wanted - {d.name for d in task_dirs}
            if missing:
                raise DataError(f"tasks {sorted(missing)} not found", root=self.root)
        if not task_dirs:
            raise DataError("no RoboTwin task directory (<task>/videos + <task>/qpos) found", root=self.root)
        cache = {}
        if index_cache is not None and Path(index_cache).is_file():
            cache = json.loads(Path(index_cache).read_text())
        self._files: list[dict] = []
        self.episodes: list[EpisodeInfo] = []
        for d in task_dirs:
            names = sorted((p.stem for p in (d / "qpos").glob("*.pt") if (d / "videos" / f"{p.stem}.mp4").is_file()),
                           key=_episode_sort_key)
            if max_episodes_per_task is not None:
                names = names[:max_episodes_per_task]
            for name in names:
                self._files.append({"task": d.name, "name": name, "dir": d})
        for i, f in enumerate(tqdm(self._files, desc=f"scan {self.root.name}", leave=False,
                                   disable=len(self._files) < 200)):
            rel = str(f["dir"].relative_to(self.root) / f["name"])
            if rel not in cache:
                qpos = _load_pt(f["dir"] / "qpos" / f"{f['name']}.pt", self.root, rel)
                if getattr(qpos, "ndim", 0) != 2:
                    raise DataError(f"qpos must be a [T, D] tensor, got shape {tuple(getattr(qpos, 'shape', ()))}",
                                    root=self.root, file=f["dir"] / "qpos" / f"{f['name']}.pt", episode=rel)
                cache[rel] = int(qpos.shape[0])
            f["rel"] = rel
            self.episodes.append(EpisodeInfo(index=i, length=cache[rel], tasks=()))
        if index_cache is not None:
            Path(index_cache).write_text(json.dumps(cache))
        self._qpos_cache: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_qpos_cache"] = {}
        return state

    @property
    def cameras(self) -> list[str]:
        return [CAMERA]

    @property
    def lowdim_keys(self) -> list[str]:
        return [QPOS]

    def episode_name(self, episode: int) -> str:
        return self._files[episode]["rel"]

    def _path(self, episode: int, sub: str, ext: str) -> Path:
        f = self._files[episode]
        return f["dir"] / sub / f"{f['name']}{ext}"

    def read_lowdim(self, episode: int, key: str, frames: Optional[Sequence[int]] = None) -> np.ndarray:
        if key != QPOS:
            raise DataError(f"the RoboTwin layout has only {QPOS!r}, not {key!r}", root=self.root)
        if episode not in self._qpos_cache:
            if len(self._qpos_cache) > 8:
                self._qpos_cache.clear()
            q = _load_pt(self._path(episode, "qpos", ".pt"), self.root, self.episode_name(episode))
            self._qpos_cache[episode] = np.asarray(q.float().numpy(), dtype=np.float32)
        x = self._qpos_cache[episode]
        if frames is None:
            return x
        idx = np.asarray(frames, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(x)):
            raise DataError(f"frame index out of range 0..{len(x) - 1}: {idx.tolist()}", root=self.root,
                            file=self._path(episode, "qpos", ".pt"), episode=self.episode_name(episode))
        return x[idx]

    def read_frames(self, episode: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        if camera != CAMERA:
            raise DataError(f"the RoboTwin layout has only the camera {CAMERA!r}, not {camera!r}", root=self.root)
        return read_frames_by_index(self._path(episode, "videos", ".mp4"), frames, root=self.root,
                                    episode=self.episode_name(episode))

    def instructions(self, episode: int) -> list[str]:
        path = self._path(episode, "metas", ".txt")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except OSError as e:
            raise DataError(f"cannot read instructions ({e})", root=self.root, file=path,
                            episode=self.episode_name(episode)) from e
        lines = [line for line in lines if line]
        if not lines:
            raise DataError("no instruction in the meta file", root=self.root, file=path,
                            episode=self.episode_name(episode))
        return lines

    def text_embeddings(self, episode: int) -> Optional[list]:
        """umT5 states per instruction (umt5_wan/<N>.pt), or None when the episode has no such file."""
        path = self._path(episode, "umt5_wan", ".pt")
        if not path.is_file():
            return None
        emb = _load_pt(path, self.root, self.episode_name(episode))
        if not isinstance(emb, (list, tuple)):
            emb = [emb]
        return [e.squeeze(0) if e.dim() == 3 else e for e in emb]
