"""MOTUS_BACKEND=auto with the Hopper forward (``triton_hopper``, kernels/joint_attention_hopper.py) as a candidate:
where it may run (CUDA capability 9.x, a Triton with device-side descriptors, aligned strides), the one-line
fallback to ours where the table names it but it cannot run (every CPU), and the plan's wiring when it can:
eager inference runs the Hopper launcher, autograd keeps the portable kernels (one line), both with the reference's
numbers."""

import json
import logging
import os
import sys

import pytest
import torch

from kernel_checks import cpu_interpreted
from motus_fast.ops import attention_dispatch as AD
from motus_fast.ops.joint_attention import joint_attention, joint_attention_reference

JA = sys.modules["motus_fast.ops.joint_attention"]
CPU = torch.device("cpu")
MASK = [[True, True, True], [True, True, True], [False, False, True]]


def hopper_table(path, capability="cpu", dtype="fp32", classes=("all/s", "masked/s")):
    rows = [dict(op="joint_attention", capability=capability, dtype=dtype, shape_class=c, choice="triton_hopper")
            for c in classes]
    path.write_text(json.dumps({"entries": rows}))
    return path


def inputs(dtype=torch.float32, lens=(20, 3, 8), B=2, H=2, D=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = ([torch.randn(B * n, H, D, generator=g).to(dtype) for n in lens] for _ in range(3))
    cu = [torch.arange(B + 1, dtype=torch.int32) * n for n in lens]
    return q, k, v, cu


def fake_gpu(monkeypatch, major, minor=0):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return torch.device("cuda")


def test_hopper_candidate_is_in_the_table_vocabulary(fresh, tmp_path):
    assert "triton_hopper" in AD.CANDIDATES
    table = AD.load_table(str(hopper_table(tmp_path / "t.json")))
    assert set(table.values()) == {"triton_hopper"}


def test_where_the_hopper_forward_may_run(monkeypatch):
    from motus_fast.kernels.joint_attention_hopper import tensor_descriptors_available

    assert "CUDA" in AD.runnable("triton_hopper", CPU, "all/s")
    assert "sm80" in AD.runnable("triton_hopper", fake_gpu(monkeypatch, 8), "all/s")
    assert "sm100" in AD.runnable("triton_hopper", fake_gpu(monkeypatch, 10), "all/s")
    hopper = fake_gpu(monkeypatch, 9)
    assert AD.runnable("triton_hopper", hopper, "masked/l") == (
        None if tensor_descriptors_available() else "the installed triton has no device-side tensor descriptors")
    if tensor_descriptors_available():
        q, k, v, _ = inputs(torch.bfloat16)
        assert AD.runnable("triton_hopper", hopper, "all/s", inputs=(q, k, v)) is None
        odd = torch.zeros(k[1].shape[0], 2, 68, dtype=torch.bfloat16)[:, :, :64]     # 136-byte head stride
        assert "aligned" in AD.runnable("triton_hopper", hopper, "all/s", inputs=(q, [k[0], odd, k[2]], v))
        assert "dtype" in AD.runnable("triton_hopper", hopper, "all/s", inputs=inputs(torch.float32)[:3])


def test_table_naming_hopper_on_cpu_falls_back_with_one_line(fresh, tmp_path, caplog):
    table = AD.load_table(str(hopper_table(tmp_path / "t.json")))
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        for _ in range(3):
            assert AD.select("joint_attention", CPU, torch.float32, None, [40, 5, 12], table) == "triton"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "triton_hopper" in warnings[0] and "CUDA" in warnings[0], warnings


@cpu_interpreted
@pytest.mark.parametrize("visible", [None, MASK])
def test_public_op_with_a_hopper_table_on_cpu_runs_ours(fresh, tmp_path, monkeypatch, caplog, visible):
    import motus_fast.kernels.joint_attention_hopper as JH

    monkeypatch.setenv(AD.TABLE_ENV, str(hopper_table(tmp_path / "t.json")))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    monkeypatch.setattr(JH, "forward_launcher", lambda *a, **kw: pytest.fail("the Hopper forward ran on a CPU"))
    q, k, v, cu = inputs()
    with caplog.at_level(logging.WARNING, logger="motus_fast"), torch.no_grad():
        for _ in range(2):
            got = joint_attention(q, k, v, cu, visible, max_seqlens=[20, 3, 8])
    assert len([r for r in caplog.records if "triton_hopper" in r.getMessage()]) == 1
    want, _ = joint_attention_reference([t.double() for t in q], [t.double() for t in k], [t.double() for t in v],
                                        cu, visible)
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-5, rtol=2e-5)


@cpu_interpreted
def test_plan_runs_the_hopper_launcher_for_inference_and_ours_under_autograd(fresh, tmp_path, monkeypatch, caplog):
    """With the device check waived (so the interpreter can stand in for an H100), a table choice of triton_hopper
    makes the eager inference plan launch the Hopper kernel; with gradients the custom op (portable kernels) runs
    and says so once. Both match fp64."""
    import motus_fast.kernels.joint_attention_hopper as JH

    real_runnable, real_launcher = AD.runnable, JH.forward_launcher
    monkeypatch.setattr(AD, "runnable", lambda c, d, cls, inputs=None: None if c == "triton_hopper"
                        else real_runnable(c, d, cls, inputs))
    built = []
    monkeypatch.setattr(JH, "forward_launcher", lambda *a, **kw: built.append(1) or real_launcher(*a, **kw))
    monkeypatch.setenv(AD.TABLE_ENV, str(hopper_table(tmp_path / "t.json", dtype="fp16")))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    q, k, v, cu = inputs(torch.float16)
    want, _ = joint_attention_reference([t.double() for t in q], [t.double() for t in k], [t.double() for t in v],
                                        cu, MASK)
    with torch.no_grad():
        got = joint_attention(q, k, v, cu, MASK, max_seqlens=[20, 3, 8])
    assert built == [1]
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-3, rtol=2e-3)

    leaves = [t.clone().requires_grad_() for t in q]
    with caplog.at_level(logging.WARNING, logger="motus_fast"):
        got = joint_attention(leaves, k, v, cu, MASK, max_seqlens=[20, 3, 8])
    assert built == [1]
    assert len([r for r in caplog.records if "eager inference forward only" in r.getMessage()]) == 1
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-3, rtol=2e-3)


@cpu_interpreted
def test_tune_times_the_hopper_candidate_through_the_public_op(fresh, monkeypatch):
    """bench.attention --tune reaches triton_hopper through auto with a one-entry table (the same host path as the
    other candidates): the plan it builds launches the Hopper kernel, and the caller's table setting is restored."""
    import motus_fast.kernels.joint_attention_hopper as JH
    from bench.attention import Problem, Shape, _candidate_call

    real_runnable, real_launcher = AD.runnable, JH.forward_launcher
    monkeypatch.setattr(AD, "runnable", lambda c, d, cls, inputs=None: None if c == "triton_hopper"
                        else real_runnable(c, d, cls, inputs))
    built = []
    monkeypatch.setattr(JH, "forward_launcher", lambda *a, **kw: built.append(1) or real_launcher(*a, **kw))
    monkeypatch.setenv(AD.TABLE_ENV, "/nonexistent/table.json")
    p = Problem(Shape("t", 1, (20, 3, 8), 2, 64), True, torch.float32, CPU)
    fwd = _candidate_call("triton_hopper", p, MASK, [20, 3, 8])
    fwd()
    assert built == [1]                                   # built once (the first call), reused after
    assert os.environ[AD.TABLE_ENV] == "/nonexistent/table.json"
