"""The Hopper forward of joint attention (kernels/joint_attention_hopper.py) against the fp64 reference, under
TRITON_INTERPRET=1 on the CPU (the interpreter runs tensor-descriptor loads and stores, including the zero-fill
past a descriptor's shape and the clipped stores) or on a GPU.

FlashAttention's rule (DESIGN.md section 6): max error vs fp64 <= 2x the same-dtype reference's error + one ulp.
Lengths per expert and sample include 0, 1, odd values and more than two tiles; q/k/v are strided views of fused
[T, 3, H, D] projections (token stride 3 * H * D); outputs are NaN-filled before the launch so an unwritten row
fails. The portable kernels' backward is fed this forward's O and LSE (the contract that lets the dispatcher swap
forwards)."""

import math
import os

import pytest
import torch

from kernel_checks import DEVICE, assert_fa_rule
from motus_fast.ops.joint_attention import joint_attention_reference

runs_here = pytest.mark.skipif(
    (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")
    or (DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9),
    reason="the Hopper forward runs on sm_90 GPUs, or on the CPU under TRITON_INTERPRET=1")
H = 2
VIS_PREFIX = [[1, 1, 1], [1, 1, 1], [0, 0, 1]]      # und sees only und (the prefix-cache mask)
VIS_BLIND = [[1, 0, 0], [0, 0, 0], [1, 1, 1]]       # expert 1 sees nothing: output 0, LSE -inf


def draw_lengths(seed, E, B, long):
    """[E][B] lengths from a pool with 0, 1, odd values and `long` (> two tiles), and forced corner cases."""
    gen = torch.Generator().manual_seed(seed)
    pool = [0, 1, 2, 3, 5, 7, 13, 16, 17, 31, long - 1, long]
    lens = [[pool[int(i)] for i in torch.randint(len(pool), (B,), generator=gen)] for _ in range(E)]
    lens[0][0] = long
    if E * B > 1:
        lens[-1][-1] = 0
        lens[min(1, E - 1)][0] = 1
    return lens


def fused_inputs(lens, D, dtype, seed):
    """q, k, v per expert as views of one fused [T, 3, H, D] buffer each; do; cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    fused = [torch.randn(sum(l), 3, H, D, generator=gen).to(DEVICE, dtype) for l in lens]
    do = [torch.randn(sum(l), H, D, generator=gen).to(DEVICE, dtype) for l in lens]
    cu = [torch.tensor([0] + torch.tensor(l).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE) for l in lens]
    return [f[:, 0] for f in fused], [f[:, 1] for f in fused], [f[:, 2] for f in fused], do, cu


def reference(q, k, v, do, cu, visible, dtype):
    """Reference outputs, LSE and (q, k, v) gradients with inputs cast to `dtype`."""
    qd = [None if t is None else t.to(dtype).requires_grad_() for t in q]
    kd = [t.to(dtype).requires_grad_() for t in k]
    vd = [t.to(dtype).requires_grad_() for t in v]
    out, lse = joint_attention_reference(qd, kd, vd, cu, visible, return_lse=True)
    pairs = [(o, g.to(dtype)) for o, g in zip(out, do) if o is not None and o.requires_grad]
    leaves = [t for t in qd if t is not None] + kd + vd
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out, lse, grads


def assert_lse(name, got, want, same):
    """-inf exactly where the reference has it (queries that see no key), the FA rule elsewhere."""
    inf = torch.isinf(want.cpu())
    assert torch.equal(torch.isinf(got.cpu()), inf), f"{name}: -inf pattern differs from the reference"
    assert (got.cpu()[inf] < 0).all(), f"{name}: +inf"
    assert_fa_rule(name, got.cpu()[~inf], want.cpu()[~inf], same.cpu()[~inf], 2)


def run_forward(q, k, v, cu, lens, vis, scale, config):
    from motus_fast.kernels.joint_attention import visibility_bits
    from motus_fast.kernels.joint_attention_hopper import attention_forward

    dtype = k[0].dtype
    out = [None if t is None else torch.full(t.shape, float("nan"), dtype=dtype, device=DEVICE) for t in q]
    lse = [None if t is None else torch.full(t.shape[:2], float("nan"), device=DEVICE) for t in q]
    res = attention_forward(q, k, v, cu, cu, [max(l) for l in lens], visible_bits=visibility_bits(vis, len(k)),
                            softmax_scale=scale, config=config, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    return out, lse


CASES = [
    # id, experts, batch, head_dim, dtype, visible, expert without queries, tiles ("small" or the GPU default)
    ("3exp-b3-d64-fp32-all-small", 3, 3, 64, torch.float32, None, None, "small"),
    ("3exp-b4-d64-fp16-blind-small", 3, 4, 64, torch.float16, VIS_BLIND, None, "small"),
    ("3exp-b2-d128-fp16-prefix-kvonly-default", 3, 2, 128, torch.float16, VIS_PREFIX, 2, "default"),
    ("2exp-b2-d64-fp16-all-default", 2, 2, 64, torch.float16, None, None, "default"),
    ("1exp-b3-d128-fp32-default", 1, 3, 128, torch.float32, None, None, "default"),
    ("3exp-b2-d128-bf16-prefix-default", 3, 2, 128, torch.bfloat16, VIS_PREFIX, None, "default"),
]


@runs_here
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hopper_forward_matches_fp64_reference(case):
    from motus_fast.kernels.joint_attention_hopper import HopperConfig, default_config

    name, E, B, D, dtype, vis, kv_only, tiles = case
    if DEVICE == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16                       # fp32 is interpreter-only; the GPU checks bf16 instead
    config = HopperConfig(16, 16, 4, 1) if tiles == "small" else default_config(D, dtype)   # fp16: 128 x 128
    seed = sum(map(ord, name))
    lens = draw_lengths(seed, E, B, 2 * max(config.block_m, config.block_n) + 3)
    q, k, v, do, cu = fused_inputs(lens, D, dtype, seed)
    assert q[0].stride(0) == 3 * H * D
    if kv_only is not None:
        q[kv_only] = do[kv_only] = None
    visible = None if vis is None else [[bool(x) for x in row] for row in vis]
    out, lse = run_forward(q, k, v, cu, lens, vis, 1 / math.sqrt(D), config)

    want, same = reference(q, k, v, do, cu, visible, torch.float64), reference(q, k, v, do, cu, visible, dtype)
    for e in range(E):
        if q[e] is None:
            assert out[e] is None and lse[e] is None
            continue
        assert_fa_rule(f"out[{e}]", out[e], want[0][e], same[0][e], 2)
        assert_lse(f"lse[{e}]", lse[e], want[1][e], same[1][e])
    if vis is VIS_BLIND:
        assert lse[1].isinf().all() and (out[1] == 0).all()


@runs_here
def test_portable_backward_consumes_the_hopper_forward():
    """O and LSE of the Hopper forward feed kernels/joint_attention.attention_backward: gradients within the FA
    rule (3x) of the fp64 reference."""
    from motus_fast.kernels.joint_attention import (AttentionConfig, BlockConfig, attention_backward,
                                                     visibility_bits)
    from motus_fast.kernels.joint_attention_hopper import HopperConfig

    dtype, D = torch.float16, 64
    lens = [[37, 5, 0], [0, 19, 1], [11, 40, 3]]
    q, k, v, do, cu = fused_inputs(lens, D, dtype, 21)
    scale, ml = 1 / math.sqrt(D), [max(l) for l in lens]
    out, lse = run_forward(q, k, v, cu, lens, VIS_PREFIX, scale, HopperConfig(16, 16, 4, 1))
    small = AttentionConfig(fwd=BlockConfig(16, 16, 4, 1), dkdv=BlockConfig(16, 32, 4, 1),
                            dq=BlockConfig(32, 16, 4, 1), delta_block=16)
    dq, dk, dv = attention_backward(do, q, k, v, out, lse, cu, cu, ml, ml, visible_bits=visibility_bits(VIS_PREFIX, 3),
                                    softmax_scale=scale, config=small)
    want = reference(q, k, v, do, cu, VIS_PREFIX, torch.float64)[2]
    same = reference(q, k, v, do, cu, VIS_PREFIX, dtype)[2]
    for i, got in enumerate([*dq, *dk, *dv]):
        assert_fa_rule(f"{'qkv'[i // 3]}-grad[{i % 3}]", got, want[i], same[i], 3)


def test_unsupported_inputs_are_refused_with_a_reason():
    from motus_fast.kernels.joint_attention_hopper import forward_launcher, unsupported

    mk = lambda *s, dtype=torch.float16: torch.zeros(*s, dtype=dtype)  # noqa: E731
    q = k = v = [mk(10, 2, 64)]
    assert unsupported(q, k, v) is None
    assert "causal" in unsupported(q, k, v, causal=True)
    assert "head_dim=96" in unsupported([mk(10, 2, 96)], [mk(10, 2, 96)], [mk(10, 2, 96)])
    assert "dtype" in unsupported([mk(10, 2, 64, dtype=torch.float32)] * 1, [mk(10, 2, 64, dtype=torch.float32)],
                                  [mk(10, 2, 64, dtype=torch.float32)])
    odd = mk(10, 2, 68)[:, :, :64]                   # head stride 68 x 2 bytes: not 16-byte aligned
    assert "k[0]" in unsupported(q, [odd], v) and "aligned" in unsupported(q, [odd], v)
    with pytest.raises(ValueError, match="joint_attention_hopper: causal"):
        forward_launcher(q, k, v, [torch.tensor([0, 10], dtype=torch.int32)] * 2, [torch.tensor([0, 10],
                         dtype=torch.int32)], [10], visible_bits=1, softmax_scale=0.1, causal=True)


@runs_here
def test_misaligned_base_pointer_raises_naming_the_tensor():
    from motus_fast.kernels.joint_attention_hopper import forward_launcher

    buf = torch.zeros(10 * 2 * 64 + 1, dtype=torch.float16, device=DEVICE)
    shifted = buf[1:].view(10, 2, 64)                # starts 2 bytes past an aligned address
    ok = torch.zeros(10, 2, 64, dtype=torch.float16, device=DEVICE)
    cu = [torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)]
    launch = forward_launcher([ok], [ok], [ok], cu, cu, [10], visible_bits=1, softmax_scale=0.1)
    with pytest.raises(ValueError, match=r"v\[0\].*16-byte aligned"):
        launch([ok], [ok], [shifted], cu, cu)


@runs_here
def test_output_stores_stay_inside_the_segments():
    """The output tile is stored through a descriptor whose shape is the sample's segment: rows past the last
    sample's end (here a partial tile) are not written, so a sentinel after the output buffer survives."""
    from motus_fast.kernels.joint_attention import visibility_bits
    from motus_fast.kernels.joint_attention_hopper import HopperConfig, attention_forward

    dtype = torch.float16
    lens = [[21, 5], [3, 0]]
    q, k, v, _, cu = fused_inputs(lens, 64, dtype, 5)
    outs, bigs = [], []
    for t in q:
        big = torch.full((t.shape[0] + 16, H, 64), 7.0, dtype=dtype, device=DEVICE)
        bigs.append(big)
        outs.append(big[:t.shape[0]])
    attention_forward(q, k, v, cu, cu, [21, 3], visible_bits=visibility_bits(None, 2), softmax_scale=0.125,
                      config=HopperConfig(16, 16, 4, 1), out=outs)
    want, _ = joint_attention_reference(q, k, v, cu, None)
    for e in range(2):
        assert (bigs[e][q[e].shape[0]:] == 7.0).all(), f"out[{e}]: rows past the last segment were written"
        torch.testing.assert_close(outs[e].float(), want[e].float(), atol=2e-3, rtol=2e-3)
