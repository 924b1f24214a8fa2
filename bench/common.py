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
from typing import Callable

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
