"""Our reference model against the official Motus code (fixture upstream_motus_tiny), fp32 on CPU."""

import torch

from fixture_utils import assert_close_to_fixture
from motus_fast.config import PRESETS
from motus_fast.flow import FlowBatch, FlowDraws, sample, sampling_grid, training_loss, training_sigmas
from motus_fast.model import Conditioning
from motus_fast.model.layers import Stream
from motus_fast.model.mot import uniform_cu_seqlens
from motus_fast.weights.upstream import config_from_upstream_json


def fwd_cond(io, prefix="fwd"):
    return Conditioning(text=io[f"{prefix}.in.t5_context"], vlm=io[f"{prefix}.in.vlm_hidden"],
                        state=io[f"{prefix}.in.state"])


def test_tiny_preset_is_the_fixture_config(tiny_fixture):
    assert config_from_upstream_json(tiny_fixture["config"]) == PRESETS["tiny"]


def test_forward_matches_upstream(tiny_model, tiny_fixture, backend):
    io = tiny_fixture["io"]
    with torch.no_grad():
        v, a = tiny_model(io["fwd.in.video_latents"], io["fwd.in.t_video"], io["fwd.in.actions"],
                          io["fwd.in.t_action"], fwd_cond(io))
    assert_close_to_fixture("video velocity", v, io["fwd.out.video_velocity"])
    assert_close_to_fixture("action velocity", a, io["fwd.out.action_velocity"])


def test_forward_intermediates_match_upstream(tiny_model, tiny_fixture):
    """The fixture's debug tensors: embeddings, time tables and every layer's stream outputs."""
    io, m = tiny_fixture["io"], tiny_model
    x0, cond = io["fwd.in.video_latents"], fwd_cond(io)
    with torch.no_grad():
        assert_close_to_fixture("video_tokens_in", m.video.embed(x0), io["fwd.dbg.video_tokens_in"])
        e, e6 = m.video.time(io["fwd.in.t_video"])
        assert_close_to_fixture("video_time_emb", e, io["fwd.dbg.video_time_emb"])
        assert_close_to_fixture("video_time_proj", e6, io["fwd.dbg.video_time_proj"])
        ea, e6a = m.action.time(io["fwd.in.t_action"])
        assert_close_to_fixture("action_time_emb", ea, io["fwd.dbg.action_time_emb"])
        assert_close_to_fixture("action_time_proj", e6a, io["fwd.dbg.action_time_proj"])
        a = m.action.embed(io["fwd.in.actions"], cond.state)
        assert_close_to_fixture("action_tokens_in", a, io["fwd.dbg.action_tokens_in"])
        u, cu = m.und.embed(cond.vlm)
        assert_close_to_fixture("und_tokens_in", u.reshape(2, -1, u.shape[-1]), io["fwd.dbg.und_tokens_in"])
        cache = m.cache_conditioning(cond)
        assert_close_to_fixture("t5_context_embedded", cache.text_ctx, io["fwd.dbg.t5_context_embedded"])

        # run the layers and compare their outputs
        from motus_fast.model.rope import rope_tables
        x, a, u = Stream(m.video.embed(x0)), Stream(a), Stream(u)
        grid = m.video.token_grid(x0.shape)
        rope = rope_tables(grid, m.cfg.head_dim)
        for i, blk in enumerate(m.blocks):
            last = i == len(m.blocks) - 1
            x, a, u = blk(x, a, u, e6_video=e6, e6_action=e6a, rope=rope, text=cache.text_kv[i], text_lens=None,
                          cu_video=uniform_cu_seqlens(2, x.x.shape[1], "cpu"),
                          cu_action=uniform_cu_seqlens(2, a.x.shape[1], "cpu"), cu_und=cu, last=last)
            # (a layer's output stream leaves its FFN branch to the next AdaLN: added here to compare)
            assert_close_to_fixture(f"layer{i}.video_out", x.value(), io[f"fwd.dbg.layer{i}.video_out"])
            assert_close_to_fixture(f"layer{i}.action_out", a.value(), io[f"fwd.dbg.layer{i}.action_out"])
            if not last:  # the last layer's und output has no effect upstream; we skip computing it
                assert_close_to_fixture(f"layer{i}.und_out", u.value().reshape(2, -1, u.x.shape[-1]),
                                        io[f"fwd.dbg.layer{i}.und_out"])


def test_training_loss_matches_upstream(tiny_model, tiny_fixture, backend):
    io = tiny_fixture["io"]
    sig = training_sigmas(tiny_model.cfg.flow)
    torch.testing.assert_close(sig, io["train.dbg.sigma_grid"], rtol=0, atol=0)
    torch.testing.assert_close(sig * 1000, io["train.dbg.timestep_grid"], rtol=0, atol=0)
    batch = FlowBatch(io["train.in.x0_video"], io["train.in.x0_actions"], fwd_cond(io))
    draws = FlowDraws(io["train.in.timestep_id_video"], io["train.in.noise_video"],
                      io["train.in.timestep_id_action"], io["train.in.noise_action"])
    with torch.no_grad():
        losses = training_loss(tiny_model, batch, draws)
    for ours, theirs in (("loss_video", "loss_video"), ("loss_action", "loss_action"), ("loss", "loss_total")):
        want = io[f"train.out.{theirs}"].item()
        assert abs(losses[ours].item() - want) / abs(want) <= 1e-6, (ours, losses[ours].item(), want)


def test_joint_sampling_matches_upstream(tiny_model, tiny_fixture, backend):
    io = tiny_fixture["io"]
    torch.testing.assert_close(sampling_grid(10), io["sample.dbg.t_grid"], rtol=0, atol=0)
    cond = Conditioning(text=io["sample.in.t5_context"], vlm=io["sample.in.vlm_hidden"], state=io["sample.in.state"])
    out = sample(tiny_model, "joint", cond_latent=io["sample.in.cond_latent"], cond=cond,
                 noise_video=io["sample.in.noise_video"], noise_action=io["sample.in.noise_action"], steps=10)
    assert_close_to_fixture("sampled video", out.video, io["sample.out.video_latents"])
    assert_close_to_fixture("sampled actions", out.actions, io["sample.out.actions"])


def test_text_padding_rows_matter_unless_masked(tiny_model, tiny_fixture):
    """Upstream attends zero-padded T5 rows; with text_lens we exclude them and get the unpadded result."""
    io = tiny_fixture["io"]
    lens = io["sample.in.t5_lens"]
    b = int(torch.argmin(lens))
    n = int(lens[b])
    args = (io["fwd.in.video_latents"][b:b + 1], io["fwd.in.t_video"][b:b + 1], io["fwd.in.actions"][b:b + 1],
            io["fwd.in.t_action"][b:b + 1])
    text = io["sample.in.t5_context"][b:b + 1]
    vlm, state = io["fwd.in.vlm_hidden"][b:b + 1], io["fwd.in.state"][b:b + 1]
    with torch.no_grad():
        padded = tiny_model(*args, Conditioning(text, vlm, state))[0]
        masked = tiny_model(*args, Conditioning(text, vlm, state, text_lens=torch.tensor([n])))[0]
        trimmed = tiny_model(*args, Conditioning(text[:, :n], vlm, state))[0]
    torch.testing.assert_close(masked, trimmed, rtol=1e-5, atol=1e-5)
    assert (padded - trimmed).abs().max() > 1e-3
