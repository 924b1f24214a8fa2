"""The per-signature launch plans of the public ops (motus_fast/ops/*, availability.PlanCache).

- In eager inference the ops launch directly, without the ``torch.ops.motus_fast`` custom ops; the custom-op path
  (autograd, torch.compile) must give the same bits for the same inputs.
- Checks run once per signature: a call whose signature differs from a cached one (shape, dtype, strides) is
  checked again and a bad input still raises its message; values that are not in the signature (CPU cu_seqlens)
  are checked on every call; a new stride pattern gets its own launch arguments (read through correctly).
- A changed MOTUS_BACKEND is seen by the next call.
"""

import pytest
import torch
from kernel_checks import DEVICE, interpreted
from torch.utils._python_dispatch import TorchDispatchMode

from motus_fast.ops import adaln as adaln_ops
from motus_fast.ops.flow_step import euler_step_reference
from motus_fast.ops import (ExpertQK, adaln_modulate, euler_step, gated_residual_adaln, joint_attention,
                            qk_norm_rope)

pytestmark = interpreted
H, D = 2, 64
W = H * D


class CustomOpCalls(TorchDispatchMode):
    """Records which torch.ops.motus_fast ops are dispatched."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("motus_fast."):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def mk(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)


def rope(L):
    angles = torch.rand(L, D // 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 6.3
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


# name -> (inputs, call(*inputs) -> list of output tensors); modulation and q/k as the model makes them (strided
# chunks of one table / one qkv projection), a keys-only expert, a frame-sliced condition
def _adaln():
    table = mk(2, 1, 6, W, seed=1)
    return [mk(2, 5, W), table[:, :, 0], table[:, :, 1]], lambda x, sh, sc: [adaln_modulate(x, sh, sc, 1e-6)]


def _gated():
    table = mk(2, 5, 6, W, seed=1)
    return ([mk(2, 5, W), mk(2, 5, W, seed=2), table[:, :, 2], table[:, :, 0], table[:, :, 1]],
            lambda x, y, g, sh, sc: list(gated_residual_adaln(x, y, g, sh, sc, 1e-6)))


def _rows():
    return [mk(7, W)], lambda x: [adaln_modulate(x, None, None, 1e-6)]


def _qk():
    video, action, und = mk(1, 6, 3 * W, seed=1), mk(1, 4, 3 * W, seed=2), mk(5, 3 * W, seed=3)
    weights = [mk(W, seed=10 + i) for i in range(6)]
    cos, sin = rope(6)

    def call(vq, vk, aq, ak, uk, *w):
        experts = [ExpertQK(vq, vk, w[0], w[1], 1e-6, (cos, sin)), ExpertQK(aq, ak, w[2], w[3], 1e-5),
                   ExpertQK(None, uk, None, w[5], 1e-6)]
        return [t for pair in qk_norm_rope(experts, H) for t in pair if t is not None]
    return [video[..., :W], video[..., W:2 * W], action[..., :W], action[..., W:2 * W], und[:, W:2 * W],
            *weights], call


def _attention():
    lens = [(3, 5), (2, 1), (4, 2)]                 # per expert: samples' lengths
    cu = [torch.tensor([0, a, a + b], dtype=torch.int32, device=DEVICE) for a, b in lens]
    T = [a + b for a, b in lens]

    def call(q0, q1, k0, k1, k2, v0, v1, v2):
        return [o for o in joint_attention([q0, q1, None], [k0, k1, k2], [v0, v1, v2], cu,
                                           max_seqlens=[max(n) for n in lens]) if o is not None]
    return ([mk(T[0], H, D, seed=1), mk(T[1], H, D, seed=2)] + [mk(t, H, D, seed=3 + e) for e, t in enumerate(T)]
            + [mk(t, H, D, seed=6 + e) for e, t in enumerate(T)]), call


OPS = {"adaln_modulate": _adaln, "gated_residual_adaln": _gated, "rows": _rows, "qk_norm_rope": _qk,
       "joint_attention": _attention}


@pytest.mark.parametrize("name", list(OPS))
def test_fast_path_and_custom_op_give_the_same_bits(name, triton_backend):
    inputs, call = OPS[name]()
    with torch.no_grad(), CustomOpCalls() as fast:
        want = call(*inputs)
        again = call(*inputs)                               # the cached plan
    assert fast.names == []                                 # no dispatcher in eager inference
    leaves = [t.detach().clone().requires_grad_() for t in inputs]   # needs grad: the custom op, with autograd
    with CustomOpCalls() as slow:
        got = call(*leaves)
    assert slow.names and all(n.startswith("motus_fast.") for n in slow.names)
    for w, a, g in zip(want, again, got):
        assert torch.equal(w, a) and torch.equal(w, g.detach())


@pytest.mark.parametrize("layout", ["frame slice", "transposed frames"])
def test_euler_step_fast_path_is_the_custom_op(layout, triton_backend):
    lat, vel = mk(2, 4, 3, 2, 5, seed=1), mk(2, 4, 3, 2, 5, seed=2)
    act, vact = mk(2, 16, 14, seed=3), mk(2, 16, 14, seed=4)
    if layout == "frame slice":                              # read through its strides
        cond = mk(2, 4, 3, 2, 5, seed=5)[:, :, :2]
    else:                                                    # frames not contiguous: copied per call
        cond = mk(2, 4, 2, 5, 2, seed=5).transpose(3, 4)
    dt = torch.tensor([-0.1, -0.2], device=DEVICE)
    with CustomOpCalls() as fast:
        want = euler_step([lat, act], [vel, vact], dt, [cond, None])
    assert fast.names == []
    got = torch.ops.motus_fast.euler_step([lat, act], [vel, vact], dt, [cond, None])
    for w, g, r in zip(want, got, euler_step_reference([lat, act], [vel, vact], dt, [cond, None])):
        assert torch.equal(w, g)
        torch.testing.assert_close(w, r)
    assert torch.equal(want[0][:, :, :2], cond)             # the condition frames re-clamped exactly


def test_a_new_signature_is_checked_again(triton_backend):
    x = mk(2, 5, W)
    table = mk(2, 1, 6, W, seed=1)
    adaln_modulate(x, table[:, :, 0], table[:, :, 1], 1e-6)                   # cached
    x2 = mk(1, 3, W)
    with pytest.raises(ValueError, match="shift must be a floating"):         # new shapes: checked
        adaln_modulate(x2, x2[:, :1, :D], x2[:, :1, :D], 1e-6)
    with pytest.raises(ValueError, match="shift must be a floating"):         # new dtype only
        adaln_modulate(x, table[:, :, 0].to(torch.int32), table[:, :, 1].to(torch.int32), 1e-6)

    inputs, call = _attention()
    call(*inputs)                                                             # cached
    bad_dtype = list(inputs)
    bad_dtype[6] = bad_dtype[6].double()                                      # v[1]
    with pytest.raises(ValueError, match=r"v\[1\] is torch.float64"):
        call(*bad_dtype)
    bad_shape = list(inputs)
    bad_shape[0] = bad_shape[0][:-1]
    with pytest.raises(ValueError, match=r"q\[0\] has shape"):
        call(*bad_shape)

    inputs, call = _qk()
    call(*inputs)
    with pytest.raises(ValueError, match="weight_q must be"):
        call(*inputs[:5], inputs[5][:D], *inputs[6:])

    lat = mk(2, 4, 3, 2, 5)
    euler_step([lat], [lat], torch.tensor([-0.1, -0.2], device=DEVICE))
    with pytest.raises(ValueError, match="dt must be"):
        euler_step([lat], [lat], torch.tensor([-0.1, -0.2, -0.3], device=DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="device cu_seqlens are the caller's promise (not read on the host)")
def test_boundary_values_are_checked_on_every_call(triton_backend):
    q = mk(8, H, D)
    good = torch.tensor([0, 3, 8], dtype=torch.int32)
    joint_attention([q], [q], [q], [good], max_seqlens=[5])                   # cached
    with pytest.raises(ValueError, match=r"cu_seqlens\[0\] must rise from 0 to the buffer length 8"):
        joint_attention([q], [q], [q], [torch.tensor([0, 3, 7], dtype=torch.int32)], max_seqlens=[5])
    with pytest.raises(ValueError, match=r"max_seqlens\[0\]=5 is below the longest segment of cu_seqlens\[0\] \(6\)"):
        joint_attention([q], [q], [q], [torch.tensor([0, 2, 8], dtype=torch.int32)], max_seqlens=[5])
    with pytest.raises(ValueError, match=r"must rise"):
        joint_attention([q], [q], [q], [torch.tensor([0, 9, 8], dtype=torch.int32)], max_seqlens=[5])
    joint_attention([q], [q], [q], [good], max_seqlens=[5])                   # found valid: not read again...
    good[1] = 9                                                               # ...until changed in place
    with pytest.raises(ValueError, match=r"must rise"):
        joint_attention([q], [q], [q], [good], max_seqlens=[5])
    with torch.inference_mode():                                              # no version counter: read each call
        frozen = torch.tensor([0, 3, 8], dtype=torch.int32)
        joint_attention([q], [q], [q], [frozen], max_seqlens=[5])
        joint_attention([q], [q], [q], [frozen], max_seqlens=[5])
        frozen[1] = 9
        with pytest.raises(ValueError, match=r"must rise"):
            joint_attention([q], [q], [q], [frozen], max_seqlens=[5])


def test_new_strides_get_their_own_launch(triton_backend):
    """The same values through other strides (a row slice of a wider buffer) give the same bits: the launch reads
    the new strides, not the cached plan's."""
    inputs, call = _attention()
    with torch.no_grad():
        want = call(*inputs)
        wide = [torch.cat([t, torch.zeros_like(t)], dim=-1)[..., :D] for t in inputs]   # token stride 2*H*D
        got = call(*wide)
    assert wide[0].stride() != inputs[0].stride()
    for w, g in zip(want, got):
        assert torch.equal(w, g)

    x = mk(2, 5, W)
    table = mk(2, 1, 6, W, seed=1)
    with torch.no_grad():
        want = adaln_modulate(x, table[:, :, 0], table[:, :, 1], 1e-6)
        x_wide = torch.cat([x, x], dim=-1)[..., :W]                           # row stride 2W
        got = adaln_modulate(x_wide, table[:, :, 0].contiguous(), table[:, :, 1].contiguous(), 1e-6)
    assert torch.equal(want, got)


