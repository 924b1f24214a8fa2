"""model.layers.Stream: a stream with a pending residual branch gives, through the next AdaLN, what adding the branch
first and then normalising gives (the layer-by-layer computation of upstream), on every backend."""

import pytest
import torch

from motus_fast.model.layers import Stream
from motus_fast.ops.adaln import adaln_modulate_reference


@pytest.mark.parametrize("case", ["fresh", "gated", "ungated", "unmodulated"])
def test_modulate_adds_the_branch_then_normalises(case, backend):
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 7, 64
    x, y = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    gate, shift, scale = (torch.randn(B, 1, D, generator=g) for _ in range(3))
    stream = {"fresh": Stream(x), "gated": Stream(x, y, gate), "ungated": Stream(x, y),
              "unmodulated": Stream(x.reshape(B * L, D), y.reshape(B * L, D))}[case]
    if case == "unmodulated":
        shift = scale = None
    want_x = {"fresh": x, "gated": x + y * gate, "ungated": x + y, "unmodulated": (x + y).reshape(B * L, D)}[case]
    got_x, got_h = stream.modulate(shift, scale, 1e-6)
    torch.testing.assert_close(stream.value(), want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, adaln_modulate_reference(want_x.double(), shift, scale, 1e-6).float(),
                               rtol=1e-5, atol=1e-5)


def _training_inputs(io):
    from motus_fast.flow import FlowBatch, FlowDraws
    from motus_fast.model import Conditioning

    cond = Conditioning(text=io["fwd.in.t5_context"], vlm=io["fwd.in.vlm_hidden"], state=io["fwd.in.state"])
    return (FlowBatch(io["train.in.x0_video"], io["train.in.x0_actions"], cond),
            FlowDraws(io["train.in.timestep_id_video"], io["train.in.noise_video"], io["train.in.timestep_id_action"],
                      io["train.in.noise_action"]))


def test_blocks_settle_their_streams_only_while_gradients_are_recorded(tiny_model, tiny_fixture, backend):
    """Inference hands each FFN branch to the next layer's AdaLN (the fusion); a training forward hands on finished
    streams (a checkpointed block's inputs stay alive until the backward: a pending branch would add a stream-sized
    tensor per layer)."""
    from motus_fast.flow import training_loss

    outputs = []
    hooks = [blk.register_forward_hook(lambda m, args, out: outputs.append(out)) for blk in tiny_model.blocks]
    try:
        batch, draws = _training_inputs(tiny_fixture["io"])
        with torch.no_grad():
            training_loss(tiny_model, batch, draws)
        pending = [s.branch is not None for out in outputs for s in out if s is not None]
        outputs.clear()
        training_loss(tiny_model, batch, draws)
        settled = [s.branch is None for out in outputs for s in out if s is not None]
    finally:
        for h in hooks:
            h.remove()
    assert pending and all(pending) and settled and all(settled)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model, tiny_fixture):
    from motus_fast.flow import training_loss

    batch, draws = _training_inputs(tiny_fixture["io"])
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    results = []
    tiny_model.train()
    try:
        for recompute in (False, True):
            tiny_model.activation_checkpointing = recompute
            loss = training_loss(tiny_model, batch, draws)["loss"]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((loss.detach(), grads))
    finally:
        tiny_model.activation_checkpointing = False
        tiny_model.eval()
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
    assert sum(g is not None for g in g0) > len(params) // 2
