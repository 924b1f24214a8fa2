"""Frozen configuration of the data stack: which datasets, how they are windowed, normalised and mixed.

A ``DatasetSpec`` names one dataset root and how to read it; ``DataConfig`` holds the list, the ``WindowSpec``,
the frame size and the mixture weights. Both round-trip through JSON (``to_dict`` / ``from_dict``), so a training
config can embed them and a checkpoint can record them.

Data pyramid: each dataset has a ``level`` tag and a ``weight``. The chance that a draw comes from dataset d is
``level_weights[level_d] * w_d / sum(w of the datasets in level_d)`` (levels without an entry in ``level_weights``
weigh 1), normalised over all datasets; with no ``level_weights`` it is ``w_d / sum(w)``. ``actions`` says where a
dataset's action chunk comes from: "dataset" (its action column), "latent" (a latent-action store, stage 2) or
"none" (action-free video: the action stream runs at t = 1 and its loss is masked).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from motus_fast.data.norm import MODES
from motus_fast.data.windows import WindowSpec

ACTION_SOURCES = ("dataset", "latent", "none")
BALANCES = ("window", "episode")


@dataclass(frozen=True)
class DatasetSpec:
    root: str
    name: Optional[str] = None              # stats and caches key on it; default: the root's directory name
    format: str = "auto"                    # auto | lerobot | robotwin
    level: str = "robot"                    # pyramid level tag
    weight: float = 1.0
    cameras: tuple[str, ...] = ()           # in layout order; () = all the dataset's cameras
    layout: str = "single"                  # single | t_shape | horizontal (see image.py)
    state_key: Optional[str] = None         # default: observation.state (LeRobot) / qpos (RoboTwin)
    action_key: Optional[str] = None        # default: action (LeRobot) / qpos (RoboTwin)
    actions: str = "dataset"                # dataset | latent | none
    latent_dir: Optional[str] = None        # default: <root>/latent_actions
    episodes: Optional[tuple[int, ...]] = None   # LeRobot: a subset of episode indices
    tasks: Optional[tuple[str, ...]] = None      # RoboTwin: a subset of task names
    instruction: Optional[str] = None       # use this instruction instead of the dataset's (e.g. plain videos)
    balance: str = "window"                 # window: every window equally likely; episode: upstream's
                                            # uniform episode, then uniform window within it

    def __post_init__(self):
        if self.actions not in ACTION_SOURCES:
            raise ValueError(f"dataset {self.root}: actions must be one of {ACTION_SOURCES}, got {self.actions!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"dataset {self.root}: balance must be one of {BALANCES}, got {self.balance!r}")
        if not self.weight > 0:
            raise ValueError(f"dataset {self.root}: weight must be > 0, got {self.weight}")

    @property
    def display_name(self) -> str:
        return self.name or Path(self.root).name


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetSpec, ...]
    window: WindowSpec = field(default_factory=WindowSpec)
    height: int = 384                       # frame size given to the VAE (upstream video_height/width)
    width: int = 320
    normalization: str = "none"             # none | min_max | mean_std | quantile (norm.py)
    stats_path: Optional[str] = None        # from `motus-fast stats`; needed unless normalization is none
    text_cache: Optional[str] = None        # from `motus-fast encode-text` (optional)
    with_state: bool = True                 # finetune layout (state token); False for the pretrain layout
    action_dim: Optional[int] = None        # pad every chunk to this width (required with action-free data)
    state_dim: Optional[int] = None         # state width for action-free samples in the finetune layout
    level_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("DataConfig needs at least one dataset")
        if self.normalization not in MODES:
            raise ValueError(f"normalization must be one of {MODES}, got {self.normalization!r}")
        names = [d.display_name for d in self.datasets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"dataset names must be unique (set `name`): {sorted(dup)}")

    def mixture_weights(self) -> list[float]:
        """Per-dataset probabilities of the pyramid mixture (see the module docstring)."""
        lw = dict(self.level_weights)
        if not lw:
            total = sum(d.weight for d in self.datasets)
            return [d.weight / total for d in self.datasets]
        level_total: dict[str, float] = {}
        for d in self.datasets:
            level_total[d.level] = level_total.get(d.level, 0.0) + d.weight
        raw = [lw.get(d.level, 1.0) * d.weight / level_total[d.level] for d in self.datasets]
        if not sum(raw) > 0:
            raise ValueError(f"level weights {lw} give every dataset zero weight")
        return [r / sum(raw) for r in raw]

    def for_stage(self, stage: int) -> "DataConfig":
        """The training stages' data (DESIGN.md section 7): 1 = video only (every dataset action-free, no state);
        2 = latent actions, pretrain layout (no state; "dataset" actions are not allowed); 3 = the target robot's
        real actions with its state."""
        if stage == 1:
            return dataclasses.replace(
                self, with_state=False,
                datasets=tuple(dataclasses.replace(d, actions="none") for d in self.datasets))
        if stage == 2:
            bad = [d.display_name for d in self.datasets if d.actions == "dataset"]
            if bad:
                raise ValueError(f"stage 2 trains on latent actions; datasets {bad} use their action column "
                                 "(set actions='latent' or 'none')")
            return dataclasses.replace(self, with_state=False)
        if stage == 3:
            bad = [d.display_name for d in self.datasets if d.actions == "latent"]
            if bad:
                raise ValueError(f"stage 3 trains on real actions; datasets {bad} use latent actions")
            return dataclasses.replace(self, with_state=True)
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")

    # ---- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DataConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(DataConfig)}
        if unknown:
            raise KeyError(f"unknown data config field(s) {sorted(unknown)}")
        specs = []
        for i, s in enumerate(d.get("datasets", ())):
            s = dict(s)
            bad = set(s) - {f.name for f in dataclasses.fields(DatasetSpec)}
            if bad:
                raise KeyError(f"unknown field(s) {sorted(bad)} in datasets[{i}]")
            for k in ("cameras", "episodes", "tasks"):
                if s.get(k) is not None:
                    s[k] = tuple(s[k])
            specs.append(DatasetSpec(**s))
        d["datasets"] = tuple(specs)
        if "window" in d:
            d["window"] = WindowSpec(**d["window"])
        if "level_weights" in d:
            lw = d["level_weights"]
            d["level_weights"] = tuple((str(k), float(v)) for k, v in (lw.items() if isinstance(lw, dict) else lw))
        return DataConfig(**d)
