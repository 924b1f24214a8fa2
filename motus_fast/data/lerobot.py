"""LeRobot dataset format v3.0: reader and writer on pyarrow + PyAV (no dependency on the ``lerobot`` package).

Layout (``codebase_version`` "v3.0"; several episodes share one data file and one video file per camera)::

    meta/info.json                               fps, features, path templates, totals, chunks_size, splits
    meta/tasks.parquet                           one row per task: "task" (str, the pandas index) + "task_index"
    meta/episodes/chunk-XXX/file-XXX.parquet     one row per episode: episode_index, tasks (list<str>), length,
                                                 data/chunk_index, data/file_index, dataset_from_index,
                                                 dataset_to_index, videos/<camera>/{chunk_index, file_index,
                                                 from_timestamp, to_timestamp}, meta/episodes/{chunk,file}_index
    data/chunk-XXX/file-XXX.parquet              one row per frame: the non-video features (vectors as fixed-size
                                                 lists) + timestamp, frame_index, episode_index, index, task_index
    videos/<camera>/chunk-XXX/file-XXX.mp4       the episodes of that file back to back; frame k of an episode is
                                                 at from_timestamp + timestamp[k]
    meta/stats.json                              per feature min/max/mean/std/count/q01/q10/q50/q90/q99

Features of dtype "image" (PNG bytes inside the parquet) are read too. Numeric features (float, int, bool) keep
their dtype. Other dtypes (lerobot-annotate's "language" columns, strings) are not low-dim features: they are
skipped (logged once); the ``task_aug`` rephrasings of ``language_persistent`` become extra instructions. The writer
writes what lerobot 0.6 writes for the same features: the full statistics set in ``meta/stats.json`` and per episode
(``stats/<feature>/<stat>`` columns of ``meta/episodes``), and the same ``info.json`` keys.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from motus_fast.data.errors import DataError
from motus_fast.data.source import EpisodeInfo
from motus_fast.data.video import VideoCodec, VideoWriter, read_frames_at

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
_FILE_CACHE = 4     # data files whose columns a worker keeps in memory
NUMERIC = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "bool"}
STAT_KEYS = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")   # lerobot 0.6's order
log = logging.getLogger("motus_fast")


def _column_to_numpy(col, name: str, where) -> np.ndarray:
    """An Arrow column of scalars or (fixed-size) lists -> numpy [n] or [n, d]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        raise DataError(f"column {name!r} has {col.null_count} null value(s)", **where)
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        n = len(col)
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if n and flat.size % n:
            raise DataError(f"column {name!r} has rows of different lengths", **where)
        return flat.reshape(n, -1 if n else 0)
    return col.to_numpy(zero_copy_only=False)


