"""Frozen backbones (Qwen3-VL, umT5, Wan VAE), the VLM feature extractor feeding the und expert, upstream-style
fresh experts and `motus-fast init`."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from motus_fast.cli import main as cli_main
from motus_fast.config import get_preset
from motus_fast.model import Conditioning, Motus
from motus_fast.encoders import VLMFeatureExtractor, WanVAE, load_encoders, load_qwen3_vl, load_umt5, load_wan_vae
from motus_fast.weights import CheckpointError, load_pretrained
from motus_fast.weights.assemble import fresh_experts_like_upstream, motus_from_wan
from motus_fast.weights.wan import is_video_key
from tiny_backbones import randomize_, rel_l2, tiny_wan_diffusers

IMAGE, VIDEO_TOKEN, VISION_START, VISION_END = 990, 991, 992, 993


# ---- tiny checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random tiny Qwen3-VL (transformers), saved in shards; and one prompt+image batch for it."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vcfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    tcfg = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    cfg = Qwen3VLConfig(text_config=tcfg, vision_config=vcfg, image_token_id=IMAGE, video_token_id=VIDEO_TOKEN,
                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    model = randomize_(Qwen3VLForConditionalGeneration(cfg), seed=3).eval()
    folder = tmp_path_factory.mktemp("qwen3_vl")
    model.save_pretrained(folder, max_shard_size="300KB")
    g = torch.Generator().manual_seed(4)
    image = [VISION_START] + [IMAGE] * 4 + [VISION_END]         # a 64x64 image: 4x4 patches of 16, merged 2x2
    prompts = [[5, 6, *image, 7, 8, 9, 10], [*image, 11, 12]]   # image in the middle / first, different lengths
    pixels = [torch.randn(16, 3 * 2 * 16 * 16, generator=g) for _ in prompts]
    return {"model": model, "dir": folder, "prompts": prompts, "pixels": pixels}


def batch(prompts, pixels, side: str):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(0, len(p)) if side == "right" else slice(L - len(p), L)
        ids[b, sl], mask[b, sl] = torch.tensor(p), 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels),
                image_grid_thw=torch.tensor([[1, 4, 4]] * len(prompts)))


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    model = randomize_(UMT5EncoderModel(cfg), seed=5).eval()
    root = tmp_path_factory.mktemp("wan_pipeline")             # a diffusers pipeline folder: text_encoder/ inside
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    model.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    return {"model": model, "root": root, "dir": root / "text_encoder"}


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=16, decoder_base_dim=24, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                             out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 8,
                             latents_std=[1.0] * 8).eval()
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return {"model": model, "dir": folder}


# ---- Qwen3-VL and the feature extractor ------------------------------------------------------------------
def test_qwen3_vl_loads_frozen_eval_in_dtype(qwen):
    for dtype in (torch.float32, torch.bfloat16):
        m = load_qwen3_vl(qwen["dir"], dtype)
        assert not m.training and {p.dtype for p in m.parameters()} == {dtype}
        assert not any(p.requires_grad for p in m.parameters())
    want = qwen["model"].state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k].to(torch.bfloat16)), k


@pytest.fixture(scope="module")
def extractor(qwen):
    ex = VLMFeatureExtractor(load_qwen3_vl(qwen["dir"], torch.float32))
    assert isinstance(ex, VLMFeatureExtractor)
    return ex


@pytest.mark.parametrize("side", ["right", "left"])
def test_features_equal_transformers_last_hidden_state(qwen, extractor, side):
    """Prompt + image of each sample, batched with padding: our features = transformers' last hidden state (after
    the final norm) of that sample run alone, for every real token; real tokens come first, lens counts them."""
    inputs = batch(qwen["prompts"], qwen["pixels"], side)
    feats, lens = extractor(**inputs)
    assert lens.tolist() == [len(p) for p in qwen["prompts"]] and feats.shape[-1] == 64
    for b, (p, px) in enumerate(zip(qwen["prompts"], qwen["pixels"])):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = qwen["model"](input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                                image_grid_thw=torch.tensor([[1, 4, 4]]),
                                mm_token_type_ids=(ids == IMAGE).int(), output_hidden_states=True)
        want = out.hidden_states[-1][0]
        assert rel_l2(feats[b, : len(p)], want) <= 1e-5, (side, b, rel_l2(feats[b, : len(p)], want))


def test_mm_token_type_ids_from_the_processor_or_derived(qwen, extractor):
    inputs = batch(qwen["prompts"], qwen["pixels"], "right")
    derived, _ = extractor(**inputs)
    given, _ = extractor(**inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int())
    assert torch.equal(derived, given)
    # without M-RoPE positions (all tokens typed as text) the image tokens would sit elsewhere: it matters
    flat, _ = extractor(**inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
    assert rel_l2(flat, derived) > 1e-3


def test_extractor_stays_frozen_in_train_mode(extractor):
    extractor.train()
    assert not extractor.vlm.training and not any(p.requires_grad for p in extractor.parameters())


def test_features_feed_the_und_expert_without_attending_padding(qwen, extractor):
    """Padded batch + lens through Motus = each sample alone with no padding (the und expert packs by vlm_lens)."""
    cfg = get_preset("tiny").override({"und.vlm_dim": extractor.hidden_size})
    model = randomize_(Motus(cfg), seed=6).eval()         # a fresh Motus has zero heads
    feats, lens = extractor(**batch(qwen["prompts"], qwen["pixels"], "left"))
    g = torch.Generator().manual_seed(2)
    B = len(lens)
    video = torch.randn(B, 48, 2, 4, 4, generator=g)
    actions = torch.randn(B, cfg.action.chunk_size, cfg.action.action_dim, generator=g)
    text = torch.randn(B, 5, cfg.video.text_dim, generator=g)
    state = torch.randn(B, cfg.action.state_dim, generator=g)
    t_v, t_a = torch.tensor([700.0, 150.0]), torch.tensor([300.0, 900.0])
    with torch.no_grad():
        v, a = model(video, t_v, actions, t_a, Conditioning(text=text, vlm=feats, state=state, vlm_lens=lens))
        for b in range(B):
            n = int(lens[b])
            vb, ab = model(video[b:b + 1], t_v[b:b + 1], actions[b:b + 1], t_a[b:b + 1],
                           Conditioning(text=text[b:b + 1], vlm=feats[b:b + 1, :n], state=state[b:b + 1]))
            assert rel_l2(v[b:b + 1], vb) <= 1e-5 and rel_l2(a[b:b + 1], ab) <= 1e-5, b
        v_pad, _ = model(video, t_v, actions, t_a, Conditioning(text=text, vlm=feats, state=state))
    assert rel_l2(v_pad[1:], v[1:]) > 1e-6            # attending the padding rows (upstream's way) differs


def _copy(src, dst):
    shutil.copytree(src, dst)
    index_path = next(dst.glob("*.index.json"))
    return json.loads(index_path.read_text()), index_path


def test_vlm_missing_shard_names_the_file(qwen, tmp_path):
    index, _ = _copy(qwen["dir"], tmp_path / "q")
    gone = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "q" / gone).unlink()
    with pytest.raises(CheckpointError, match="shard is missing") as err:
        load_qwen3_vl(tmp_path / "q", torch.float32)
    assert gone in str(err.value)


@pytest.mark.parametrize("damage", ["shape", "drop", "extra"])
def test_vlm_key_problems_are_named(qwen, tmp_path, damage):
    index, index_path = _copy(qwen["dir"], tmp_path / "q")
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / "q" / index["weight_map"][key]
    sd = load_file(str(shard))
    if damage == "shape":
        sd[key] = sd[key][:-1].clone()
    elif damage == "drop":
        del sd[key], index["weight_map"][key]
    else:
        key = "model.language_model.layers.1.mlp.bonus.weight"
        sd[key], index["weight_map"][key] = torch.zeros(2), shard.name
    save_file(sd, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    problem = {"shape": "mis-shaped", "drop": "missing", "extra": "unexpected"}[damage]
    with pytest.raises(CheckpointError, match=problem) as err:
        load_qwen3_vl(tmp_path / "q", torch.float32)
    assert key in str(err.value)


# ---- umT5 ------------------------------------------------------------------------------------------------
def test_umt5_loads_frozen_eval_and_encodes_like_transformers(umt5):
    enc = load_umt5(umt5["root"], torch.float32)          # pipeline folder -> text_encoder/
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    ids = torch.tensor([[5, 9, 23, 7, 1, 0, 0], [3, 4, 5, 6, 7, 8, 1]])
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    with torch.no_grad():
        ctx = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        want = umt5["model"](input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_l2(ctx[0, :5], want[0, :5]) <= 1e-6 and rel_l2(ctx[1], want[1]) <= 1e-6
    assert {p.dtype for p in load_umt5(umt5["dir"], torch.bfloat16).parameters()} == {torch.bfloat16}


def test_umt5_truncated_shard_names_the_file(umt5, tmp_path):
    index, _ = _copy(umt5["dir"], tmp_path / "t5")
    shard = tmp_path / "t5" / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_umt5(tmp_path / "t5")
    assert shard.name in str(err.value)


def hf_umt5_to_wan(sd):
    """transformers UMT5EncoderModel keys -> the original Wan T5 encoder's (wan/modules/t5.py), spelled out here."""
    leaf = {"0.SelfAttention.q": "attn.q", "0.SelfAttention.k": "attn.k", "0.SelfAttention.v": "attn.v",
            "0.SelfAttention.o": "attn.o", "0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
            "0.layer_norm": "norm1", "1.DenseReluDense.wi_0": "ffn.gate.0", "1.DenseReluDense.wi_1": "ffn.fc1",
            "1.DenseReluDense.wo": "ffn.fc2", "1.layer_norm": "norm2"}
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for key, t in sd.items():
        if key.startswith("encoder.block."):
            _, _, i, _, rest = key.split(".", 4)
            out[f"blocks.{i}.{leaf[rest.removesuffix('.weight')]}.weight"] = t.clone()
    return out


