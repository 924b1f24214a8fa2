"""Flow-step ops (noise_and_target, masked_mse, euler_step): Triton kernels (TRITON_INTERPRET=1 on CPU) against
the fp64 reference with DESIGN.md section 6's rule (2x / 3x the same-dtype reference error plus one ulp), on odd
latent shapes, per-sample sigmas/weights/dt, condition frames, action-free samples and CFG. Outputs are allocated
NaN-filled so an element the kernel does not write fails."""

import logging

import pytest
import torch
from kernel_checks import DEVICE, assert_fa_rule, interpreted  # noqa: F401

from motus_fast import backend as backend_mod
from motus_fast.ops.flow_step import (euler_step, euler_step_reference, masked_mse, masked_mse_reference,
                                      noise_and_target, noise_and_target_reference)

# video latents [B, C, T, H, W] (odd sizes) and action chunks [B, K, A]
SHAPES = [(2, 5, 3, 7, 3), (3, 4, 2, 5, 5), (1, 48, 3, 12, 8), (2, 16, 14), (3, 5, 7)]


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def frames_of(shape, g):
    """Condition frames to use for a shape: 0 for actions; 0, 1 or 2 for video."""
    return 0 if len(shape) < 5 else int(torch.randint(0, 3, (1,), generator=g))


