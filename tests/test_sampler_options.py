"""Sampler options (motus_fast.flow.SamplerOptions): the exact video/und cache equals the uncached sampler bit for
bit for a model whose video/und queries do not see actions; each approximate shortcut runs the steps it promises
and stays near the exact sampler; FP8 weights match an independent dequantised computation."""

import pytest
import torch

from motus_fast.config import get_preset
from motus_fast.flow import (FlowBatch, SamplerOptions, get_sampler, sample, training_loss, video_step_points)
from motus_fast.infer import InferenceEngine
from motus_fast.model import Conditioning, Motus
from motus_fast.model.fp8 import Fp8Linear, dequantize, quantize, quantize_video_linears

EXACT_CACHE_OFF = SamplerOptions(context_cache=False)


def make_model(see_actions: bool, layers: int = 2, seed: int = 0) -> Motus:
    torch.manual_seed(seed)
    cfg = get_preset("tiny").override({"video_und_see_actions": see_actions, "num_layers": layers})
    model = Motus(cfg).eval()
    for p in model.parameters():        # the fresh init zeroes the heads: give every path a say
        torch.nn.init.normal_(p, std=0.05)
    return model


def make_inputs(cfg, B=2, frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(text=torch.randn(B, 6, cfg.video.text_dim, generator=g),
                        vlm=torch.randn(B, 5, cfg.und.vlm_dim, generator=g),
                        state=torch.randn(B, cfg.action.state_dim, generator=g), vlm_lens=torch.tensor([5, 3][:B]))
    clip = torch.randn(B, cfg.video.in_channels, frames, 4, 6, generator=g)
    noise = dict(noise_video=torch.randn(B, cfg.video.in_channels, frames, 4, 6, generator=g),
                 noise_action=torch.randn(B, cfg.action.chunk_size, cfg.action.action_dim, generator=g))
    return cond, clip, noise


def mode_kw(mode, clip):
    return dict(video=clip) if mode == "idm" else dict(cond_latent=clip[:, :, :1])


def count_calls(monkeypatch, model, names=("forward", "context_kv", "action_velocity")):
    counts = {n: 0 for n in names}
    for n in names:
        fn = getattr(model, n)

        def spy(*args, _fn=fn, _n=n, **kw):
            counts[_n] += 1
            return _fn(*args, **kw)
        monkeypatch.setattr(model, n, spy)
    return counts


# ---- item 2: exact video/und cache --------------------------------------------------------------------------
def test_blind_video_does_not_depend_on_actions():
    """With the visibility, the video velocity ignores the actions (and with all-visible it does not)."""
    for see, should_change in ((False, False), (True, True)):
        model = make_model(see)
        cond, clip, noise = make_inputs(model.cfg)
        B = clip.shape[0]
        t = torch.full((B,), 500.0)
        with torch.no_grad():
            v1, _ = model(clip, t, noise["noise_action"], t, cond)
            v2, _ = model(clip, t, noise["noise_action"] + 1.0, t, cond)
        assert (not torch.equal(v1, v2)) == should_change


@pytest.mark.parametrize("mode", ["vla", "idm"])
def test_exact_cache_is_bitwise_equal_to_uncached_sampler(mode, monkeypatch):
    model = make_model(see_actions=False)
    cond, clip, noise = make_inputs(model.cfg)
    ref = sample(model, mode, cond=cond, steps=4, options=EXACT_CACHE_OFF, **mode_kw(mode, clip), **noise)
    counts = count_calls(monkeypatch, model)
    out = sample(model, mode, cond=cond, steps=4, **mode_kw(mode, clip), **noise)
    assert counts == {"forward": 0, "context_kv": 1, "action_velocity": 4}     # video/und once, actions per step
    assert torch.equal(out.actions, ref.actions)
    if mode == "idm":
        assert torch.equal(out.video, clip)
    # the engine (the same loop on its caches) too
    engine = InferenceEngine(model)
    prepared = engine.prepare_tensors(cond, None if mode == "idm" else clip[:, :, :1])
    assert torch.equal(engine.sample(mode, prepared, steps=4, **mode_kw(mode, clip) if mode == "idm" else {},
                                     **noise).actions, ref.actions)


def test_exact_cache_is_bitwise_equal_on_the_triton_kernels(triton_backend):
    """The same on the Triton joint attention (interpreted on CPU): the action queries' tiles read the same keys."""
    model = make_model(see_actions=False, layers=1)
    cond, clip, noise = make_inputs(model.cfg, B=1, frames=2)
    ref = sample(model, "vla", cond=cond, steps=2, options=EXACT_CACHE_OFF, cond_latent=clip[:, :, :1], **noise)
    out = sample(model, "vla", cond=cond, steps=2, cond_latent=clip[:, :, :1], **noise)
    assert torch.equal(out.actions, ref.actions)


def test_exact_cache_does_not_apply_to_all_visible_models(monkeypatch):
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    counts = count_calls(monkeypatch, model)
    sample(model, "vla", cond=cond, steps=3, cond_latent=clip[:, :, :1], **noise)
    assert counts == {"forward": 3, "context_kv": 0, "action_velocity": 0}


def test_training_with_the_visibility_keeps_video_loss_independent_of_actions():
    """The option trains: the action loss reaches every expert, the video loss gets no gradient from actions."""
    model = make_model(see_actions=False).train()
    cond, clip, noise = make_inputs(model.cfg)
    actions = noise["noise_action"].clone().requires_grad_(True)
    out = training_loss(model, FlowBatch(clip, actions, cond), generator=torch.Generator().manual_seed(0))
    (g_video,) = torch.autograd.grad(out["loss_video"], actions, allow_unused=True)
    assert g_video is None or torch.count_nonzero(g_video) == 0
    out["loss_action"].backward()
    assert model.blocks[0].video.qkv.weight.grad.abs().sum() > 0      # video K/V serve the action queries
    assert actions.grad.abs().sum() > 0


# ---- item 3: approximate shortcuts ---------------------------------------------------------------------------
def test_action_only_suffix_runs_full_steps_then_the_action_expert(monkeypatch):
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    exact = sample(model, "vla", cond=cond, steps=6, cond_latent=clip[:, :, :1], **noise)
    counts = count_calls(monkeypatch, model)
    out = sample(model, "vla", cond=cond, steps=6, cond_latent=clip[:, :, :1],
                 options=SamplerOptions(action_only_after=2), **noise)
    assert counts == {"forward": 2, "context_kv": 0, "action_velocity": 4}
    cos = torch.nn.functional.cosine_similarity(out.actions.flatten(), exact.actions.flatten(), dim=0)
    assert cos > 0.9 and not torch.equal(out.actions, exact.actions)      # an approximation: close, not equal
    counts.update(forward=0, action_velocity=0)
    sample(model, "joint", cond=cond, steps=6, cond_latent=clip[:, :, :1], options=SamplerOptions(action_only_after=2),
           **noise)
    assert counts["forward"] == 6 and counts["action_velocity"] == 0     # not in modes that integrate video


def test_action_only_suffix_equals_the_exact_sampler_for_a_blind_model():
    """On a model trained with the visibility, freezing video/und after step s changes nothing in vla."""
    model = make_model(see_actions=False)
    cond, clip, noise = make_inputs(model.cfg)
    ref = sample(model, "vla", cond=cond, steps=4, cond_latent=clip[:, :, :1], options=EXACT_CACHE_OFF, **noise)
    out = sample(model, "vla", cond=cond, steps=4, cond_latent=clip[:, :, :1],
                 options=SamplerOptions(context_cache=False, action_only_after=1), **noise)
    assert torch.equal(out.actions, ref.actions)


def test_velocity_cache_skips_only_below_its_threshold(monkeypatch):
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    kw = dict(cond=cond, steps=6, cond_latent=clip[:, :, :1], **noise)
    exact = sample(model, "joint", **kw)
    tiny = sample(model, "joint", options=SamplerOptions(velocity_threshold=1e-9), **kw)
    assert torch.equal(tiny.actions, exact.actions) and torch.equal(tiny.video, exact.video)   # never skips
    counts = count_calls(monkeypatch, model)
    huge = sample(model, "joint", options=SamplerOptions(velocity_threshold=1e9), **kw)
    assert counts["forward"] == 1 and counts["action_velocity"] == 5       # always skips after the first step
    # skipping reuses the first velocity: the video is one Euler step of size 1 from the first evaluation
    one = sample(model, "joint", **dict(kw, steps=1))
    torch.testing.assert_close(huge.video, one.video, rtol=1e-5, atol=1e-5)


def test_video_steps_evaluate_the_video_stream_on_a_coarse_grid(monkeypatch):
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    assert video_step_points(10, 5) == {0, 2, 4, 6, 8} and video_step_points(10, 3) == {0, 3, 6}
    kw = dict(cond=cond, cond_latent=clip[:, :, :1], **noise)
    counts = count_calls(monkeypatch, model)
    out = sample(model, "joint", steps=4, options=SamplerOptions(video_steps=2), **kw)
    assert counts == {"forward": 2, "context_kv": 0, "action_velocity": 2}
    # world_model: the video stream alone integrates, so 2 video steps of 4 == 2 plain steps
    actions = noise["noise_action"] * 0.3
    wm = sample(model, "world_model", steps=4, options=SamplerOptions(video_steps=2), actions=actions, **kw)
    plain = sample(model, "world_model", steps=2, actions=actions, **kw)
    torch.testing.assert_close(wm.video, plain.video, rtol=1e-5, atol=1e-5)
    assert out.actions.shape == noise["noise_action"].shape


def test_fp8_linear_matches_dequantised_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    for gran in ("tensor", "row"):
        f = Fp8Linear(lin, gran)
        # independent: quantise by hand (e4m3 max 448) and multiply in float64
        wamax = lin.weight.abs().amax() if gran == "tensor" else lin.weight.abs().amax(1, keepdim=True)
        w = (lin.weight / (wamax / 448)).to(torch.float8_e4m3fn).double() * (wamax / 448).double()
        x2 = x.reshape(15, 64)
        xamax = x2.abs().amax() if gran == "tensor" else x2.abs().amax(1, keepdim=True)
        xq = (x2 / (xamax / 448)).to(torch.float8_e4m3fn).double() * (xamax / 448).double()
        want = (xq @ w.T + lin.bias.double()).reshape(3, 5, 48)
        torch.testing.assert_close(f(x).double(), want, rtol=1e-5, atol=1e-5)
        err = (f(x) - lin(x)).abs().max() / lin(x).abs().max()
        assert 1e-4 < err < 0.1          # e4m3 has a 3-bit mantissa: visibly approximate, still close
    q, s = quantize(torch.tensor([[1.0, -448.0 * 2]]), "row")
    assert torch.equal(dequantize(q, s), torch.tensor([[0.0, -896.0]])) or dequantize(q, s)[0, 1] == -896.0


def test_fp8_option_needs_a_converted_model_and_the_engine_converts():
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    with pytest.raises(ValueError, match="quantize_video_linears"):
        sample(model, "vla", cond=cond, cond_latent=clip[:, :, :1], options=SamplerOptions(fp8_video="row"),
               **noise)
    exact = sample(model, "vla", cond=cond, steps=3, cond_latent=clip[:, :, :1], **noise)
    engine = InferenceEngine(model, sampler=SamplerOptions(fp8_video="row"))
    assert isinstance(model.blocks[1].video.ffn[2], Fp8Linear)
    out = engine.sample("vla", engine.prepare_tensors(cond, clip[:, :, :1]), steps=3, **noise)
    ref = sample(model, "vla", cond=cond, steps=3, cond_latent=clip[:, :, :1],
                 options=SamplerOptions(fp8_video="row"), **noise)
    assert torch.equal(out.actions, ref.actions) and not torch.equal(out.actions, exact.actions)
    cos = torch.nn.functional.cosine_similarity(out.actions.flatten(), exact.actions.flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("options", [SamplerOptions(action_only_after=2), SamplerOptions(velocity_threshold=0.05),
                                     SamplerOptions(video_steps=2)])
@pytest.mark.parametrize("mode", ["joint", "vla", "idm"])
def test_engine_equals_plain_sampler_with_shortcuts(options, mode):
    model = make_model(see_actions=True)
    cond, clip, noise = make_inputs(model.cfg)
    ref = sample(model, mode, cond=cond, steps=4, options=options, **mode_kw(mode, clip), **noise)
    engine = InferenceEngine(model, sampler=options)
    prepared = engine.prepare_tensors(cond, None if mode == "idm" else clip[:, :, :1])
    out = engine.sample(mode, prepared, steps=4, **(dict(video=clip) if mode == "idm" else {}), **noise)
    assert torch.equal(out.actions, ref.actions)


def test_named_samplers():
    assert get_sampler("exact").exact and not get_sampler("fast").exact
    with pytest.raises(KeyError, match="unknown sampler"):
        get_sampler("turbo")
    with pytest.raises(ValueError, match="action_only_after"):
        SamplerOptions(action_only_after=0)


@pytest.mark.gpu
@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_fp8_scaled_mm_matches_emulation(gran):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384).cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    f = Fp8Linear(lin, gran)
    got = f(x).float()
    want = f.cpu()(x.cpu()).float()          # the emulation of the same quantised numbers
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2)


