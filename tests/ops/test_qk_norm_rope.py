"""qk_norm_rope: the multi-expert Triton kernel (TRITON_INTERPRET=1 on CPU) against the fp64 reference, forward and
backward (q, k and both norm weights), with DESIGN.md section 6's rule (2x / 3x the same-dtype reference error plus
one ulp). Experts come as strided chunks of a fused qkv projection, with different row counts (0 included), a
keys-only expert, per-expert eps, and the video expert's 3-D RoPE; outputs are allocated NaN-filled."""

import logging

import pytest
import torch
from kernel_checks import DEVICE, assert_fa_rule, interpreted  # noqa: F401

from motus_fast import backend as backend_mod
from motus_fast.model.rope import rope_tables
from motus_fast.ops.qk_norm_rope import ExpertQK, qk_norm_rope, qk_norm_rope_reference, rms_norm, rms_norm_reference

# (width, heads): head_dim 128 as motus-8b; 96 = 2 x 48 (RoPE pairs 8/8/8); 123 = one odd head (no RoPE)
WIDTHS = [(3072, 24), (1024, 8), (512, 4), (96, 2), (123, 1)]


def make_experts(width, heads, seed, lengths=((2, 12), (2, 5), (7,)), keys_only=(2,), rope_expert=0):
    """Per expert: fp64 (q, k, weight_q, weight_k, eps, rope, grad_q, grad_k). Expert e has leading shape
    lengths[e] ([B, L] or packed [T]); q/k are chunks of one [..., 3 * width] projection."""
    g = torch.Generator().manual_seed(seed)
    head_dim = width // heads
    out = []
    for e, shape in enumerate(lengths):
        qkv = torch.randn(*shape, 3 * width, generator=g, dtype=torch.float64) * 2 + 0.5
        q, k, _ = qkv.chunk(3, dim=-1)
        q = None if e in keys_only else q
        wq = None if q is None else 1 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64)
        wk = 1 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64)
        rope = None
        if e == rope_expert and head_dim % 2 == 0:
            L = shape[-1]
            rope = rope_tables((L // 4, 2, 2) if L % 4 == 0 else (1, 1, L), head_dim)
        grads = [None if q is None else torch.randn(*shape, heads, head_dim, generator=g, dtype=torch.float64),
                 torch.randn(*shape, heads, head_dim, generator=g, dtype=torch.float64)]
        out.append(dict(q=q, k=k, wq=wq, wk=wk, eps=(1e-6, 1e-5, 1e-5)[e % 3], rope=rope, grads=grads))
    return out


def run(fn, experts, heads, dtype):
    """fn over the experts with leaves in `dtype` -> outputs [(q, k)] and grads [(dq, dk, dwq, dwk)] per expert."""
    leaves, specs = [], []
    for e in experts:
        mk = lambda t: None if t is None else t.to(DEVICE, dtype).detach().requires_grad_()  # noqa: E731
        q, k, wq, wk = mk(e["q"]), mk(e["k"]), mk(e["wq"]), mk(e["wk"])
        rope = None if e["rope"] is None else tuple(t.to(DEVICE) for t in e["rope"])
        specs.append(ExpertQK(q, k, wq, wk, e["eps"], rope))
        leaves.append((q, k, wq, wk))
    outs = fn(specs, heads)
    pairs = [(o, g.to(DEVICE, dtype)) for (qo, ko), e in zip(outs, experts)
             for o, g in ((qo, e["grads"][0]), (ko, e["grads"][1])) if o is not None]
    flat = [t for group in leaves for t in group if t is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], flat, [g for _, g in pairs]))
    return ([(None if qo is None else qo.detach(), ko.detach()) for qo, ko in outs],
            [tuple(None if t is None else next(grads) for t in group) for group in leaves])


def check(experts, heads, dtype, name):
    out, grads = run(qk_norm_rope, experts, heads, dtype)
    out64, grads64 = run(qk_norm_rope_reference, experts, heads, torch.float64)
    out_d, grads_d = run(qk_norm_rope_reference, experts, heads, dtype)
    for e in range(len(experts)):
        for i, label in enumerate(("q", "k")):
            if out64[e][i] is None:
                assert out[e][i] is None
                continue
            assert out[e][i].dtype == dtype and out[e][i].is_contiguous()
            assert_fa_rule(f"{name} expert {e} {label}", out[e][i], out64[e][i], out_d[e][i], 2)
        for i, label in enumerate(("dq", "dk", "dweight_q", "dweight_k")):
            if grads64[e][i] is not None:
                assert_fa_rule(f"{name} expert {e} {label}", grads[e][i], grads64[e][i], grads_d[e][i], 3)


