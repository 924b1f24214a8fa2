"""NVTX ranges (motus_fast/ops/profiling.py) around the public ops, each Motus layer and each expert's part of a
layer: emitted, balanced and named with MOTUS_NVTX=1; absent (the functions undecorated) without it. Runs in
subprocesses: the switch is read at import."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FAKE_NVTX = """
calls = []
def push_range(name): calls.append(("push", name))
def pop_range(): calls.append(("pop", None))
"""

SCRIPT = textwrap.dedent("""
    import torch, nvtx
    from motus_fast.config import get_preset
    from motus_fast.model import Conditioning, Motus
    from motus_fast.model.wan import VideoLayer
    from motus_fast.ops import adaln_modulate, euler_step, joint_attention
    x = torch.randn(1, 4, 8)
    adaln_modulate(x, x[:, :1], x[:, :1], 1e-6)
    q = [torch.randn(3, 2, 64)]
    joint_attention(q, q, q, [torch.tensor([0, 3], dtype=torch.int32)])
    euler_step([x], [x], torch.tensor(-0.1))
    print(repr(nvtx.calls))
    nvtx.calls.clear()
    torch.manual_seed(0)
    model = Motus(get_preset("tiny").override({"num_layers": 2})).eval()
    cond = Conditioning(text=torch.randn(1, 5, 64), vlm=torch.randn(1, 3, 96), state=torch.randn(1, 14))
    with torch.no_grad():
        model(torch.randn(1, 48, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 14), torch.tensor([300.0]),
              cond)
    print(repr(nvtx.calls))
    print(hasattr(adaln_modulate, "__wrapped__"), hasattr(VideoLayer.attention_inputs, "__wrapped__"))
""")


@pytest.fixture(scope="module", params=[True, False], ids=["on", "off"])
def ranges(request, tmp_path_factory):
    """-> (ranges of three op calls, ranges of a 2-layer tiny model forward, whether the functions are wrapped)"""
    tmp = tmp_path_factory.mktemp("nvtx")
    (tmp / "nvtx.py").write_text(FAKE_NVTX)
    env = {k: v for k, v in os.environ.items() if k not in ("MOTUS_NVTX", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp), str(Path(__file__).resolve().parents[2])]),
               MOTUS_BACKEND="reference")
    if request.param:
        env["MOTUS_NVTX"] = "1"
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    op_calls, model_calls, wrapped = r.stdout.strip().splitlines()[-3:]
    return request.param, eval(op_calls), eval(model_calls), wrapped.split()


def test_op_ranges_are_emitted_balanced_and_named(ranges):
    on, calls, _, wrapped = ranges
    if not on:
        assert calls == [] and wrapped == ["False", "False"]    # off by default, and free: nothing wrapped
        return
    assert wrapped == ["True", "True"]
    pushes = [name for kind, name in calls if kind == "push"]
    assert pushes == ["motus_fast.adaln_modulate", "motus_fast.joint_attention", "motus_fast.euler_step"]
    assert [kind for kind, _ in calls] == ["push", "pop"] * 3


def test_model_ranges_per_layer_and_stream_in_order(ranges):
    """Two tiny layers: each a MotusBlock range holding, in the order the layer runs them, every expert's
    pre-attention part, the two joint ops, and every expert's post-attention part (none for und in the last layer,
    which has no und queries). The ops inside the expert parts have their own ranges, nested."""
    on, _, calls, _ = ranges
    if not on:
        assert calls == []
        return
    stack = []
    for kind, name in calls:                          # balanced, and every stream range inside a layer's
        if kind == "push":
            assert name.startswith("motus_fast.") or name == "MotusBlock" or "MotusBlock" in stack, name
            stack.append(name)
        else:
            stack.pop()
    assert stack == []
    layer = ["MotusBlock", "video.pre_attention", "action.pre_attention", "und.pre_attention",
             "motus_fast.qk_norm_rope", "motus_fast.joint_attention", "video.post_attention", "action.post_attention"]
    structural = [n for k, n in calls if k == "push" and (not n.startswith("motus_fast.") or n in layer)]
    assert structural == layer + ["und.post_attention"] + layer
