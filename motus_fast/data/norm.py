"""Normalisation statistics for state and action vectors, and the maps between raw and model space.

Modes (``normalize`` / ``unnormalize`` are exact inverses, per dimension):

| mode       | forward                                  | range of the data | where it comes from                 |
|------------|------------------------------------------|-------------------|-------------------------------------|
| `none`     | x                                        | raw               | upstream RoboTwin default (raw qpos) |
| `min_max`  | (x - min) / (max - min)                  | [0, 1]            | upstream `action_normalization: min_max` |
| `mean_std` | (x - mean) / std                         | ~N(0, 1)          | common practice                     |
| `quantile` | 2 (x - q01) / (q99 - q01) - 1            | ~[-1, 1]          | openpi-style q01/q99                 |

Tiny spreads: a dimension whose spread (max - min, std, or q99 - q01) is below ``SPREAD_EPS`` (a constant joint, an
unused gripper) is divided by 1 instead, so it maps to ``x - offset`` (0 on the data) and inverts exactly; a warning
names the dimensions once. Upstream applies the *action* statistics to the state too (both are qpos on RoboTwin);
we keep one ``FeatureStats`` per role (state, action) and ``NormStats.for_dataset`` can share them.

File format (``motus-fast stats --out stats.json``, also stored in checkpoints under ``extra["norm_stats"]``; a
LeRobot dataset's own ``meta/stats.json`` is read too)::

    {"format": "motus_fast/norm_stats/1",
     "datasets": {"<name>": {"state": {"mean": [...], "std": [...], "min": [...], "max": [...], "q01": [...],
                                       "q10": [...], "q50": [...], "q90": [...], "q99": [...], "count": N,
                                       "key": "observation.state"},
                             "action": {...}}}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "motus_fast/norm_stats/1"
MODES = ("none", "min_max", "mean_std", "quantile")
SPREAD_EPS = 1e-6
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")     # what normalisation needs
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}   # lerobot's full set
ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension statistics of one vector feature (all arrays float64 [d])."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    count: int
    key: Optional[str] = None       # the column they were computed from (informational)
    q10: Optional[np.ndarray] = None    # lerobot's other quantiles (its quantile-10 normalisation reads them)
    q50: Optional[np.ndarray] = None
    q90: Optional[np.ndarray] = None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @staticmethod
    def compute(x: np.ndarray, key: Optional[str] = None, max_rows: int = 2_000_000) -> "FeatureStats":
        """x: [N, d] rows. Quantiles use at most ``max_rows`` evenly strided rows (mean/std/min/max use all)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"stats need a non-empty [N, d] array for {key or 'feature'}, got shape {x.shape}")
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"non-finite value in {key or 'feature'} at row {bad[0]}, dim {bad[1]}")
        q = x if x.shape[0] <= max_rows else x[:: int(np.ceil(x.shape[0] / max_rows))]
        qs = dict(zip(QUANTILES, np.quantile(q, list(QUANTILES.values()), axis=0)))
        return FeatureStats(mean=x.mean(0), std=x.std(0), min=x.min(0), max=x.max(0), count=int(x.shape[0]),
                            key=key, **qs)

    def to_dict(self) -> dict:
        d = {name: getattr(self, name).tolist() for name in (*STAT_NAMES, "q10", "q50", "q90")
             if getattr(self, name) is not None}
        d["count"] = self.count
        if self.key is not None:
            d["key"] = self.key
        return d

    @staticmethod
    def from_dict(d: dict, where: str = "stats") -> "FeatureStats":
        missing = [n for n in STAT_NAMES if n not in d]
        if missing:
            raise KeyError(f"{where}: missing statistics {missing}")
        arrays = {n: np.asarray(d[n], dtype=np.float64).reshape(-1) for n in (*STAT_NAMES, "q10", "q50", "q90")
                  if n in d}
        dims = {a.shape[0] for a in arrays.values()}
        if len(dims) != 1:
            raise ValueError(f"{where}: statistics have different lengths {sorted(dims)}")
        count = d.get("count", 0)
        count = int(np.asarray(count).reshape(-1)[0]) if np.size(count) else 0     # lerobot writes [N]
        return FeatureStats(**arrays, count=count, key=d.get("key"))

    # ---- the affine map x_model = (x - offset) / scale ----------------------------------------------------
    def affine(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) of the mode's map x -> (x - offset) / scale (scale guarded against tiny spreads)."""
        if mode == "none":
            return np.zeros(self.dim), np.ones(self.dim)
        if mode == "min_max":
            offset, spread = self.min, self.max - self.min
        elif mode == "mean_std":
            offset, spread = self.mean, self.std
        elif mode == "quantile":
            # 2 (x - q01) / (q99 - q01) - 1 == (x - (q01 + q99) / 2) / ((q99 - q01) / 2)
            offset, spread = (self.q01 + self.q99) / 2, (self.q99 - self.q01) / 2
        else:
            raise ValueError(f"unknown normalization mode {mode!r}; choose from {MODES}")
        tiny = spread < SPREAD_EPS
        if tiny.any():
            _warn_tiny(self.key, mode, np.flatnonzero(tiny))
        return offset, np.where(tiny, 1.0, spread)


