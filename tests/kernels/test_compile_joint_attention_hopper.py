"""The Hopper attention forward (kernels/joint_attention_hopper.py) compiles for sm_90a with no register spills,
shared memory within the 227 KB an sm_90 block may use, and what makes it the Hopper variant in its PTX: wgmma
(``wgmma.mma_async``) for both products and TMA (``cp.async.bulk.tensor``) for the tile loads and the output
store, from device-side descriptors (``tensormap.replace``). Compiled in a subprocess without TRITON_INTERPRET
(the interpreter replaces @triton.jit functions); the report lines (registers, instruction counts) go to the test
output."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SMEM_LIMIT = 227 * 1024

COMPILE = r"""
import json, re
from motus_fast.kernels.compile_check import aot_compile, ptxas_usage
from motus_fast.kernels.joint_attention_hopper import compile_targets

for t in compile_targets():
    ck = aot_compile(t["fn"], t["signature"], t["constexprs"], t["attrs"], 90, t["num_warps"], t["num_stages"])
    ptx = ck.asm["ptx"]
    regs, st, ld = ptxas_usage(ptx)
    print(json.dumps(dict(name=t["name"], regs=regs, spill_st=st, spill_ld=ld, smem=ck.metadata.shared,
                          warps=ck.metadata.num_warps,
                          wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                          wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\S*\.(m64n\d+k\d+)", ptx))),
                          tma_load=len(re.findall(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)),
                          tma_store=len(re.findall(r"\bcp\.async\.bulk\.tensor\.\dd\.global\.shared::", ptx)),
                          tensormap=len(re.findall(r"\btensormap\.replace", ptx)))), flush=True)
"""


def test_hopper_forward_compiles_for_sm90_with_wgmma_and_tma(capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"compile subprocess failed:\n{p.stderr[-4000:]}"
    reports = [json.loads(line) for line in p.stdout.splitlines()]
    names = [r["name"] for r in reports]
    assert any("fp16 d128" in n for n in names) and any("bf16 d128" in n for n in names), names
    with capsys.disabled():
        print("\njoint_attention_hopper sm_90 compile report:\n  " + "\n  ".join(
            f"{r['name']}: regs={r['regs']} spills(st/ld)={r['spill_st']}/{r['spill_ld']} smem={r['smem']}B "
            f"warps={r['warps']} wgmma={r['wgmma']} {'/'.join(r['wgmma_shapes'])} TMA ld/st={r['tma_load']}/"
            f"{r['tma_store']} tensormap.replace={r['tensormap']}" for r in reports))
    for r in reports:
        assert r["spill_st"] == r["spill_ld"] == 0, f"{r['name']}: register spills"
        assert r["smem"] <= SMEM_LIMIT, f"{r['name']}: shared memory {r['smem']} B > {SMEM_LIMIT} B"
        assert r["warps"] == 8, f"{r['name']}: {r['warps']} warps (two consumer warp groups need 8)"
        assert r["wgmma"] > 0, f"{r['name']}: no wgmma.mma_async in the PTX"
        assert r["tma_load"] > 0 and r["tma_store"] > 0, f"{r['name']}: no TMA loads/stores in the PTX"
        assert r["tensormap"] > 0, f"{r['name']}: no device-side descriptors (tensormap.replace)"
