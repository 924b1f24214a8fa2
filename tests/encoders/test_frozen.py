"""One preprocessing path: what serving gets from FrozenEncoders is exactly what training's BatchEncoder gave the
model (the same latents, umT5 states and VLM features, padding attended or masked the same way); and the engine
runs on them."""

import pytest
import torch

from motus_fast.config import get_preset
from motus_fast.data.dataset import RawBatch
from motus_fast.data.encode import BatchEncoder
from motus_fast.encoders import FrozenEncoders, build_tiny_encoders
from motus_fast.flow import sample
from motus_fast.infer import InferenceEngine
from motus_fast.model import Conditioning, Motus

CFG = get_preset("tiny")
PROMPTS = ["pick up the red cube", "open the drawer, then stop"]


@pytest.fixture(scope="module")
def encoders():
    return build_tiny_encoders(CFG, seed=0, text_len=CFG.video.text_len, image_size=(64, 64))


def raw_batch(encoders, frames):
    """frames: uint8 [B, T, H, W, 3] -> the RawBatch the training loader would give (first frame to the VLM)."""
    B = frames.shape[0]
    return RawBatch(frames=frames.permute(0, 1, 4, 2, 3).contiguous(), actions=torch.zeros(B, 16, 14), state=None,
                    has_actions=torch.ones(B, dtype=torch.bool), instructions=PROMPTS[:B], keys=["k"] * B,
                    levels=["l"] * B, vlm_inputs=[encoders.vlm_prompt(f[0].numpy(), p)
                                                  for f, p in zip(frames, PROMPTS)])


@pytest.mark.parametrize("attend_padding", [True, False])
def test_serving_inputs_equal_training_inputs(encoders, attend_padding):
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 9, 64, 64, 3), dtype=torch.uint8, generator=g)
    served = FrozenEncoders(encoders.vae, encoders.text, encoders.vlm, text_len=CFG.video.text_len,
                            image_size=(64, 64), attend_padding=attend_padding)
    trained = BatchEncoder(served)(raw_batch(encoders, frames))

    assert torch.equal(served.encode_frames(frames), trained.video)
    text, text_lens = served.encode_prompts(PROMPTS)
    assert torch.equal(text, trained.cond.text)
    vlm, vlm_lens = served.vlm_features(frames[:, 0], PROMPTS)
    assert torch.equal(vlm, trained.cond.vlm)
    for got, want in ((text_lens, trained.cond.text_lens), (vlm_lens, trained.cond.vlm_lens)):
        assert (got is None) == (want is None) == attend_padding
        if want is not None:
            assert torch.equal(got.cpu(), want.cpu())

    decoded = served.decode_latents(trained.video)
    assert decoded.dtype == torch.uint8 and decoded.shape == frames.shape
    assert torch.equal(decoded, ((encoders.vae.decode(trained.video) + 1) * 127.5).round().clamp(0, 255)
                       .to(torch.uint8).permute(0, 2, 3, 4, 1))


def test_engine_runs_on_frozen_encoders(encoders):
    """Images + prompts through FrozenEncoders and the engine == the plain sampler on the encoders' outputs."""
    torch.manual_seed(0)
    model = Motus(CFG).eval()
    enc = FrozenEncoders(encoders.vae, encoders.text, encoders.vlm, text_len=CFG.video.text_len,
                         image_size=(64, 64), attend_padding=False)
    engine = InferenceEngine(model, enc)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    state = torch.randn(2, CFG.action.state_dim, generator=g)
    noise_action = torch.randn(2, CFG.action.chunk_size, CFG.action.action_dim, generator=g)
    noise_video = torch.randn(2, CFG.video.in_channels, 3, 4, 4, generator=g)
    text, text_lens = enc.encode_prompts(PROMPTS)
    vlm, vlm_lens = enc.vlm_features(images, PROMPTS)
    cond = Conditioning(text=text, vlm=vlm, state=state, text_lens=text_lens, vlm_lens=vlm_lens)
    ref = sample(model, "vla", cond=cond, cond_latent=enc.encode_frames(images[:, None]), noise_video=noise_video,
                 noise_action=noise_action, steps=2)
    out = engine.sample("vla", engine.prepare(images, PROMPTS, state), noise_video=noise_video,
                        noise_action=noise_action, steps=2)
    assert torch.equal(out.actions, ref.actions)


def test_rejects_what_it_cannot_encode(encoders):
    no_vlm = FrozenEncoders(encoders.vae, encoders.text, None)
    assert no_vlm.vlm_dim is None
    with pytest.raises(ValueError, match="no VLM"):
        no_vlm.vlm_features(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), ["x"])
    with pytest.raises(ValueError, match="spatial stride 16"):
        FrozenEncoders(encoders.vae, encoders.text, encoders.vlm, image_size=(64, 40))
    with pytest.raises(ValueError, match="these encoders take"):
        encoders.encode_frames(torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8))
