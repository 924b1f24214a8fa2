"""`motus-fast train`: one process, or many under torchrun (`torchrun --nproc-per-node N -m motus_fast.cli train`);
`motus-fast plan`: the peak memory per GPU of a training run, computed on the CPU (train/plan.py)."""

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


def build_dataset(spec: str, model_cfg, stage: int, seed: int, *, cache: Optional[str] = None,
                  wan: Optional[str] = None, vlm: Optional[str] = None, t5: Optional[str] = None,
                  encoder_dtype: str = "bf16", encoder_seed: int = 0) -> TrainData:
    """The training data of `spec`: `synthetic[:N]` (N synthetic samples: tests, smoke runs) or a DataConfig
    JSON file read for this stage, encoded by one of
    - `--cache DIR`: an encoded cache from `motus-fast encode` (no frame is decoded, no encoder runs);
    - `--wan DIR --vlm DIR`: the real frozen encoders, run online per sample on the training device;
    - `--encoders tiny`: tiny random in-process encoders (CPU runs and CI).
    Every mismatch (cache vs data or model, encoder widths vs model) is an error before training starts."""
    from motus_fast.train.stages import model_config_for_stage
    cfg = model_config_for_stage(model_cfg, stage)
    if spec.startswith("synthetic"):
        from motus_fast.data.synthetic import SyntheticDataset
        size = int(spec.split(":", 1)[1]) if ":" in spec else 64
        return TrainData(SyntheticDataset(cfg, size=size, seed=seed))
    import json
    from pathlib import Path

    from motus_fast.data import DataConfig
    from motus_fast.data.mixture import build_mixture
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--data {spec!r}: not `synthetic[:N]` and no such DataConfig JSON file")
    data_cfg = DataConfig.from_dict(json.loads(path.read_text())).for_stage(stage)
    # serving hints: the frame size trained on, and padding masked (training batches record exact lengths)
    extra = {"norm_mode": data_cfg.normalization, "data": data_cfg.to_dict(),
             "serve": {"image_size": [data_cfg.height, data_cfg.width], "attend_padding": False}}
    if data_cfg.stats_path:
        from motus_fast.data.norm import load_stats, stats_to_json
        extra["norm_stats"] = stats_to_json(load_stats(data_cfg.stats_path))
    if cache:
        from motus_fast.data.encoded import CachedDataset, EncodedCache, describe
        mixture = build_mixture(data_cfg, read_frames=False)
        index = EncodedCache(cache).index
        encoded = EncodedCache(cache, expect=describe(index["encoders"], mixture))
        encoded.check_shards()
        dataset = CachedDataset(mixture, encoded)
        _check_cached_widths(dataset, cfg, cache)
        extra["encoders"] = index["encoders"]
        return TrainData(dataset, mixture=mixture, extra=extra)
    import torch

    from motus_fast.data.cli import encoder_dtype as to_dtype
    from motus_fast.data.encode import EncodedDataset
    from motus_fast.encoders.load import training_encoders
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc, desc = training_encoders(cfg, stage != 1, wan=wan, vlm=vlm, t5=t5, dtype=to_dtype(encoder_dtype),
                                  seed=encoder_seed, device=device)
    mixture = build_mixture(data_cfg, vlm_prompt=enc.vlm_prompt if enc.vlm_dim is not None else None)
    extra["encoders"] = desc
    return TrainData(EncodedDataset(mixture, enc), mixture=mixture, extra=extra)


def _check_cached_widths(dataset, cfg, where: str) -> None:
    fb = dataset[(0, 0)]
    pairs = [("latent channels", fb.video.shape[1], "video.in_channels", cfg.video.in_channels),
             ("text width", fb.cond.text.shape[-1], "video.text_dim", cfg.video.text_dim)]
    if fb.cond.vlm is not None:
        pairs.append(("VLM width", fb.cond.vlm.shape[-1], "und.vlm_dim", cfg.und.vlm_dim))
    for what, got, field, want in pairs:
        if got != want:
            raise SystemExit(f"--cache {where}: the cached {what} is {got}, the model's {field} is {want}")