@pytest.fixture(scope="module")
def wan_t5_pth(umt5, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_release") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(hf_umt5_to_wan(umt5["model"].state_dict()), path)
    return path


def test_original_wan_t5_pth_loads_as_umt5(umt5, wan_t5_pth):
    enc = load_umt5(wan_t5_pth, torch.float32, progress=False)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    want = umt5["model"].state_dict()
    assert enc.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in enc.state_dict().items())
    assert enc.shared.weight is enc.encoder.embed_tokens.weight
    ids = torch.tensor([[5, 9, 23, 7, 1, 0], [3, 4, 5, 6, 7, 1]])
    mask = (ids > 0).long()
    with torch.no_grad():
        assert rel_l2(enc(input_ids=ids, attention_mask=mask).last_hidden_state,
                      umt5["model"](input_ids=ids, attention_mask=mask).last_hidden_state) <= 1e-6


def test_original_wan_t5_pth_problems_are_named(umt5, tmp_path):
    sd = hf_umt5_to_wan(umt5["model"].state_dict())
    key = "blocks.1.ffn.fc2.weight"
    sd[key] = sd[key][:, :-1].clone()
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        load_umt5(tmp_path / "t5.pth", progress=False)
    assert key in str(err.value) and "t5.pth" in str(err.value)
    data = (tmp_path / "t5.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_umt5(tmp_path / "cut.pth", progress=False)
    assert "cut.pth" in str(err.value)


# ---- Wan VAE ---------------------------------------------------------------------------------------------
def test_vae_loads_frozen_eval_in_dtype_and_encodes_identically(vae):
    m = load_wan_vae(vae["dir"], torch.float32, progress=False)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    want = vae["model"].state_dict()
    assert m.state_dict().keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in m.state_dict().items())
    x = torch.randn(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = m.encode(x).latent_dist.mode()
        assert torch.equal(z, vae["model"].encode(x).latent_dist.mode())
    assert z.shape == (1, 8, 2, 2, 2)
    assert {p.dtype for p in load_wan_vae(vae["dir"], torch.bfloat16, progress=False).parameters()} == {torch.bfloat16}


def test_broken_original_vae_pth_is_named(tmp_path):
    (tmp_path / "Wan2.2_VAE.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_wan_vae(tmp_path)                              # a release folder: its Wan2.2_VAE.pth
    assert "Wan2.2_VAE.pth" in str(err.value)


def test_vae_wrong_shape_names_key_and_file(vae, tmp_path):
    shutil.copytree(vae["dir"], tmp_path / "vae")
    f = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    key = "decoder.conv_out.bias"
    sd[key] = sd[key][:-1].clone()
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        load_wan_vae(tmp_path / "vae", progress=False)
    assert key in str(err.value) and f.name in str(err.value)


# ---- fresh experts and `motus-fast init` -----------------------------------------------------------------
# ---- the three as the Encoders bundle (training's BatchEncoder, serving's FrozenEncoders) --------------------
def word_tokenizer(words, special=None):
    """An in-process word-level fast tokenizer (no download): `words` get ids 0.., `special` {token: id}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    vocab.update(special or {})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=list(special or {}))


CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def test_frozen_encoders_load_from_folders_and_match_the_models(qwen, umt5, vae, tmp_path):
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from motus_fast.encoders.qwen3_vl import Qwen3VLChatPrompt

    words = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "pick", "the", "cube", "open"]
    pipeline = tmp_path / "wan_pipeline"
    shutil.copytree(umt5["root"], pipeline)
    shutil.copytree(vae["dir"], pipeline / "vae")
    with pytest.raises(CheckpointError, match="no umT5 tokenizer"):
        load_encoders(pipeline, qwen["dir"], dtype=torch.float32, progress=False)
    t5_tok = word_tokenizer(words)
    t5_tok.save_pretrained(pipeline / "tokenizer")                              # the diffusers pipeline layout
    qwen_dir = tmp_path / "qwen3_vl"
    shutil.copytree(qwen["dir"], qwen_dir)
    vl_tok = word_tokenizer(words, {"<|image_pad|>": IMAGE, "<|vision_start|>": VISION_START,
                                    "<|vision_end|>": VISION_END})
    vl_tok.chat_template = CHAT
    vl_tok.save_pretrained(qwen_dir)
    improc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                      max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    improc.save_pretrained(qwen_dir)

    enc = load_encoders(pipeline, qwen_dir, dtype=torch.float32, text_len=8, progress=False)
    prompts = ["pick the cube", "open"]
    tok = t5_tok(prompts, padding=True, return_tensors="pt")
    want = umt5["model"](**tok).last_hidden_state
    for i, got in enumerate(enc.text(prompts)):
        n = int(tok["attention_mask"][i].sum())
        torch.testing.assert_close(got, want[i, :n], rtol=1e-5, atol=1e-5)   # rounding (seen: 1.3e-6)

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    item = enc.vlm.prompt(image, "pick the cube")
    assert torch.equal(item["input_ids"], Qwen3VLChatPrompt(vl_tok, improc, CHAT)(image, "pick the cube")["input_ids"])
    hidden, lens = enc.vlm([item])
    ref, ref_lens = VLMFeatureExtractor(qwen["model"])(**{k: v[None] if k != "pixel_values" else v
                                                           for k, v in item.items() if k != "image_grid_thw"},
                                                        image_grid_thw=item["image_grid_thw"])
    torch.testing.assert_close(hidden, ref.float(), rtol=1e-5, atol=1e-5)

    clip = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    assert torch.equal(enc.vae.encode(clip), WanVAE(vae["model"]).encode(clip))
    assert enc.encode_prompts(prompts)[0].shape == (2, 8, 32) and enc.frame_stride == 4


def test_fresh_experts_follow_upstream_init():
    cfg = get_preset("tiny")
    with torch.device("meta"):
        model = Motus(cfg)
    model.video.to_empty(device="cpu")
    for blk in model.blocks:
        blk.video.to_empty(device="cpu")
    fresh_experts_like_upstream(model, torch.Generator().manual_seed(0))
    a, hd, Da, Du = model.action, cfg.head_dim, cfg.action.dim, cfg.und.dim

    def close(x, want, tol):
        return abs(x - want) <= tol * want

    assert not a.head.weight.any() and not a.head.bias.any()
    assert close(a.registers.std().item(), 0.02, 0.1) and close(a.decoder_modulation.std().item(), Da ** -0.5, 0.15)
    assert close(a.time.embed[0].weight.std().item(), 0.02, 0.05) and not a.time.embed[0].bias.any()
    for blk in model.blocks:
        act, und = blk.action, blk.und
        assert close(act.qkv.weight.std().item(), (Da * hd) ** -0.5, 0.05)
        assert close(und.qkv.weight.std().item(), (Du * hd) ** -0.5, 0.05)
        assert close(act.modulation.std().item(), Da ** -0.5, 0.15)
        for n in (act.norm_q, act.norm_k, und.norm_q, und.norm_k):
            assert torch.equal(n.weight, torch.ones_like(n.weight))
        for lin in (act.o, act.ffn[0], act.ffn[2]):                  # Xavier-uniform, zero bias
            bound = math.sqrt(6 / sum(lin.weight.shape))
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
            assert lin.bias is None or not lin.bias.any()
        for lin in (und.o, und.ffn[0], und.ffn[2]):                  # PyTorch default: U(+-1/sqrt(fan_in))
            bound = 1 / math.sqrt(lin.weight.shape[1])
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
            assert lin.bias is None or 0 < lin.bias.abs().max() <= bound
    again = Motus(cfg)
    fresh_experts_like_upstream(again, torch.Generator().manual_seed(0))
    other = Motus(cfg)
    fresh_experts_like_upstream(other, torch.Generator().manual_seed(1))
    sd, sa, so = model.state_dict(), again.state_dict(), other.state_dict()
    fresh = [k for k in sd if not is_video_key(k)]
    assert all(torch.equal(sd[k], sa[k]) for k in fresh)
    assert not all(torch.equal(sd[k], so[k]) for k in fresh if "norm" not in k and "pos_table" not in k)


@pytest.fixture(scope="module")
def wan_for_init(tmp_path_factory, umt5, vae):
    """A tiny Wan whose text width is the tiny umT5's and whose latent channels are the tiny VAE's."""
    m = tiny_wan_diffusers(in_channels=8, text_dim=32, seed=7)
    root = tmp_path_factory.mktemp("wan_init")
    m.save_pretrained(root / "transformer", max_shard_size="20KB")
    return root / "transformer"


def test_init_cli_builds_a_loadable_stage_checkpoint(tmp_path, wan_for_init, qwen, umt5, vae):
    out = tmp_path / "stage"
    cli_main(["init", "--wan", str(wan_for_init), "--vlm", str(qwen["dir"]), "--t5", str(umt5["root"]),
              "--vae", str(vae["dir"]), "--out", str(out), "--preset", "tiny", "--set", "action.layout=pretrain",
              "--seed", "3"])
    model = load_pretrained(out)
    cfg = model.cfg
    assert cfg.und.vlm_dim == 64 and cfg.video.in_channels == 8 and cfg.video.text_dim == 32
    assert cfg.action.layout == "pretrain" and cfg.num_layers == 2
    meta = json.loads((out / "config.json").read_text())["extra"]
    assert meta["backbones"]["vlm"]["hidden_size"] == 64 and meta["backbones"]["wan"]["layout"] == "diffusers"
    assert meta["backbones"]["vae"]["z_dim"] == 8 and meta["init"]["seed"] == 3
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref = motus_from_wan(wan_for_init, cfg, torch.float32, torch.Generator().manual_seed(3), progress=False)
    want = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v, a = model(torch.randn(1, 8, 2, 4, 4, generator=g), torch.tensor([500.0]),
                     torch.randn(1, cfg.action.chunk_size, cfg.action.action_dim, generator=g), torch.tensor([500.0]),
                     Conditioning(text=torch.randn(1, 3, 32, generator=g), vlm=torch.randn(1, 4, 64, generator=g)))
    assert torch.isfinite(v).all() and not a.any()                  # the fresh action head is zero, as upstream's


def test_init_refuses_backbones_that_do_not_fit(tmp_path, qwen, umt5, vae):
    wrong = tiny_wan_diffusers(in_channels=4, text_dim=32)
    wrong.save_pretrained(tmp_path / "wan")
    with pytest.raises(CheckpointError, match="latent channels"):
        cli_main(["init", "--wan", str(tmp_path / "wan"), "--vlm", str(qwen["dir"]), "--t5", str(umt5["dir"]),
                  "--vae", str(vae["dir"]), "--out", str(tmp_path / "out"), "--preset", "tiny"])
    assert not (tmp_path / "out").exists()
