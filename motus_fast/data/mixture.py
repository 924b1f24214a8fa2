"""The data pyramid: a weighted mixture of windowed datasets and the one training sampler.

``MixtureDataset.draws(seed, epoch, n)`` is epoch e of the pyramid as a pure function of (seed, e): which dataset
each draw comes from (by the mixture probabilities), which window (a fresh permutation per dataset and pass, so a
single dataset with ``samples_per_epoch = len`` visits every window exactly once; or upstream's uniform episode then
uniform window with ``balance="episode"``), and a per-draw seed the dataset uses for its own choices.

``StepSampler`` is the only sampler training uses (the trainer, tests, any loader): global sample position p of a
run is draw ``p % N`` of epoch ``p // N`` (N samples per epoch), and the positions of step s, micro-step m, rank r
are ``s*B*A*W + (m*W + r)*B + [0, B)`` (per-process batch B, accumulation A, world size W). So the samples of a
step depend only on (seed, step) and on the global batch, never on how it is split over processes: resuming needs
no data state (the step is the state), also on another world size. Any map-style dataset can be sampled: a
``MixtureDataset`` (or a dataset indexed like one, e.g. ``EncodedDataset(mixture)``, with ``mixture=``) gets
``(index, draw seed)`` items; a plain dataset gets a fresh permutation per epoch.

    mixture = build_mixture(data_cfg, vlm_prompt=encoders.vlm_prompt if encoders.vlm_dim else None)
    sampler = StepSampler(len(mixture), batch_size=8, steps=10_000, seed=0, rank=rank, world_size=world,
                          start_step=resumed_step, mixture=mixture)
    loader = DataLoader(mixture, batch_sampler=sampler, collate_fn=collate, num_workers=4)   # RawBatches
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from motus_fast.data.config import DataConfig
from motus_fast.data.dataset import MotusDataset, Sample
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

    def draws(self, seed: int, epoch: int, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch`` of the pyramid: ``n`` (default len) draws as (global indices [n], draw seeds [n])."""
        N = int(n or len(self))
        rng = np.random.default_rng([int(seed), int(epoch)])
        which = rng.choice(len(self.datasets), size=N, p=self.probabilities)
        out = np.empty(N, dtype=np.int64)
        for d, ds in enumerate(self.datasets):
            pos = np.flatnonzero(which == d)
            k = len(pos)
            if k == 0:
                continue
            if ds.spec.balance == "episode":
                eligible = np.flatnonzero(ds.windows_per_episode > 0)
                ep = eligible[rng.integers(0, len(eligible), k)]
                local = ds.offsets[ep] + (rng.random(k) * ds.windows_per_episode[ep]).astype(np.int64)
            else:
                passes = math.ceil(k / len(ds))
                local = np.concatenate([rng.permutation(len(ds)) for _ in range(passes)])[:k]
            out[pos] = self.offsets[d] + local
        seeds = rng.integers(0, 2 ** 62, size=N, dtype=np.int64)
        return out, seeds


class StepSampler(Sampler):
    """Yields this rank's index lists for steps ``start_step .. steps - 1``, micro-step by micro-step (see the module
    docstring). ``size``: the dataset's length; ``mixture``: the MixtureDataset whose draws the dataset's items
    follow (items are ``(index, draw seed)``), None for a plain dataset (items are ints, one permutation of
    ``range(size)`` per epoch seeded by seed + epoch); ``samples_per_epoch``: draws per mixture epoch (default
    ``size``)."""

    def __init__(self, size: int, *, batch_size: int, steps: int, seed: int = 0, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, mixture: Optional[MixtureDataset] = None,
                 samples_per_epoch: Optional[int] = None):
        if size < 1:
            raise ValueError("the training dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        if mixture is not None and len(mixture) != size:
            raise ValueError(f"the dataset has {size} items but its mixture {len(mixture)} windows")
        if samples_per_epoch is not None and mixture is None:
            raise ValueError("samples_per_epoch needs a mixture (a plain dataset's epoch is one permutation)")
        self.size, self.mixture, self.seed = int(size), mixture, int(seed)
        self.batch_size, self.grad_accum, self.steps = int(batch_size), int(grad_accum), int(steps)
        self.rank, self.world_size, self.start_step = rank, world_size, int(start_step)
        self.samples_per_epoch = int(samples_per_epoch or size)
        self._epoch: Optional[tuple[int, list]] = None

    def epoch_items(self, epoch: int) -> list:
        """The dataset items of one epoch, in order (the same on every rank)."""
        if self._epoch is None or self._epoch[0] != epoch:
            if self.mixture is None:
                perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
                items = perm.tolist()
            else:
                index, seeds = self.mixture.draws(self.seed, epoch, self.samples_per_epoch)
                items = list(zip(index.tolist(), seeds.tolist()))
            self._epoch = (epoch, items)
        return self._epoch[1]

    def item(self, position: int):
        """The dataset item at global sample position ``position`` of the run."""
        return self.epoch_items(position // self.samples_per_epoch)[position % self.samples_per_epoch]

    def __iter__(self):
        B, A, W = self.batch_size, self.grad_accum, self.world_size
        for step in range(self.start_step, self.steps):
            for micro in range(A):
                first = step * B * A * W + (micro * W + self.rank) * B
                yield [self.item(p) for p in range(first, first + B)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.grad_accum


def build_mixture(cfg: DataConfig, stats: Optional[dict[str, DatasetStats]] = None, text_cache=None,
                  vlm_prompt=None, read_frames: bool = True) -> MixtureDataset:
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
        datasets.append(MotusDataset(spec, cfg, s, text_cache, vlm_prompt, read_frames))
    dims = {d.action_dim for d in datasets}
    if len(dims) != 1:
        raise ValueError(f"datasets give action chunks of widths {sorted(dims)}; set data.action_dim to pad them")
    states = {d.state_dim for d in datasets}
    if len(states) != 1:
        raise ValueError(f"datasets give states of widths {sorted(states)}; set data.state_dim to pad them")
    return MixtureDataset(datasets, cfg.mixture_weights())
