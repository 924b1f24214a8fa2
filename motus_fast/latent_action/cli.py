"""`motus-fast train-latent-actions` and `motus-fast label-latent-actions`.

    motus-fast train-latent-actions --dataset VIDEOS/ --out CKPT/ [--preset tiny|motus] [--set KEY=VALUE ...]
                                    [--labels LABELS/]
    motus-fast label-latent-actions --dataset VIDEOS/ --checkpoint CKPT/ [--out DIR]

--dataset: a LeRobot v3 dataset or an upstream RoboTwin layout (read through motus_fast.data; --camera picks the
view, default the first), or a directory with one .mp4 per episode (``episode_000123.mp4`` -> episode 123).
--labels: a directory of ``episode_<index:06d>.npy`` float [n_steps, A] real actions per latent step (normalised;
A <= latent_dim), for the episodes that have them. The latent actions are written to <out>/latent_actions/ (format:
latent_action/label.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _read_labels(root: str) -> dict:
    import re

    import numpy as np
    files = sorted(Path(root).glob("episode_*.npy"))
    if not files:
        raise SystemExit(f"--labels {root!r}: no episode_*.npy files")
    out = {}
    for f in files:
        m = re.fullmatch(r"episode_(\d+)", f.stem)
        if m is None:
            raise SystemExit(f"--labels: {f.name} does not look like episode_<index>.npy")
        out[int(m.group(1))] = np.load(f)
    return out


def cmd_train(args) -> None:
    from motus_fast.config import parse_overrides
    from motus_fast.latent_action.config import get_preset
    from motus_fast.latent_action.data import build_flow_clips
    from motus_fast.latent_action.frames import open_frame_source
    from motus_fast.latent_action.train import train_latent_actions

    cfg = get_preset(args.preset).override(parse_overrides(args.set))
    source = open_frame_source(args.dataset, frame_step=cfg.frame_spacing, size=cfg.flow.flow_size,
                               camera=args.camera)
    labels = _read_labels(args.labels) if args.labels else None
    clips = build_flow_clips(source, cfg, labels=labels)
    train_latent_actions(cfg, clips, out_dir=args.out)
    print(f"checkpoint: {args.out} (log: {Path(args.out) / 'log.jsonl'})")


def cmd_label(args) -> None:
    import torch

    from motus_fast.latent_action.checkpoint import load_latent_action_model, read_checkpoint_meta
    from motus_fast.latent_action.frames import open_frame_source
    from motus_fast.latent_action.label import label_latent_actions

    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))      # under torchrun: every N-th episode per rank
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    meta = read_checkpoint_meta(args.checkpoint)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    model = load_latent_action_model(args.checkpoint, device=torch.device(device))
    cfg = model.cfg
    source = open_frame_source(args.dataset, frame_step=cfg.frame_spacing, size=cfg.flow.flow_size,
                               camera=args.camera)
    out = label_latent_actions(model, source, args.out or args.dataset, checkpoint=args.checkpoint,
                               checkpoint_step=int(meta.get("step", 0)), dataset=str(Path(args.dataset).resolve()),
                               batch_size=args.batch_size, overwrite=args.overwrite, rank=rank, world_size=world,
                               barrier=dist.barrier if world > 1 else None)
    if world > 1:
        dist.destroy_process_group()
    if rank:
        return
    print(f"latent actions ({cfg.model.latent_dim}-D, one per {cfg.frame_spacing} raw frames) written to {out}")


def register(sub) -> None:
    p = sub.add_parser("train-latent-actions", help="train the optical-flow latent-action VAE on videos")
    p.add_argument("--dataset", required=True, metavar="DIR",
                   help="LeRobot v3 / RoboTwin dataset root, or a directory of per-episode .mp4 videos")
    p.add_argument("--camera", default=None, help="camera of a LeRobot/RoboTwin dataset (default: the first)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (also gets log.jsonl)")
    p.add_argument("--labels", metavar="DIR", help="episode_<index>.npy real actions per latent step (optional)")
    p.add_argument("--preset", default="tiny", help="latent-action preset: tiny (CI), motus (paper; needs "
                   "--set dcae.pretrained_path=DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=1000 --set frame_spacing=6 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("label-latent-actions", help="write per-episode latent actions for stage-2 training "
                       "(torchrun: one rank per GPU, every N-th episode each)")
    p.add_argument("--dataset", required=True, metavar="DIR",
                   help="LeRobot v3 / RoboTwin dataset root, or a directory of per-episode .mp4 videos")
    p.add_argument("--camera", default=None, help="camera of a LeRobot/RoboTwin dataset (default: the first)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a train-latent-actions checkpoint")
    p.add_argument("--out", metavar="DIR", help="where latent_actions/ goes (default: the dataset directory)")
    p.add_argument("--batch-size", type=int, default=64, help="latent steps encoded per forward pass")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing latent_actions/ directory")
    p.set_defaults(func=cmd_label)
