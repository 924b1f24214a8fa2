"""Shared benchmark plumbing: device description, timing (CUDA events or a CPU clock), result files.

Numbers from a CPU run only show that the suite works: they say nothing about GPU speed, and every CPU result file
says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CPU_DISCLAIMER = "CPU run: these numbers only show the benchmark runs; they say nothing about GPU performance."


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=p.name, sm=f"{p.major}{p.minor}", cuda=torch.version.cuda,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    else:
        info.update(device="cpu", gpu=None, cpu=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


def time_fn(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> dict:
    """Median/min/p90 wall time of fn() in milliseconds: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "iters": iters}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], columns: list[str], notes: str = "", out_dir: Path | None = None):
    """Write bench/results/<name>_<device>.json and .md; returns the two paths."""
    info = device_info()
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = (info.get("gpu") or "cpu").lower().replace(" ", "_")
    stem = out_dir / f"{name}_{tag}"
    if info["device"] == "cpu":
        notes = (notes + "\n\n" if notes else "") + CPU_DISCLAIMER
    stem.with_suffix(".json").write_text(json.dumps({"benchmark": name, "device": info, "notes": notes,
                                                     "rows": rows}, indent=2))
    md = [f"# {name}", "", "Device: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None), ""]
    md += [markdown_table(rows, columns), ""] + ([notes, ""] if notes else [])
    stem.with_suffix(".md").write_text("\n".join(md))
    print(markdown_table(rows, columns))
    if notes:
        print(notes)
    return stem.with_suffix(".json"), stem.with_suffix(".md")


PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0}


def peak_tflops() -> Optional[float]:
    """The dense bf16 tensor-core peak of this GPU (None on a CPU or an unlisted GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_BF16_TFLOPS.items():          # most specific names first
        if all(part in name for part in key.split()):
            return peak
    return None


def profiler_flops(ev) -> Optional[float]:
    """FLOPs per call that torch.profiler(with_flops=True) estimated for an event (matmuls, convolutions), or None."""
    return ev.flops / ev.count if getattr(ev, "flops", 0) else None


def kernel_table(prof, on_gpu: bool, flops: Callable[[object], Optional[float]] = profiler_flops,
                 peak_tflops: Optional[float] = None, top: int = 40) -> list[dict]:
    """Per-kernel rows of a finished torch.profiler run, most time first: calls, self time (device time on a GPU,
    CPU time on a CPU) in total and per call, its share of all rows' time, and where ``flops(event)`` gives the
    FLOPs per call, TFLOP/s and % of `peak_tflops`."""
    rows = []
    for ev in prof.key_averages():
        us = ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        if not us:
            continue
        row = dict(kernel=ev.key[:80], calls=ev.count, total_ms=us / 1e3, ms_per_call=us / 1e3 / ev.count)
        f = flops(ev)
        if f:
            row["tflops"] = f * ev.count / (us * 1e-6) / 1e12
            row["pct_peak"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
        rows.append(row)
    total = sum(r["total_ms"] for r in rows) or 1.0
    for r in rows:
        r["pct_time"] = 100 * r["total_ms"] / total
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:top]


@contextlib.contextmanager
def backend(name: str):
    """Run a block with MOTUS_BACKEND=name."""
    old = os.environ.get("MOTUS_BACKEND")
    os.environ["MOTUS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["MOTUS_BACKEND"]
        else:
            os.environ["MOTUS_BACKEND"] = old
