"""The tiny encoders and the data edge (RawBatch -> FlowBatch), up to a training loss per stage."""

import numpy as np
import pytest
import torch

from motus_fast.config import get_preset
from motus_fast.data.dataset import collate
from motus_fast.data.encode import BatchEncoder, EncodedDataset
from motus_fast.encoders import FrozenEncoders, build_tiny_encoders, pad_text
from motus_fast.encoders.registry import build_text_encoder
from motus_fast.data.mixture import StepSampler, build_mixture
from motus_fast.data.text_cache import TextCache, build_text_cache
from motus_fast.data.tiny import tiny_pyramid
from motus_fast.data.windows import WindowSpec
from motus_fast.flow import training_loss

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def encoders():
    return build_tiny_encoders(CFG, seed=0, text_len=CFG.video.text_len)


@pytest.fixture(scope="module")
def stage_cfgs(tmp_path_factory):
    # tiny preset: chunk K = 16 = 8 video frames x ratio 2; 64x64 frames -> 4x4 latents
    return tiny_pyramid(tmp_path_factory.mktemp("pyr"), window=WindowSpec(8, 2, 1), height=64, width=64,
                        episodes=2, frames=30)


def test_vae_condition_latent_is_first_clip_latent(encoders):
    """Upstream encodes the clip and the condition frame separately; our single encode gives both."""
    vae = encoders.vae
    torch.manual_seed(0)
    clip = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    lat = vae.encode(clip)
    assert lat.shape == (1, CFG.video.in_channels, 3, 4, 4)
    cond = vae.encode(clip[:, :, :1])
    err = (lat[:, :, :1] - cond).abs().max() / cond.abs().max()
    assert err < 1e-5
    assert vae.decode(lat).shape == (1, 3, 9, 64, 64)
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        vae.encode(clip[:, :, :6])


