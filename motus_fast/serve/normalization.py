"""Raw robot units <-> model space on the server, from the statistics stored with the checkpoint.

A checkpoint's config.json may carry ``extra["norm_stats"]`` (``motus_fast.data.norm`` format: per dataset, state
and action statistics) and ``extra["norm_mode"]`` (``none | min_max | mean_std | quantile``). The server
normalises the state (and given or previous actions) before the model and un-normalises the actions after it, so
clients speak raw units. Without statistics the server passes values through and logs that it does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from motus_fast.data.norm import MODES, FeatureStats, normalize, stats_from_json, unnormalize

log = logging.getLogger("motus_fast")


@dataclass(frozen=True)
class Normalizer:
    mode: str                               # one of motus_fast.data.norm.MODES
    state: Optional[FeatureStats] = None
    action: Optional[FeatureStats] = None
    dataset: Optional[str] = None

    @staticmethod
    def from_extra(extra: dict, mode: Optional[str] = None, dataset: Optional[str] = None) -> "Normalizer":
        """From a checkpoint's "extra" metadata; `mode` / `dataset` override what the checkpoint says."""
        doc = extra.get("norm_stats")
        mode = mode or extra.get("norm_mode")
        if doc is None:
            if mode not in (None, "none"):
                raise ValueError(f"normalization mode {mode!r} needs statistics, but the checkpoint has no "
                                 "extra['norm_stats']")
            log.warning("the checkpoint has no normalization statistics: state and actions pass through as given")
            return Normalizer(mode="none")
        if mode not in MODES:
            raise ValueError(f"the checkpoint has normalization statistics but no valid mode (got {mode!r}): pass "
                             f"one of {MODES} (--norm-mode), or store extra['norm_mode'] with the checkpoint")
        datasets = stats_from_json(doc, "checkpoint extra['norm_stats']")
        if dataset is None:
            if len(datasets) != 1:
                raise ValueError(f"the checkpoint has statistics for several datasets {sorted(datasets)}: choose one "
                                 "(--norm-dataset)")
            dataset = next(iter(datasets))
        if dataset not in datasets:
            raise ValueError(f"no statistics for dataset {dataset!r}; the checkpoint has {sorted(datasets)}")
        s = datasets[dataset]
        return Normalizer(mode=mode, state=s.state, action=s.action, dataset=dataset)

    def check_dims(self, state_dim: Optional[int], action_dim: int) -> None:
        """Fail at start-up, not at the first request, if the statistics do not fit the model."""
        if self.mode == "none":
            return
        if self.action is None or self.action.dim != action_dim:
            got = None if self.action is None else self.action.dim
            raise ValueError(f"action statistics have {got} dims; the model's action_dim is {action_dim}")
        if state_dim is not None and (self.state is None or self.state.dim != state_dim):
            got = None if self.state is None else self.state.dim
            raise ValueError(f"state statistics have {got} dims; the model's state_dim is {state_dim}")

    def state_in(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(normalize(np.asarray(x, np.float64), self.state, self.mode), np.float32)

    def actions_in(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(normalize(np.asarray(x, np.float64), self.action, self.mode), np.float32)

    def actions_out(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(unnormalize(np.asarray(x, np.float64), self.action, self.mode), np.float32)
