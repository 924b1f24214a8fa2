"""Joint attention: Triton kernels (under TRITON_INTERPRET=1 on CPU) against the fp64 reference.

FlashAttention's rule (DESIGN.md section 6): the kernel's max error against the fp64 reference must be at most
2x (outputs, LSE) or 3x (gradients) the error of the same reference computed in the kernel's dtype, plus a
rounding floor. Lengths are drawn per expert and sample, with zero-length and one-token segments, odd lengths and
segments longer than two tiles; output buffers are NaN-filled before each launch so an unwritten element fails.
"""

import logging
import math
import os

import pytest
import torch

from kernel_checks import DEVICE
from motus_fast import backend as backend_mod
from motus_fast.ops.joint_attention import (joint_attention, joint_attention_reference, varlen_attention,
                                            varlen_attention_reference)

interpreted = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")

H = 2
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


# ---- helpers ------------------------------------------------------------------------------------------------------
def draw_lengths(gen, E, B, long):
    """[E][B] lengths from a pool with 0, 1, odd values and `long` (> two tiles); forced corner cases."""
    pool = [0, 1, 2, 3, 5, 7, 13, 16, 17, 31, long - 1, long]
    lens = [[pool[int(i)] for i in torch.randint(len(pool), (B,), generator=gen)] for _ in range(E)]
    lens[0][0] = long
    if E * B > 1:
        lens[-1][-1] = 0
        lens[min(1, E - 1)][min(1, B - 1) if E == 1 else 0] = 1
    return lens


def cu_from(lens, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(lens, D, dtype, seed, device=DEVICE):
    """Drawn on the CPU (same numbers on every machine), then moved to the kernels' device."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(n, H, D, generator=gen).to(device, dtype)  # noqa: E731
    q = [mk(sum(l)) for l in lens]
    k = [mk(sum(l)) for l in lens]
    v = [mk(sum(l)) for l in lens]
    do = [mk(sum(l)) for l in lens]
    return q, k, v, do, [cu_from(l, device) for l in lens]


def reference_with_grads(q, k, v, do, cu, visible, dtype):
    """Reference outputs, LSE and gradients with inputs cast to `dtype`."""
    qd = [None if t is None else t.to(dtype).requires_grad_() for t in q]
    kd = [t.to(dtype).requires_grad_() for t in k]
    vd = [t.to(dtype).requires_grad_() for t in v]
    out, lse = joint_attention_reference(qd, kd, vd, cu, visible, return_lse=True)
    pairs = [(o, g.to(dtype)) for o, g in zip(out, do) if o is not None and o.requires_grad]
    leaves = [t for t in qd if t is not None] + kd + vd
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    # an input that reaches no output (a query that sees nothing, a key nobody sees) has gradient 0
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    nq = sum(t is not None for t in qd)
    it = iter(grads[:nq])
    dq = [None if t is None else next(it) for t in qd]
    return out, lse, dq, grads[nq:nq + len(k)], grads[nq + len(k):]


def assert_fa_rule(name, got, want, same_dtype, factor, dtype):
    """max|got - want| <= factor * max|same_dtype - want| + floor (want in fp64); also no NaN anywhere."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    got, want, same_dtype = (t.detach().double().cpu() for t in (got, want, same_dtype))
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or invalid elements)"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{name}: -inf pattern differs"
    got, want, same_dtype = got[~inf], want[~inf], same_dtype[~inf]
    if got.numel() == 0:
        return
    err = (got - want).abs().max().item()
    ref_err = (same_dtype - want).abs().max().item()
    floor = EPS[dtype] * max(1.0, want.abs().max().item())          # one unit of rounding at the largest value
    assert err <= factor * ref_err + floor, (
        f"{name}: max error {err:.3e} > {factor} x same-dtype reference error {ref_err:.3e} + floor {floor:.1e}")


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def small_config(dtype):
    """Small tiles, so short test sequences still span several tiles in both directions."""
    from motus_fast.kernels.joint_attention import AttentionConfig, BlockConfig

    return AttentionConfig(fwd=BlockConfig(16, 16, 4, 1), dkdv=BlockConfig(16, 32, 4, 1),
                           dq=BlockConfig(32, 16, 4, 1), delta_block=16)


VIS_PARTIAL = [[1, 0, 1], [1, 1, 1], [0, 0, 1]]     # und sees itself, video sees video + und, action sees all
VIS_BLIND = [[1, 0, 0], [0, 0, 0], [1, 1, 1]]       # expert 1 sees nothing; its keys are seen by expert 2 only

