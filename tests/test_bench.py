"""The bench suite's tools: the host-overhead tool must stub every Triton launch while it times and restore them
after; the GPU session script must run every phase (its --dry-run, on the CPU)."""

import json

import pytest
import torch

from kernel_checks import DEVICE, cpu_interpreted, interpreted


@interpreted
def test_host_overhead_stubs_launches_and_restores_them(tmp_path, triton_backend, poisoned_outputs):
    from bench.host_overhead import main, stubbed_launches
    from motus_fast.ops.flow_step import euler_step, euler_step_reference

    x, v = torch.randn(2, 4, 3, 2, 2, device=DEVICE), torch.randn(2, 4, 3, 2, 2, device=DEVICE)
    dt = torch.tensor(-0.25, device=DEVICE)
    with stubbed_launches():
        stubbed = euler_step([x], [v], dt)[0]
    assert torch.isnan(stubbed).all()                                   # no kernel wrote the (NaN-poisoned) output
    torch.testing.assert_close(euler_step([x], [v], dt)[0], euler_step_reference([x], [v], dt)[0])  # restored

    main(["--iters", "2", "--out-dir", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("host_overhead_*.json")).read_text())["rows"]
    assert len(rows) == 10 and {r["grad mode"] for r in rows} == {True, False}
    assert all(r["public op us"] > 0 and r["bare custom op us"] > 0 for r in rows)


@pytest.mark.slow   # ~40 s on the 2-core CPU machine: five Python processes, each importing torch
def test_gpu_session_dry_run_runs_every_phase(tmp_path):
    """scripts/gpu_session.sh --dry-run: every phase at tiny size on the CPU, each phase's results in the tarball,
    and the phase limits fit one 10-minute device call (<= 9 minutes)."""
    import os
    import re
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", "scripts/gpu_session.sh", "--dry-run"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    phases = re.findall(r"== (\w+): rc=(\d+) in \d+ s \(limit (\d+)\)", (tmp_path / "summary.txt").read_text())
    assert [p for p, _, _ in phases] == ["env", "latency", "attention", "ops", "tests"]
    assert all(rc == "0" for _, rc, _ in phases), phases
    assert sum(int(limit) for _, _, limit in phases) <= 540
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"attention_table.json", "tests.xml"} <= names
    assert any(n.startswith("latency_") for n in names) and any(n.startswith("ops_launches") for n in names)


@interpreted
def test_attention_profile_writes_a_trace_and_a_kernel_table(tmp_path):
    from bench.attention import main

    main(["--profile", "--shapes", "tiny", "--out-dir", str(tmp_path)])
    events = json.loads((tmp_path / "attention_trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"bench tiny triton", "bench tiny sdpa"} <= names          # one range per candidate
    rows = json.loads(next(tmp_path.glob("attention_profile_*.json")).read_text())["rows"]
    assert rows and all(r["total_ms"] > 0 and r["calls"] >= 1 for r in rows)


def test_latency_profile_writes_a_trace_and_a_kernel_table(tmp_path):
    from bench.latency import main

    main(["--profile", "--profile-requests", "2", "--modes", "vla", "--requests", "1", "--warmup", "0", "--steps", "1",
          "--device", "cpu", "--out-dir", str(tmp_path)])
    events = json.loads((tmp_path / "latency_trace.json").read_text())["traceEvents"]
    assert {"request vla 0", "request vla 1"} <= {e.get("name") for e in events}      # one range per request
    rows = json.loads(next(tmp_path.glob("latency_profile_*.json")).read_text())["rows"]
    matmul = [r for r in rows if r["kernel"] in ("aten::addmm", "aten::mm")]
    assert matmul and all(r["tflops"] > 0 for r in matmul)                 # the profiler's FLOP estimate is used
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    shares = [r["pct_time"] / r["total_ms"] for r in rows]                  # one constant: a share of one total
    assert max(shares) - min(shares) < 1e-9 and sum(r["pct_time"] for r in rows) <= 100 + 1e-9


@cpu_interpreted   # (the CPU's candidates: triton, sdpa, flex)
def test_tune_keeps_what_it_measured_when_cut_off(tmp_path, monkeypatch):
    """bench.attention --tune writes the dispatch table after every timed candidate, and times flex (compiling per
    shape on a GPU) after every other candidate of every key: a GPU session's time limit that cuts the phase
    loses only what was not yet measured, flex first."""
    import bench.attention as BA

    calls = []

    def cut_off_at_the_fifth(fn, warmup, iters):
        if len(calls) == 4:
            raise KeyboardInterrupt("the phase's time limit")
        calls.append(1)
        fn()
        return {"median_ms": float(len(calls))}

    monkeypatch.setattr(BA, "time_fn", cut_off_at_the_fifth)
    table = tmp_path / "table.json"
    with pytest.raises(KeyboardInterrupt):          # CPU candidates: triton, sdpa (all, then masked), then flex
        BA.tune(BA.CPU_SHAPES[:1], 0, 1, torch.float32, table)
    entries = json.loads(table.read_text())["entries"]
    assert sorted(e["shape_class"] for e in entries) == ["all/s", "masked/s"]
    for e in entries:
        assert set(e["median_ms"]) == {"triton", "sdpa"}
        assert e["choice"] == min(e["median_ms"], key=e["median_ms"].get)
