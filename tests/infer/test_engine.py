"""The inference engine's caches are exact: its output equals the plain sampler's (motus_fast.flow.sample) bit
for bit, for all five modes, on cache misses and on cache hits, for several batch sizes, step grids and both
action layouts; and CUDA graphs fall back loudly."""

import logging

import pytest
import torch

from motus_fast.config import get_preset
from motus_fast.flow import MODES, sample
from motus_fast.encoders import StubEncoders
from motus_fast.infer import InferenceEngine
from motus_fast.infer.graphs import DenoiseGraphs
from motus_fast.model import Conditioning, Motus


def fixture_inputs(io, b=slice(None)):
    cond = Conditioning(text=io["sample.in.t5_context"][b], vlm=io["sample.in.vlm_hidden"][b],
                        state=io["sample.in.state"][b])
    return cond, dict(noise_video=io["sample.in.noise_video"][b], noise_action=io["sample.in.noise_action"][b])


def given(mode, io, b=slice(None)):
    if mode == "world_model":
        return dict(actions=io["train.in.x0_actions"][b])
    if mode == "idm":
        return dict(video=io["train.in.x0_video"][b])
    return {}


def assert_same(ref, out, mode):
    for name in ("video", "actions"):
        r, o = getattr(ref, name), getattr(out, name)
        assert (r is None) == (o is None), f"{mode}: {name} present in one result only"
        if r is not None:
            assert torch.equal(r, o), f"{mode} {name}: engine differs from the plain sampler by " \
                                      f"{(r - o).abs().max().item():.3e}"


@pytest.mark.parametrize("mode", MODES)
def test_engine_equals_plain_sampler(tiny_model, tiny_fixture, mode):
    io = tiny_fixture["io"]
    engine = InferenceEngine(tiny_model)
    for b, steps, shift in ((slice(None), 3, None), (slice(0, 1), 2, 3.0)):
        cond, noise = fixture_inputs(io, b)
        kw = dict(noise, **given(mode, io, b), steps=steps, shift=shift)
        cond_latent = kw["video"][:, :, :1] if mode == "idm" else io["sample.in.cond_latent"][b]
        ref = sample(tiny_model, mode, cond=cond, cond_latent=cond_latent, **kw)
        hits_before = engine.instructions.hits
        for _ in range(2):       # 1st: caches filled; 2nd: every conditioning cache hits
            prepared = engine.prepare_tensors(cond, None if mode == "idm" else cond_latent,
                                              text_key=("fixture", str(b)), obs_key=("fixture", str(b)))
            assert_same(ref, engine.sample(mode, prepared, **kw), mode)
        assert engine.instructions.hits == hits_before + 1 and engine.observations.hits >= 1


def test_engine_equals_plain_sampler_pretrain_layout():
    torch.manual_seed(0)
    cfg = get_preset("tiny").override({"action.layout": "pretrain", "num_layers": 1})
    model = Motus(cfg).eval()
    for p in model.parameters():       # the fresh init zeroes the heads: make every path matter
        p.data.normal_(0, 0.05)
    engine = InferenceEngine(model)
    B, g = 3, torch.Generator().manual_seed(1)
    cond = Conditioning(text=torch.randn(B, 7, cfg.video.text_dim, generator=g),
                        vlm=torch.randn(B, 5, cfg.und.vlm_dim, generator=g), vlm_lens=torch.tensor([5, 2, 0]))
    cond_latent = torch.randn(B, cfg.video.in_channels, 1, 4, 4, generator=g)
    for mode in ("vla", "joint"):
        noise = dict(noise_video=torch.randn(B, cfg.video.in_channels, 2, 4, 4, generator=g),
                     noise_action=torch.randn(B, cfg.action.chunk_size, cfg.action.action_dim, generator=g))
        ref = sample(model, mode, cond=cond, cond_latent=cond_latent, steps=2, **noise)
        out = engine.sample(mode, engine.prepare_tensors(cond, cond_latent, text_key="t", obs_key="o"), steps=2,
                            **noise)
        assert_same(ref, out, mode)


def test_observation_path_equals_plain_sampler(tiny_model):
    """Images + prompts through the encoders and the engine's caches == the plain sampler on the encoders'
    outputs; the instruction LRU evicts and recomputes exactly."""
    cfg = tiny_model.cfg
    enc = StubEncoders(cfg, (64, 96), seed=3)
    engine = InferenceEngine(tiny_model, enc, instruction_cache=1, observation_cache=1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8, generator=g)
    state = torch.randn(2, cfg.action.state_dim, generator=g)
    noise_video = torch.randn(2, cfg.video.in_channels, 3, 4, 6, generator=g)
    noise_action = torch.randn(2, cfg.action.chunk_size, cfg.action.action_dim, generator=g)
    for prompts in (["pick the cube", "open"], ["stack", "push"], ["pick the cube", "open"]):
        text, text_lens = enc.encode_prompts(prompts)
        vlm, vlm_lens = enc.vlm_features(images, prompts)
        cond = Conditioning(text=text, vlm=vlm, state=state, text_lens=text_lens, vlm_lens=vlm_lens)
        ref = sample(tiny_model, "joint", cond=cond, cond_latent=enc.encode_frames(images[:, None]),
                     noise_video=noise_video, noise_action=noise_action, steps=2)
        for _ in range(2):
            out = engine.sample("joint", engine.prepare(images, prompts, state), noise_video=noise_video,
                                noise_action=noise_action, steps=2)
            assert_same(ref, out, "joint")
    # capacity 1: every prompt change missed (3 misses), every repeat hit (3 hits)
    assert (engine.instructions.misses, engine.instructions.hits) == (3, 3)
    assert len(engine.instructions) == 1


