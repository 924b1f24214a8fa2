"""The policy server under attack, measured from outside: event-loop stall and peak memory under a decode bomb,
memory held after four flooding clients.

    python -m bench.serve_hostile                                  # this checkout's server
    python -m bench.serve_hostile --server-pythonpath /tmp/old     # the same attacks on another checkout

The server runs as `motus-fast serve` in a subprocess (tiny 1-layer model, stub encoders, an API key, default
limits); this process is the attacker on 127.0.0.1, so the server's memory is read from /proc/<pid>/status alone
(VmRSS now, VmHWM the peak since /proc/<pid>/clear_refs was reset). The stall is the worst /healthz round trip
while the attack runs minus the median one before it (every client shares the event loop that answers /healthz).

- decode bomb: a 12 MB msgpack of nested arrays of empty maps (each container small, ~12 million objects), sent
  by a client with the key, then as the first message of a connection without the key;
- flood: four clients send 16 MiB messages as fast as they can for a few seconds without reading replies (without
  the key, then with it), then leave; "held" is the server's RSS 2 s later minus before.
Writes bench/results/serve_hostile_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import logging
import secrets
import site
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import write_results

MB = 2**20


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


def peak_mb(pid: int) -> float:
    return status_kb(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def decode_bomb(size: int = 12 * 10**6) -> bytes:
    """An array of 4096 arrays of empty maps: no container above 4096 entries, ~`size` objects in all."""
    per = min(4096, size // 4096 - 3)
    inner = b"\xdc" + per.to_bytes(2, "big") + b"\x80" * per
    return b"\xdc" + (4096).to_bytes(2, "big") + inner * 4096


@contextlib.contextmanager
def server_process(key: str, pythonpath: str | None):
    env = dict(os.environ, MOTUS_BACKEND="reference", OMP_NUM_THREADS="1", MOTUS_BENCH_KEY=key)
    python, cwd = [sys.executable], None
    if pythonpath:
        # -S: no site hooks, so the editable install of this checkout cannot shadow the other tree (run from a
        # neutral directory for the same reason); the installed packages come back through PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join([str(Path(pythonpath).resolve())] + site.getsitepackages())
        python, cwd = [sys.executable, "-S"], tempfile.gettempdir()
    proc = subprocess.Popen(python + ["-m", "motus_fast.cli", "serve", "--preset", "tiny", "--set",
                             "num_layers=1", "--port", "0", "--threads", "1", "--steps", "1", "--encoders", "stub",
                             "--image-size", "32", "32", "--api-key-env", "MOTUS_BENCH_KEY"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = ""
        while "listening on ws://" not in line:
            line = lines.get(timeout=180)
        yield proc, int(line.split("listening on ws://")[1].split()[0].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthz_ms(port: int) -> float:
    from motus_fast.serve.client import healthz
    t = time.perf_counter()
    healthz("127.0.0.1", port, timeout=60)
    return (time.perf_counter() - t) * 1e3


class Prober:
    """/healthz round trips, back to back, on a thread, while an attack runs."""

    def __init__(self, port: int):
        self.port, self.ms, self._stop = port, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.ms.append(healthz_ms(self.port))
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.2)
        self._stop.set()
        self._thread.join()


def connect(port: int, key: str | None):
    import websockets.sync.client
    headers = {"Authorization": f"Api-Key {key}"} if key else None
    return websockets.sync.client.connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None,
                                          compression=None, open_timeout=30).__enter__()


def bomb_attack(proc, port: int, key: str | None, base_rss: float, base_health: float) -> dict:
    bomb = decode_bomb()
    reset_peak(proc.pid)
    with Prober(port) as probe:
        with contextlib.suppress(Exception):
            ws = connect(port, key)
            if key:
                ws.recv(timeout=30)                     # metadata
            ws.send(bomb)
            reply = ws.recv(timeout=60)
            print(f"  bomb ({'key' if key else 'no key'}): reply {str(reply)[:120]!r}")
        with contextlib.suppress(Exception):
            ws.close()
    return {"attack": f"12 MB decode bomb ({'with key' if key else 'first message, no key'})",
            "stall_s": (max(probe.ms) - base_health) / 1e3, "peak_mb": peak_mb(proc.pid) - base_rss,
            "held_mb": rss_mb(proc.pid) - base_rss}


def flood_attack(proc, port: int, key: str | None, base_rss: float, seconds: float) -> dict:
    junk = b"\xc1" * (16 * MB - 64)
    stop = threading.Event()
    sent = [0]

    def flood():
        while not stop.is_set():
            try:
                ws = connect(port, key)
                if key:
                    ws.recv(timeout=30)
                while not stop.is_set():
                    ws.send(junk)
                    sent[0] += 1
            except Exception:  # noqa: BLE001  (closed by the server: connect again)
                time.sleep(0.05)
            finally:
                with contextlib.suppress(Exception):
                    ws.close_socket()
    reset_peak(proc.pid)
    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    during = rss_mb(proc.pid) - base_rss
    stop.set()
    for t in threads:
        t.join(60)
    time.sleep(2.0)
    print(f"  flood ({'key' if key else 'no key'}): {sent[0]} messages of 16 MiB sent")
    return {"attack": f"4 clients flooding 16 MiB messages for {seconds:g} s ({'with key' if key else 'no key'})",
            "peak_mb": peak_mb(proc.pid) - base_rss, "during_mb": during, "held_mb": rss_mb(proc.pid) - base_rss}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server-pythonpath", default=None, help="run the server from this source tree")
    p.add_argument("--flood-seconds", type=float, default=3.0)
    p.add_argument("--name", default="serve_hostile")
    args = p.parse_args(argv)
    logging.getLogger("websockets").setLevel(logging.CRITICAL)      # the attackers' own connection errors
    from motus_fast.serve.client import MotusClient

    key = secrets.token_hex(16)
    rows = []
    with server_process(key, args.server_pythonpath) as (proc, port):
        rng = np.random.default_rng(0)
        with MotusClient("127.0.0.1", port, api_key=key) as client:         # warm: one real request
            for _ in range(3):
                client.infer({"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                              "state": np.zeros(14, np.float32), "prompt": "pick"})
        time.sleep(0.5)
        base_health = statistics.median(healthz_ms(port) for _ in range(20))
        for attack in ("bomb key", "bomb anon", "flood anon", "flood key"):
            base_rss = rss_mb(proc.pid)
            kind, who = attack.split()
            k = key if who == "key" else None
            row = (bomb_attack(proc, port, k, base_rss, base_health) if kind == "bomb"
                   else flood_attack(proc, port, k, base_rss, args.flood_seconds))
            row["server_ok_after"] = healthz_ms(port) < 60e3
            rows.append(row)
            print(row)
    notes = (f"server: {'this checkout' if not args.server_pythonpath else args.server_pythonpath}; tiny 1-layer "
             f"model, stub encoders, default limits, API key; health round trip before the attacks "
             f"{base_health:.1f} ms (median). MB = MiB of server RSS relative to just before each attack. Command: "
             f"python -m bench.serve_hostile" + (f" --server-pythonpath {args.server_pythonpath}"
                                                  if args.server_pythonpath else ""))
    write_results(args.name, rows, ["attack", "stall_s", "peak_mb", "during_mb", "held_mb", "server_ok_after"],
                  notes=notes)


if __name__ == "__main__":
    main()