def test_text_and_vlm_padding_independent(encoders):
    texts = ["pick up the red cube", "go", "put the cube in the box, then close the lid"]
    batched = encoders.text(texts)
    for t, b in zip(texts, batched):
        single = encoders.text([t])[0]
        assert b.shape == single.shape == (len(t.replace(",", " ,").split()) + 1, CFG.video.text_dim)
        torch.testing.assert_close(b, single, rtol=1e-5, atol=1e-5)
    padded, lens = pad_text(batched, 16)
    assert padded.shape == (3, 16, CFG.video.text_dim) and lens.tolist() == [b.shape[0] for b in batched]
    assert (padded[1, lens[1]:] == 0).all()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    items = [encoders.vlm.prompt(imgs[0], texts[0]), encoders.vlm.prompt(imgs[1], texts[1])]
    hidden, lens = encoders.vlm(items)
    assert hidden.shape[0] == 2 and hidden.shape[2] == CFG.und.vlm_dim
    assert lens.tolist() == [len(i["input_ids"]) for i in items]
    for i in range(2):
        alone, n = encoders.vlm([items[i]])
        torch.testing.assert_close(hidden[i, : int(n[0])], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_batches_train(encoders, stage_cfgs, stage):
    """Each stage's loader -> FlowBatch -> a finite loss with gradients on the tiny model."""
    from motus_fast.model import Motus

    cfg = stage_cfgs[stage]
    mix = build_mixture(cfg, vlm_prompt=encoders.vlm_prompt)
    raw = collate([mix[i] for i in next(iter(StepSampler(len(mix), batch_size=2, steps=1, seed=stage, mixture=mix)))])
    fb = BatchEncoder(encoders)(raw)
    assert fb.video.shape == (2, CFG.video.in_channels, 3, 4, 4)
    assert fb.actions.shape == (2, 16, 14) and fb.cond.text.shape == (2, CFG.video.text_len, CFG.video.text_dim)
    assert fb.cond.vlm.shape[::2] == (2, CFG.und.vlm_dim) and fb.cond.text_lens is None
    assert torch.equal(fb.has_actions, raw.has_actions)
    model_cfg = CFG.override({"action.layout": "finetune" if cfg.with_state else "pretrain"})
    assert (fb.cond.state is not None) == cfg.with_state
    torch.manual_seed(0)
    model = Motus(model_cfg)
    losses = training_loss(model, fb, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.video.head.weight.grad is not None
    if stage == 1:
        assert losses["loss_action"].item() == 0.0         # every sample action-free: nothing to score


def test_text_cache_is_used(encoders, stage_cfgs, tmp_path):
    cfg = stage_cfgs[3]
    mix = build_mixture(cfg)
    texts = {t for e in range(2) for t in mix.datasets[0].source.instructions(e)}
    path = build_text_cache(texts, encoders.text, tmp_path / "text.safetensors", encoder_name="tiny", progress=False)
    cache = TextCache(path)
    assert len(cache) == len(texts) and cache.encoder == "tiny"
    mix = build_mixture(cfg, text_cache=cache)
    raw = collate([mix[(0, 1)], mix[(5, 2)]])
    assert all(t is not None for t in raw.text)

    calls = []

    class Counting:
        dim = encoders.text.dim

        def __call__(self, texts):
            calls.append(list(texts))
            return encoders.text(texts)

    fb = BatchEncoder(FrozenEncoders(encoders.vae, Counting(), None, text_len=CFG.video.text_len,
                                     attend_padding=False))(raw)
    assert calls == [] and fb.cond.vlm is None
    direct = encoders.text(raw.instructions)
    assert fb.cond.text_lens.tolist() == [d.shape[0] for d in direct]
    for i, d in enumerate(direct):
        torch.testing.assert_close(fb.cond.text[i, : d.shape[0]], d)
    raw.text = [None, raw.text[1]]
    BatchEncoder(FrozenEncoders(encoders.vae, Counting(), None, text_len=CFG.video.text_len))(raw)
    assert calls == [[raw.instructions[0]]]


def test_encoded_dataset_collates_for_the_trainer(encoders, stage_cfgs):
    from motus_fast.data.batch import collate_flow_batches

    mix = build_mixture(stage_cfgs[3], vlm_prompt=encoders.vlm_prompt)
    per_sample = FrozenEncoders(encoders.vae, encoders.text, encoders.vlm)     # text_len None: no padding rows
    ds = EncodedDataset(mix, per_sample)
    fb = collate_flow_batches([ds[0], ds[1]])
    assert fb.video.shape[0] == 2 and fb.cond.text_lens is not None and fb.cond.vlm_lens is not None
    assert build_text_encoder("tiny", CFG).dim == CFG.video.text_dim
    with pytest.raises(KeyError, match="unknown text encoder"):
        build_text_encoder("nope", CFG)


def test_chat_prompt_with_a_tokenizer(encoders):
    """The real-weights prompt path (chat template + image processor), on an in-process word-level tokenizer whose
    ids match the tiny Qwen3-VL's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from motus_fast.encoders.qwen3_vl import Qwen3VLChatPrompt
    from motus_fast.encoders.tiny import TINY_QWEN_IDS

    words = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "pick", "the", "cube"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<|image_pad|>": TINY_QWEN_IDS["image_token_id"], "<|vision_start|>":
                  TINY_QWEN_IDS["vision_start_token_id"], "<|vision_end|>": TINY_QWEN_IDS["vision_end_token_id"]})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
                "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    prompt = Qwen3VLChatPrompt(tok, encoders.vlm.prompt.image_processor, chat_template=template)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    item = prompt(image, "pick the cube")
    ids = item["input_ids"].tolist()
    n = int(item["image_grid_thw"].prod()) // 4
    i = ids.index(TINY_QWEN_IDS["vision_start_token_id"])
    assert ids[i + 1: i + 1 + n] == [TINY_QWEN_IDS["image_token_id"]] * n
    assert ids[i + 1 + n] == TINY_QWEN_IDS["vision_end_token_id"] and ids[-1] == vocab["assistant"]
    hidden, lens = encoders.vlm([item])
    assert hidden.shape == (1, len(ids), 96) and lens.tolist() == [len(ids)]


def test_latent_cache(encoders, stage_cfgs, tmp_path):
    import dataclasses

    from motus_fast.data.latent_cache import LatentCache

    mix = build_mixture(stage_cfgs[3])
    raw = collate([mix[(0, 0)], mix[(3, 0)]])
    calls = []

    class CountingVAE(torch.nn.Module):
        temporal_stride, spatial_stride = encoders.vae.temporal_stride, encoders.vae.spatial_stride
        latent_channels = encoders.vae.latent_channels

        def __init__(self):
            super().__init__()
            self.inner = encoders.vae

        def encode(self, video):
            calls.append(video.shape[0])
            return self.inner.encode(video)

    cache = LatentCache(tmp_path / "lat", tag="tiny-vae")
    be = BatchEncoder(FrozenEncoders(CountingVAE(), encoders.text, None), latent_cache=cache)
    first = be.encode_video(raw.frames, raw.video_ids)
    again = be.encode_video(raw.frames, raw.video_ids)
    assert calls == [2] and torch.equal(first, again)
    mixed = collate([mix[(3, 0)], mix[(7, 0)]])           # one cached, one new
    out = be.encode_video(mixed.frames, mixed.video_ids)
    assert calls == [2, 1] and torch.equal(out[0], first[1])
    # another frame size is another clip: another id
    other = build_mixture(dataclasses.replace(stage_cfgs[3], height=32, width=32))[(0, 0)]
    assert other.key == raw.keys[0] and other.video_id != raw.video_ids[0]
    assert LatentCache(tmp_path / "lat", tag="other-vae").get(raw.video_ids[0]) is None
