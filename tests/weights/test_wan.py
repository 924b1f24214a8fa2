"""Wan2.2 video DiT -> our video expert: diffusers and original layouts, lazy sharded loading, strict errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from motus_fast.model import Conditioning, Motus
from motus_fast.weights import CheckpointError
from motus_fast.weights.assemble import motus_from_wan
from motus_fast.weights.sources import SafetensorsSource, open_weights
from motus_fast.weights.wan import diffusers_rules, is_video_key, load_wan_video, locate_wan, original_rules
from tiny_backbones import (TINY_BASE, diffusers_to_original, original_wan_config, rel_l2, tiny_wan_diffusers,
                            write_sharded)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The same random tiny Wan saved in both layouts, each in several shards with an index."""
    m = tiny_wan_diffusers()
    root = tmp_path_factory.mktemp("wan")
    m.save_pretrained(root / "diffusers", max_shard_size="20KB")
    write_sharded(root / "original", diffusers_to_original(m.state_dict()), original_wan_config(m))
    return {"model": m, "diffusers": root / "diffusers", "original": root / "original"}


@pytest.fixture(scope="module")
def ours(wan):
    return motus_from_wan(wan["diffusers"], TINY_BASE, torch.float32, progress=False).eval()


def test_checkpoints_are_sharded(wan):
    for layout in ("diffusers", "original"):
        index = json.loads(next(wan[layout].glob("*.index.json")).read_text())
        assert len(set(index["weight_map"].values())) >= 2, layout


@pytest.mark.parametrize("per_token", [False, True], ids=["t_per_sample", "t_per_token"])
def test_matches_diffusers_forward(wan, ours, per_token):
    """Our Motus with only the video stream (no action, no und) = diffusers' WanTransformer3DModel, fp32."""
    g = torch.Generator().manual_seed(1)
    for B, (T, H, W), L_t in ((2, (3, 4, 6), 7), (1, (2, 6, 2), 5)):
        x = torch.randn(B, 4, T, H, W, generator=g)
        ctx = torch.randn(B, L_t, 24, generator=g)
        L_v = T * (H // 2) * (W // 2)
        t = torch.rand(B, L_v, generator=g) * 1000 if per_token else torch.rand(B, generator=g) * 1000
        with torch.no_grad():
            want = wan["model"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            got, no_actions = ours(x, t, None, None, Conditioning(text=ctx))
        assert no_actions is None
        assert got.shape == want.shape
        assert rel_l2(got, want) <= 1e-5, (B, T, H, W, rel_l2(got, want))


def test_original_layout_loads_to_the_identical_state(wan, ours):
    other = motus_from_wan(wan["original"], TINY_BASE, torch.float32, progress=False)
    a, b = ours.state_dict(), other.state_dict()
    video = [k for k in a if is_video_key(k)]
    assert len(video) == len(original_rules(2)) == len(diffusers_rules(2))
    for k in video:
        assert torch.equal(a[k], b[k]), k
    assert locate_wan(wan["original"]).video == locate_wan(wan["diffusers"]).video


def test_upstream_fixture_video_weights_in_original_layout(tmp_path, tiny_fixture, tiny_model):
    """The Wan tensors of the official Motus fixture, stripped of their prefix, are an original-layout Wan
    checkpoint: loading it gives exactly the video expert that load_upstream gives."""
    prefix = "video_model.wan_model."
    sd = load_file(str(tiny_fixture["dir"] / "model.safetensors"))
    wan_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    write_sharded(tmp_path / "wan", wan_sd, tiny_fixture["config"]["wan_config_json"], shards=2)
    ckpt = locate_wan(tmp_path / "wan")
    assert ckpt.layout == "original" and ckpt.motus_config(tiny_model.cfg) == tiny_model.cfg
    with torch.device("meta"):
        model = Motus(tiny_model.cfg)
    load_wan_video(model, tmp_path / "wan", torch.float32, progress=False)
    want = tiny_model.state_dict()
    for k, v in model.state_dict().items():
        if is_video_key(k):
            assert torch.equal(v, want[k]), k


def test_path_forms(wan, ours, tmp_path):
    """A pipeline folder (model_index.json + transformer/), an index json, or one .safetensors beside config.json."""
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    shutil.copytree(wan["diffusers"], tmp_path / "pipe" / "transformer")
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(wan["diffusers"] / "config.json", single)
    save_file(wan["model"].state_dict(), str(single / "diffusion_pytorch_model.safetensors"))
    want = ours.state_dict()
    for path in (tmp_path / "pipe", next(wan["original"].glob("*.index.json")),
                 single / "diffusion_pytorch_model.safetensors"):
        got = motus_from_wan(path, TINY_BASE, torch.float32, progress=False).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if is_video_key(k)), path


def test_dtype_on_load(wan):
    m = motus_from_wan(wan["diffusers"], TINY_BASE, torch.bfloat16, progress=False)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert torch.equal(m.video.head.weight, wan["model"].proj_out.weight.to(torch.bfloat16))
    stored = motus_from_wan(wan["diffusers"], TINY_BASE, None, progress=False)   # None: as stored (fp32 here)
    assert {p.dtype for p in stored.parameters()} == {torch.float32}


def test_reads_lazily_tensor_by_tensor(wan, monkeypatch):
    """Opening reads headers only; the loader then reads each stored tensor exactly once, shard by shard, into a
    model built on the meta device."""
    with open_weights(wan["diffusers"]) as src:
        assert isinstance(src, SafetensorsSource) and len(src.files()) >= 2
        assert {src.shape(k) for k in src.keys()}        # shapes come from the headers
        assert src.tensors_read == 0
        all_keys = sorted(src.keys())
    reads = []
    real_load = SafetensorsSource.load
    monkeypatch.setattr(SafetensorsSource, "load", lambda self, k: reads.append((self.where(k), k)) or
                        real_load(self, k))
    with torch.device("meta"):
        model = Motus(locate_wan(wan["diffusers"]).motus_config(TINY_BASE))
    load_wan_video(model, wan["diffusers"], progress=False)
    assert sorted(k for _, k in reads) == all_keys                  # each tensor once, nothing else
    assert len({f for f, _ in reads}) >= 2
    video = [(n, p) for n, p in model.named_parameters() if is_video_key(n)]
    assert video and not any(p.is_meta for _, p in video)
    assert all(p.is_meta for n, p in model.named_parameters() if not is_video_key(n))   # untouched


# ---- errors name the key or the file ---------------------------------------------------------------------
def _damaged_copy(wan, tmp_path, layout="diffusers"):
    dst = tmp_path / layout
    shutil.copytree(wan[layout], dst)
    index_path = next(dst.glob("*.index.json"))
    return dst, index_path, json.loads(index_path.read_text())


def _rewrite_shard(folder, index, key, change):
    shard = folder / index["weight_map"][key]
    sd = load_file(str(shard))
    change(sd)
    save_file(sd, str(shard), metadata={"format": "pt"})
    return shard.name


def _load(folder):
    return motus_from_wan(folder, TINY_BASE, torch.float32, progress=False)


def test_missing_shard_names_the_file(wan, tmp_path):
    folder, _, index = _damaged_copy(wan, tmp_path)
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(CheckpointError, match="shard is missing") as err:
        _load(folder)
    assert gone in str(err.value)


@pytest.mark.parametrize("keep_bytes", [100, 5], ids=["truncated_data", "truncated_header"])
def test_truncated_file_names_the_file(wan, tmp_path, keep_bytes):
    folder, _, index = _damaged_copy(wan, tmp_path, "original")
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: keep_bytes if keep_bytes < 10 else len(data) - keep_bytes])
    with pytest.raises(CheckpointError, match="truncated") as err:
        _load(folder)
    assert shard.name in str(err.value)


