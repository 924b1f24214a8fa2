"""`motus-fast` command line: demo, convert, info, ... (one sub-command per job).

Model configs come from a preset (``--preset tiny|small|motus-8b``) with dotted overrides
(``--set action.dim=256 --set num_layers=4``). Commands defined elsewhere register through COMMAND_MODULES: each
module exposes ``register(subparsers)`` and keeps heavy imports inside its handler.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from motus_fast.config import add_config_args, config_from_args

# modules that add sub-commands (each has register(subparsers))
COMMAND_MODULES: list[str] = ["motus_fast.demo", "motus_fast.train.cli", "motus_fast.weights.assemble",
                              "motus_fast.eval", "motus_fast.serve.cli", "motus_fast.data.cli",
                              "motus_fast.latent_action.cli", "motus_fast.experiments.ablations"]


def cmd_convert(args) -> None:
    import torch

    from motus_fast.weights import load_upstream, save_pretrained
    from motus_fast.weights.native import VLM_FILE, load_vlm_weights, save_vlm_weights
    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = None
    if args.preset:
        config = config_from_args(args)
    model = load_upstream(args.from_upstream, config=config, dtype=dtype, upstream_config=args.upstream_config)
    save_pretrained(model, args.out)
    vlm, where = load_vlm_weights(args.from_upstream)
    if vlm:
        save_vlm_weights(vlm, args.out)
        print(f"kept the checkpoint's VLM weights ({len(vlm)} tensors from {where}) in {args.out}/{VLM_FILE}")
    counts = model.param_counts()
    print(f"converted {args.from_upstream} -> {args.out} "
          f"({', '.join(f'{k} {v / 1e6:.1f}M' for k, v in counts.items())}; dtype {model.video.head.weight.dtype})")


def cmd_info(args) -> None:
    import torch

    from motus_fast.model import Motus
    cfg = config_from_args(args)
    with torch.device("meta"):
        model = Motus(cfg)
    counts = model.param_counts()
    print(cfg.to_json())
    for k, v in counts.items():
        print(f"{k:>6}: {v:>14,d} parameters")
    print(f"{'total':>6}: {sum(counts.values()):>14,d}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="motus-fast", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an official Motus checkpoint to our format")
    p.add_argument("--from-upstream", required=True, metavar="PATH",
                   help="mp_rank_00_model_states.pt / .bin / .safetensors, or a DeepSpeed checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--upstream-config", metavar="JSON", help="upstream config values (wan_config_json + "
                   "motus_config); without it and without --preset the sizes are read from the tensor shapes")
    p.add_argument("--preset", default=None, help="take the config from this preset instead")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="print a config and its parameter counts per expert")
    add_config_args(p, "motus-8b")
    p.set_defaults(func=cmd_info)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting collapse (50-100x) when another process shares the cores: the demo's
    # server + simulator + trainer, torchrun on a small CPU box. Passive waiting costs little; set it before the
    # sub-commands import torch (an explicit OMP_WAIT_POLICY wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
