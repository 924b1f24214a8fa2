"""`motus-fast stats` (normalisation statistics) and `motus-fast encode-text` (the umT5 cache).

    motus-fast stats --dataset /data/robotwin --dataset /data/aloha --out stats.json
    motus-fast stats --config data.json --out stats.json            # the datasets of a DataConfig JSON
    motus-fast encode-text --config data.json --text-encoder tiny --out text_cache.safetensors
"""

from __future__ import annotations

import json


def _specs(args) -> tuple:
    from motus_fast.data.config import DataConfig, DatasetSpec

    if args.config:
        cfg = DataConfig.from_dict(json.loads(open(args.config).read()))
        return cfg.datasets, cfg.with_state
    if not args.dataset:
        raise SystemExit("give --dataset ROOT (repeatable) or --config DATA.json")
    specs = tuple(DatasetSpec(root=r, format=args.format, state_key=args.state_key, action_key=args.action_key,
                              actions=args.actions, latent_dir=args.latent_dir) for r in args.dataset)
    return specs, not getattr(args, "no_state", False)


def _add_dataset_args(p) -> None:
    p.add_argument("--dataset", action="append", default=[], metavar="ROOT",
                   help="a LeRobot v3 or upstream RoboTwin dataset root (repeatable)")
    p.add_argument("--config", metavar="JSON", help="a DataConfig JSON (its datasets replace --dataset)")
    p.add_argument("--format", default="auto", choices=["auto", "lerobot", "robotwin"])
    p.add_argument("--state-key", default=None)
    p.add_argument("--action-key", default=None)
    p.add_argument("--actions", default="dataset", choices=["dataset", "latent", "none"])
    p.add_argument("--latent-dir", default=None, help="latent-action store (default <root>/latent_actions)")


def cmd_stats(args) -> None:
    from motus_fast.data.dataset import compute_dataset_stats
    from motus_fast.data.norm import save_stats

    specs, with_state = _specs(args)
    stats = {}
    for spec in specs:
        s = compute_dataset_stats(spec, with_state=with_state)
        stats[spec.display_name] = s
        for role in ("state", "action"):
            f = getattr(s, role)
            if f is not None:
                print(f"{spec.display_name} {role} ({f.key}, {f.dim} dims, {f.count} rows): "
                      f"min {f.min.min():.4g} max {f.max.max():.4g} mean |{abs(f.mean).mean():.4g}|")
    path = save_stats(stats, args.out)
    print(f"wrote {path}")


def cmd_encode_text(args) -> None:
    import torch

    from motus_fast.config import config_from_args
    from motus_fast.encoders.registry import build_text_encoder
    from motus_fast.data.source import open_source
    from motus_fast.data.text_cache import build_text_cache

    texts: set[str] = set()
    if args.instructions:
        texts |= {line.strip() for line in open(args.instructions, encoding="utf-8") if line.strip()}
    if args.dataset or args.config:
        specs, _ = _specs(args)
        for spec in specs:
            if spec.instruction is not None:
                texts.add(spec.instruction)
                continue
            kwargs = {k: getattr(spec, k) for k in ("episodes", "tasks") if getattr(spec, k) is not None}
            source = open_source(spec.root, spec.format, **kwargs)
            for e in range(len(source.episodes)):
                texts.update(source.instructions(e))
    if not texts:
        raise SystemExit("no instructions found (give --dataset, --config or --instructions)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    encoder = build_text_encoder(args.text_encoder, config_from_args(args), device=args.device, dtype=dtype)
    path = build_text_cache(sorted(texts), encoder, args.out, batch_size=args.batch_size,
                            encoder_name=args.text_encoder)
    print(f"encoded {len(texts)} unique instruction(s) with {args.text_encoder!r} -> {path}")


def register(sub) -> None:
    from motus_fast.config import add_config_args

    p = sub.add_parser("stats", help="state/action normalisation statistics of datasets -> stats.json")
    _add_dataset_args(p)
    p.add_argument("--no-state", action="store_true", help="skip the state (pretrain layout)")
    p.add_argument("--out", required=True, metavar="JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("encode-text", help="cache umT5 states per unique instruction (safetensors)")
    _add_dataset_args(p)
    p.add_argument("--instructions", metavar="TXT", help="more instructions, one per line")
    p.add_argument("--text-encoder", default="tiny", help="a registered text encoder (tiny, ...) or module:function")
    add_config_args(p, "tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, metavar="SAFETENSORS")
    p.set_defaults(func=cmd_encode_text)