class LeRobotV3Source:
    """Read a LeRobot v3 dataset. ``episodes``: optional subset of episode indices to expose."""

    def __init__(self, root: str | Path, episodes: Optional[Sequence[int]] = None):
        import pyarrow.parquet as pq

        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        try:
            self.info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read dataset info ({e})", root=self.root, file=info_path) from e
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DataError(f"codebase_version {version!r} is not v3.x (convert older datasets with lerobot's "
                            "v2.1 -> v3.0 converter)", root=self.root, file=info_path)
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise DataError(f"info.json has no {key!r}", root=self.root, file=info_path)
        self.fps = float(self.info["fps"])
        self.features: dict = self.info["features"]
        skipped = {k: f.get("dtype") for k, f in self.features.items()
                   if f.get("dtype") not in NUMERIC | {"video", "image"}}
        if skipped:
            log.info("%s: features %s are not numeric, video or image; not read as low-dim features", self.root,
                     skipped)
        self.tasks = self._read_tasks()

        rows = []
        ep_dir = self.root / "meta" / "episodes"
        files = sorted(ep_dir.glob("chunk-*/file-*.parquet"))
        if not files:
            raise DataError("no episode metadata (meta/episodes/chunk-*/file-*.parquet)", root=self.root,
                            file=ep_dir)
        for f in files:
            try:
                names = pq.ParquetFile(f).schema_arrow.names
                table = pq.read_table(f, columns=[n for n in names if not n.startswith("stats/")])
            except Exception as e:
                raise DataError(f"cannot read episode metadata ({type(e).__name__}: {e})", root=self.root,
                                file=f) from e
            rows.extend(table.to_pylist())
        rows.sort(key=lambda r: r["episode_index"])
        if episodes is not None:
            keep = set(int(e) for e in episodes)
            unknown = keep - {int(r["episode_index"]) for r in rows}
            if unknown:
                raise DataError(f"episodes {sorted(unknown)} are not in the dataset", root=self.root)
            rows = [r for r in rows if int(r["episode_index"]) in keep]
        self._rows = rows
        self.episodes = [EpisodeInfo(index=int(r["episode_index"]), length=int(r["length"]),
                                     tasks=tuple(r.get("tasks") or ())) for r in rows]
        self._cache: OrderedDict = OrderedDict()

    # ---- pickling: workers reopen files lazily ------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    # ---- metadata -------------------------------------------------------------------------------------------
    @property
    def cameras(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]

    @property
    def lowdim_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in NUMERIC]

    def feature_dim(self, key: str) -> int:
        return int(np.prod(self.features[key]["shape"]))

    def _read_tasks(self) -> dict[int, str]:
        import pyarrow.parquet as pq

        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"cannot read tasks ({type(e).__name__}: {e})", root=self.root, file=path) from e
        names = table.column_names
        text_col = "task" if "task" in names else "__index_level_0__" if "__index_level_0__" in names else None
        if text_col is None or "task_index" not in names:
            raise DataError(f"tasks.parquet needs columns 'task' and 'task_index', has {names}", root=self.root,
                            file=path)
        return dict(zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist()))

    def _where(self, episode: int, file=None) -> dict:
        return {"root": self.root, "file": file, "episode": self.episodes[episode].index}

    # ---- low-dim columns --------------------------------------------------------------------------------------
    def _data_file(self, episode: int) -> Path:
        row = self._rows[episode]
        return self.root / self.info["data_path"].format(chunk_index=int(row["data/chunk_index"]),
                                                         file_index=int(row["data/file_index"]))

    def _load_file(self, path: Path, episode: int) -> dict:
        """Columns of one data file (cached): {"episode_index": [n], key: [n, d], ..., "_ranges": {ep: (a, b)}}."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        import pyarrow.parquet as pq

        where = self._where(episode, path)
        if not path.is_file():
            raise DataError("data file not found", **where)
        wanted = [k for k in self.lowdim_keys] + [k for k in self.cameras if self.features[k]["dtype"] == "image"]
        try:
            pf = pq.ParquetFile(path)
            present = set(pf.schema_arrow.names)
            missing = [k for k in wanted + ["episode_index"] if k not in present]
            if missing:
                raise DataError(f"data file lacks column(s) {missing} declared in info.json", **where)
            table = pf.read(columns=wanted + ["episode_index"])
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read parquet ({type(e).__name__}: {e})", **where) from e
        cols = {}
        for k in wanted:
            if self.features[k]["dtype"] == "image":
                cols[k] = table.column(k)
            else:
                a = _column_to_numpy(table.column(k), k, where)
                cols[k] = a.reshape(len(a), -1)
        ep_col = _column_to_numpy(table.column("episode_index"), "episode_index", where)
        ranges = {}
        for e in np.unique(ep_col):
            pos = np.flatnonzero(ep_col == e)
            if pos[-1] - pos[0] + 1 != len(pos):
                raise DataError(f"rows of episode {int(e)} are not contiguous in the data file", **where)
            ranges[int(e)] = (int(pos[0]), int(pos[-1]) + 1)
        cols["_ranges"] = ranges
        self._cache[path] = cols
        while len(self._cache) > _FILE_CACHE:
            self._cache.popitem(last=False)
        return cols

    def _episode_rows(self, episode: int) -> tuple[dict, int, int, Path]:
        path = self._data_file(episode)
        cols = self._load_file(path, episode)
        info = self.episodes[episode]
        if info.index not in cols["_ranges"]:
            raise DataError("episode has no rows in its data file", **self._where(episode, path))
        a, b = cols["_ranges"][info.index]
        if b - a != info.length:
            raise DataError(f"episode has {b - a} rows in its data file but length {info.length} in the "
                            "metadata (truncated or mismatched file)", **self._where(episode, path))
        return cols, a, b, path

    def read_lowdim(self, episode: int, key: str, frames: Optional[Sequence[int]] = None) -> np.ndarray:
        if key not in self.features or key not in self.lowdim_keys:
            raise DataError(f"no low-dim feature {key!r} (has {self.lowdim_keys})", root=self.root)
        cols, a, b, path = self._episode_rows(episode)
        x = cols[key][a:b]
        if frames is not None:
            idx = np.asarray(frames, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= b - a):
                raise DataError(f"frame index out of range 0..{b - a - 1}: {idx.tolist()}",
                                **self._where(episode, path))
            x = x[idx]
        return np.asarray(x, dtype=np.dtype(self.features[key]["dtype"]))

    # ---- frames ------------------------------------------------------------------------------------------------
    def read_frames(self, episode: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        if camera not in self.cameras:
            raise DataError(f"no camera {camera!r} (has {self.cameras})", root=self.root)
        idx = np.asarray(frames, dtype=np.int64)
        length = self.episodes[episode].length
        if idx.size == 0 or idx.min() < 0 or idx.max() >= length:
            raise DataError(f"frame index out of range 0..{length - 1}: {idx.tolist()}", **self._where(episode))
        if self.features[camera]["dtype"] == "image":
            return self._read_images(episode, camera, idx)
        row = self._rows[episode]
        try:
            chunk, file = int(row[f"videos/{camera}/chunk_index"]), int(row[f"videos/{camera}/file_index"])
            start = float(row[f"videos/{camera}/from_timestamp"])
        except KeyError as e:
            raise DataError(f"episode metadata lacks {e.args[0]!r}", **self._where(episode)) from e
        path = self.root / self.info["video_path"].format(video_key=camera, chunk_index=chunk, file_index=file)
        if "timestamp" in self.features:
            ts = self.read_lowdim(episode, "timestamp", idx)[:, 0].astype(np.float64)
        else:
            ts = idx / self.fps
        return read_frames_at(path, start + ts, self.fps, root=self.root, episode=self.episodes[episode].index)

    def _read_images(self, episode: int, camera: str, idx: np.ndarray) -> np.ndarray:
        from PIL import Image

        cols, a, _, path = self._episode_rows(episode)
        out = []
        for i in idx:
            cell = cols[camera][a + int(i)].as_py()
            try:
                data = cell["bytes"] if isinstance(cell, dict) else cell
                out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception as e:
                raise DataError(f"cannot decode image {camera!r} at frame {int(i)} ({e})",
                                **self._where(episode, path)) from e
        return np.stack(out)

    def instructions(self, episode: int) -> list[str]:
        """The episode's task strings, then its ``task_aug`` rephrasings from lerobot-annotate (if any)."""
        tasks = list(self.episodes[episode].tasks)
        if not tasks and "task_index" in self.features:
            first = int(self.read_lowdim(episode, "task_index", [0])[0, 0])
            tasks = [self.tasks[first]] if first in self.tasks else []
        if not tasks:
            raise DataError("episode has no task / instruction", **self._where(episode))
        return tasks + [t for t in self.language_rows(episode, "task_aug") if t not in tasks]

    def language_rows(self, episode: int, style: str) -> list[str]:
        """Contents of the episode's ``language_persistent`` rows of one style ([] without the column)."""
        import pyarrow.parquet as pq

        if self.features.get("language_persistent", {}).get("dtype") != "language":
            return []
        path = self._data_file(episode)
        table = pq.read_table(path, columns=["episode_index", "language_persistent"],
                              filters=[("episode_index", "=", self.episodes[episode].index)])
        rows = table.column("language_persistent")[0].as_py() if table.num_rows else []
        return [r["content"] for r in rows or () if r.get("style") == style and r.get("content")]

    def episode_name(self, episode: int) -> str:
        return str(self.episodes[episode].index)

    def text_embeddings(self, episode: int) -> None:
        return None


