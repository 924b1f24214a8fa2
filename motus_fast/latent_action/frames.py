"""Frame sources: where the videos of the latent-action pipeline come from.

A frame source is anything with ``__len__`` and ``__iter__`` yielding ``Episode``s: decoded RGB frames
uint8 [T, H, W, 3] of one episode, already sub-sampled every ``frame_step`` raw frames (the labeller asks for
``frame_step = frame_spacing``, so consecutive frames are exactly the pairs a latent action spans, and a long video
never sits in memory at full frame rate) and optionally resized. Sources here:

- ``VideoDirectory``: one video file per episode (mp4 by default, decoded with PyAV).
- ``DatasetEpisodes``: one camera of a dataset the data stack reads (LeRobot v3 or upstream RoboTwin layout,
  ``motus_fast.data.source.open_source``); episode indices are the dataset's own, as its stage-2 loader expects.
- ``EpisodeList``: frames already in memory (tests, synthetic data, other readers).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Episode:
    index: int                 # episode index (names the output file)
    frames: np.ndarray         # uint8 [T', H, W, 3]: raw frames 0, frame_step, 2 * frame_step, ...
    fps: float                 # of the raw video
    num_raw_frames: int        # T, frames in the raw video
    frame_step: int            # raw frames between consecutive entries of `frames`
    source: str                # where it came from (a path, or a description)


class FrameSource(Protocol):
    """Episodes in order; ``shard(rank, world_size)`` keeps every world_size-th one (positions rank, rank + N, ...)
    and skips the others without decoding them."""

    def __len__(self) -> int: ...

    def shard(self, rank: int, world_size: int) -> None: ...

    def __iter__(self) -> Iterator[Episode]: ...


def _resize(frame: np.ndarray, size: Optional[tuple[int, int]]) -> np.ndarray:
    from motus_fast.latent_action.optical_flow import resize_frames
    return resize_frames(frame[None], size)[0]


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading videos needs PyAV: pip install av (pinned in requirements/cpu.txt)") from e
    return av


def read_video(path: str | Path, frame_step: int = 1, size: Optional[tuple[int, int]] = None
               ) -> tuple[np.ndarray, float, int]:
    """Decode a video file -> (frames uint8 [ceil(T / frame_step), H, W, 3] (raw frames 0, step, 2 step, ...),
    fps, T). size = (H, W) resizes each kept frame."""
    av = _av()
    path = Path(path)
    kept, n = [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            for frame in container.decode(stream):
                if n % frame_step == 0:
                    kept.append(_resize(frame.to_ndarray(format="rgb24"), size))
                n += 1
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot be decoded ({e})") from e
    if n == 0:
        raise ValueError(f"{path}: the video has no frames")
    return np.stack(kept), fps, n


def write_video(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames (H, W even for yuv420p) to a video file (tests, tools)."""
    av = _av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


_TRAILING_INT = re.compile(r"(\d+)$")


class _Sharded:
    """Position filter shared by the frame sources (see ``FrameSource.shard``)."""

    rank, world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size

    def keep(self, position: int) -> bool:
        return position % self.world_size == self.rank

    def kept(self, n: int) -> int:
        return len(range(self.rank, n, self.world_size))


