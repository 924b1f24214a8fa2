"""Real-time chunking (guided inpainting of the action prefix) and the stub encoders' geometry."""

import math

import pytest
import torch

from motus_fast.encoders import StubEncoders
from motus_fast.infer import InferenceEngine, PrefixGuidance, rtc_weights
from motus_fast.infer.chunking import guide_velocity
from motus_fast.model import Conditioning


@pytest.mark.parametrize("horizon,prefix,delay", [(16, 10, 3), (16, 16, 0), (8, 5, 5), (7, 1, 0), (5, 0, 0)])
def test_rtc_weights(horizon, prefix, delay):
    w = rtc_weights(horizon, prefix, delay)
    assert w.shape == (horizon,)
    assert torch.all(w[:delay] == 1) and torch.all(w[prefix:] == 0)
    soft = w[delay:prefix]
    assert torch.all((soft > 0) & (soft < 1)) and torch.all(soft[1:] < soft[:-1])   # decays over the overlap
    for j in range(delay, prefix):     # RTC's c (e^c - 1) / (e - 1), c = (P - j) / (P - d + 1)
        c = (prefix - j) / (prefix - delay + 1)
        assert math.isclose(w[j].item(), c * math.expm1(c) / math.expm1(1), rel_tol=1e-12)


def test_rtc_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="prefix length"):
        rtc_weights(8, 9, 0)
    with pytest.raises(ValueError, match="inference_delay"):
        rtc_weights(8, 4, 5)


def test_guided_velocity_moves_the_clean_estimate_toward_the_prefix():
    g = torch.Generator().manual_seed(0)
    a, v, target = (torch.randn(2, 6, 3, generator=g) for _ in range(3))
    sigma = torch.tensor(0.4)
    guidance = PrefixGuidance(target=target, weights=torch.rand(2, 6, 1, generator=g))
    vg = guide_velocity(a, v, sigma, guidance)
    x0, x0g = a - sigma * v, a - sigma * vg
    torch.testing.assert_close(x0g, x0 + guidance.weights * (target - x0))


def _engine_and_inputs(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    engine = InferenceEngine(tiny_model)
    cond = Conditioning(text=io["sample.in.t5_context"], vlm=io["sample.in.vlm_hidden"], state=io["sample.in.state"])
    prepared = engine.prepare_tensors(cond, io["sample.in.cond_latent"])
    noise = dict(noise_video=io["sample.in.noise_video"], noise_action=io["sample.in.noise_action"], steps=4)
    return engine, prepared, noise


def test_guidance_with_zero_weights_is_the_plain_sampler(tiny_model, tiny_fixture):
    engine, prepared, noise = _engine_and_inputs(tiny_model, tiny_fixture)
    plain = engine.sample("vla", prepared, **noise).actions
    zero = PrefixGuidance(target=torch.randn_like(plain), weights=torch.zeros(*plain.shape[:2], 1))
    assert torch.equal(engine.sample("vla", prepared, guidance=zero, **noise).actions, plain)


@pytest.mark.parametrize("mode", ["vla", "joint"])
def test_prefix_is_inpainted_and_the_rest_adapts(tiny_model, tiny_fixture, mode):
    engine, prepared, noise = _engine_and_inputs(tiny_model, tiny_fixture)
    plain = engine.sample(mode, prepared, **noise).actions              # [B, K, D]
    K, P, d = plain.shape[1], 6, 4
    prefix = plain[:, :P] + 0.5 * torch.randn(plain[:, :P].shape, generator=torch.Generator().manual_seed(1))
    guided = engine.sample(mode, prepared, guidance=PrefixGuidance.from_prefix(prefix, K, d), **noise).actions
    # frozen part (w = 1) equals the previous chunk; the decaying part lies between it and the free sample
    torch.testing.assert_close(guided[:, :d], prefix[:, :d], rtol=0, atol=1e-5)
    assert (guided[:, d:P] - prefix[:, d:P]).abs().max() > 1e-3
    # the rest of the chunk is not copied but re-sampled in the guided context: it differs from the free sample
    assert (guided[:, P:] - plain[:, P:]).abs().max() > 1e-4


def test_guidance_needs_an_action_mode(tiny_model, tiny_fixture):
    engine, prepared, noise = _engine_and_inputs(tiny_model, tiny_fixture)
    guidance = PrefixGuidance.from_prefix(torch.zeros(2, 3, 14), 16, 1)
    with pytest.raises(ValueError, match="guidance"):
        engine.sample("video", prepared, guidance=guidance, **noise)


def test_stub_encoders_geometry():
    from motus_fast.config import get_preset
    cfg = get_preset("tiny")
    enc = StubEncoders(cfg, (64, 32))
    clip = torch.randint(0, 256, (2, 9, 64, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lat = enc.encode_frames(clip)
    assert lat.shape == (2, cfg.video.in_channels, 3, 4, 2)
    assert torch.equal(lat[:, :, :1], enc.encode_frames(clip[:, :1]))       # causal: frame 0 alone
    assert enc.decode_latents(lat).shape == (2, 9, 64, 32, 3)
    text, _ = enc.encode_prompts(["a", "bb"])
    assert text.shape == (2, cfg.video.text_len, cfg.video.text_dim) and not torch.equal(text[0], text[1])
    with pytest.raises(ValueError, match="multiple"):
        StubEncoders(cfg, (48, 64))
