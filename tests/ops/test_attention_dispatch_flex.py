"""MOTUS_BACKEND=auto with FlexAttention (``flex``, attention_dispatch.flex_joint) as a candidate: its numbers
through the public op against the fp64 reference (FlashAttention's rule, DESIGN.md section 6) for all-visible and
masked visibility, odd lengths, empty segments, a query expert that sees nothing and a keys-only expert, fp32 and
fp16, outputs and LSE; its block mask against torch's own create_block_mask; a table that picks it is honoured;
and where flex_attention cannot run (no flex_attention; autograd on CPU), the one-line fallback to ours. On CPU
flex_attention runs its eager math (the block lists only matter to the compiled kernel, hence the separate
block-mask check)."""

import json
import logging
import os
import sys
import warnings

import pytest
import torch

from kernel_checks import assert_fa_rule, cpu_interpreted
from motus_fast.ops import attention_dispatch as AD
from motus_fast.ops.joint_attention import joint_attention, joint_attention_reference

JA = sys.modules["motus_fast.ops.joint_attention"]
CPU = torch.device("cpu")
ALL = [[True] * 3] * 3
MASK = [[True, True, True], [True, True, True], [False, False, True]]     # prefix cache: und sees only und
BLIND = [[False, True, False], [True, True, True], [False, False, False]]  # expert 2 sees nothing
H, D = 2, 64
# per expert, per sample: odd lengths, empty segments, segments spanning several 128-token flex blocks
CASES = {"one sample": [[37], [5], [12]],
         "odd and empty": [[150, 0, 261], [3, 7, 0], [40, 1, 130]],
         "empty expert": [[129, 2], [0, 0], [17, 9]]}