CASES = [
    # id, experts, batch, head_dim, dtype, visible, expert without queries, tiles ("small" or the GPU default)
    ("1exp-b1-d64-fp32", 1, 1, 64, torch.float32, None, None, "small"),
    ("2exp-b3-d128-fp16-upper", 2, 3, 128, torch.float16, [[1, 1], [0, 1]], None, "small"),
    ("3exp-b5-d64-fp16-partial", 3, 5, 64, torch.float16, VIS_PARTIAL, None, "small"),
    ("3exp-b4-d64-fp32-blind", 3, 4, 64, torch.float32, VIS_BLIND, None, "small"),
    ("3exp-b2-d128-fp32-kvonly-default", 3, 2, 128, torch.float32, None, 2, "default"),
    ("2exp-b2-d64-fp16-default", 2, 2, 64, torch.float16, None, None, "default"),
    ("2exp-b2-d128-fp16-default", 2, 2, 128, torch.float16, [[1, 0], [1, 1]], None, "default"),   # H100 tiles
]


# ---- kernels against the fp64 reference ---------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_fp64_reference(case):
    from motus_fast.kernels.joint_attention import (attention_backward, attention_forward, default_config,
                                                     visibility_bits)

    name, E, B, D, dtype, vis, kv_only, tiles = case
    config = small_config(dtype) if tiles == "small" else default_config(D, dtype)
    long = 2 * max(config.fwd.block_m, config.dkdv.block_n, config.dq.block_m) + 3
    seed = sum(map(ord, name))
    lens = draw_lengths(torch.Generator().manual_seed(seed), E, B, long)
    q, k, v, do, cu = make_inputs(lens, D, dtype, seed)
    if kv_only is not None:
        q[kv_only] = do[kv_only] = None
    visible = None if vis is None else torch.tensor(vis, dtype=torch.bool)
    bits = visibility_bits(vis, E)
    max_len = [max(l) for l in lens]
    scale = 1 / math.sqrt(D)

    out = [None if t is None else nan_like(t.shape, dtype) for t in q]
    lse = [None if t is None else nan_like(t.shape[:2], torch.float32) for t in q]
    attention_forward(q, k, v, cu, cu, max_len, visible_bits=bits, softmax_scale=scale, config=config, out=out,
                      lse=lse)
    dq = [None if t is None else nan_like(t.shape, dtype) for t in q]
    dk = [nan_like(t.shape, dtype) for t in k]
    dv = [nan_like(t.shape, dtype) for t in v]
    attention_backward(do, q, k, v, out, lse, cu, cu, max_len, max_len, visible_bits=bits, softmax_scale=scale,
                       config=config, dq=dq, dk=dk, dv=dv)

    want = reference_with_grads(q, k, v, do, cu, visible, torch.float64)
    same = reference_with_grads(q, k, v, do, cu, visible, dtype)
    for e in range(E):
        if q[e] is not None:
            assert_fa_rule(f"out[{e}]", out[e], want[0][e], same[0][e], 2, dtype)
            assert_fa_rule(f"lse[{e}]", lse[e], want[1][e], same[1][e], 2, torch.float32)
            assert_fa_rule(f"dq[{e}]", dq[e], want[2][e], same[2][e], 3, dtype)
        assert_fa_rule(f"dk[{e}]", dk[e], want[3][e], same[3][e], 3, dtype)
        assert_fa_rule(f"dv[{e}]", dv[e], want[4][e], same[4][e], 3, dtype)