_warned: set = set()


def _warn_tiny(key, mode, dims) -> None:
    tag = (key, mode, tuple(dims.tolist()))
    if tag not in _warned:
        _warned.add(tag)
        logger.warning("normalization %s of %s: dims %s have a spread below %g; they are shifted, not scaled",
                       mode, key or "feature", dims.tolist(), SPREAD_EPS)


def normalize(x: ArrayLike, stats: Optional[FeatureStats], mode: str) -> ArrayLike:
    """Raw -> model space along the last dimension (numpy or torch, any leading shape)."""
    if mode == "none":
        return x
    if stats is None:
        raise ValueError(f"normalization mode {mode!r} needs statistics (run `motus-fast stats`)")
    offset, scale = stats.affine(mode)
    _check_dim(x, stats)
    if isinstance(x, torch.Tensor):
        o = torch.as_tensor(offset, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        return (x - o) / s
    return ((np.asarray(x, dtype=np.float64) - offset) / scale).astype(np.asarray(x).dtype, copy=False)


def unnormalize(x: ArrayLike, stats: Optional[FeatureStats], mode: str) -> ArrayLike:
    """Model space -> raw (the inverse of ``normalize``)."""
    if mode == "none":
        return x
    if stats is None:
        raise ValueError(f"normalization mode {mode!r} needs statistics to invert")
    offset, scale = stats.affine(mode)
    _check_dim(x, stats)
    if isinstance(x, torch.Tensor):
        o = torch.as_tensor(offset, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        return x * s + o
    return (np.asarray(x, dtype=np.float64) * scale + offset).astype(np.asarray(x).dtype, copy=False)


def _check_dim(x, stats: FeatureStats) -> None:
    if x.shape[-1] != stats.dim:
        raise ValueError(f"last dimension {x.shape[-1]} does not match the statistics of "
                         f"{stats.key or 'feature'} ({stats.dim} dims)")


@dataclass(frozen=True)
class DatasetStats:
    """The state and action statistics of one dataset (either may be None: no state / action-free)."""

    state: Optional[FeatureStats] = None
    action: Optional[FeatureStats] = None

    def to_dict(self) -> dict:
        return {role: s.to_dict() for role, s in (("state", self.state), ("action", self.action)) if s is not None}

    @staticmethod
    def from_dict(d: dict, where: str = "stats") -> "DatasetStats":
        return DatasetStats(**{role: FeatureStats.from_dict(d[role], f"{where}.{role}")
                               for role in ("state", "action") if role in d})


def save_stats(stats: dict[str, DatasetStats], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = stats_to_json(stats)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def stats_to_json(stats: dict[str, DatasetStats]) -> dict:
    """The JSON document (for checkpoints' ``extra["norm_stats"]``)."""
    return {"format": FORMAT, "datasets": {name: s.to_dict() for name, s in stats.items()}}


def stats_from_json(doc: dict, where: str = "norm stats") -> dict[str, DatasetStats]:
    if doc.get("format") != FORMAT:
        raise ValueError(f"{where}: format {doc.get('format')!r} is not {FORMAT!r}")
    return {name: DatasetStats.from_dict(d, f"{where}: {name}") for name, d in doc["datasets"].items()}


def load_stats(path: str | Path) -> dict[str, DatasetStats]:
    """Our stats file (``motus-fast stats``), or a LeRobot dataset's ``meta/stats.json`` as lerobot writes it: then
    one entry named after the dataset folder, state from ``observation.state`` and action from ``action``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read norm stats ({e})") from e
    if "format" not in doc and path.name == "stats.json" and path.parent.name == "meta":
        roles = {role: FeatureStats.from_dict({**doc[key], "key": key}, f"{path}: {key}")
                 for role, key in (("state", "observation.state"), ("action", "action")) if key in doc}
        if not roles:
            raise ValueError(f"{path}: a LeRobot stats.json without 'observation.state' or 'action'")
        return {path.parent.parent.name: DatasetStats(**roles)}
    return stats_from_json(doc, str(path))