def inputs(lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = ([torch.randn(sum(l), H, D, generator=g).to(dtype) for l in lens] for _ in range(4))
    cu = [torch.tensor([0] + torch.tensor(l).cumsum(0).tolist(), dtype=torch.int32) for l in lens]
    return q, k, v, do, cu


def flex_table(path, visible, lens, dtype="fp32"):
    cls = AD.shape_class(visible, [max(l) for l in lens])
    path.write_text(json.dumps({"entries": [dict(op="joint_attention", capability="cpu", dtype=dtype,
                                                 shape_class=cls, choice="flex")]}))
    return path


def spy_flex(monkeypatch):
    """Records each flex plan built, so a test can tell the candidate really ran."""
    built, real = [], AD.flex_joint
    monkeypatch.setattr(AD, "flex_joint", lambda *a: built.append(a) or real(*a))
    return built


def assert_lse_rule(name, got, want, same_dtype):
    """The -inf pattern (queries that see no key) exactly, the finite entries by FlashAttention's rule."""
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and bool((got[inf] < 0).all()), f"{name}: -inf pattern differs"
    assert_fa_rule(name, got[~inf], want[~inf], same_dtype[~inf], 2)


def test_flex_is_a_candidate_that_runs_here(fresh, tmp_path):
    assert "flex" in AD.CANDIDATES
    assert AD.runnable("flex", CPU, "masked/s") is None        # torch 2.13 has flex_attention
    assert set(AD.load_table(str(flex_table(tmp_path / "t.json", MASK, [[3], [3], [3]]))).values()) == {"flex"}


def test_why_flex_cannot_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch.nn.attention.flex_attention" else real(name, *a))
    assert "flex_attention" in AD.runnable("flex", CPU, "all/s")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    cuda = torch.device("cuda")
    assert "triton" in AD.runnable("flex", cuda, "masked/s") and AD.runnable("flex", CPU, "masked/s") is None
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert "not mps" in AD.runnable("flex", torch.device("mps"), "all/s")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "TorchDynamo" in AD.runnable("flex", CPU, "all/s")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("visible", [None, MASK, BLIND], ids=["all", "prefix-mask", "blind-row"])
def test_block_mask_matches_create_block_mask(case, visible):
    """Our block-level build visits exactly the block pairs torch's dense build does, and skips the mask_mod on
    exactly the same full ones (the compiled kernel trusts both)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lens = CASES[case]
    _, k, _, _, cu = inputs(lens, torch.float32)
    q_experts = [0, 1] if visible is BLIND else [0, 1, 2]
    vis = torch.tensor(visible or ALL)
    ours = AD.flex_block_mask(cu, q_experts, [k[e].shape[0] for e in q_experts], [t.shape[0] for t in k], vis)
    theirs = create_block_mask(ours.mask_mod, None, None, *ours.seq_lengths, device="cpu",
                               BLOCK_SIZE=AD.FLEX_BLOCK)

    def dense(num, idx):
        d = torch.zeros(idx.shape[-2:], dtype=torch.bool)
        for row, n in enumerate(num[0, 0].tolist()):
            d[row, idx[0, 0, row, :n].long()] = True
        return d

    assert ours.seq_lengths == theirs.seq_lengths
    assert torch.equal(dense(ours.kv_num_blocks, ours.kv_indices), dense(theirs.kv_num_blocks, theirs.kv_indices))
    assert torch.equal(dense(ours.full_kv_num_blocks, ours.full_kv_indices),
                       dense(theirs.full_kv_num_blocks, theirs.full_kv_indices))


def count_mask_builds(monkeypatch):
    builds, real = [], AD.flex_block_mask
    monkeypatch.setattr(AD, "flex_block_mask", lambda *a: builds.append(1) or real(*a))
    return builds


def assert_reference(got, q, k, v, cu, visible):
    want, _ = joint_attention_reference([None if t is None else t.double() for t in q], [t.double() for t in k],
                                        [t.double() for t in v], cu, visible)
    for e in range(len(k)):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-5, rtol=2e-5)


def test_block_mask_is_built_once_when_the_shapes_fix_the_boundaries(monkeypatch):
    """Every buffer holding B x its bound means every sample has the bound: one mask per plan, none per call."""
    builds = count_mask_builds(monkeypatch)
    lens = [[20, 20], [3, 3], [8, 8]]
    q, k, v, _, cu = inputs(lens, torch.float32)
    run = AD.flex_joint(q, k, v, cu, MASK, D ** -0.5, [20, 3, 8])
    assert len(builds) == 1                                   # at plan time
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            out, _ = run(q, k, v, [c.clone() for c in cu], False)
    assert len(builds) == 1
    assert_reference(out, q, k, v, cu, MASK)


def test_cpu_boundaries_reuse_the_last_mask_and_rebuild_on_new_values(monkeypatch):
    """Same signature, other boundary values (same totals and bounds): the mask follows the values."""
    builds = count_mask_builds(monkeypatch)
    first, second = [[150, 0, 261], [3, 7, 0], [40, 1, 130]], [[261, 150, 0], [0, 7, 3], [130, 40, 1]]
    q, k, v, _, cu_a = inputs(first, torch.float32)
    cu_b = inputs(second, torch.float32)[4]
    run = AD.flex_joint(q, k, v, cu_a, MASK, D ** -0.5, [261, 7, 130])
    assert builds == []                                       # the shapes do not fix the boundaries
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cu, n in ((cu_a, 1), (cu_a, 1), (cu_b, 2), (cu_a, 3)):
            out, _ = run(q, k, v, cu, False)
            assert len(builds) == n
            assert_reference(out, q, k, v, cu, MASK)


@cpu_interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("visible", [None, MASK, BLIND], ids=["all", "prefix-mask", "blind-row"])
def test_auto_with_a_flex_table_runs_flex_with_the_reference_numbers(fresh, tmp_path, monkeypatch, case, visible,
                                                                     dtype):
    lens = CASES[case]
    name = "fp16" if dtype == torch.float16 else "fp32"
    monkeypatch.setenv(AD.TABLE_ENV, str(flex_table(tmp_path / "t.json", visible, lens, name)))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    built = spy_flex(monkeypatch)
    q, k, v, _, cu = inputs(lens, dtype)
    if visible is BLIND:
        q[1] = None                     # expert 1 keys/values only; expert 2's queries see nothing
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "called without torch.compile" note (CPU runs eager)
        out, lse = joint_attention(q, k, v, cu, visible, max_seqlens=[max(l) for l in lens], return_lse=True)
        again = joint_attention(q, k, v, cu, visible, max_seqlens=[max(l) for l in lens])   # cached plan, no LSE
    assert len(built) == 1
    up = lambda ts, dt: [None if t is None else t.to(dt) for t in ts]  # noqa: E731
    want, want_lse = joint_attention_reference(up(q, torch.float64), up(k, torch.float64), up(v, torch.float64),
                                               cu, visible, return_lse=True)
    same, same_lse = joint_attention_reference(q, k, v, cu, visible, return_lse=True)
    for e in range(3):
        if q[e] is None:
            assert out[e] is None and lse[e] is None and again[e] is None
            continue
        assert out[e].shape == q[e].shape and out[e].is_contiguous() and lse[e].dtype == torch.float32
        assert_fa_rule(f"out[{e}]", out[e], want[e], same[e], 2)
        assert_lse_rule(f"lse[{e}]", lse[e], want_lse[e], same_lse[e])
        torch.testing.assert_close(again[e], out[e], rtol=0, atol=0)
        blind = torch.isinf(want_lse[e])
        assert bool((out[e][blind] == 0).all()), f"out[{e}]: a query that sees no key must give 0"


@cpu_interpreted
def test_flex_under_autograd_falls_back_to_ours_with_one_line(fresh, tmp_path, monkeypatch, caplog):
    """flex serves the inference forward only (the table times no backward; flex_attention has none on CPU): a
    table naming flex gives training calls our kernels (one line), with the reference's gradients (3x rule)."""
    lens = CASES["odd and empty"]
    monkeypatch.setenv(AD.TABLE_ENV, str(flex_table(tmp_path / "t.json", MASK, lens)))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    built = spy_flex(monkeypatch)
    q, k, v, do, cu = inputs(lens, torch.float32, seed=1)

    def grads(dtype, op):
        leaves = [t.to(dtype).requires_grad_() for t in q + k + v]
        out = op(leaves[0:3], leaves[3:6], leaves[6:9])
        return torch.autograd.grad(out, leaves, [g.to(dtype) for g in do])

    with caplog.at_level(logging.INFO, logger="motus_fast"):
        got = grads(torch.float32, lambda q, k, v: joint_attention(q, k, v, cu, MASK, max_seqlens=[261, 7, 130]))
    ref = lambda q, k, v: joint_attention_reference(q, k, v, cu, MASK)[0]  # noqa: E731
    want, same = grads(torch.float64, ref), grads(torch.float32, ref)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert built == [] and len(warnings_) == 1 and "inference forward only" in warnings_[0], warnings_
    for i, (g, w, s) in enumerate(zip(got, want, same)):
        assert_fa_rule(f"grad[{i}]", g, w, s, 3)


@cpu_interpreted
def test_flex_that_cannot_run_falls_back_to_ours_with_one_line(fresh, tmp_path, monkeypatch, caplog):
    lens = CASES["odd and empty"]
    monkeypatch.setenv(AD.TABLE_ENV, str(flex_table(tmp_path / "t.json", MASK, lens)))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    monkeypatch.setattr(AD, "flex_attention_missing", lambda device: "torch 0.0 has no flex_attention")
    built = spy_flex(monkeypatch)
    q, k, v, _, cu = inputs(lens, torch.float32)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="motus_fast"):
        for bounds in ([261, 7, 130], [262, 7, 130], [261, 7, 130]):     # two plans, one key
            got = joint_attention(q, k, v, cu, MASK, max_seqlens=bounds)
        assert AD.select("joint_attention", CPU, torch.float32, MASK, [261, 7, 130]) == "triton"
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "flex" in warnings_[0] and "no flex_attention" in warnings_[0], warnings_
    assert built == []
    want, _ = joint_attention_reference([t.double() for t in q], [t.double() for t in k], [t.double() for t in v],
                                        cu, MASK)
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-5, rtol=2e-5)