class VideoDirectory(_Sharded):
    """One video per episode in `root` (files matching `pattern`, sorted by name). Episode indices: the trailing
    number of every file name (``episode_000123.mp4`` -> 123) when all have one and they are unique, otherwise the
    position in sorted order."""

    def __init__(self, root: str | Path, frame_step: int = 1, size: Optional[tuple[int, int]] = None,
                 pattern: str = "*.mp4"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--dataset {str(self.root)!r}: not a directory")
        self.paths = sorted(p for p in self.root.glob(pattern) if p.is_file())
        if not self.paths:
            raise FileNotFoundError(f"--dataset {str(self.root)!r}: no files match {pattern!r}")
        if frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {frame_step}")
        self.frame_step, self.size = frame_step, size
        numbers = [_TRAILING_INT.search(p.stem) for p in self.paths]
        if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(numbers):
            self.indices = [int(m.group(1)) for m in numbers]
        else:
            log.info("%s: file names do not all end in unique numbers; episodes are numbered in sorted order",
                     self.root)
            self.indices = list(range(len(self.paths)))

    def __len__(self) -> int:
        return self.kept(len(self.paths))

    def __iter__(self) -> Iterator[Episode]:
        for pos, (index, path) in enumerate(zip(self.indices, self.paths)):
            if not self.keep(pos):
                continue
            frames, fps, n = read_video(path, self.frame_step, self.size)
            yield Episode(index=index, frames=frames, fps=fps, num_raw_frames=n, frame_step=self.frame_step,
                          source=str(path))


class EpisodeList(_Sharded):
    """Episodes already in memory: videos uint8 [T, H, W, 3] each, indexed 0.. (or by `indices`)."""

    def __init__(self, videos: Sequence[np.ndarray], fps: float, frame_step: int = 1,
                 size: Optional[tuple[int, int]] = None, indices: Optional[Sequence[int]] = None):
        if frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {frame_step}")
        for i, v in enumerate(videos):
            if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"video {i} must be uint8 [T, H, W, 3], got {v.dtype} {list(v.shape)}")
        self.videos, self.fps, self.frame_step, self.size = list(videos), float(fps), frame_step, size
        self.indices = list(indices) if indices is not None else list(range(len(self.videos)))
        if len(self.indices) != len(self.videos) or len(set(self.indices)) != len(self.indices):
            raise ValueError("indices must be unique, one per video")

    def __len__(self) -> int:
        return self.kept(len(self.videos))

    def __iter__(self) -> Iterator[Episode]:
        for pos, (index, v) in enumerate(zip(self.indices, self.videos)):
            if not self.keep(pos):
                continue
            frames = v[::self.frame_step]
            if self.size is not None:
                from motus_fast.latent_action.optical_flow import resize_frames
                frames = resize_frames(frames, self.size)
            yield Episode(index=index, frames=frames, fps=self.fps, num_raw_frames=len(v),
                          frame_step=self.frame_step, source=f"in-memory video {index}")


class DatasetEpisodes(_Sharded):
    """Frames of one camera of a data-stack dataset (an ``EpisodeSource``), every `frame_step` frames."""

    def __init__(self, source, camera: Optional[str] = None, frame_step: int = 1,
                 size: Optional[tuple[int, int]] = None):
        if frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {frame_step}")
        cameras = list(source.cameras)
        if not cameras:
            raise ValueError(f"{source.root}: the dataset has no camera")
        if camera is None:
            camera = cameras[0]
            if len(cameras) > 1:
                log.info("%s: cameras %s; labelling %r (choose with --camera)", source.root, cameras, camera)
        elif camera not in cameras:
            raise ValueError(f"--camera {camera!r}: {source.root} has cameras {cameras}")
        self.source, self.camera, self.frame_step, self.size = source, camera, frame_step, size

    def __len__(self) -> int:
        return self.kept(len(self.source.episodes))

    def __iter__(self) -> Iterator[Episode]:
        for pos, info in enumerate(self.source.episodes):
            if not self.keep(pos):
                continue
            frames = self.source.read_frames(pos, self.camera, range(0, info.length, self.frame_step))
            if self.size is not None:
                from motus_fast.latent_action.optical_flow import resize_frames
                frames = resize_frames(frames, self.size)
            yield Episode(index=int(info.index), frames=frames, fps=float(self.source.fps),
                          num_raw_frames=int(info.length), frame_step=self.frame_step,
                          source=f"{self.source.episode_name(pos)} ({self.camera})")


def open_frame_source(dataset: str | Path, frame_step: int, size: Optional[tuple[int, int]] = None,
                      camera: Optional[str] = None) -> FrameSource:
    """The frame source for a --dataset argument: a LeRobot v3 dataset or an upstream RoboTwin layout (through the
    data stack; `camera` picks the view, default the first), else a directory of per-episode .mp4 videos."""
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset {str(root)!r}: not a directory")
    try:
        from motus_fast.data.source import detect_format, open_source
        fmt = detect_format(root)
    except (ImportError, FileNotFoundError):
        fmt = None
    if fmt is not None:
        return DatasetEpisodes(open_source(root, fmt), camera=camera, frame_step=frame_step, size=size)
    if camera is not None:
        raise ValueError(f"--camera applies to LeRobot/RoboTwin datasets; {root} is read as a directory of videos")
    return VideoDirectory(root, frame_step=frame_step, size=size)


def step_pairs(episode: Episode) -> tuple[np.ndarray, np.ndarray]:
    """The frame pairs of an episode's latent steps: (first, second) uint8 [n_steps, H, W, 3] each, n_steps =
    (T - 1) // frame_step (a trailing partial step is dropped)."""
    f = episode.frames
    n_steps = (episode.num_raw_frames - 1) // episode.frame_step
    return f[:n_steps], f[1:n_steps + 1]
