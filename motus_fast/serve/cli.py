"""`motus-fast serve`: load a checkpoint once and serve it as an openpi-compatible websocket policy; `motus-fast
check`: what `serve` would load, from headers only, and every problem found, before anything heavy runs."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("motus_fast")


def _add_policy_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="our checkpoint directory, or an official checkpoint "
                     "(mp_rank_00_model_states.pt, a DeepSpeed directory, .bin/.pt/.safetensors)")
    src.add_argument("--preset", help="serve a RANDOMLY INITIALISED model of this preset (testing only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--preset)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (--preset)")
    p.add_argument("--upstream-config", metavar="JSON", help="upstream config of an official checkpoint")
    p.add_argument("--wan", metavar="DIR", help="Wan2.2-TI2V-5B folder, original release (Wan2.2_VAE.pth, "
                   "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) or diffusers layout (vae/, text_encoder/, "
                   "tokenizer/): the VAE and umT5")
    p.add_argument("--vlm", metavar="DIR", help="Qwen3-VL-2B-Instruct folder: config, tokenizer, image processor and "
                   "chat template (weights from the checkpoint when it carries them)")
    p.add_argument("--t5", metavar="PATH", help="a umT5 encoder (file or folder) instead of the one in --wan")
    p.add_argument("--encoders", choices=["auto", "real", "checkpoint", "stub"], default="auto",
                   help="real: --wan/--vlm; checkpoint: stand-ins shipped in our checkpoint directory (the demo's "
                   "patch-PCA VAE); stub: deterministic stand-ins; auto: real if --wan is given, else checkpoint if "
                   "the directory ships encoders, else stub")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on cuda, fp32 on cpu")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over websockets (openpi-client compatible)")
    _add_policy_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--api-key-env", metavar="VAR", help="require the API key stored in this environment variable")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's)")
    p.add_argument("--shift", type=float, default=None, help="sampling grid shift (default: the config's)")
    p.add_argument("--num-frames", type=int, default=None, help="latent frames of the video stream (incl. "
                   "condition; default: the checkpoint's serving hints, else 2)")
    p.add_argument("--execute-steps", type=int, default=None, help="actions a client executes per chunk "
                   "(published in the metadata; default: the whole horizon)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size (default: the checkpoint's serving hints, else 64 64)")
    p.add_argument("--norm-mode", default=None, help="override the checkpoint's normalization mode")
    p.add_argument("--norm-dataset", default=None, help="which dataset's statistics to use")
    p.add_argument("--max-message-mb", type=float, default=16.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact", help="denoise loop options "
                   "(motus_fast.flow.SAMPLERS): exact, or fast (approximate; README 'Sampler options')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription on "
                   "busy CPU machines)")
    p.add_argument("--instruction-cache", type=int, default=64, help="instructions kept in the LRU cache")
    limits = p.add_argument_group("limits (hostile clients, fleet load; default: ServeConfig's)")
    limits.add_argument("--max-unauthenticated", type=int, help="connections still owing their key message")
    limits.add_argument("--max-request-cost", type=int, help="batch x latent frames x steps (x 2 with frames)")
    limits.add_argument("--max-queued-requests", type=int, help="beyond: 'busy, retry after'")
    limits.add_argument("--batch-window-ms", type=float, help="micro-batching window (0: no batching)")
    limits.add_argument("--send-timeout-s", type=float, help="drop a client that does not read its reply")
    limits.add_argument("--shutdown-deadline-s", type=float, help="SIGTERM: time for in-flight requests")
    limits.add_argument("--cache-budget-mb", type=float, nargs=2, metavar=("INSTRUCTIONS", "OBSERVATIONS"),
                        help="conditioning cache budgets (default: a share of the device's memory)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="preflight: what `serve` would load (headers only) and every problem found")
    _add_policy_args(p)
    p.set_defaults(func=cmd_check)


def spec_from_args(args):
    """The ``PolicySpec`` of parsed `serve` / `check` arguments."""
    from motus_fast.config import parse_overrides
    from motus_fast.serve.build import PolicySpec

    def opt(name, default=None):
        return getattr(args, name, default)
    try:
        return PolicySpec(
            checkpoint=args.checkpoint, preset=args.preset, overrides=parse_overrides(args.set), seed=args.seed,
            upstream_config=args.upstream_config, encoders=args.encoders, wan=args.wan, vlm=args.vlm, t5=args.t5,
            device=args.device, dtype=args.dtype, steps=opt("steps"), shift=opt("shift"),
            num_frames=opt("num_frames"), execute_steps=opt("execute_steps"),
            image_size=tuple(args.image_size) if opt("image_size") else None, norm_mode=opt("norm_mode"),
            norm_dataset=opt("norm_dataset"),
            cuda_graphs={"auto": None, "on": True, "off": False}[opt("cuda_graphs", "auto")],
            threads=opt("threads"), instruction_cache=opt("instruction_cache", 64), sampler=opt("sampler", "exact"))
    except ValueError as e:
        raise SystemExit(f"motus-fast {args.command}: {e}") from None


def cmd_check(args) -> None:
    import time

    from motus_fast.serve.build import check_policy

    t = time.perf_counter()
    spec = spec_from_args(args)
    report = check_policy(spec)
    print(f"motus-fast check: {spec.checkpoint or 'random ' + spec.preset} with {spec.encoder_kind} encoders "
          f"on {spec.torch_device()} ({(time.perf_counter() - t):.1f} s)")
    print(report.render())
    if not report.ok:
        raise SystemExit(1)


def _limits(args) -> dict:
    """The ServeConfig limits given on the command line."""
    names = ("max_unauthenticated", "max_request_cost", "max_queued_requests", "batch_window_ms", "send_timeout_s",
             "shutdown_deadline_s")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "cache_budget_mb", None):
        out["instruction_cache_bytes"], out["observation_cache_bytes"] = (int(mb * 2**20) for mb in args.cache_budget_mb)
    return out


def cmd_serve(args) -> None:
    from motus_fast.serve.build import build_policy
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.server import PolicyServer
    from motus_fast.weights.mapping import CheckpointError

    spec = spec_from_args(args)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: the environment variable is not set or empty")
    server = ServeConfig(host=args.host, port=args.port, api_key=api_key,
                         max_message_bytes=int(args.max_message_mb * 2**20), max_connections=args.max_connections,
                         max_batch=args.max_batch, **_limits(args))
    try:
        policy, config, name = build_policy(spec, server)
    except CheckpointError as e:
        raise SystemExit(f"motus-fast serve: {e}") from None
    running = PolicyServer(policy, config)

    def ready(port: int) -> None:
        print(f"motus-fast serve: {name} listening on ws://{config.host}:{port} "
              f"(healthz: http://{config.host}:{port}/healthz)", flush=True)
        sys.stdout.flush()
    running.serve_forever(ready)