def test_flex_lse_is_natural_log():
    """The op's contract is natural-log LSE; flex_attention computes in log2 and rescales. A guard for a torch
    upgrade that changes that: one row against logsumexp."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 9, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, aux = flex_attention(q, k, v, scale=0.25, return_aux=AuxRequest(lse=True))
    want = torch.logsumexp(q[0, 0].double() @ k[0, 0].double().T * 0.25, dim=-1)
    torch.testing.assert_close(aux.lse[0, 0].double(), want, atol=1e-5, rtol=1e-5)


@cpu_interpreted
def test_tune_times_the_flex_candidate_through_the_public_op(fresh, monkeypatch):
    """bench.attention --tune reaches flex through auto with a one-entry table (the same host path as the other
    candidates, its concatenation and block mask included): the plan is built once and computes flex's numbers."""
    from bench.attention import Problem, Shape, _candidate_call

    built = spy_flex(monkeypatch)
    monkeypatch.setenv(AD.TABLE_ENV, "/nonexistent/table.json")
    p = Problem(Shape("t", 2, (20, 3, 8), H, D), True, torch.float32, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd = _candidate_call("flex", p, MASK, [20, 3, 8])
        fwd()
        plans = list(JA._PLANS.values())               # kept: (run, boundary check) of the one signature
        got, _ = plans[0][0](p.q, p.k, p.v, p.cu, False)
    assert len(built) == 1 and len(plans) == 1        # built once (the first call), reused after
    assert os.environ[AD.TABLE_ENV] == "/nonexistent/table.json"
    want, _ = joint_attention_reference([t.double() for t in p.q], [t.double() for t in p.k],
                                        [t.double() for t in p.v], p.cu, MASK)
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-5, rtol=2e-5)