@interpreted
def test_backward_is_deterministic():
    from motus_fast.kernels.joint_attention import attention_backward, attention_forward, visibility_bits

    lens = [[37, 5], [0, 19], [11, 40]]
    q, k, v, do, cu = make_inputs(lens, 64, torch.float16, 7)
    args = dict(visible_bits=visibility_bits(None, 3), softmax_scale=0.125, config=small_config(torch.float16))
    ml = [max(l) for l in lens]
    out, lse = attention_forward(q, k, v, cu, cu, ml, **args)
    first = attention_backward(do, q, k, v, out, lse, cu, cu, ml, ml, **args)
    second = attention_backward(do, q, k, v, out, lse, cu, cu, ml, ml, **args)
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---- the public ops through the custom op + autograd ---------------------------------------------------------------
@interpreted
def test_joint_attention_op_autograd_matches_reference(monkeypatch):
    """The public op on strided views of fused [T, 3, H, D] q|k|v buffers (as a fused projection yields them),
    an expert without queries, a partial visibility matrix; gradients through autograd into the fused buffers."""
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    dtype, D = torch.float16, 64
    lens = [[70, 0, 9], [21, 21, 21], [33, 1, 0]]
    q, k, v, do, cu = make_inputs(lens, D, dtype, 11)
    q[2] = None
    visible = torch.tensor(VIS_PARTIAL, dtype=torch.bool)
    fused = [torch.stack([t for t in (q[e], k[e], v[e]) if t is not None], dim=1).requires_grad_() for e in range(3)]
    qs = [fused[0][:, 0], fused[1][:, 0], None]
    ks = [f[:, -2] for f in fused]
    vs = [f[:, -1] for f in fused]
    assert not qs[0].is_contiguous()
    out, lse = joint_attention(qs, ks, vs, cu, visible, max_seqlens=[70, 21, 33], return_lse=True)
    assert out[2] is None and lse[2] is None
    grads = torch.autograd.grad([out[0], out[1]], fused, [do[0], do[1]])
    want = reference_with_grads(q, k, v, do, cu, visible, torch.float64)
    same = reference_with_grads(q, k, v, do, cu, visible, dtype)
    for e in range(3):
        if e < 2:
            assert_fa_rule(f"out[{e}]", out[e], want[0][e], same[0][e], 2, dtype)
            assert_fa_rule(f"lse[{e}]", lse[e], want[1][e], same[1][e], 2, torch.float32)
            assert_fa_rule(f"dq[{e}]", grads[e][:, 0], want[2][e], same[2][e], 3, dtype)
        assert_fa_rule(f"dk[{e}]", grads[e][:, -2], want[3][e], same[3][e], 3, dtype)
        assert_fa_rule(f"dv[{e}]", grads[e][:, -1], want[4][e], same[4][e], 3, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_attention_matches_reference(monkeypatch, causal, dtype):
    """Single buffer, different query and key lengths per sample (longer, shorter, empty), head_dim 128."""
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    lq, lk = [5, 0, 150, 1, 40], [3, 7, 133, 1, 0]
    gen = torch.Generator().manual_seed(3 + causal)
    mk = lambda n: torch.randn(n, H, 128, generator=gen).to(DEVICE, dtype)  # noqa: E731
    q, k, v, do = mk(sum(lq)), mk(sum(lk)), mk(sum(lk)), mk(sum(lq))
    cu_q, cu_k = cu_from(lq), cu_from(lk)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, leaves, do)

    def ref(dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o, l = varlen_attention_reference(*xs, cu_q, cu_k, causal=causal)
        return o, l, torch.autograd.grad(o, xs, do.to(dt))

    want, same = ref(torch.float64), ref(dtype)
    assert_fa_rule("out", out, want[0], same[0], 2, dtype)
    assert_fa_rule("lse", lse, want[1], same[1], 2, torch.float32)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want[2], same[2]):
        assert_fa_rule(name, g, w, s, 3, dtype)


