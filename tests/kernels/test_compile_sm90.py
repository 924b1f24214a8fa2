"""Every Triton kernel configuration the GPU path uses compiles for H100 (sm_90a), with no register spills and
shared memory within the 227 KB an sm_90 block may use. Each kernel module lists its configurations in
``compile_targets()``. Runs in subprocesses without TRITON_INTERPRET (the interpreter accepts code the compiler
rejects); the report lines (registers, spills, shared memory, warps) go to the test output."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SMEM_LIMIT = 227 * 1024
SHARDS = 2          # compiles are single-threaded: one process per core
VECTORISED = ("adaln",)

COMPILE_SHARD = r"""
import importlib, json, sys
from motus_fast.kernels.compile_check import compile_report

shard, shards, module = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
targets = list(importlib.import_module(f"motus_fast.kernels.{module}").compile_targets())
print(json.dumps({"total": len(targets)}), flush=True)
for i, target in enumerate(targets):
    if i % shards == shard:
        print(json.dumps(vars(compile_report(**target))), flush=True)
"""


@pytest.mark.parametrize("module", ["joint_attention", "qk_norm_rope", "adaln", "flow_step"])
def test_every_configuration_compiles_for_sm90_without_spills(module, capsys):
    from motus_fast.kernels.compile_check import CompileReport

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", COMPILE_SHARD, str(i), str(SHARDS), module], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(SHARDS)]
    reports, totals = [], set()
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"compile subprocess failed:\n{stderr[-4000:]}"
        for line in stdout.splitlines():
            item = json.loads(line)
            if "total" in item:
                totals.add(item["total"])
            else:
                reports.append(item)
    assert len(totals) == 1 and len(reports) == totals.pop() > 0, "some configurations were not compiled"
    reports.sort(key=lambda r: r["name"])
    lines = [CompileReport(**r).line() for r in reports]
    with capsys.disabled():
        print(f"\n{module} sm_90 compile report:\n  " + "\n  ".join(lines))
    spilled = [line for r, line in zip(reports, lines) if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    too_big = [r["name"] for r in reports if r["shared_mem_bytes"] > SMEM_LIMIT]
    assert not too_big, f"shared memory above {SMEM_LIMIT} B: {too_big}"
    if module in VECTORISED:   # bandwidth-bound rows: 16-byte global loads and stores, or they miss the roofline
        scalar = [line for r, line in zip(reports, lines) if not (r["vector_loads"] and r["vector_stores"])]
        assert not scalar, "no 16-byte global loads/stores:\n" + "\n".join(scalar)