def test_engine_checks_its_inputs(tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    engine = InferenceEngine(tiny_model)
    cond, noise = fixture_inputs(io)
    prepared = engine.prepare_tensors(cond, io["sample.in.cond_latent"])
    with pytest.raises(ValueError, match="world_model"):
        engine.sample("world_model", prepared, **noise)
    with pytest.raises(ValueError, match="unknown mode"):
        engine.sample("dream", prepared, **noise)
    with pytest.raises(ValueError, match="actions have shape"):
        engine.sample("world_model", prepared, actions=torch.zeros(2, 3, 14), **noise)
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        InferenceEngine(tiny_model, cuda_graphs=True)


def test_graph_capture_failure_is_logged_and_runs_eagerly(caplog):
    """CPU inputs cannot be captured (with or without a GPU on the machine): the key runs eagerly, the reason is
    logged once, and no replay returns stale outputs."""
    graphs = DenoiseGraphs()
    calls = []

    def loop(x, y):
        calls.append(1)
        return x * 2 + y, None

    inputs = dict(x=torch.arange(4.0), y=torch.ones(4))
    with caplog.at_level(logging.WARNING, logger="motus_fast"):
        for _ in range(3):
            (out, none), replayed = graphs.run(("vla", 1), loop, inputs)
            assert torch.equal(out, torch.arange(4.0) * 2 + 1) and none is None and not replayed
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "('vla', 1)" in warnings[0].getMessage()
    assert ("vla", 1) in graphs.failed and len(calls) == 3


class ReplayOnCPU:
    """Stands in for a CUDA graph on CPU: replay() re-runs the function on the static inputs and writes the static
    outputs in place, which is what a graph replay does to its buffers."""

    def __init__(self, fn, static_inputs):
        self.fn, self.static_inputs = fn, static_inputs
        self.outputs = fn(**static_inputs)

    def replay(self):
        for out, new in zip(self.outputs, self.fn(**self.static_inputs)):
            out.copy_(new)


def test_graph_replay_copies_inputs_and_reuses_only_immutable_ones(monkeypatch):
    graphs = DenoiseGraphs()

    def record(fn, static_inputs):
        g = ReplayOnCPU(fn, static_inputs)
        return g, g.outputs
    monkeypatch.setattr(graphs, "record", record)

    def loop(x, cached):
        return x + cached[0], x * cached[1]

    x, cached = torch.arange(3.0), [torch.ones(3), torch.full((3,), 2.0)]
    out, replayed = graphs.run("k", loop, dict(x=x, cached=cached), immutable=("cached",))
    assert replayed and torch.equal(out[0], x + 1) and torch.equal(out[1], 2 * x)
    x.add_(10)                        # the same tensor object, modified in place: must be copied again
    out, _ = graphs.run("k", loop, dict(x=x, cached=cached), immutable=("cached",))
    assert torch.equal(out[0], x + 1)
    cached[0].fill_(5)                # an immutable input seen again is not re-copied (the caches never do this)
    out, _ = graphs.run("k", loop, dict(x=x, cached=cached), immutable=("cached",))
    assert torch.equal(out[0], x + 1)
    fresh = [torch.full((3,), 5.0), cached[1]]          # a new cache entry is copied
    out, _ = graphs.run("k", loop, dict(x=x, cached=fresh), immutable=("cached",))
    assert torch.equal(out[0], x + 5) and graphs.captures == 1 and graphs.replays == 4
    with pytest.raises(RuntimeError, match="structure"):
        graphs.run("k", loop, dict(x=x, cached=fresh[:1]), immutable=("cached",))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["vla", "joint"])
def test_cuda_graph_equals_eager(tiny_fixture, mode, monkeypatch):
    """bf16 on the auto backend (the Triton kernels): capture must succeed (no host sync in the forward) and the
    replay must equal the eager loop."""
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    from motus_fast.weights.upstream import load_upstream
    model = load_upstream(tiny_fixture["dir"] / "model.safetensors", upstream_config=tiny_fixture["config"],
                          dtype=torch.bfloat16).cuda().eval()
    io = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()
          for k, v in tiny_fixture["io"].items()}
    cond, noise = fixture_inputs(io)
    eager = InferenceEngine(model, cuda_graphs=False)
    graphed = InferenceEngine(model, cuda_graphs=True)
    ref = eager.sample(mode, eager.prepare_tensors(cond, io["sample.in.cond_latent"]), steps=3, **noise)
    for _ in range(2):
        out = graphed.sample(mode, graphed.prepare_tensors(cond, io["sample.in.cond_latent"]), steps=3, **noise)
        assert not graphed.graphs.failed, f"capture failed: {graphed.graphs.failed}"
        for name in ("video", "actions"):
            r, o = getattr(ref, name), getattr(out, name)
            if r is not None:
                torch.testing.assert_close(o, r)          # the same kernels replayed (bf16 tolerances)
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 2


def test_from_checkpoint_loads_ours_and_official(tiny_model, tiny_fixture, tmp_path):
    from motus_fast.weights.native import load_model
    from motus_fast.weights import save_pretrained
    save_pretrained(tiny_model, tmp_path / "ours", extra={"norm_mode": "none"})
    official = InferenceEngine.from_checkpoint(tiny_fixture["dir"] / "model.safetensors",
                                               upstream_config=tiny_fixture["config"], dtype=torch.float32)
    ours, extra = load_model(tmp_path / "ours")
    assert extra == {"norm_mode": "none"} and not ours.training
    for name, p in tiny_model.state_dict().items():
        assert torch.equal(official.model.state_dict()[name], p) and torch.equal(ours.state_dict()[name], p), name
