"""The five sampling modes: one step equals a hand-computed Euler update, held/given streams behave, and the
generated stream reacts to its conditioning."""

import pytest
import torch

from motus_fast.flow import MODES, sample, with_condition_frame
from motus_fast.model import Conditioning, Motus
from motus_fast.config import get_preset

# (t_video, t_action) fed at the first step of each mode: 1000 = pure noise, 0 = clean given stream
FIRST_STEP_T = {"joint": (1000, 1000), "vla": (1000, 1000), "world_model": (1000, 0), "idm": (0, 1000),
                "video": (1000, 1000)}


def inputs(io, b=slice(None)):
    cond = Conditioning(text=io["sample.in.t5_context"][b], vlm=io["sample.in.vlm_hidden"][b],
                        state=io["sample.in.state"][b])
    return dict(cond_latent=io["sample.in.cond_latent"][b], cond=cond, noise_video=io["sample.in.noise_video"][b],
                noise_action=io["sample.in.noise_action"][b])


def mode_args(mode, io):
    """The given stream of world_model / idm (in idm the clip's frame 0 is the condition)."""
    if mode == "world_model":
        return dict(actions=io["train.in.x0_actions"])
    if mode == "idm":
        return dict(video=io["train.in.x0_video"], cond_latent=io["train.in.x0_video"][:, :, :1])
    return {}


@pytest.mark.parametrize("mode", MODES)
def test_one_step_is_one_euler_update(tiny_model, tiny_fixture, mode):
    io = tiny_fixture["io"]
    kw = dict(inputs(io), **mode_args(mode, io))
    given = dict(actions=kw.pop("actions", None), video=kw.pop("video", None))
    out = sample(tiny_model, mode, steps=1, **kw, **given)

    t_v, t_a = FIRST_STEP_T[mode]
    B = kw["cond_latent"].shape[0]
    x = given["video"] if mode == "idm" else with_condition_frame(kw["noise_video"], kw["cond_latent"])
    a = given["actions"] if mode == "world_model" else kw["noise_action"]
    with torch.no_grad():
        v_video, v_action = tiny_model(x, torch.full((B,), float(t_v)), a, torch.full((B,), float(t_a)), kw["cond"])
    dt = -1.0  # t goes 1 -> 0 in one step
    if mode in ("joint", "world_model", "video"):
        torch.testing.assert_close(out.video, with_condition_frame(x + v_video * dt, kw["cond_latent"]),
                                   rtol=1e-6, atol=1e-6)
    if mode in ("joint", "vla", "idm"):
        torch.testing.assert_close(out.actions, a + v_action * dt, rtol=1e-6, atol=1e-6)
    if mode == "vla":
        assert out.video is None
    if mode == "video":
        assert out.actions is None
    if mode == "world_model":
        assert torch.equal(out.actions, given["actions"])
    if mode == "idm":
        assert torch.equal(out.video, given["video"])


@pytest.mark.parametrize("mode", MODES)
def test_timesteps_and_held_streams_over_steps(tiny_model, tiny_fixture, mode, monkeypatch):
    """Record what the network receives at every step of a 3-step sample."""
    io = tiny_fixture["io"]
    calls = []
    forward = tiny_model.forward

    def spy(video, t_video, actions, t_action, cond, **kw):
        calls.append((video.clone(), t_video.clone(), actions.clone(), t_action.clone()))
        return forward(video, t_video, actions, t_action, cond, **kw)

    monkeypatch.setattr(tiny_model, "forward", spy)
    kw = dict(inputs(io), **mode_args(mode, io))
    out = sample(tiny_model, mode, steps=3, **kw)
    assert len(calls) == 3
    grid = [1000.0, 1000.0 * 2 / 3, 1000.0 / 3]
    for i, (video, t_v, actions, t_a) in enumerate(calls):
        want_v = {"idm": 0.0, "vla": 1000.0}.get(mode, grid[i])
        want_a = {"world_model": 0.0, "video": 1000.0}.get(mode, grid[i])
        torch.testing.assert_close(t_v, torch.full_like(t_v, want_v))
        torch.testing.assert_close(t_a, torch.full_like(t_a, want_a))
        torch.testing.assert_close(video[:, :, :1], kw["cond_latent"], rtol=0, atol=0)  # condition frame re-clamped
        if mode in ("vla", "idm"):
            assert torch.equal(video, calls[0][0])      # video held (noise) or given: never updated
        if mode in ("world_model", "video"):
            assert torch.equal(actions, calls[0][2])    # actions given or held at noise
    if out.video is not None:
        assert torch.equal(out.video[:, :, :1], kw["cond_latent"])