def test_server_metadata_names_the_sampler():
    from motus_fast.encoders import StubEncoders
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.policy import MotusPolicy
    model = make_model(see_actions=True, layers=1)
    for name, options in (("exact", SamplerOptions()), ("fast", get_sampler("fast")),
                          ("custom", SamplerOptions(video_steps=3))):
        engine = InferenceEngine(model, StubEncoders(model.cfg, (32, 32)), sampler=options)
        meta = MotusPolicy(engine, ServeConfig(port=0)).metadata()
        assert meta["sampler"] == name and SamplerOptions(**meta["sampler_options"]) == options


def test_bench_meta_attention_equals_joint_attention():
    """bench.policy_speed counts FLOPs with a host-read-free B=1 joint attention: it must compute the same thing."""
    from bench.policy_speed import dense_joint_attention
    from motus_fast.model.mot import blind_to_actions
    from motus_fast.ops import joint_attention
    g = torch.Generator().manual_seed(0)
    lens = (7, 5, 4)
    q, k, v = ([torch.randn(n, 2, 16, generator=g) for n in lens] for _ in range(3))
    cu = [torch.tensor([0, n], dtype=torch.int32) for n in lens]
    for visible in (None, blind_to_actions(True)):
        for got, want in zip(dense_joint_attention(q, k, v, cu, visible), joint_attention(q, k, v, cu, visible)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
