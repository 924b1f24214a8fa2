"""The data pyramid: a weighted mixture of windowed datasets, a deterministic resumable sampler, and a loader that
the trainer iterates forever and checkpoints.

``MixtureSampler`` draws epoch e as a pure function of (seed, e): which dataset each draw comes from (by the
mixture probabilities), which window (a fresh permutation per dataset and pass, so a single dataset with
``samples_per_epoch = len`` visits every window exactly once; or upstream's uniform episode then uniform window
with ``balance="episode"``), and a per-draw seed the dataset uses for its own choices. Ranks take every
``world_size``-th draw. ``ResumableLoader`` wraps a torch DataLoader over it, counts the batches the training loop
has *consumed* (not the ones prefetched by workers), and restarts from exactly there after ``load_state_dict``,
also on another world size (the global sample position is kept; a remainder of less than one global batch is
skipped).

    mixture = build_mixture(data_cfg, vlm_prompt=encoders.vlm_prompt if encoders.vlm_dim else None)
    loader = ResumableLoader(mixture, batch_size=8, seed=0, rank=rank, world_size=world, num_workers=4)
    loader.load_state_dict(ckpt["data"])            # when resuming
    raw = next(loader)                               # RawBatch; BatchEncoder(encoders)(raw) -> FlowBatch
    ckpt["data"] = loader.state_dict()
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from motus_fast.data.config import DataConfig
from motus_fast.data.dataset import MotusDataset, RawBatch, Sample, collate
from motus_fast.data.norm import DatasetStats, load_stats


class MixtureDataset(Dataset):
    """Concatenated index space over several ``MotusDataset``s with mixture probabilities (one per dataset)."""

    def __init__(self, datasets: list[MotusDataset], probabilities: list[float]):
        if len(datasets) != len(probabilities) or not datasets:
            raise ValueError("need one probability per dataset")
        p = np.asarray(probabilities, dtype=np.float64)
        if (p < 0).any() or not p.sum() > 0:
            raise ValueError(f"bad mixture probabilities {probabilities}")
        self.datasets = datasets
        self.probabilities = p / p.sum()
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item) -> Sample:
        index, draw = (item, 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} windows")
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.datasets[d][(int(index - self.offsets[d]), draw)]

    def describe(self) -> str:
        rows = [f"{d.name}: level {d.spec.level}, p={p:.3f}, {d.num_episodes} episodes, {len(d)} windows, "
                f"actions={d.spec.actions}" for d, p in zip(self.datasets, self.probabilities)]
        return "\n".join(rows)


class MixtureSampler(Sampler):
    """Yields ``(global index, draw seed)`` for this rank, starting at per-rank position ``start``."""

    def __init__(self, mixture: MixtureDataset, seed: int = 0, samples_per_epoch: Optional[int] = None,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.mixture, self.seed = mixture, int(seed)
        self.samples_per_epoch = int(samples_per_epoch or len(mixture))
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self._cache: Optional[tuple[int, np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All ranks' draws of an epoch: (global indices [N], draw seeds [N])."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        m, N = self.mixture, self.samples_per_epoch
        rng = np.random.default_rng([self.seed, epoch])
        which = rng.choice(len(m.datasets), size=N, p=m.probabilities)
        out = np.empty(N, dtype=np.int64)
        for d, ds in enumerate(m.datasets):
            pos = np.flatnonzero(which == d)
            n = len(pos)
            if n == 0:
                continue
            if ds.spec.balance == "episode":
                eligible = np.flatnonzero(ds.windows_per_episode > 0)
                ep = eligible[rng.integers(0, len(eligible), n)]
                local = ds.offsets[ep] + (rng.random(n) * ds.windows_per_episode[ep]).astype(np.int64)
            else:
                passes = math.ceil(n / len(ds))
                local = np.concatenate([rng.permutation(len(ds)) for _ in range(passes)])[:n]
            out[pos] = m.offsets[d] + local
        seeds = rng.integers(0, 2 ** 62, size=N, dtype=np.int64)
        self._cache = (epoch, out, seeds)
        return out, seeds

    def __iter__(self):
        idx, seeds = self.draws(self.epoch)
        n = len(self)
        for p in range(self.start, n):
            g = p * self.world_size + self.rank
            yield int(idx[g]), int(seeds[g])


class ResumableLoader:
    """An endless iterator of ``RawBatch`` over epochs, with an exact ``state_dict`` (see the module docstring)."""

    def __init__(self, mixture: MixtureDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 samples_per_epoch: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: Optional[int] = None, persistent_workers: bool = False,
                 multiprocessing_context=None):
        self.mixture, self.batch_size = mixture, int(batch_size)
        self.sampler = MixtureSampler(mixture, seed, samples_per_epoch, rank, world_size)
        if len(self.sampler) < self.batch_size:
            raise ValueError(f"an epoch has {len(self.sampler)} samples per rank, fewer than one batch of "
                             f"{self.batch_size} (raise samples_per_epoch)")
        self.loader_kwargs = dict(num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                                  persistent_workers=persistent_workers and num_workers > 0,
                                  multiprocessing_context=multiprocessing_context)
        self.batches_consumed = 0
        self._it = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def _restart(self) -> None:
        self.sampler.start = self.batches_consumed * self.batch_size
        loader = DataLoader(self.mixture, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate,
                            drop_last=True, **self.loader_kwargs)
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> RawBatch:
        if self.batches_consumed >= self.batches_per_epoch:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.batches_consumed, self._it = 0, None
        if self._it is None:
            self._restart()
        batch = next(self._it)
        self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict:
        s = self.sampler
        return {"seed": s.seed, "epoch": s.epoch, "batches_consumed": self.batches_consumed,
                "batch_size": self.batch_size, "world_size": s.world_size, "samples_per_epoch": s.samples_per_epoch,
                "mixture_size": len(self.mixture)}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        for key, mine in (("seed", s.seed), ("samples_per_epoch", s.samples_per_epoch),
                          ("mixture_size", len(self.mixture))):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data position: {key} was {state[key]}, is now {mine} "
                                 "(same datasets, seed and samples_per_epoch are needed for an exact resume)")
        global_samples = state["batches_consumed"] * state["batch_size"] * state["world_size"]
        s.set_epoch(state["epoch"])
        self.batches_consumed = global_samples // (self.batch_size * s.world_size)
        self._it = None


def build_mixture(cfg: DataConfig, stats: Optional[dict[str, DatasetStats]] = None, text_cache=None,
                  vlm_prompt=None) -> MixtureDataset:
    """All datasets of ``cfg`` as one mixture. ``stats``: per dataset name (default: read cfg.stats_path);
    ``text_cache``: a TextCache (default: open cfg.text_cache); ``vlm_prompt``: the VLM's per-sample prompt
    builder (``encoders.vlm_prompt``), run in the workers."""
    if stats is None and cfg.stats_path is not None:
        stats = load_stats(cfg.stats_path)
    if cfg.normalization != "none" and stats is None:
        raise ValueError(f"normalization {cfg.normalization!r} needs statistics: set data.stats_path (from "
                         "`motus-fast stats`)")
    if text_cache is None and cfg.text_cache is not None:
        from motus_fast.data.text_cache import TextCache
        text_cache = TextCache(cfg.text_cache)
    datasets = []
    for spec in cfg.datasets:
        s = None if stats is None else stats.get(spec.display_name)
        if cfg.normalization != "none" and s is None and spec.actions != "none":
            raise ValueError(f"no statistics for dataset {spec.display_name!r} in {cfg.stats_path} (has "
                             f"{sorted(stats)})")
        datasets.append(MotusDataset(spec, cfg, s, text_cache, vlm_prompt))
    dims = {d.action_dim for d in datasets}
    if len(dims) != 1:
        raise ValueError(f"datasets give action chunks of widths {sorted(dims)}; set data.action_dim to pad them")
    states = {d.state_dim for d in datasets}
    if len(states) != 1:
        raise ValueError(f"datasets give states of widths {sorted(states)}; set data.state_dim to pad them")
    return MixtureDataset(datasets, cfg.mixture_weights())


class MixtureView(Dataset):
    """The pyramid mixture as a plain map-style dataset of ``size`` entries: entry i is draw i of the sampler's
    epoch-0 draws (dataset by the mixture probabilities, window, draw seed), so any index sampler -- e.g. a
    trainer's own step-indexed permutation -- sees the mixture weights. ``size`` defaults to len(mixture)."""

    def __init__(self, mixture: MixtureDataset, seed: int = 0, size: Optional[int] = None):
        self.mixture = mixture
        self.index, self.seeds = MixtureSampler(mixture, seed, size).draws(0)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        return self.mixture[(int(self.index[i]), int(self.seeds[i]))]
