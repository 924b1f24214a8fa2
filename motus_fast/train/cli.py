"""`motus-fast train`: one process, or many under torchrun (`torchrun --nproc-per-node N -m motus_fast.cli train`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class TrainData:
    """What the Trainer reads: the dataset, its collate_fn (None: items are FlowBatches), the MixtureDataset its
    (index, draw seed) items follow (None: plain indices), and the JSON stored with every checkpoint."""
    dataset: Any
    collate_fn: Optional[Callable] = None
    mixture: Any = None
    extra: Optional[dict] = None


def build_dataset(spec: str, model_cfg, stage: int, seed: int, encoders: str) -> TrainData:
    """`spec`: `synthetic[:N]` (N synthetic samples: tests, smoke runs) or a DataConfig JSON file (motus_fast.data),
    read for this stage and encoded by `encoders` (`tiny`: tiny random in-process encoders, CPU runs and CI)."""
    import json

    from motus_fast.train.stages import model_config_for_stage
    cfg = model_config_for_stage(model_cfg, stage)
    if spec.startswith("synthetic"):
        from motus_fast.data.synthetic import SyntheticDataset
        size = int(spec.split(":", 1)[1]) if ":" in spec else 64
        return TrainData(SyntheticDataset(cfg, size=size, seed=seed))
    from pathlib import Path

    from motus_fast.data import DataConfig
    from motus_fast.data.encode import EncodedDataset
    from motus_fast.data.mixture import build_mixture
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--data {spec!r}: not `synthetic[:N]` and no such DataConfig JSON file")
    data_cfg = DataConfig.from_dict(json.loads(path.read_text())).for_stage(stage)
    if encoders != "tiny":
        raise SystemExit(f"--encoders {encoders!r}: only `tiny` is wired into the trainer so far")
    from motus_fast.encoders import build_tiny_encoders
    enc = build_tiny_encoders(cfg, seed=seed, use_vlm=stage != 1)
    mixture = build_mixture(data_cfg, vlm_prompt=enc.vlm_prompt if enc.vlm_dim is not None else None)
    extra = {"norm_mode": data_cfg.normalization, "data": data_cfg.to_dict()}
    if data_cfg.stats_path:
        from motus_fast.data.norm import load_stats, stats_to_json
        extra["norm_stats"] = stats_to_json(load_stats(data_cfg.stats_path))
    return TrainData(EncodedDataset(mixture, enc), mixture=mixture, extra=extra)


def cmd_train(args) -> None:
    from motus_fast.config import config_from_args, parse_overrides
    from motus_fast.config import TrainConfig
    from motus_fast.train.distributed import shutdown
    from motus_fast.train.trainer import Trainer

    model_cfg = config_from_args(args)
    train_cfg = TrainConfig().override(parse_overrides(args.train))
    data = build_dataset(args.data, model_cfg, train_cfg.stage, train_cfg.seed, args.encoders)
    try:
        Trainer(model_cfg, train_cfg, data.dataset, args.out, collate_fn=data.collate_fn, num_workers=args.workers,
                extra=data.extra, mixture=data.mixture).run(resume=args.resume)
    finally:
        shutdown()


def register(sub) -> None:
    from motus_fast.config import add_config_args
    p = sub.add_parser("train", help="train Motus (stage 1, 2 or 3); runs under torchrun for several processes")
    add_config_args(p, "tiny")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --train stage=2 --train steps=500 (repeatable)")
    p.add_argument("--data", default="synthetic", help="`synthetic[:N]` or a DataConfig JSON file")
    p.add_argument("--encoders", default="tiny", help="encoders at the data edge (`tiny`: random, in-process)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, metrics, tensorboard)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.set_defaults(func=cmd_train)