@interpreted
@pytest.mark.parametrize("width,heads", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_three_experts_match_reference(triton_backend, poisoned_outputs, width, heads, dtype):
    """video-like [B, L] rows with RoPE, action-like [B, L] rows, a keys-only packed und expert."""
    check(make_experts(width, heads, seed=width + heads), heads, dtype, f"w{width}")


@interpreted
def test_expert_counts_and_empty_experts(triton_backend, poisoned_outputs):
    """One expert alone (RoPE on), an empty expert between two others, and four experts (two launches)."""
    check(make_experts(256, 2, seed=1, lengths=((3, 8),), keys_only=()), 2, torch.float32, "single")
    check(make_experts(256, 2, seed=2, lengths=((1, 4), (2, 0), (9,)), keys_only=(), rope_expert=-1), 2,
          torch.float32, "empty middle")
    check(make_experts(128, 2, seed=3, lengths=((1, 8), (5,), (2, 3), (4,)), keys_only=(1,)), 2, torch.float32,
          "four experts")


@interpreted
def test_all_experts_share_one_launch(triton_backend, monkeypatch):
    import motus_fast.kernels.qk_norm_rope as K

    launches = []
    kernel = K.qk_norm_rope_fwd_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(K, "qk_norm_rope_fwd_kernel", Counting())
    f32 = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    rope = lambda r: None if r is None else tuple(t.to(DEVICE) for t in r)  # noqa: E731
    specs = [ExpertQK(f32(e["q"]), f32(e["k"]), f32(e["wq"]), f32(e["wk"]), e["eps"], rope(e["rope"]))
             for e in make_experts(96, 2, seed=4)]
    with torch.no_grad():
        qk_norm_rope(specs, 2)
    assert len(launches) == 1


@interpreted
@pytest.mark.parametrize("width", [3072, 123])
def test_rms_norm_matches_reference(triton_backend, poisoned_outputs, width):
    g = torch.Generator().manual_seed(width)
    x64 = torch.randn(2, 5, width, generator=g, dtype=torch.float64) * 3
    w64 = 1 + 0.2 * torch.randn(width, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 5, width, generator=g, dtype=torch.float64)
    res = {}
    for kind, dtype, fn in (("kernel", torch.float32, rms_norm), ("ref64", torch.float64, rms_norm_reference),
                            ("ref32", torch.float32, rms_norm_reference)):
        x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
        y = fn(x, w, 1e-6)
        res[kind] = (y.detach(), *torch.autograd.grad(y, (x, w), dy.to(dtype)))
    for i, name in enumerate(("y", "dx", "dw")):
        assert_fa_rule(f"rms_norm {name}", res["kernel"][i], res["ref64"][i], res["ref32"][i], 2 if i == 0 else 3)


@interpreted
def test_log_names_the_backend(triton_backend, monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_logged", set())
    e = make_experts(64, 1, seed=5, lengths=((2, 3),), keys_only=())[0]
    with caplog.at_level(logging.INFO, logger="motus_fast"), torch.no_grad():
        qk_norm_rope([ExpertQK(*(e[n].to(DEVICE, torch.float32) for n in ("q", "k", "wq", "wk")), 1e-6)], 1)
    assert "qk_norm_rope: using the triton backend" in caplog.text


def test_bad_inputs_name_the_field():
    q, k, w = torch.randn(2, 4, 64), torch.randn(2, 4, 64), torch.ones(64)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        qk_norm_rope([ExpertQK(q, k, w, w, 1e-6)], 3)
    with pytest.raises(ValueError, match="weight_k must be"):
        qk_norm_rope([ExpertQK(q, k, w, torch.ones(63), 1e-6)], 2)
    with pytest.raises(ValueError, match="has weight_q but no q"):
        qk_norm_rope([ExpertQK(None, k, w, w, 1e-6)], 2)
    with pytest.raises(ValueError, match="rope tables must be"):
        qk_norm_rope([ExpertQK(q, k, w, w, 1e-6, rope_tables((1, 1, 5), 32))], 2)
    with pytest.raises(ValueError, match="expected floating"):
        qk_norm_rope([ExpertQK(q, k, w, w, 1e-6), ExpertQK(q, torch.randn(2, 4, 32), w, w, 1e-6)], 2)


@pytest.mark.gpu
def test_bf16_motus_shapes_on_gpu(monkeypatch):
    """motus-8b inference shapes in bf16: video 1 x 360 (RoPE), action 1 x 21, und 1 x 40 (keys only)."""
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    check(make_experts(3072, 24, seed=8, lengths=((1, 360), (1, 21), (40,))), 24, torch.bfloat16, "motus-8b")


@interpreted
def test_torch_compile_traces_the_op(triton_backend):
    """fake impls + autograd with tensor lists: a compiled graph gives the eager values and gradients."""
    experts = make_experts(64, 2, seed=6, lengths=((2, 4), (3,)), keys_only=(1,))
    leaves = [t.to(DEVICE, torch.float32).requires_grad_()
              for e in experts for t in (e["q"], e["k"], e["wq"], e["wk"]) if t is not None]
    rope = None if experts[0]["rope"] is None else tuple(t.to(DEVICE) for t in experts[0]["rope"])

    def f(q0, k0, wq0, wk0, k1, wk1):
        out = qk_norm_rope([ExpertQK(q0, k0, wq0, wk0, 1e-6, rope), ExpertQK(None, k1, None, wk1, 1e-5)], 2)
        return (out[0][0] * out[0][1]).sum() + out[1][1].square().sum()
    eager = f(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    for a, b in zip(torch.autograd.grad(compiled, leaves), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@interpreted
def test_output_dtype_follows_the_reference(triton_backend):
    """fp16 rows with fp32 weights: the reference promotes (rows * weight); so does the kernel."""
    e = make_experts(96, 2, seed=7, lengths=((2, 4),), keys_only=())[0]
    spec = ExpertQK(e["q"].half(), e["k"].half(), e["wq"].float(), e["wk"].float(), 1e-6, e["rope"])
    with torch.no_grad():
        (q, k), = qk_norm_rope([spec], 2)
        (rq, rk), = qk_norm_rope_reference([spec], 2)
    assert q.dtype == rq.dtype == torch.float32 and k.dtype == rk.dtype
    torch.testing.assert_close(q, rq, rtol=1e-3, atol=1e-3)
