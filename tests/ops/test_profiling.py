"""NVTX ranges around the public ops (motus_fast/ops/profiling.py): emitted, balanced and named with MOTUS_NVTX=1;
absent (the functions undecorated) without it. Runs in subprocesses: the switch is read at import."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

FAKE_NVTX = """
calls = []
def push_range(name): calls.append(("push", name))
def pop_range(): calls.append(("pop", None))
"""

SCRIPT = textwrap.dedent("""
    import torch, nvtx
    from motus_fast.ops import adaln_modulate, euler_step, joint_attention
    x = torch.randn(1, 4, 8)
    adaln_modulate(x, x[:, :1], x[:, :1], 1e-6)
    q = [torch.randn(3, 2, 64)]
    joint_attention(q, q, q, [torch.tensor([0, 3], dtype=torch.int32)])
    euler_step([x], [x], torch.tensor(-0.1))
    print(repr(nvtx.calls))
    print(hasattr(adaln_modulate, "__wrapped__"))
""")


def run(tmp_path, nvtx_on: bool):
    (tmp_path / "nvtx.py").write_text(FAKE_NVTX)
    env = {k: v for k, v in os.environ.items() if k not in ("MOTUS_NVTX", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])]),
               MOTUS_BACKEND="reference")
    if nvtx_on:
        env["MOTUS_NVTX"] = "1"
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    calls, wrapped = r.stdout.strip().splitlines()[-2:]
    return eval(calls), wrapped == "True"


def test_ranges_are_emitted_balanced_and_named(tmp_path):
    calls, wrapped = run(tmp_path, True)
    assert wrapped
    pushes = [name for kind, name in calls if kind == "push"]
    assert pushes == ["motus_fast.adaln_modulate", "motus_fast.joint_attention", "motus_fast.euler_step"]
    assert [kind for kind, _ in calls] == ["push", "pop"] * 3


def test_off_by_default_and_free(tmp_path):
    calls, wrapped = run(tmp_path, False)
    assert calls == [] and not wrapped