def _sample(model, io, mode, **changes):
    kw = inputs(io)
    kw.update(mode_args(mode, io))
    kw.update(changes)
    return sample(model, mode, steps=2, **kw)


def test_world_model_video_depends_on_actions(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    base = _sample(tiny_model, io, "world_model")
    moved = _sample(tiny_model, io, "world_model", actions=io["train.in.x0_actions"] + 0.5)
    assert (base.video - moved.video).abs().max() > 1e-3


def test_idm_actions_depend_on_video(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    base = _sample(tiny_model, io, "idm")
    moved = _sample(tiny_model, io, "idm", video=with_condition_frame(io["train.in.noise_video"],
                                                                      io["train.in.x0_video"][:, :, :1]),
                    cond_latent=None)
    assert (base.actions - moved.actions).abs().max() > 1e-3


def test_vla_actions_depend_on_state_and_vlm(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    base = _sample(tiny_model, io, "vla")
    c = inputs(io)["cond"]
    for cond in (Conditioning(c.text, c.vlm, c.state + 0.5), Conditioning(c.text, c.vlm + 0.5, c.state)):
        assert (base.actions - _sample(tiny_model, io, "vla", cond=cond).actions).abs().max() > 1e-4


def test_video_mode_depends_on_text(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    base = _sample(tiny_model, io, "video")
    c = inputs(io)["cond"]
    other = _sample(tiny_model, io, "video", cond=Conditioning(c.text + 0.5, c.vlm, c.state))
    assert (base.video - other.video).abs().max() > 1e-4


def test_samples_are_independent_across_the_batch(tiny_model, tiny_fixture):
    """No batch size is baked in: sample 1 alone equals sample 1 of the batch of 2."""
    io = tiny_fixture["io"]
    both = sample(tiny_model, "joint", steps=2, **inputs(io))
    one = sample(tiny_model, "joint", steps=2, **inputs(io, slice(1, 2)))
    torch.testing.assert_close(one.video, both.video[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.actions, both.actions[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_pretrain_layout_samples_every_mode(mode):
    """Stage-2 (pretrain layout: no state, no registers) checkpoints sample too; the official sampler cannot."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").override({"action.layout": "pretrain"})
    model = Motus(cfg).eval()
    for p in model.parameters():  # fresh heads are zero: give every weight a value so outputs are non-trivial
        torch.nn.init.normal_(p, std=0.05)
    B, K = 2, cfg.action.chunk_size
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(text=torch.randn(B, 5, cfg.video.text_dim, generator=g),
                        vlm=torch.randn(B, 7, cfg.und.vlm_dim, generator=g), state=None)
    clip = torch.randn(B, 48, 3, 12, 8, generator=g)
    actions = torch.randn(B, K, cfg.action.action_dim, generator=g)
    out = sample(model, mode, cond_latent=None if mode == "idm" else clip[:, :, :1], cond=cond, num_frames=3,
                 steps=2, generator=g,
                 actions=actions if mode == "world_model" else None, video=clip if mode == "idm" else None)
    if out.actions is not None:
        assert out.actions.shape == (B, K, cfg.action.action_dim) and torch.isfinite(out.actions).all()
    with pytest.raises(ValueError, match="pretrain layout has no state"):
        sample(model, mode, cond_latent=None if mode == "idm" else clip[:, :, :1], num_frames=3, steps=1,
               cond=Conditioning(cond.text, cond.vlm, torch.zeros(B, cfg.action.state_dim)),
               actions=actions if mode == "world_model" else None, video=clip if mode == "idm" else None)


def test_bad_requests_raise(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    kw = inputs(io)
    with pytest.raises(ValueError, match="unknown mode"):
        sample(tiny_model, "dream", **kw)
    with pytest.raises(ValueError, match="world_model.*actions"):
        sample(tiny_model, "world_model", **kw)
    with pytest.raises(ValueError, match="idm.*video"):
        sample(tiny_model, "idm", **kw)
    with pytest.raises(ValueError, match="cond_latent differs"):
        sample(tiny_model, "idm", video=io["train.in.x0_video"], **kw)
    with pytest.raises(ValueError, match="actions have shape"):
        sample(tiny_model, "world_model", actions=torch.zeros(2, 3, 14), **kw)
    with pytest.raises(ValueError, match="state of shape"):
        bad = dict(kw, cond=Conditioning(kw["cond"].text, kw["cond"].vlm, None))
        sample(tiny_model, "vla", **bad)