def cmd_train(args) -> None:
    from motus_fast.config import config_from_args, parse_overrides
    from motus_fast.config import TrainConfig
    from motus_fast.train.distributed import shutdown
    from motus_fast.train.trainer import Trainer

    model_cfg = config_from_args(args)
    train_cfg = TrainConfig().override(parse_overrides(args.train))
    data = build_dataset(args.data, model_cfg, train_cfg.stage, train_cfg.seed, cache=args.cache, wan=args.wan,
                         vlm=args.vlm, t5=args.t5, encoder_dtype=args.encoder_dtype, encoder_seed=args.encoder_seed)
    workers = args.workers
    if args.wan and workers:             # online encoders live on the training device, in this process
        print("motus-fast train: --wan/--vlm encode online in the loader process; --workers set to 0")
        workers = 0
    try:
        Trainer(model_cfg, train_cfg, data.dataset, args.out, collate_fn=data.collate_fn, num_workers=workers,
                extra=data.extra, mixture=data.mixture).run(resume=args.resume)
    finally:
        shutdown()


def cmd_plan(args) -> None:
    import json

    from motus_fast.config import config_from_args, parse_overrides
    from motus_fast.config import TrainConfig
    from motus_fast.train.plan import StepShape, human_bytes, plan_memory

    train_cfg = TrainConfig().override({**parse_overrides(args.train), "stage": args.stage})
    try:
        shapes = [StepShape(b, args.video_frames, tuple(args.image_size), args.vlm_tokens) for b in args.batch]
    except ValueError as e:
        raise SystemExit(f"motus-fast plan: {e}") from None
    if args.world_size < 2:
        raise SystemExit("motus-fast plan: --world-size must be >= 2 (the plan is of FSDP2 training; one process "
                         "trains unsharded)")
    rows = []
    for shape in shapes:
        plan = plan_memory(config_from_args(args), train_cfg, args.world_size, shape)
        rows.append(plan.to_dict() | {"fits": plan.fits(args.gpu_gib)})
        if not args.json:
            print(plan.report())
            print(f"  -> {'fits' if rows[-1]['fits'] else 'does not fit'} in {args.gpu_gib:g} GiB with 10% headroom")
    if args.json:
        print(json.dumps(rows))
    elif len(rows) > 1:
        print("batch per GPU: " + ", ".join(f"{r['shape']['batch']}: {human_bytes(r['peak'])}"
                                            f"{'' if r['fits'] else ' (too big)'}" for r in rows))


def register(sub) -> None:
    from motus_fast.config import add_config_args

    p = sub.add_parser("plan", help="peak GPU memory per rank of FSDP2 training, traced on the CPU (fake tensors)")
    add_config_args(p, "motus-8b")
    p.add_argument("--world-size", type=int, required=True, help="number of GPUs the model is sharded over (>= 2)")
    p.add_argument("--batch", type=int, nargs="+", required=True, help="samples per GPU (several: one plan each)")
    p.add_argument("--video-frames", type=int, default=8, help="future frames per sample (upstream num_video_frames)")
    p.add_argument("--image-size", type=int, nargs=2, default=[384, 320], metavar=("H", "W"),
                   help="frame size (upstream video_height video_width)")
    p.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--vlm-tokens", type=int, default=None,
                   help="VLM tokens per sample (default: (H/32)(W/32) image tokens + 30 prompt tokens)")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --train activation_checkpointing=false")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to check the plan against")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("train", help="train Motus (stage 1, 2 or 3); runs under torchrun for several processes")
    add_config_args(p, "tiny")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --train stage=2 --train steps=500 (repeatable)")
    p.add_argument("--data", default="synthetic", help="`synthetic[:N]` or a DataConfig JSON file")
    p.add_argument("--encoders", default="tiny", choices=["tiny"], help="without --cache/--wan: tiny random "
                   "in-process encoders (tests, smoke runs)")
    p.add_argument("--cache", metavar="DIR", help="an encoded cache from `motus-fast encode` (the fast path)")
    from motus_fast.data.cli import add_encoder_args
    add_encoder_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, metrics, tensorboard)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.set_defaults(func=cmd_train)
