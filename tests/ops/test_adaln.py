"""AdaLN ops: Triton kernels (TRITON_INTERPRET=1 on CPU) against the fp64 reference, forward and backward.

DESIGN.md section 6: the kernel's max error against the reference computed in fp64 must be at most 2x (outputs) or
3x (gradients) the error of the same reference computed in the kernel's dtype, plus a rounding floor of one ulp at
the output's scale. Shapes are drawn per case (batch 1-3, odd lengths, widths 3072/1024/512/96/123); outputs are
allocated NaN-filled so an element the kernel does not write fails.
"""

import logging

import pytest
import torch
from kernel_checks import DEVICE, assert_fa_rule, interpreted  # noqa: F401

from motus_fast import backend as backend_mod
from motus_fast.ops.adaln import (adaln_modulate, adaln_modulate_reference, gated_residual_adaln,
                                  gated_residual_adaln_reference, layer_norm)

WIDTHS = [3072, 1024, 512, 96, 123]


# ---- helpers ------------------------------------------------------------------------------------------------------
def draw(D, mod, dtype, seed, B=None, L=None):
    """x, y [B, L, D]; gate/shift/scale per sample [B, 1, D], per token [B, L, D] or None; upstream grads."""
    g = torch.Generator().manual_seed(seed)
    B = B if B is not None else int(torch.randint(1, 4, (1,), generator=g))
    L = L if L is not None else int(torch.tensor([1, 3, 7, 17, 33])[torch.randint(5, (1,), generator=g)])
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale + 0.3)  # noqa: E731
    x, y = mk(B, L, D), mk(B, L, D)
    rows = {"sample": 1, "token": L}.get(mod)
    # modulation as the model makes it: chunks of one [B, rows, 6, D] table (strided views)
    table = None if rows is None else mk(B, rows, 6, D, scale=0.5)
    gate, shift, scale = (None, None, None) if table is None else table.unbind(2)[:3]
    dx_out, dh = mk(B, L, D), mk(B, L, D)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (x, y, gate, shift, scale, dx_out, dh)]


def run(fn, inputs, grads_out, dtype):
    """Run fn on leaf copies of `inputs` in `dtype`; return outputs and the inputs' gradients."""
    leaves = [None if t is None else t.to(DEVICE, dtype).detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, present, [g.to(DEVICE, dtype) for g in grads_out])
    it = iter(grads)
    return [o.detach() for o in outs], [None if t is None else next(it) for t in leaves]


def check_against_reference(name, fn, ref, inputs, grads_out, dtype):
    out, grads = run(fn, inputs, grads_out, dtype)
    out64, grads64 = run(ref, inputs, grads_out, torch.float64)
    out_d, grads_d = run(ref, inputs, grads_out, dtype)
    for i, (o, o64, od) in enumerate(zip(out, out64, out_d)):
        assert_fa_rule(f"{name} output {i}", o.cpu(), o64.cpu(), od.cpu(), 2)
    for i, (gr, g64, gd) in enumerate(zip(grads, grads64, grads_d)):
        if gr is not None:
            assert_fa_rule(f"{name} grad of input {i}", gr.cpu(), g64.cpu(), gd.cpu(), 3)


# ---- tests --------------------------------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("mod", ["sample", "token", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaln_modulate_matches_reference(triton_backend, poisoned_outputs, D, mod, dtype):
    x, _, _, shift, scale, _, dh = draw(D, mod, dtype, seed=D + 7 * (mod is None) + 3 * (mod == "token"))
    check_against_reference("adaln_modulate", lambda x, sh, sc: adaln_modulate(x, sh, sc, 1e-6),
                            lambda x, sh, sc: adaln_modulate_reference(x, sh, sc, 1e-6), [x, shift, scale], [dh],
                            dtype)