def test_a_changed_backend_is_seen(monkeypatch):
    calls = []
    reference = adaln_ops.adaln_modulate_reference
    monkeypatch.setattr(adaln_ops, "adaln_modulate_reference", lambda *a: calls.append(1) or reference(*a))
    x = mk(2, 5, W)
    table = mk(2, 1, 6, W, seed=1)
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    with torch.no_grad():
        adaln_modulate(x, table[:, :, 0], table[:, :, 1], 1e-6)
        assert calls == []
        monkeypatch.setenv("MOTUS_BACKEND", "reference")
        adaln_modulate(x, table[:, :, 0], table[:, :, 1], 1e-6)
        assert calls == [1]
        monkeypatch.setenv("MOTUS_BACKEND", "triton")
        adaln_modulate(x, table[:, :, 0], table[:, :, 1], 1e-6)
        assert calls == [1]


def test_inference_writes_the_lse_only_when_asked(triton_backend, monkeypatch):
    """The eager inference plan launches a kernel variant without the LSE store unless return_lse: same outputs
    either way, and the LSE, when asked for, is the reference's."""
    import sys

    import motus_fast.kernels.joint_attention as K
    from motus_fast.ops.joint_attention import joint_attention_reference

    JA = sys.modules["motus_fast.ops.joint_attention"]
    monkeypatch.setattr(JA, "_PLANS", type(JA._PLANS)())             # a plan built here, by the spied launcher
    built, real = [], K.forward_launcher
    monkeypatch.setattr(K, "forward_launcher", lambda *a, **kw: built.append(kw["write_lse"]) or real(*a, **kw))

    inputs, _ = _attention()
    q0, q1, k0, k1, k2, v0, v1, v2 = inputs
    lens = [(3, 5), (2, 1), (4, 2)]
    cu = [torch.tensor([0, a, a + b], dtype=torch.int32, device=DEVICE) for a, b in lens]
    args = ([q0, q1, None], [k0, k1, k2], [v0, v1, v2], cu)
    with torch.no_grad(), CustomOpCalls() as fast:
        plain = joint_attention(*args, max_seqlens=[5, 2, 4])
        out, lse = joint_attention(*args, max_seqlens=[5, 2, 4], return_lse=True)
    assert fast.names == [] and built == [False, True]                  # the LSE-writing variant when first asked
    _, want = joint_attention_reference(*[[None if t is None else t.double() for t in ts] for ts in args[:3]], cu,
                                        return_lse=True)
    for e in range(2):
        assert torch.equal(plain[e], out[e])
        torch.testing.assert_close(lse[e].double(), want[e], atol=1e-5, rtol=1e-5)
    assert plain[2] is None and lse[2] is None


def test_plans_keep_no_tensor_alive(triton_backend):
    """A cached plan holds what the signature determines, not the tensors of the call that built it."""
    import gc
    import weakref

    for name, make in OPS.items():
        inputs, call = make()
        with torch.no_grad():
            call(*inputs)
            call(*inputs)                               # through the cached plan (and its lookups)
        refs = [weakref.ref(t) for t in inputs if isinstance(t, torch.Tensor) and t._base is None]
        closure = dict(zip(call.__code__.co_freevars, (c.cell_contents for c in call.__closure__ or ())))
        refs += [weakref.ref(c) for c in closure.get("cu", [])]   # joint attention's boundaries (values checked)
        del inputs, call, closure
        gc.collect()
        assert all(r() is None for r in refs), name
