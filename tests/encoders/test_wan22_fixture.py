"""The original Wan2.2 release files (fixture ../shared/fixtures/upstream_wan22_tiny, made by running the release's
vae2_2.py and t5.py) load into diffusers' AutoencoderKLWan and transformers' UMT5EncoderModel and reproduce the
release's outputs within the fixture README's tolerance (float32: rel-L2 <= 3e-6, max abs <= 2e-5)."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixture_utils import rel_l2
from motus_fast.encoders import WanVAE, load_umt5, load_wan_vae
from motus_fast.weights import CheckpointError

REL, ABS = 3e-6, 2e-5
FIXTURES = Path(os.environ.get("MOTUS_FIXTURES", Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"))


@pytest.fixture(scope="module")
def wan22():
    root = FIXTURES / "upstream_wan22_tiny"
    if not root.is_dir():
        pytest.fail(f"parity fixture not found at {root} (set MOTUS_FIXTURES)")
    return {"root": root, "io": load_file(str(root / "io.safetensors"))}


def check(name, got, want):
    r, m = rel_l2(got, want), (got.double() - want.double()).abs().max().item()
    assert r <= REL and m <= ABS, f"{name}: rel-L2 {r:.2e}, max abs {m:.2e}"


@pytest.fixture(scope="module")
def vae(wan22):
    return WanVAE(load_wan_vae(wan22["root"] / "Wan2.2_VAE.pth", torch.float32, progress=False))


def test_vae_pth_reproduces_the_release(vae, wan22):
    io = wan22["io"]
    check("latent_raw", vae.encode_raw(io["vae.video"]), io["vae.latent_raw"])
    logvar = vae.vae.encode(io["vae.video"]).latent_dist.logvar
    check("latent_logvar", logvar, io["vae.latent_logvar"])
    check("latent", vae.encode(io["vae.video"]), io["vae.latent"])
    check("decoded (clamped)", vae.decode(io["vae.latent"]), io["vae.decoded_raw"].clamp(-1, 1))
    check("noise decoded (clamped)", vae.decode(io["vae.noise_latent"]), io["vae.noise_decoded_raw"].clamp(-1, 1))
    assert torch.equal(vae.latents_mean.flatten(), io["vae.latents_mean"])       # the release's literals
    assert torch.equal(1 / vae.latents_inv_std.flatten(), 1 / (1 / io["vae.latents_std"]))


def test_vae_sizes_come_from_the_file(vae):
    c = vae.vae.config
    assert (c.base_dim, c.decoder_base_dim, c.z_dim, list(c.dim_mult), c.num_res_blocks) == (8, 12, 48, [1, 2, 4, 4], 2)
    assert list(c.temperal_downsample) == [False, True, True]


def test_both_vae_layouts_load_the_same_module(vae, wan22, tmp_path):
    """The release .pth and the diffusers folder (what diffusers writes for the same weights) are one model."""
    vae.vae.save_pretrained(tmp_path / "vae")
    folder = load_wan_vae(tmp_path / "vae", torch.float32, progress=False)
    want = vae.vae.state_dict()
    assert folder.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in folder.state_dict().items())


def test_umt5_pth_reproduces_the_release(wan22):
    io = wan22["io"]
    t5 = load_umt5(wan22["root"], torch.float32, progress=False)     # a release folder: its .pth
    with torch.no_grad():
        out = t5(input_ids=io["t5.input_ids"], attention_mask=io["t5.attention_mask"]).last_hidden_state
    valid = io["t5.attention_mask"].bool()
    check("t5 valid rows", out[valid], io["t5.hidden_states"][valid])
    t5 = load_umt5(wan22["root"] / "models_t5_umt5-xxl-enc-bf16.pth", torch.bfloat16, progress=False)
    with torch.no_grad():
        bf16 = t5(input_ids=io["t5.input_ids"], attention_mask=io["t5.attention_mask"]).last_hidden_state
    assert rel_l2(bf16.float()[valid], io["t5.hidden_states"][valid]) <= 2e-2      # README: bf16 tolerance


@pytest.mark.parametrize("damage", ["missing", "misshaped", "truncated"])
def test_release_file_problems_are_named(wan22, tmp_path, damage):
    src = wan22["root"] / "Wan2.2_VAE.pth"
    bad = tmp_path / "Wan2.2_VAE.pth"
    key = "decoder.upsamples.1.upsamples.2.residual.6.weight"
    if damage == "truncated":
        data = src.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        sd = torch.load(src, map_location="cpu", weights_only=True)
        if damage == "missing":
            del sd[key]
        else:
            sd[key] = sd[key][:, :-1].clone()
        torch.save(sd, bad)
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(bad, progress=False)
    msg = str(err.value)
    assert str(bad) in msg and {"missing": key, "misshaped": key, "truncated": "truncated"}[damage] in msg
    assert {"missing": "missing", "misshaped": "mis-shaped", "truncated": "truncated"}[damage] in msg
