"""Labelling: write per-episode latent actions for the stage-2 data loader, and read them back.

On-disk format (``FORMAT = "motus_fast.latent_actions/1"``), under ``<out>/latent_actions/`` (``<out>`` defaults to
the dataset root, where the stage-2 loader looks: ``motus_fast.data.latent_actions.LatentActionStore``):

- ``episode_<index:06d>.npy``: float32 ``[n_steps, dim]``; row k is the posterior mean of the latent action of the
  motion from raw frame ``k * frame_spacing`` to raw frame ``(k + 1) * frame_spacing`` of that episode's video;
  ``n_steps = (num_raw_frames - 1) // frame_spacing`` (a trailing partial step is dropped). An episode shorter than
  one step gets no file and is listed under ``too_short``.
- ``meta.json``: ``format``, ``dim`` (14), ``frame_spacing`` (raw frames per row), ``checkpoint`` (absolute path),
  ``checkpoint_step``, ``config_hash`` (of the latent-action config), ``image_size``, ``flow`` (the optical-flow
  config), ``dataset``, ``stats`` (per-dimension ``mean``/``std`` over all rows and their ``count``, for
  normalisation), ``episodes``: ``{"<index>": {"file", "num_steps", "num_raw_frames", "fps", "source"}}`` and
  ``too_short``: [indices]. It is written last (atomically): a directory without it is an interrupted run.

A stage-2 window whose condition frame is c (a multiple of frame_spacing) takes rows c / frame_spacing onwards. At
30 fps and the default spacing of 6, one row is 0.2 s of motion.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from motus_fast.latent_action.frames import FrameSource, step_pairs
from motus_fast.latent_action.model import LatentActionVAE, rgb_to_input
from motus_fast.latent_action.optical_flow import FlowEstimator, flow_images, make_flow_estimator

log = logging.getLogger(__name__)

FORMAT = "motus_fast.latent_actions/1"
SUBDIR = "latent_actions"


def episode_file(index: int) -> str:
    return f"episode_{index:06d}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


@torch.no_grad()
def label_latent_actions(model: LatentActionVAE, source: FrameSource, out_root: str | Path, *,
                         checkpoint: str | Path, checkpoint_step: int = 0, dataset: str = "",
                         batch_size: int = 64, estimator: Optional[FlowEstimator] = None, overwrite: bool = False,
                         progress: bool = True, rank: int = 0, world_size: int = 1,
                         barrier: Optional[Callable[[], None]] = None) -> Path:
    """Encode every latent step of every episode of `source` (frames every cfg.frame_spacing raw frames) and write
    the files described in the module docstring under <out_root>/latent_actions/. Returns that directory.

    Sharded (torchrun): rank r labels every `world_size`-th episode and records them in ``meta.rank<r>.json``;
    `barrier` synchronises the ranks; rank 0 then writes meta.json with the statistics computed from all the files
    in episode order, exactly as one process does."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    out = Path(out_root) / SUBDIR
    sync = barrier or (lambda: None)
    if rank == 0:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} already holds files; pass --overwrite to replace them")
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in list(out.glob("episode_*.npy")) + list(out.glob("meta*.json")):
                stale.unlink(missing_ok=True)
    sync()
    source.shard(rank, world_size)
    estimator = estimator or make_flow_estimator(cfg.flow)
    device = next(model.parameters()).device
    model.eval()
    episodes, too_short = {}, []
    bar = tqdm(source, total=len(source), desc="latent actions", unit="episode", disable=not progress)
    for ep in bar:
        if ep.frame_step != cfg.frame_spacing:
            raise ValueError(f"{ep.source}: frames come every {ep.frame_step} raw frames but the checkpoint's "
                             f"frame_spacing is {cfg.frame_spacing}")
        if str(ep.index) in episodes or ep.index in too_short:
            raise ValueError(f"episode index {ep.index} appears twice (second time from {ep.source})")
        first, second = step_pairs(ep)
        rows = []
        for i in range(0, first.shape[0], batch_size):
            rgb = flow_images(first[i:i + batch_size], second[i:i + batch_size], cfg.flow, cfg.model.image_size,
                              estimator)
            mean, _ = model.encode(rgb_to_input(rgb).to(device))
            rows.append(mean.float().cpu().numpy())
        if not rows:
            log.warning("%s: %d raw frames, shorter than one latent step of %d; no latent actions", ep.source,
                        ep.num_raw_frames, cfg.frame_spacing)
            too_short.append(int(ep.index))
            continue
        latents = np.concatenate(rows)
        _save_npy(out / episode_file(ep.index), latents.astype(np.float32))
        episodes[str(ep.index)] = {"file": episode_file(ep.index), "num_steps": int(latents.shape[0]),
                                   "num_raw_frames": int(ep.num_raw_frames), "fps": float(ep.fps),
                                   "source": ep.source}
    _write_json(out / f"meta.rank{rank}.json", {"episodes": episodes, "too_short": too_short})
    sync()
    if rank != 0:
        return out
    for r in range(world_size):                     # merge the ranks' parts
        part = out / f"meta.rank{r}.json"
        if not part.is_file():
            raise FileNotFoundError(f"{part}: rank {r} did not finish")
        d = json.loads(part.read_text())
        clash = set(d["episodes"]) & set(episodes) if r else set()
        if clash:
            raise ValueError(f"episode indices {sorted(clash)[:5]} labelled by two ranks (duplicate indices?)")
        if r:
            episodes.update(d["episodes"])
            too_short += d["too_short"]
        part.unlink()
    episodes = dict(sorted(episodes.items(), key=lambda kv: int(kv[0])))
    s1, s2, total = np.zeros(cfg.model.latent_dim), np.zeros(cfg.model.latent_dim), 0
    for info in episodes.values():                  # statistics in episode order, whatever the sharding
        latents = np.load(out / info["file"])
        total += latents.shape[0]
        s1 += latents.sum(0)
        s2 += np.square(latents.astype(np.float64)).sum(0)
    mean = s1 / max(total, 1)
    std = np.sqrt(np.maximum(s2 / max(total, 1) - mean ** 2, 0.0))
    meta = {"format": FORMAT, "dim": cfg.model.latent_dim, "frame_spacing": cfg.frame_spacing,
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_step": int(checkpoint_step),
            "config_hash": cfg.config_hash(), "image_size": list(cfg.model.image_size),
            "flow": cfg.to_dict()["flow"], "dataset": dataset,
            "stats": {"mean": mean.tolist(), "std": std.tolist(), "count": total}, "episodes": episodes,
            "too_short": sorted(too_short)}
    _write_json(out / "meta.json", meta)
    log.info("wrote latent actions of %d episodes (%d steps) to %s", len(episodes), total, out)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