# ==================================================================================================================
class LeRobotV3Writer:
    """Write a LeRobot v3 dataset.

    features: the user features, e.g. ``{"observation.state": {"dtype": "float32", "shape": [14], "names": None},
    "action": {...}, "observation.images.top": {"dtype": "video", "shape": [H, W, 3]}}`` (vectors are 1-D; the
    default columns timestamp/frame_index/episode_index/index/task_index are added). Episodes go into data and
    video files of ``episodes_per_file`` episodes each (``chunks_size`` files per chunk directory).

        with LeRobotV3Writer(root, fps=10, features=...) as w:
            w.add_episode({"observation.state": s, "action": a, "observation.images.top": frames}, "pick the cube")
    """

    def __init__(self, root: str | Path, fps: int, features: dict, robot_type: Optional[str] = None,
                 codec: VideoCodec = VideoCodec(), episodes_per_file: int = 100, chunks_size: int = 1000,
                 overwrite: bool = False):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty (pass overwrite=True)")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for name, ft in features.items():
            if name in DEFAULT_FEATURES:
                raise ValueError(f"feature {name!r} is added by the writer; do not declare it")
            if "/" in name:
                raise ValueError(f"feature names may not contain '/': {name!r}")
            if ft.get("dtype") == "video":
                if len(ft.get("shape", ())) != 3 or ft["shape"][2] != 3:
                    raise ValueError(f"video feature {name!r} needs shape [H, W, 3], got {ft.get('shape')}")
            elif len(ft.get("shape", ())) != 1:
                raise ValueError(f"feature {name!r}: only 1-D vector features are supported, got {ft.get('shape')}")
        self.fps, self.codec = int(fps), codec
        self.robot_type = robot_type
        self.features = {**{k: dict(v, shape=list(v["shape"])) for k, v in features.items()}, **DEFAULT_FEATURES}
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.vector_keys = [k for k, f in features.items() if f["dtype"] != "video"]
        self.episodes_per_file, self.chunks_size = int(episodes_per_file), int(chunks_size)
        self.tasks: dict[str, int] = {}
        self._episode_rows: list[dict] = []
        self._file_index = 0
        self._file_buffer: list[dict] = []
        self._videos: dict[str, VideoWriter] = {}
        self._total_frames = 0
        self._stat_rows: dict[str, list[np.ndarray]] = {k: [] for k in self.features}
        self._finished = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.finish()
        else:
            for v in self._videos.values():
                v.close()

    def _chunk_file(self) -> tuple[int, int]:
        return self._file_index // self.chunks_size, self._file_index % self.chunks_size

    def add_episode(self, data: dict[str, np.ndarray], tasks: str | Sequence[str]) -> int:
        """Append one episode; returns its episode_index. ``tasks``: its instruction(s); every frame gets the
        task_index of the first."""
        if self._finished:
            raise RuntimeError("writer already finished")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not tasks:
            raise ValueError("an episode needs at least one task string")
        expected = set(self.vector_keys) | set(self.video_keys)
        if set(data) != expected:
            raise ValueError(f"episode keys {sorted(data)} differ from the features {sorted(expected)}")
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all features of an episode need the same length, got {lengths}")
        T = next(iter(lengths.values()))
        if T == 0:
            raise ValueError("empty episode")
        for k in self.vector_keys:
            v = np.asarray(data[k])
            d = self.features[k]["shape"][0]
            if v.reshape(T, -1).shape[1] != d:
                raise ValueError(f"feature {k!r} has {v.reshape(T, -1).shape[1]} dims per frame, declared {d}")
        for k in self.video_keys:
            h, w, _ = self.features[k]["shape"]
            if np.asarray(data[k]).shape != (T, h, w, 3):
                raise ValueError(f"video {k!r} must be uint8 [{T}, {h}, {w}, 3], got {np.asarray(data[k]).shape}")

        for t in tasks:
            self.tasks.setdefault(t, len(self.tasks))
        ep = len(self._episode_rows)
        chunk, file = self._chunk_file()
        row = {"episode_index": ep, "tasks": tasks, "length": T, "data/chunk_index": chunk, "data/file_index": file,
               "dataset_from_index": self._total_frames, "dataset_to_index": self._total_frames + T}
        for k in self.video_keys:
            if k not in self._videos:
                path = self.root / VIDEO_PATH.format(video_key=k, chunk_index=chunk, file_index=file)
                self._videos[k] = VideoWriter(path, self.fps, self.codec)
            vw = self._videos[k]
            start = vw.frames_written / self.fps
            vw.write(np.asarray(data[k], dtype=np.uint8))
            row.update({f"videos/{k}/chunk_index": chunk, f"videos/{k}/file_index": file,
                        f"videos/{k}/from_timestamp": start, f"videos/{k}/to_timestamp": start + T / self.fps})
            # pixel statistics from a subsample (every few frames, every 4th pixel), in [0, 1]
            sub = np.asarray(data[k][:: max(1, T // 8), ::4, ::4], dtype=np.float64)
            self._stat_rows[k].append(sub.reshape(-1, 3) / 255)
        frames = {k: np.asarray(data[k], dtype=self.features[k]["dtype"]).reshape(T, -1) for k in self.vector_keys}
        frames.update({
            "timestamp": (np.arange(T) / self.fps).astype(np.float32),
            "frame_index": np.arange(T, dtype=np.int64),
            "episode_index": np.full(T, ep, dtype=np.int64),
            "index": np.arange(self._total_frames, self._total_frames + T, dtype=np.int64),
            "task_index": np.full(T, self.tasks[tasks[0]], dtype=np.int64),
        })
        for k in [*self.vector_keys, *DEFAULT_FEATURES]:
            self._stat_rows[k].append(frames[k].reshape(T, -1).astype(np.float64))
        for k, rows in self._stat_rows.items():        # this episode's statistics, as lerobot stores them
            row.update({f"stats/{k}/{n}": v for n, v in _feature_stats(rows[-1], k in self.video_keys).items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        self._file_buffer.append(frames)
        self._episode_rows.append(row)
        self._total_frames += T
        if len(self._file_buffer) >= self.episodes_per_file:
            self._flush_file()
        return ep

    def _flush_file(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._file_buffer:
            return
        chunk, file = self._chunk_file()
        arrays, names = [], []
        for k in self.vector_keys + list(DEFAULT_FEATURES):
            v = np.concatenate([f[k] for f in self._file_buffer])
            if k in self.vector_keys and self.features[k]["shape"] != [1]:
                v = v.reshape(len(v), -1)
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]))
            elif k in self.vector_keys:      # shape [1]: a plain column, as lerobot writes it
                arrays.append(pa.array(v.reshape(-1)))
            else:
                arrays.append(pa.array(v))
            names.append(k)
        path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(arrays, names=names), path, compression="snappy")
        for v in self._videos.values():
            v.close()
        self._videos = {}
        self._file_buffer = []
        self._file_index += 1

    def finish(self) -> Path:
        """Write the remaining data/video file, the episode and task tables, info.json and stats.json."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._finished:
            return self.root
        if not self._episode_rows:
            raise RuntimeError("no episodes were added")
        self._flush_file()
        self._finished = True
        ep_path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episode_rows), ep_path)
        # tasks: the task string is the pandas index (lerobot reads it with pandas.read_parquet)
        tasks = sorted(self.tasks.items(), key=lambda kv: kv[1])
        table = pa.table({"task_index": pa.array([i for _, i in tasks], pa.int64()),
                          "task": pa.array([t for t, _ in tasks], pa.string())})
        pandas_meta = {"index_columns": ["task"], "column_indexes": [],
                       "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                    "numpy_type": "int64", "metadata": None},
                                   {"name": "task", "field_name": "task", "pandas_type": "unicode",
                                    "numpy_type": "object", "metadata": None}],
                       "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
        table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
        pq.write_table(table, self.root / "meta" / "tasks.parquet")

        features = json.loads(json.dumps(self.features))
        for k in self.video_keys:
            h, w, _ = self.features[k]["shape"]
            features[k]["names"] = ["height", "width", "channels"]
            features[k]["info"] = {"video.height": h, "video.width": w, "video.codec": _codec_family(self.codec.name),
                                   "video.pix_fmt": self.codec.pix_fmt, "video.fps": self.fps, "video.channels": 3,
                                   "has_audio": False, "video.g": self.codec.gop, "video.crf": self.codec.crf,
                                   "video.preset": None, "video.fast_decode": 0, "video.video_backend": "pyav",
                                   "video.extra_options": {}, "is_depth_map": False}
        n_ep = len(self._episode_rows)
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type, "total_episodes": n_ep,
                "total_frames": self._total_frames, "total_tasks": len(self.tasks), "chunks_size": self.chunks_size,
                "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": self.fps,
                "splits": {"train": f"0:{n_ep}"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if self.video_keys else None, "features": features}
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        (self.root / "meta" / "stats.json").write_text(json.dumps(self._stats(), indent=4))
        return self.root

    def _stats(self) -> dict:
        return {k: _feature_stats(np.concatenate(rows), k in self.video_keys) for k, rows in self._stat_rows.items()}


def _feature_stats(x: np.ndarray, image: bool) -> dict:
    """lerobot's statistics of one feature's rows [N, d]: min/max/mean/std/q01/q10/q50/q90/q99 per dimension and
    count as [N]; a camera's per channel, each shaped (3, 1, 1)."""
    from motus_fast.data.norm import FeatureStats

    s = FeatureStats.compute(x)
    out = {n: (getattr(s, n)[:, None, None] if image else getattr(s, n)).tolist() if n != "count" else [s.count]
           for n in STAT_KEYS}
    return out


def _codec_family(name: str) -> str:
    return {"libx264": "h264", "libx264rgb": "h264", "libsvtav1": "av1", "libx265": "hevc",
            "libvpx-vp9": "vp9"}.get(name, name)