@interpreted
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("mod", ["sample", "token", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_residual_adaln_matches_reference(triton_backend, poisoned_outputs, D, mod, dtype):
    x, y, gate, shift, scale, dx_out, dh = draw(D, mod, dtype, seed=11 * D + (mod == "token"))
    check_against_reference(
        "gated_residual_adaln", lambda *a: gated_residual_adaln(*a, 1e-5),
        lambda *a: gated_residual_adaln_reference(*a, 1e-5), [x, y, gate, shift, scale], [dx_out, dh], dtype)


@interpreted
@pytest.mark.parametrize("D", [512, 123])
def test_rms_variant_and_ungated_residual(triton_backend, poisoned_outputs, D):
    x, y, _, shift, scale, dx_out, dh = draw(D, "token", torch.float32, seed=D)
    check_against_reference("adaln rms", lambda *a: adaln_modulate(*a, 1e-6, norm="rms"),
                            lambda *a: adaln_modulate_reference(*a, 1e-6, norm="rms"), [x, shift, scale], [dh],
                            torch.float32)
    check_against_reference("gated residual rms, no gate",
                            lambda x, y, sh, sc: gated_residual_adaln(x, y, None, sh, sc, 1e-6, norm="rms"),
                            lambda x, y, sh, sc: gated_residual_adaln_reference(x, y, None, sh, sc, 1e-6, "rms"),
                            [x, y, shift, scale], [dx_out, dh], torch.float32)


@interpreted
def test_broadcast_over_batch_and_packed_rows(triton_backend, poisoned_outputs):
    """A [1, 1, D] modulation (one table for the whole batch) and the und stream's packed [T, D] rows."""
    x, y, _, _, _, dx_out, dh = draw(96, None, torch.float32, seed=5, B=3, L=5)
    table = torch.randn(1, 1, 2, 96, dtype=torch.float64)
    check_against_reference("batch-broadcast", lambda x, sh, sc: adaln_modulate(x, sh, sc, 1e-6),
                            lambda x, sh, sc: adaln_modulate_reference(x, sh, sc, 1e-6),
                            [x, table[:, :, 0], table[:, :, 1]], [dh], torch.float32)
    check_against_reference("packed residual + LN", lambda x, y: gated_residual_adaln(x, y, None, None, None, 1e-5),
                            lambda x, y: gated_residual_adaln_reference(x, y, None, None, None, 1e-5),
                            [x[0], y[0]], [dx_out[0], dh[0]], torch.float32)
    with torch.no_grad():
        got = layer_norm(x[0].float(), 1e-5)
    assert_fa_rule("layer_norm", got, adaln_modulate_reference(x[0].double(), None, None, 1e-5),
                   adaln_modulate_reference(x[0].float(), None, None, 1e-5), 2)


@interpreted
def test_empty_inputs(triton_backend):
    x, y, gate, shift, scale, _, _ = draw(64, "sample", torch.float32, seed=0, B=2, L=0)
    xr, h = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
    assert xr.shape == h.shape == (2, 0, 64)


@interpreted
def test_log_names_the_backend(triton_backend, monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_logged", set())
    x, _, _, shift, scale, _, _ = draw(32, "sample", torch.float32, seed=1)
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        adaln_modulate(x.to(DEVICE), shift.to(DEVICE), scale.to(DEVICE), 1e-6)
    assert "adaln_modulate: using the triton backend" in caplog.text


def test_unrunnable_triton_request_logs_and_uses_the_reference(monkeypatch, caplog):
    """Without a GPU or the interpreter, MOTUS_BACKEND=triton falls back to the reference, and says so."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton kernels can run")
    monkeypatch.setenv("MOTUS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend_mod, "_logged", set())
    x, y, gate, shift, scale, _, _ = draw(32, "sample", torch.float32, seed=2)
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        got = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
    want = gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "gated_residual_adaln: MOTUS_BACKEND=triton requested but no triton implementation" in caplog.text


def test_bad_inputs_name_the_field():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="scale must be"):
        adaln_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 7), 1e-6)
    with pytest.raises(ValueError, match="both shift and scale"):
        adaln_modulate(x, torch.randn(2, 1, 8), None, 1e-6)
    with pytest.raises(ValueError, match="y is"):
        gated_residual_adaln(x, torch.randn(2, 4, 8), None, None, None, 1e-6)
    with pytest.raises(ValueError, match="norm must be"):
        adaln_modulate(x, None, None, 1e-6, norm="batch")
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\]"):
        adaln_modulate(torch.randn(5, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(1, 360, 3072), (8, 4096, 3072), (2, 21, 1024)])
def test_bf16_motus_shapes_on_gpu(monkeypatch, backend, shape):
    """bf16 at motus-8b shapes (inference B=1 x 360, training 8 x 4096), forward on both GPU backends; the CUDA
    backend serves inference only, so its gradients come from Triton."""
    from motus_fast.ops.availability import cuda_ops_loaded
    if backend == "cuda" and not cuda_ops_loaded():
        pytest.skip("the CUDA C++ extension is not built (tests/csrc/test_csrc_build.py builds and tests it)")
    monkeypatch.setenv("MOTUS_BACKEND", backend)
    B, L, D = shape
    x, y, gate, shift, scale, dx_out, dh = draw(D, "sample", torch.bfloat16, seed=L, B=B, L=L)
    dev = lambda t: t.cuda()  # noqa: E731
    with torch.no_grad():
        got = gated_residual_adaln(*map(dev, (x, y, gate, shift, scale)), 1e-6)
        want64 = gated_residual_adaln_reference(*(dev(t).double() for t in (x, y, gate, shift, scale)), 1e-6)
        want = gated_residual_adaln_reference(*map(dev, (x, y, gate, shift, scale)), 1e-6)
        for i in range(2):
            assert_fa_rule(f"{backend} output {i}", got[i], want64[i], want[i], 2)
    if backend == "triton":
        check_against_reference("bf16 gated_residual_adaln", lambda *a: gated_residual_adaln(*a, 1e-6),
                                lambda *a: gated_residual_adaln_reference(*a, 1e-6), [x, y, gate, shift, scale],
                                [dx_out, dh], torch.bfloat16)


@interpreted
def test_torch_compile_traces_the_ops(triton_backend):
    """fake impls + autograd: a compiled graph (no graph break) gives the eager values and gradients."""
    x, y, gate, shift, scale, _, _ = draw(64, "token", torch.float32, seed=3, B=2, L=5)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (x, y, gate, shift, scale)]

    def f(x, y, gate, shift, scale):
        xr, h = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
        return (adaln_modulate(xr, shift, scale, 1e-6) * h).sum()
    eager = f(*leaves)                     # also logs the backend choice outside the compiled region
    grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    for a, b in zip(torch.autograd.grad(compiled, leaves), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