@interpreted
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noise_and_target_matches_reference(triton_backend, poisoned_outputs, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x0, noise = rand(g, *shape), rand(g, *shape)
    sigma = torch.rand(shape[0], generator=g, dtype=torch.float64)
    clean = frames_of(shape, g)
    got = noise_and_target(x0.to(DEVICE, dtype), noise.to(DEVICE, dtype), sigma.float().to(DEVICE), clean)
    want = noise_and_target_reference(x0, noise, sigma.float().double(), clean)
    same = noise_and_target_reference(x0.to(dtype), noise.to(dtype), sigma.float(), clean)
    for name, a, b, c in zip(("x_t", "v"), got, want, same):
        assert_fa_rule(f"{name} {shape}", a, b, c, 2)
    if clean:   # the condition frames are x0 itself, bit for bit
        assert torch.equal(got[0][:, :, :clean].cpu(), x0.to(dtype)[:, :, :clean])


@interpreted
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_mse_matches_reference(triton_backend, poisoned_outputs, shape, weights, dtype):
    g = torch.Generator().manual_seed(3 * sum(shape) + len(str(weights)))
    pred, target = rand(g, *shape), rand(g, *shape)
    w = None
    if weights == "bool":
        w = torch.rand(shape[0], generator=g) < 0.5
        w[0] = False           # an action-free sample
    elif weights == "float":
        w = torch.rand(shape[0], generator=g, dtype=torch.float64)
    skip = frames_of(shape, g)
    res = {}
    for kind, dt, fn in (("kernel", dtype, masked_mse), ("ref64", torch.float64, masked_mse_reference),
                         ("ref", dtype, masked_mse_reference)):
        p = pred.to(DEVICE, dt).requires_grad_()
        wt = None if w is None else (w if w.dtype == torch.bool else w.float()).to(DEVICE)
        loss = fn(p, target.to(DEVICE, dt), wt, skip)
        res[kind] = (loss.detach(), *torch.autograd.grad(loss, p, torch.tensor(1.7, dtype=loss.dtype, device=DEVICE)))
    assert res["kernel"][0].dtype == torch.float32
    assert_fa_rule(f"loss {shape}", res["kernel"][0], res["ref64"][0], res["ref"][0].float(), 2)
    assert_fa_rule(f"d_pred {shape}", res["kernel"][1], res["ref64"][1], res["ref"][1], 3)


@interpreted
def test_masked_mse_all_samples_action_free_is_zero(triton_backend):
    pred, target = torch.randn(3, 16, 14), torch.randn(3, 16, 14)
    none = torch.zeros(3, dtype=torch.bool)
    assert masked_mse(pred, target, none).item() == 0.0 == masked_mse_reference(pred, target, none).item()


def draw_streams(g, shapes, cond_frames, dtype):
    xs = [rand(g, *s) for s in shapes]
    vs = [rand(g, *s) for s in shapes]
    conds = [None if c == 0 else rand(g, s[0], s[1], c, *s[3:]) for s, c in zip(shapes, cond_frames)]
    return xs, vs, conds


@interpreted
@pytest.mark.parametrize("case", [
    # (stream shapes, condition frames per stream, dt per sample?)
    ([(2, 5, 3, 7, 3), (2, 16, 14)], [1, 0], False),     # joint: video + actions
    ([(1, 48, 3, 12, 8)], [1], True),                    # world_model / video: video alone
    ([(3, 5, 7)], [0], True),                            # vla / idm: actions alone
    ([(2, 4, 5, 3, 3), (2, 6, 4)], [2, 0], False),       # two condition frames
    ([(2, 3, 2, 2, 2), (2, 5, 4), (2, 4, 3)], [1, 0, 0], False),   # three streams: two launches
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_euler_step_matches_reference(triton_backend, poisoned_outputs, case, dtype):
    shapes, cond_frames, per_sample_dt = case
    g = torch.Generator().manual_seed(len(shapes) + 10 * sum(cond_frames))
    xs, vs, conds = draw_streams(g, shapes, cond_frames, dtype)
    B = shapes[0][0]
    dt64 = -torch.rand(B if per_sample_dt else (), generator=g, dtype=torch.float64)

    def call(fn, dt_, device):
        cast = lambda ts: None if ts is None else [None if t is None else t.to(device, dt_) for t in ts]  # noqa: E731
        return fn(cast(xs), cast(vs), dt64.to(device, dt_), cast(conds))
    got = call(euler_step, dtype, DEVICE)
    want = call(euler_step_reference, torch.float64, "cpu")
    same = call(euler_step_reference, dtype, "cpu")
    for i, (a, b, c) in enumerate(zip(got, want, same)):
        assert_fa_rule(f"stream {i} {shapes[i]}", a, b, c, 2)
        if conds[i] is not None:   # condition frames re-clamped exactly
            assert torch.equal(a[:, :, :cond_frames[i]].cpu(), conds[i].to(dtype))


@interpreted
def test_video_and_action_streams_share_one_launch(triton_backend, monkeypatch):
    import motus_fast.kernels.flow_step as K

    launches = []
    kernel = K.euler_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(K, "euler_step_kernel", Counting())
    g = torch.Generator().manual_seed(0)
    xs, vs, conds = draw_streams(g, [(2, 5, 3, 7, 3), (2, 16, 14)], [1, 0], torch.float32)
    f32 = lambda ts: [None if t is None else t.to(DEVICE, torch.float32) for t in ts]  # noqa: E731
    euler_step(f32(xs), f32(vs), torch.tensor(-0.1, device=DEVICE), f32(conds))
    assert len(launches) == 1


@interpreted
def test_log_names_the_backend(triton_backend, monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_logged", set())
    x = torch.randn(2, 3, 2, 2, 2, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        noise_and_target(x, x, torch.rand(2, device=DEVICE), 1)
        euler_step([x], [x], torch.tensor(-0.5, device=DEVICE), [x[:, :, :1]])
        masked_mse(x, x, None, 1)
    for op in ("noise_and_target", "euler_step", "masked_mse"):
        assert f"{op}: using the triton backend" in caplog.text


def test_bad_inputs_name_the_field():
    x = torch.randn(2, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="sigma must be"):
        noise_and_target(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="condition frames do not fit"):
        noise_and_target(torch.randn(2, 16, 14), torch.randn(2, 16, 14), torch.rand(2), clean_frames=1)
    with pytest.raises(ValueError, match="target is"):
        masked_mse(x, x[:1])
    with pytest.raises(ValueError, match=r"conds\[0\] has shape"):
        euler_step([x], [x], torch.tensor(-0.1), [torch.randn(2, 4, 1, 3, 2)])
    with pytest.raises(ValueError, match="dt must be"):
        euler_step([x], [x], torch.full((3,), -0.1))
    with pytest.raises(ValueError, match="one v"):
        euler_step([x, x], [x], torch.tensor(-0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_euler_step_on_gpu(monkeypatch, backend):
    """motus-8b sampling shapes in bf16: video latents [1, 48, 3, 24, 20] + actions [1, 16, 14], one launch."""
    from motus_fast.ops.availability import cuda_ops_loaded
    if backend == "cuda" and not cuda_ops_loaded():
        pytest.skip("the CUDA C++ extension is not built (tests/csrc/test_csrc_build.py builds and tests it)")
    monkeypatch.setenv("MOTUS_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    xs, vs, conds = draw_streams(g, [(1, 48, 3, 24, 20), (1, 16, 14)], [1, 0], torch.bfloat16)
    cast = lambda ts, dt_, dev: [None if t is None else t.to(dev, dt_) for t in ts]  # noqa: E731
    dt = torch.tensor(-0.1)
    got = euler_step(cast(xs, torch.bfloat16, "cuda"), cast(vs, torch.bfloat16, "cuda"),
                     dt.to("cuda", torch.bfloat16), cast(conds, torch.bfloat16, "cuda"))
    want = euler_step_reference(xs, vs, dt.to(torch.bfloat16).double(), conds)
    same = euler_step_reference(cast(xs, torch.bfloat16, "cpu"), cast(vs, torch.bfloat16, "cpu"),
                                dt.to(torch.bfloat16), cast(conds, torch.bfloat16, "cpu"))
    for i in range(2):
        assert_fa_rule(f"{backend} stream {i}", got[i], want[i], same[i], 2)


@interpreted
def test_torch_compile_traces_the_ops(triton_backend):
    """fake impls (+ masked_mse's autograd): a compiled graph gives the eager values."""
    g = torch.Generator().manual_seed(9)
    video, actions = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 4, 3, 2, 2), (2, 16, 14)))
    pred = torch.randn(2, 4, 3, 2, 2, generator=g).to(DEVICE).requires_grad_()

    def f(video, actions, pred):
        x_t, v = noise_and_target(video, video.flip(0), torch.tensor([0.3, 0.8], device=video.device), 1)
        stepped = euler_step([x_t, actions], [v, actions], torch.tensor(-0.1, device=video.device),
                             [video[:, :, :1], None])
        return masked_mse(pred, stepped[0], None, 1), stepped[1]
    eager = f(video, actions, pred)
    d_eager = torch.autograd.grad(eager[0], pred)[0]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(video, actions, pred)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(compiled[0], pred)[0], d_eager, rtol=0, atol=0)
