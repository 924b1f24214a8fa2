"""Policy-server throughput under concurrent clients: micro-batching vs one request at a time, in one run.

    python -m bench.serve_throughput                        # tiny model, CPU, 8 clients x 25 `vla` requests
    python -m bench.serve_throughput --clients 12 --requests 25 --window-ms 5

Two servers (in process, 127.0.0.1, the same engine and model): ``batch_window_ms=0`` (every request runs alone)
and ``batch_window_ms=--window-ms`` (compatible requests arriving within the window share one denoise loop). Each
of ``--clients`` threads runs a closed loop of ``--requests`` requests (our client, a fresh image and state each
time, one of three prompts, its own noise seed), as robots would. The two configurations alternate for
``--rounds`` rounds, so machine load drifts over both alike. Reported per configuration: requests/s (all rounds),
client round-trip p50/p99, the mean number of requests per batch; and the throughput and p99 ratios.
Writes bench/results/serve_throughput_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import numpy as np
import torch

from bench.common import write_results


def run_clients(port: int, clients: int, requests: int, image_size, seed: int) -> tuple[list[float], float, list]:
    """-> (round-trip latencies in ms, wall seconds, failures)"""
    from motus_fast.serve.client import MotusClient

    latencies, failures, lock = [], [], threading.Lock()
    conns = [MotusClient("127.0.0.1", port) for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def loop(i: int):
        rng = np.random.default_rng(seed * 1000 + i)
        start.wait()
        for n in range(requests):
            obs = {"image": rng.integers(0, 256, tuple(image_size) + (3,), dtype=np.uint8),
                   "state": rng.standard_normal(14).astype(np.float32), "prompt": ["pick", "place", "push"][n % 3],
                   "noise_seed": int(rng.integers(2**31))}
            t = time.perf_counter()
            try:
                conns[i].infer(obs)
            except Exception as e:  # noqa: BLE001  (counted and reported)
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                latencies.append((time.perf_counter() - t) * 1e3)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    return latencies, wall, failures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's, 10)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--window-ms", type=float, default=None, help="default: ServeConfig's batch_window_ms")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from motus_fast.config import get_preset
    from motus_fast.encoders import StubEncoders
    from motus_fast.infer import InferenceEngine
    from motus_fast.model import Motus
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.policy import MotusPolicy
    from motus_fast.serve.server import PolicyServer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Motus(get_preset(args.preset))
    image_size = (64, 64)
    engine = InferenceEngine(model, StubEncoders(model.cfg, image_size), steps=args.steps)
    window = ServeConfig().batch_window_ms if args.window_ms is None else args.window_ms
    configs = {"one at a time": 0.0, f"micro-batching ({window:g} ms window)": window}
    stats = {name: {"latencies": [], "wall": 0.0, "failures": [], "batches": 0, "batched": 0} for name in configs}
    for r in range(args.rounds):
        for name, w in configs.items():
            config = ServeConfig(port=0, batch_window_ms=w, max_queued_requests=max(32, args.clients))
            with PolicyServer(MotusPolicy(engine, config), config).start_in_thread() as srv:
                lat, wall, failures = run_clients(srv.port, args.clients, args.requests, image_size, seed=r)
                s = stats[name]
                s["latencies"] += lat
                s["wall"] += wall
                s["failures"] += failures
                s["batches"] += srv.server.scheduler.batches
                s["batched"] += srv.server.scheduler.batched_requests
            print(f"round {r}: {name}: {len(lat) / wall:.1f} requests/s")
    rows = []
    for name, s in stats.items():
        p50, p99 = np.percentile(s["latencies"], [50, 99])
        rows.append({"server": name, "clients": args.clients, "requests": len(s["latencies"]),
                     "failures": len(s["failures"]), "requests_per_s": len(s["latencies"]) / s["wall"],
                     "p50_ms": float(p50), "p99_ms": float(p99), "requests_per_batch": s["batched"] / s["batches"]})
    base, batched = rows
    ratio = batched["requests_per_s"] / base["requests_per_s"]
    p99_ratio = batched["p99_ms"] / base["p99_ms"]
    steps = engine.steps
    notes = (f"{args.preset} model, {steps} Euler steps, `vla`, stub encoders, {image_size[0]}x{image_size[1]} images, "
             f"torch threads {args.threads}; clients are threads of the same process. Throughput ratio "
             f"(micro-batching / one at a time): {ratio:.2f}x; p99 ratio: {p99_ratio:.2f} (goal: >= 2x at p99 no "
             f"worse, i.e. <= 1). Command: python -m bench.serve_throughput --clients {args.clients} --requests "
             f"{args.requests} --rounds {args.rounds}" + (f" --window-ms {args.window_ms:g}" if args.window_ms
                                                          is not None else ""))
    write_results("serve_throughput", rows, ["server", "clients", "requests", "failures", "requests_per_s", "p50_ms",
                                             "p99_ms", "requests_per_batch"], notes=notes)


if __name__ == "__main__":
    main()
