"""Training data for the latent-action VAE: flow images of every latent step, optional real-action labels, and the
labelled/unlabelled batch mix.

``FlowClips`` holds the flow images in memory (float16, [-1, 1]); it suits the single-process trainer here and
datasets up to a few hundred thousand steps at 256 px. Streaming from the data stack replaces it for web-scale
video.

Labels: ``labels[episode_index]`` is float [n_steps, A], row k the (normalised) real action of latent step k, i.e.
of the motion from raw frame k * frame_spacing to (k + 1) * frame_spacing; A <= latent_dim (aligned with the leading
latent dimensions). Rows with a NaN are treated as unlabelled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from motus_fast.latent_action.config import LatentActionConfig
from motus_fast.latent_action.frames import FrameSource, step_pairs
from motus_fast.latent_action.model import rgb_to_input
from motus_fast.latent_action.optical_flow import FlowEstimator, flow_images, make_flow_estimator

log = logging.getLogger(__name__)


@dataclass
class FlowClips:
    images: torch.Tensor      # float16 [N, 3, H, W] in [-1, 1]
    actions: torch.Tensor     # float32 [N, A] (zeros where unlabelled; A = 0 without labels)
    labelled: torch.Tensor    # bool [N]
    episode: torch.Tensor     # int64 [N] episode index of each clip
    step: torch.Tensor        # int64 [N] latent step within its episode

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx) -> "FlowClips":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return FlowClips(self.images[idx], self.actions[idx], self.labelled[idx], self.episode[idx], self.step[idx])

    def with_labelled(self, labelled: torch.Tensor) -> "FlowClips":
        """The same clips with a different labelled mask (e.g. to keep labels on only a fraction of them)."""
        if labelled.shape != self.labelled.shape:
            raise ValueError(f"labelled mask must be {list(self.labelled.shape)}, got {list(labelled.shape)}")
        return FlowClips(self.images, self.actions, labelled.to(torch.bool), self.episode, self.step)


def build_flow_clips(source: FrameSource, cfg: LatentActionConfig,
                     labels: Optional[Mapping[int, np.ndarray]] = None,
                     estimator: Optional[FlowEstimator] = None, progress: bool = True) -> FlowClips:
    """Flow images of every latent step of every episode in `source` (which must yield frames every
    cfg.frame_spacing raw frames), with labels where given."""
    from tqdm.auto import tqdm

    estimator = estimator or make_flow_estimator(cfg.flow)
    images, episode, step, label_rows = [], [], [], []
    action_dim = None
    if labels:
        dims = {np.asarray(v).shape[-1] for v in labels.values()}
        if len(dims) != 1:
            raise ValueError(f"labels have different action dimensions {sorted(dims)}")
        action_dim = dims.pop()
        if action_dim > cfg.model.latent_dim:
            raise ValueError(f"labels have {action_dim} dimensions, more than model.latent_dim "
                             f"{cfg.model.latent_dim}")
    for ep in tqdm(source, total=len(source), desc="optical flow", unit="episode", disable=not progress):
        if ep.frame_step != cfg.frame_spacing:
            raise ValueError(f"{ep.source}: frames come every {ep.frame_step} raw frames but frame_spacing is "
                             f"{cfg.frame_spacing}")
        first, second = step_pairs(ep)
        n = first.shape[0]
        if n == 0:
            log.warning("%s: shorter than one latent step (%d frames); skipped", ep.source, ep.num_raw_frames)
            continue
        images.append(rgb_to_input(flow_images(first, second, cfg.flow, cfg.model.image_size, estimator)).half())
        episode.append(torch.full((n,), ep.index, dtype=torch.long))
        step.append(torch.arange(n))
        rows = np.full((n, action_dim or 0), np.nan, dtype=np.float32)
        if labels and ep.index in labels:
            lab = np.asarray(labels[ep.index], dtype=np.float32)
            if lab.ndim != 2 or lab.shape[0] != n:
                raise ValueError(f"labels for episode {ep.index} are {list(lab.shape)}; its video has {n} latent "
                                 f"steps of {cfg.frame_spacing} frames, so [{n}, {action_dim}] is expected")
            rows = lab
        label_rows.append(rows)
    if not images:
        raise ValueError("the dataset has no episode with at least one latent step")
    unknown = sorted(set(labels or ()) - {int(e[0]) for e in episode})
    if unknown:
        raise ValueError(f"labels given for episodes {unknown[:10]} that the dataset does not have (or that are "
                         "shorter than one latent step)")
    actions = torch.from_numpy(np.concatenate(label_rows))
    labelled = ~torch.isnan(actions).any(-1) if actions.shape[1] else torch.zeros(actions.shape[0], dtype=torch.bool)
    return FlowClips(images=torch.cat(images), actions=torch.nan_to_num(actions, nan=0.0), labelled=labelled,
                     episode=torch.cat(episode), step=torch.cat(step))


class MixedBatchSampler:
    """Batches of clip indices where each sample is labelled with probability `labelled_fraction` (the paper's
    10% labelled / 90% unlabelled), drawn uniformly within its pool. A missing pool gives way to the other."""

    def __init__(self, labelled: torch.Tensor, batch_size: int, labelled_fraction: float, generator: torch.Generator):
        self.lab = torch.nonzero(labelled, as_tuple=False).flatten()
        self.unlab = torch.nonzero(~labelled, as_tuple=False).flatten()
        self.batch_size, self.generator = batch_size, generator
        if len(self.lab) == 0:
            self.p = 0.0
        elif len(self.unlab) == 0:
            self.p = 1.0
        else:
            self.p = labelled_fraction

    def sample(self) -> torch.Tensor:
        g, B = self.generator, self.batch_size
        n_lab = int(torch.binomial(torch.tensor(float(B)), torch.tensor(self.p), generator=g).item()) \
            if 0.0 < self.p < 1.0 else int(round(B * self.p))
        parts = []
        if n_lab:
            parts.append(self.lab[torch.randint(len(self.lab), (n_lab,), generator=g)])
        if B - n_lab:
            parts.append(self.unlab[torch.randint(len(self.unlab), (B - n_lab,), generator=g)])
        return torch.cat(parts)
