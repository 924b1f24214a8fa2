"""mp4 reading and writing with PyAV (FFmpeg), no other video backend.

Reading is by timestamp (LeRobot v3: several episodes share one mp4, an episode starts at its ``from_timestamp``) or
by frame position (upstream RoboTwin mp4s, read like decord/OpenCV do). Either way the decoder seeks to the key frame
before the first wanted frame and decodes forward only as far as the last one. Any FFmpeg failure or a frame that
is not in the file (a truncated mp4) raises ``DataError`` naming the file.

Writing appends frames (uint8 RGB ``[T, H, W, 3]``) of consecutive episodes to one stream at a constant frame rate,
so episode ``k`` starts at ``frames_written_before_k / fps`` seconds. ``lossless=True`` uses H.264 in RGB at QP 0
(bit-exact round trip, used by the tests); the default is H.264 yuv420p, CRF 18, GOP 2 (every other frame a key
frame, like LeRobot's writer, so random access decodes at most one extra frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from motus_fast.data.errors import DataError


@dataclass(frozen=True)
class VideoCodec:
    """How the writer encodes. ``name``: an FFmpeg encoder (libx264, libx264rgb, libsvtav1, ...)."""

    name: str = "libx264"
    pix_fmt: str = "yuv420p"
    crf: Optional[int] = 18
    gop: int = 2

    @staticmethod
    def lossless() -> "VideoCodec":
        return VideoCodec(name="libx264rgb", pix_fmt="rgb24", crf=None, gop=2)

    def options(self) -> dict[str, str]:
        opts = {"g": str(self.gop)}
        if self.crf is None:
            opts["qp"] = "0"
        else:
            opts["crf"] = str(self.crf)
        return opts


class VideoWriter:
    """Append RGB frames to one mp4 at a constant ``fps``; ``frames_written`` gives the next episode's offset."""

    def __init__(self, path: str | Path, fps: int, codec: VideoCodec = VideoCodec()):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.codec = int(fps), codec
        self._container = av.open(str(self.path), mode="w")
        self._stream = None
        self.frames_written = 0
        self.shape: Optional[tuple[int, int]] = None

    def write(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{self.path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._stream is None:
            h, w = frames.shape[1:3]
            if self.codec.pix_fmt.startswith("yuv420") and (h % 2 or w % 2):
                raise ValueError(f"{self.path}: {self.codec.pix_fmt} needs even width and height, got {w}x{h}")
            s = self._container.add_stream(self.codec.name, rate=self.fps)
            s.width, s.height, s.pix_fmt = w, h, self.codec.pix_fmt
            s.options = self.codec.options()
            self._stream, self.shape = s, (h, w)
        elif frames.shape[1:3] != self.shape:
            raise ValueError(f"{self.path}: all frames of one file must be {self.shape}, got {frames.shape[1:3]}")
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = self.frames_written
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()


def _open(path: Path, root, episode):
    import av

    if not path.is_file():
        raise DataError("video file not found", root=root, file=path, episode=episode)
    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.* (InvalidDataError, ...) and OSError
        raise DataError(f"cannot open video ({type(e).__name__}: {e})", root=root, file=path, episode=episode) from e
    if not container.streams.video:
        container.close()
        raise DataError("no video stream in file", root=root, file=path, episode=episode)
    return container


def read_frames_at(path: str | Path, timestamps: Sequence[float], fps: float, *, root=None, episode=None) -> np.ndarray:
    """Decode the frames shown at ``timestamps`` (seconds in the file) -> uint8 [N, H, W, 3], in the given order.

    A decoded frame matches a wanted timestamp within 0.4 frame periods (unambiguous at constant frame rate).
    """
    path = Path(path)
    want = np.asarray(timestamps, dtype=np.float64)
    if want.size == 0:
        raise ValueError("read_frames_at: no timestamps requested")
    tol = 0.4 / float(fps)
    order = np.unique(want)
    found: dict[int, np.ndarray] = {}
    container = _open(path, root, episode)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if order[0] > tol:
            # seek to the key frame at or before the first wanted frame (offset in stream time base)
            container.seek(max(0, int(math.floor((order[0] - tol) / stream.time_base))), stream=stream,
                           backward=True, any_frame=False)
        last = order[-1] + tol
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            t = float(frame.time)
            if t > last:
                break
            j = int(np.searchsorted(order, t - tol))
            if j < len(order) and abs(order[j] - t) <= tol and j not in found:
                found[j] = frame.to_ndarray(format="rgb24")
                if len(found) == len(order):
                    break
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot decode video ({type(e).__name__}: {e})", root=root, file=path,
                        episode=episode) from e
    finally:
        container.close()
    if len(found) != len(order):
        missing = [float(order[j]) for j in range(len(order)) if j not in found]
        raise DataError(f"{len(missing)} frame(s) not in the video (first missing at t={missing[0]:.4f}s; the file "
                        "may be truncated)", root=root, file=path, episode=episode)
    index = np.searchsorted(order, want)
    return np.stack([found[int(j)] for j in index])


def read_frames_by_index(path: str | Path, indices: Sequence[int], *, root=None, episode=None) -> np.ndarray:
    """Decode the frames at decode positions ``indices`` (0 = first frame) -> uint8 [N, H, W, 3] in the given order.
    Decodes from the start: meant for short per-episode files (upstream's RoboTwin layout)."""
    path = Path(path)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:
        raise ValueError(f"read_frames_by_index: bad indices {idx.tolist()}")
    wanted = set(idx.tolist())
    stop = int(idx.max())
    found: dict[int, np.ndarray] = {}
    container = _open(path, root, episode)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= stop:
                break
    except Exception as e:
        raise DataError(f"cannot decode video ({type(e).__name__}: {e})", root=root, file=path,
                        episode=episode) from e
    finally:
        container.close()
    if len(found) != len(wanted):
        raise DataError(f"video has fewer frames than needed (wanted index {stop}, decoded "
                        f"{len(found)} of {len(wanted)} wanted frames; the file may be truncated)", root=root,
                        file=path, episode=episode)
    return np.stack([found[int(i)] for i in idx])


def count_frames(path: str | Path, *, root=None, episode=None) -> int:
    """Number of decodable frames (container metadata when present, else a full decode)."""
    path = Path(path)
    container = _open(path, root, episode)
    try:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))
    except Exception as e:
        raise DataError(f"cannot read video ({type(e).__name__}: {e})", root=root, file=path, episode=episode) from e
    finally:
        container.close()
