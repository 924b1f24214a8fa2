"""`motus-fast serve`: load a checkpoint once and serve it as an openpi-compatible websocket policy."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("motus_fast")
DTYPES = ("fp32", "bf16", "fp16")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over websockets (openpi-client compatible)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="our checkpoint directory, or an official checkpoint")
    src.add_argument("--preset", help="serve a RANDOMLY INITIALISED model of this preset (testing only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--preset)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (--preset)")
    p.add_argument("--upstream-config", metavar="JSON", help="upstream config of an official checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--api-key-env", metavar="VAR", help="require the API key stored in this environment variable")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's)")
    p.add_argument("--shift", type=float, default=None, help="sampling grid shift (default: the config's)")
    p.add_argument("--num-frames", type=int, default=None, help="latent frames of the video stream (incl. "
                   "condition; default: the checkpoint's serving hints, else 2)")
    p.add_argument("--execute-steps", type=int, default=None, help="actions a client executes per chunk "
                   "(published in the metadata; default: the whole horizon)")
    p.add_argument("--encoders", choices=["auto", "stub", "checkpoint"], default="auto",
                   help="checkpoint: the encoders shipped in the checkpoint directory (encoders.safetensors, e.g. the "
                   "demo's patch-PCA VAE); stub: deterministic stand-ins for the VAE/umT5/VLM; auto: checkpoint if "
                   "the directory has them, else stub")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="frame size (default: the checkpoint's serving hints, else 64 64)")
    p.add_argument("--norm-mode", default=None, help="override the checkpoint's normalization mode")
    p.add_argument("--norm-dataset", default=None, help="which dataset's statistics to use")
    p.add_argument("--max-message-mb", type=float, default=16.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
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


def build_policy(args):
    """The engine + policy + server config for parsed `serve` arguments (also used by bench/latency.py)."""
    import torch

    from motus_fast.cli import parse_overrides
    from pathlib import Path

    from motus_fast.infer import InferenceEngine, StubEncoders
    from motus_fast.infer.encoders import PatchPCAEncoders
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.normalization import Normalizer
    from motus_fast.serve.policy import MotusPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    extra: dict = {}
    if args.checkpoint:
        from motus_fast.infer.engine import load_model
        model, extra = load_model(args.checkpoint, dtype=dtype, device=device, upstream_config=args.upstream_config)
        name = str(args.checkpoint)
    else:
        from motus_fast.config import get_preset
        from motus_fast.model import Motus
        torch.manual_seed(args.seed)
        with torch.device(device):          # initialise where it runs (motus-8b in fp32 is 32 GB)
            model = Motus(get_preset(args.preset).override(parse_overrides(args.set)))
        model = model.to(dtype)
        name = f"random {args.preset}"
        log.warning("serving a RANDOMLY INITIALISED %s model (no --checkpoint): its actions mean nothing",
                    args.preset)
    hints = extra.get("serve", {})       # written by trainers that know the data geometry (e.g. the demo)
    image_size = tuple(args.image_size or hints.get("image_size", (64, 64)))
    num_frames = args.num_frames or hints.get("num_frames", 2)
    shipped = Path(args.checkpoint) / PatchPCAEncoders.FILENAME if args.checkpoint else None
    if args.encoders == "checkpoint" or (args.encoders == "auto" and shipped is not None and shipped.is_file()):
        if shipped is None or not shipped.is_file():
            raise SystemExit(f"--encoders checkpoint: {shipped} not found")
        encoders = PatchPCAEncoders.load(model.cfg, shipped, device=device)
        if tuple(encoders.image_size) != image_size:
            raise SystemExit(f"the checkpoint's encoders take {encoders.image_size} frames, not {image_size}")
        log.warning("encoders: %s (patch-PCA VAE fitted to the training frames + stub prompt/VLM encoders; not "
                    "the real Wan VAE, umT5 or Qwen3-VL)", shipped)
    else:
        log.warning("encoders: stub (deterministic stand-ins for the VAE, umT5 and the VLM; not real models)")
        encoders = StubEncoders(model.cfg, image_size, device=device)
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    engine = InferenceEngine(model, encoders, steps=args.steps, shift=args.shift, cuda_graphs=graphs,
                             instruction_cache=args.instruction_cache)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: the environment variable is not set or empty")
    config = ServeConfig(host=args.host, port=args.port, api_key=api_key,
                         max_message_bytes=int(args.max_message_mb * 2**20), max_connections=args.max_connections,
                         num_frames=num_frames, execute_steps=args.execute_steps, max_batch=args.max_batch,
                         **_limits(args))
    normalizer = Normalizer.from_extra(extra, mode=args.norm_mode, dataset=args.norm_dataset)
    return MotusPolicy(engine, config, normalizer), config, name


def _limits(args) -> dict:
    """The ServeConfig limits given on the command line."""
    names = ("max_unauthenticated", "max_request_cost", "max_queued_requests", "batch_window_ms", "send_timeout_s",
             "shutdown_deadline_s")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "cache_budget_mb", None):
        out["instruction_cache_bytes"], out["observation_cache_bytes"] = (int(mb * 2**20) for mb in args.cache_budget_mb)
    return out


def cmd_serve(args) -> None:
    from motus_fast.serve.server import PolicyServer

    policy, config, name = build_policy(args)
    server = PolicyServer(policy, config)

    def ready(port: int) -> None:
        print(f"motus-fast serve: {name} listening on ws://{config.host}:{port} "
              f"(healthz: http://{config.host}:{port}/healthz)", flush=True)
        sys.stdout.flush()
    server.serve_forever(ready)