@pytest.mark.parametrize("layout, key", [("diffusers", "blocks.1.attn1.to_k.weight"),
                                         ("original", "blocks.1.self_attn.k.weight"),
                                         ("original", "patch_embedding.weight")])
def test_wrong_shape_names_key_and_file(wan, tmp_path, layout, key):
    folder, _, index = _damaged_copy(wan, tmp_path, layout)
    shard = _rewrite_shard(folder, index, key, lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        _load(folder)
    assert key in str(err.value) and shard in str(err.value)


def test_missing_and_unexpected_keys_are_named(wan, tmp_path):
    folder, index_path, index = _damaged_copy(wan, tmp_path)
    gone, extra = "blocks.0.attn2.norm_k.weight", "blocks.0.attn2.add_k_proj.weight"

    def change(sd):
        sd[extra] = sd.pop(gone)
    _rewrite_shard(folder, index, gone, change)
    index["weight_map"][extra] = index["weight_map"].pop(gone)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    msg = str(err.value)
    assert "1 missing key" in msg and gone in msg and "1 unexpected key" in msg and extra in msg


def test_index_pointing_to_the_wrong_shard(wan, tmp_path):
    folder, index_path, index = _damaged_copy(wan, tmp_path)
    key = "proj_out.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold them") as err:
        _load(folder)
    assert key in str(err.value) and other in str(err.value)


def test_config_mismatch_names_the_field(wan):
    cfg = locate_wan(wan["diffusers"]).motus_config(TINY_BASE)
    with torch.device("meta"):
        model = Motus(cfg.override({"video.eps": 1e-5}))
    with pytest.raises(CheckpointError, match="eps"):
        load_wan_video(model, wan["diffusers"], progress=False)


@pytest.mark.parametrize("field, value, message", [("added_kv_proj_dim", 32, "image conditioning"),
                                                   ("qk_norm", "rms_norm", "qk_norm"),
                                                   ("cross_attn_norm", False, "cross_attn_norm")])
def test_unsupported_wan_variants_are_refused(wan, tmp_path, field, value, message):
    folder, _, _ = _damaged_copy(wan, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        _load(folder)


def test_missing_config_is_named(wan, tmp_path):
    folder, _, _ = _damaged_copy(wan, tmp_path, "original")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        _load(folder)
