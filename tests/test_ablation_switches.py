"""The two model switches of the paper's ablations: one shared timestep for both streams (the "joint diffuser",
``flow.timesteps="shared"``) and the model without its understanding stream (``und_stream=False``)."""

import dataclasses

import torch

from motus_fast.flow import FlowBatch, FlowDraws, training_loss
from motus_fast.model import Conditioning, Motus


def _batch(io, vlm=True):
    cond = Conditioning(text=io["sample.in.t5_context"], vlm=io["sample.in.vlm_hidden"] if vlm else None,
                        state=io["sample.in.state"])
    return FlowBatch(io["train.in.x0_video"], io["train.in.x0_actions"], cond)


def test_shared_timesteps_give_both_streams_the_video_timestep(tiny_model, tiny_fixture):
    batch = _batch(tiny_fixture["io"])
    flow = tiny_model.cfg.flow
    B = batch.video.shape[0]
    batch = FlowBatch(batch.video.repeat(4, 1, 1, 1, 1), batch.actions.repeat(4, 1, 1), batch.cond)  # draws only
    indep = FlowDraws.sample(batch, flow, torch.Generator().manual_seed(0))
    shared = FlowDraws.sample(batch, dataclasses.replace(flow, timesteps="shared"), torch.Generator().manual_seed(0))
    assert not torch.equal(indep.action_ids, indep.video_ids)          # independent draws differ (4B samples)
    assert torch.equal(shared.action_ids, shared.video_ids)
    # the same random stream is consumed: video draws and both noises are unchanged
    assert torch.equal(shared.video_ids, indep.video_ids)
    assert torch.equal(shared.video_noise, indep.video_noise) and torch.equal(shared.action_noise, indep.action_noise)
    assert B >= 1


def test_shared_timestep_model_trains_on_equal_timesteps(tiny_model, tiny_fixture):
    shared = Motus(tiny_model.cfg.override({"flow.timesteps": "shared"}))
    shared.load_state_dict(tiny_model.state_dict())
    batch = _batch(tiny_fixture["io"])
    seen = []
    hook = shared.register_forward_pre_hook(lambda m, args: seen.append((args[1].clone(), args[3].clone())))
    with torch.no_grad():
        training_loss(shared, batch, generator=torch.Generator().manual_seed(3))
    hook.remove()
    t_video, t_action = seen[0]
    torch.testing.assert_close(t_video, t_action)


def test_without_the_und_stream_the_vlm_features_are_ignored(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    no_und = Motus(tiny_model.cfg.override({"und_stream": False})).eval()
    no_und.load_state_dict(tiny_model.state_dict())
    x, a = io["train.in.x0_video"], io["train.in.x0_actions"]
    B = x.shape[0]
    t = torch.full((B,), 500.0)
    with torch.no_grad():
        with_vlm = no_und(x, t, a, t, _batch(io).cond)
        without = no_und(x, t, a, t, _batch(io, vlm=False).cond)
        full_with = tiny_model(x, t, a, t, _batch(io).cond)
        full_without = tiny_model(x, t, a, t, _batch(io, vlm=False).cond)
    for got, want in zip(with_vlm, without):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(without, full_without):                  # no und tokens: the full model's computation
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full_with[1], full_without[1])      # the full model does read the VLM features
    und = {n for n, _ in no_und.expert_parameters()["und"]}
    assert und and und <= no_und.unused_parameter_names()         # trainers freeze the whole und expert