@interpreted
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of both custom ops."""
    from motus_fast.kernels.joint_attention import visibility_bits

    lens = [[5, 17], [3, 0]]
    q, k, v, do, cu = make_inputs(lens, 64, torch.float32, 5)
    q = [t.requires_grad_() for t in q]
    bits = visibility_bits([[1, 1], [0, 1]], 2)
    args = ([q[0], q[1]], [0, 1], k, v, cu, cu, [17, 3], [17, 3], bits, 0.2, False)
    torch.library.opcheck(torch.ops.motus_fast.attention_fwd.default, args)
    res = [t.detach() for t in torch.ops.motus_fast.attention_fwd(*args)]
    bwd_args = (do, [t.detach() for t in q], [0, 1], k, v, res[:2], res[2:], cu, cu, [17, 3], [17, 3], bits, 0.2,
                False)        # no double backward: the backward op's inputs need no grad
    torch.library.opcheck(torch.ops.motus_fast.attention_bwd.default, bwd_args)


@interpreted
def test_works_under_torch_compile(monkeypatch):
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    lens = [[19, 4], [7, 30]]
    q, k, v, do, cu = make_inputs(lens, 64, torch.float32, 9)
    visible = [[True, True], [False, True]]         # python bools: a compile-time constant, no graph break

    def attend(q0, q1, k0, k1, v0, v1):
        o = joint_attention([q0, q1], [k0, k1], [v0, v1], cu, visible, max_seqlens=[19, 30])
        return o[0] * 2, o[1] + 1

    leaves = [t.clone().requires_grad_() for t in (*q, *k, *v)]
    eager = attend(*leaves)
    g_eager = torch.autograd.grad(eager, leaves, do)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)(*leaves)
    g_compiled = torch.autograd.grad(compiled, leaves, do)
    for a, b in zip((*eager, *g_eager), (*compiled, *g_compiled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- backend selection ----------------------------------------------------------------------------------------------
def test_reference_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("MOTUS_BACKEND", "reference")
    from motus_fast.kernels import joint_attention as kernels

    def no_kernel(*args, **kwargs):
        raise AssertionError("MOTUS_BACKEND=reference must not launch the Triton kernels")

    monkeypatch.setattr(kernels, "attention_forward", no_kernel)
    lens = [[9, 3], [0, 5]]
    q, k, v, _, cu = make_inputs(lens, 64, torch.float32, 1)
    got = joint_attention(q, k, v, cu)
    want, _ = joint_attention_reference(q, k, v, cu)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("why", ["no-interpreter", "head-dim"])
def test_unrunnable_triton_logs_and_uses_reference(monkeypatch, caplog, why):
    """MOTUS_BACKEND=triton where the kernels cannot run (CPU tensors without the interpreter; an unsupported
    head dim): a warning, then the reference's result."""
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    D, device = 64, DEVICE
    if why == "no-interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device = "cpu"
    else:
        D = 48
    monkeypatch.setattr(backend_mod, "_logged", set())
    lens = [[9, 3], [0, 5]]
    q, k, v, _, cu = make_inputs(lens, D, torch.float32, 2, device)
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        got = joint_attention(q, k, v, cu)
        got_varlen = varlen_attention(q[0], k[0], v[0], cu[0], cu[0], 9, 9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for op in ("joint_attention", "varlen_attention"):
        assert any(m.startswith(f"{op}:") and "triton" in m and "reference" in m for m in warnings), warnings
    want, _ = joint_attention_reference(q, k, v, cu)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(got_varlen, varlen_attention_reference(q[0], k[0], v[0], cu[0], cu[0])[0])


def test_rejects_bad_inputs():
    q, k, v, _, cu = make_inputs([[9, 3], [0, 5]], 64, torch.float32, 4)
    with pytest.raises(ValueError, match=r"max_seqlens\[0\]=8 is below the longest segment"):
        joint_attention(q, k, v, cu, max_seqlens=[8, 5])
    with pytest.raises(ValueError, match=r"cu_seqlens\[1\] must rise from 0 to the buffer length 5"):
        joint_attention(q, k, v, [cu[0], torch.tensor([0, 1, 4], dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"k\[1\] has shape"):
        joint_attention(q, [k[0], k[1][:, :1]], v, cu)
    with pytest.raises(ValueError, match="visible must be a bool"):
        joint_attention(q, k, v, cu, visible=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        varlen_attention(q[0], k[0], v[0], cu[0], cu[0], 9, 9, 0.1)
    with pytest.raises(ValueError, match="max_seqlen_k=4 is below"):
        varlen_attention(q[0], k[0], v[0], cu[0], cu[0], 9, 4)


# ---- GPU: bf16 at motus-8b shapes -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_motus_8b_shapes_bf16_on_gpu(monkeypatch, batch):
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    dev, dtype, Hg, D = "cuda", torch.bfloat16, 24, 128
    lens = [[360] * batch, [21] * batch, [150 - 7 * b for b in range(batch)]]
    gen = torch.Generator().manual_seed(0)
    mk = lambda n: torch.randn(n, Hg, D, generator=gen).to(dev, dtype)  # noqa: E731
    q, k, v, do = ([mk(sum(l)) for l in lens] for _ in range(4))
    cu = [cu_from(l).to(dev) for l in lens]
    leaves = [t.clone().requires_grad_() for t in (*q, *k, *v)]
    out = joint_attention(leaves[0:3], leaves[3:6], leaves[6:9], cu, max_seqlens=[max(l) for l in lens])
    grads = torch.autograd.grad(out, leaves, do)
    want = reference_with_grads(q, k, v, do, cu, None, torch.float64)
    same = reference_with_grads(q, k, v, do, cu, None, dtype)
    for e in range(3):
        assert_fa_rule(f"out[{e}]", out[e], want[0][e], same[0][e], 2, dtype)
        for i, g in enumerate(("dq", "dk", "dv")):
            assert_fa_rule(f"{g}[{e}]", grads[3 * i + e], want[2 + i][e], same[2 + i][e], 3, dtype)
