"""End-to-end request latency of the policy server, per mode: p50 / p99 and the median of every stage.

    python -m bench.latency                                    # tiny, CPU (the numbers say nothing about a GPU)
    python -m bench.latency --preset motus-8b --device cuda --image-size 320 384 --steps 10   # on an H100
    python -m bench.latency --loopback                         # through the websocket server and our client
    python -m bench.latency --profile                          # also a torch-profiler trace + per-kernel table

Each request is a fresh observation (new image, so the VLM/VAE observation cache misses) with the same
instruction (the instruction cache hits after the first request), as in a control loop. Without --checkpoint the
model is randomly initialised (latency does not depend on the weights). The encoders are the stub encoders, so
``vae``/``text``/``vlm`` times exclude the real VAE, umT5 and Qwen3-VL: the denoise loop and the server around it
are what this measures.

``--profile`` traces ``--profile-requests`` more requests per mode, after the timed ones, with torch.profiler:
``latency_trace.json`` (open it in Perfetto; one range per request, and with ``MOTUS_NVTX=1`` the same layers
appear in Nsight Systems) and ``latency_profile_<device>.md``, the kernels by time with their share and, for
matmuls (the profiler's FLOP estimate), TFLOP/s and % of the bf16 peak.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from bench.common import kernel_table, peak_tflops, write_results

STAGES = ("preprocess", "text", "vae", "vlm", "denoise", "postprocess")


def policy_spec(args, mode_steps: int | None):
    """The served policy's settings (stub encoders: the bench measures the model and the engine)."""
    from motus_fast.config import parse_overrides
    from motus_fast.serve.build import PolicySpec

    return PolicySpec(checkpoint=args.checkpoint, preset=None if args.checkpoint else args.preset,
                      overrides=parse_overrides(args.set), encoders="stub", device=args.device, dtype=args.dtype,
                      steps=mode_steps, num_frames=args.num_frames, image_size=tuple(args.image_size),
                      cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs], threads=args.threads)


def request(rng, policy, mode: str, batch: int) -> dict:
    spec = policy.spec
    H, W = spec.image_size
    lead = (batch,) if batch > 1 else ()
    obs = {"image": rng.integers(0, 256, lead + (H, W, 3), dtype=np.uint8), "mode": mode,
           "prompt": ["pick up the cube"] * batch if batch > 1 else "pick up the cube"}
    if spec.state_dim is not None:
        obs["state"] = rng.standard_normal(lead + (spec.state_dim,)).astype(np.float32)
    if mode == "world_model":
        obs["actions"] = rng.standard_normal(lead + (spec.horizon, spec.action_dim)).astype(np.float32)
    if mode == "idm":
        obs["future_frames"] = rng.integers(0, 256, lead + (spec.frame_stride, H, W, 3), dtype=np.uint8)
    return obs


def profile_requests(call, policy, args, on_gpu: bool) -> None:
    """Trace --profile-requests requests per mode (warm: after the timed ones) in one torch.profiler session:
    latency_trace.json and the per-kernel table latency_profile_<device> (see the module docstring)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile, record_function

    from bench.common import RESULTS

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    rng = np.random.default_rng(1)
    with profile(activities=activities, with_flops=True) as prof:
        for mode in args.modes.split(","):
            for i in range(args.profile_requests):
                obs = request(rng, policy, mode, args.batch)
                with record_function(f"request {mode} {i}"):
                    call(obs)
    out = Path(args.out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "latency_trace.json"))
    print(f"wrote {out / 'latency_trace.json'}")
    write_results("latency_profile", kernel_table(prof, on_gpu, peak_tflops=peak_tflops()),
                  ["kernel", "calls", "total_ms", "ms_per_call", "pct_time", "tflops", "pct_peak"],
                  notes=f"Self {'device' if on_gpu else 'CPU'} time per kernel over {args.profile_requests} "
                        f"requests per mode ({args.modes}) after the timed ones; TFLOP/s where torch.profiler "
                        "estimates FLOPs (matmuls, convolutions); trace: latency_trace.json.",
                  out_dir=args.out_dir)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--modes", default="vla,joint,world_model,idm,video")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's, 10)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--num-frames", type=int, default=2)
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--loopback", action="store_true", help="through the websocket server and MotusClient")
    p.add_argument("--profile", action="store_true", help="also trace requests: Perfetto trace + kernel table")
    p.add_argument("--profile-requests", type=int, default=3, help="requests per mode traced by --profile")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import time

    from motus_fast.serve.build import build_policy
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.client import MotusClient
    from motus_fast.serve.schema import validate
    from motus_fast.serve.server import PolicyServer

    policy, config, name = build_policy(policy_spec(args, args.steps),
                                        ServeConfig(port=0, max_message_bytes=256 * 2**20, max_batch=64,
                                                    max_connections=4))
    engine = policy.engine
    rows = []
    running = PolicyServer(policy, config).start_in_thread() if args.loopback else None
    client = MotusClient("127.0.0.1", running.port) if running else None

    def call(obs):
        if client is not None:
            return client.infer(obs)
        return policy.infer(validate(obs, policy.spec))
    try:
        for mode in args.modes.split(","):
            rng = np.random.default_rng(0)
            for _ in range(args.warmup):
                call(request(rng, policy, mode, args.batch))
            total, stages = [], {s: [] for s in STAGES}
            for _ in range(args.requests):
                obs = request(rng, policy, mode, args.batch)
                t = time.perf_counter()
                reply = call(obs)
                total.append((time.perf_counter() - t) * 1e3)
                for s in STAGES:
                    stages[s].append(reply["server_timing"][f"{s}_ms"])
            p50, p99 = np.percentile(total, [50, 99])
            row = {"model": name, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
                   "mode": mode, "steps": engine.steps, "batch": args.batch, "requests": args.requests,
                   "path": "websocket" if client else "in-process", "p50_ms": float(p50), "p99_ms": float(p99)}
            row.update({f"{s}_p50_ms": float(np.median(v)) for s, v in stages.items()})
            rows.append(row)
            print(f"{mode:>11}: p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  (denoise p50 {row['denoise_p50_ms']:.2f} ms)",
                  flush=True)
        if args.profile:
            profile_requests(call, policy, args, engine.device.type == "cuda")
    finally:
        if client is not None:
            client.close()
        if running is not None:
            running.stop()
    graphs = engine.cache_stats().get("graphs")
    notes = ("Stub encoders: vae/text/vlm exclude the real VAE, umT5 and Qwen3-VL. Each request has a new image and "
             f"the same instruction. CUDA graphs: {graphs if graphs else 'off'}.")
    columns = ["model", "device", "dtype", "mode", "steps", "batch", "path", "p50_ms", "p99_ms"] + \
        [f"{s}_p50_ms" for s in STAGES]
    write_results(f"latency_{args.preset if not args.checkpoint else 'checkpoint'}", rows, columns, notes,
                  out_dir=args.out_dir)


if __name__ == "__main__":
    main()
