"""The latent-action VAE: token layout, generic (n_tokens, width), the loss terms, frozen vs trained DC-AE,
checkpoints, the labelled/unlabelled mix and the trainer's logs."""

import json

import pytest
import torch
import torch.nn.functional as F

from motus_fast.latent_action.checkpoint import (LatentActionCheckpointError, load_latent_action_model,
                                                 save_latent_action_model)
from motus_fast.latent_action.config import LatentActionConfig, get_preset
from motus_fast.latent_action.data import FlowClips, MixedBatchSampler
from motus_fast.latent_action.model import LatentActionVAE, latent_action_loss
from motus_fast.latent_action.train import train_latent_actions


def small_cfg(**over) -> LatentActionConfig:
    base = {"model.image_size": [16, 16], "model.hidden_dim": 32, "model.token_proj_dim": 8,
            "dcae.block_out_channels": [8, 16], "dcae.layers_per_block": [1, 1], "dcae.latent_channels": 4,
            "dcae.trainable": False}
    base.update(over)
    return get_preset("tiny").override(base)


def images(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *cfg.model.image_size, generator=g) * 2 - 1


@pytest.mark.parametrize("blocks,size,latent_channels", [((8, 16), (16, 24), 4), ((8, 16, 16), (32, 16), 8)])
def test_tokens_follow_the_dcae_latent_grid(blocks, size, latent_channels):
    torch.manual_seed(0)
    cfg = small_cfg(**{"dcae.block_out_channels": list(blocks), "dcae.layers_per_block": [1] * len(blocks),
                       "dcae.latent_channels": latent_channels, "model.image_size": list(size)})
    model = LatentActionVAE(cfg).eval()
    f = 2 ** (len(blocks) - 1)
    assert (model.n_tokens, model.width) == ((size[0] // f) * (size[1] // f), latent_channels)
    x = images(3, cfg)
    model.token_mean.uniform_(-1, 1)
    model.token_std.uniform_(0.5, 2)
    with torch.no_grad():
        lat = model.dcae.encode(x).latent * model.dcae.config.scaling_factor       # [B, C, h, w]
        want = (lat.permute(0, 2, 3, 1).reshape(3, -1, latent_channels) - model.token_mean) / model.token_std
        torch.testing.assert_close(model.tokens(x), want)
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (3, cfg.model.latent_dim)
        # decode inverts the standardisation and the token layout before the DC-AE decoder
        z = torch.randn(3, cfg.model.latent_dim)
        tok = model.decoder(z) * model.token_std + model.token_mean
        want_img = model.dcae.decode(tok.transpose(1, 2).reshape(3, latent_channels, *lat.shape[2:])).sample
        torch.testing.assert_close(model.decode(z), want_img)
    with pytest.raises(ValueError, match="image_size"):
        model.encode(torch.zeros(1, 3, 8, 8))


def test_image_size_must_fit_the_compression():
    with pytest.raises(ValueError, match="not divisible"):
        LatentActionVAE(small_cfg(**{"model.image_size": [17, 16]}))


def test_paper_preset_needs_a_pretrained_dcae():
    with pytest.raises(ValueError, match="pretrained_path"):
        LatentActionVAE(get_preset("motus"))
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        LatentActionVAE(get_preset("motus").override({"dcae.pretrained_path": "/nonexistent/dcae"}))


def test_loss_terms_against_a_direct_computation():
    torch.manual_seed(1)
    cfg = small_cfg(**{"train.lambda_a": 0.7, "train.beta": 0.3})
    model = LatentActionVAE(cfg)
    x = images(5, cfg)
    out = model(x)
    actions = torch.randn(5, 3)
    labelled = torch.tensor([True, False, True, False, False])
    losses = latent_action_loss(out, x, actions, labelled, cfg.train)

    q = torch.distributions.Normal(out.mean, torch.exp(0.5 * out.logvar))
    p = torch.distributions.Normal(torch.zeros_like(out.mean), torch.ones_like(out.mean))
    kl = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    recon = ((out.recon - x) ** 2).mean()
    err = ((out.mean[:, :3] - actions) ** 2).sum(-1)
    align = err[labelled].mean()
    torch.testing.assert_close(losses["kl"], kl)
    torch.testing.assert_close(losses["recon"], recon)
    torch.testing.assert_close(losses["align"], align)
    torch.testing.assert_close(losses["loss"], recon + 0.7 * err[labelled].sum() / 5 + 0.3 * kl)
    assert losses["labelled"].item() == 2

    # unlabelled rows do not matter, and without labels the alignment term is 0
    other = actions.clone()
    other[~labelled] = 1e3
    torch.testing.assert_close(latent_action_loss(out, x, other, labelled, cfg.train)["loss"], losses["loss"])
    none = latent_action_loss(out, x, None, None, cfg.train)
    torch.testing.assert_close(none["loss"], recon + 0.3 * kl)
    with pytest.raises(ValueError, match="actions"):
        latent_action_loss(out, x, torch.zeros(5, cfg.model.latent_dim + 1), labelled, cfg.train)


def test_frozen_dcae_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(2)
    frozen = LatentActionVAE(small_cfg()).train()
    assert not frozen.dcae.training and frozen.encoder.training
    x = images(4, frozen.cfg)
    F.mse_loss(frozen(x).recon, x).backward()
    assert all(p.grad is None for p in frozen.dcae.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.decoder.parameters())
    assert all(p.grad is not None for p in frozen.encoder.parameters())

    tuned = LatentActionVAE(small_cfg(**{"dcae.trainable": True})).train()
    assert tuned.dcae.training
    F.mse_loss(tuned(x).recon, x).backward()
    enc = [p for n, p in tuned.dcae.named_parameters() if n.startswith("encoder.")]
    assert enc and all(p.grad is not None for p in enc)


def test_checkpoint_round_trip_with_stored_dcae(tmp_path):
    torch.manual_seed(3)
    model = LatentActionVAE(small_cfg()).eval()
    model.token_mean.uniform_(-1, 1)
    save_latent_action_model(model, tmp_path / "ck", step=7)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["step"] == 7 and meta["config_hash"] == model.cfg.config_hash()
    loaded = load_latent_action_model(tmp_path / "ck").eval()
    assert loaded.cfg == model.cfg
    x = images(2, model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
        z = torch.randn(2, model.cfg.model.latent_dim)
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)


def test_checkpoint_refers_to_a_frozen_pretrained_dcae(tmp_path):
    torch.manual_seed(4)
    base = LatentActionVAE(small_cfg())
    base.dcae.save_pretrained(tmp_path / "dcae")           # stands in for a released DC-AE directory
    cfg = small_cfg(**{"dcae.pretrained_path": str(tmp_path / "dcae")})
    model = LatentActionVAE(cfg).eval()
    for a, b in zip(model.dcae.state_dict().values(), base.dcae.state_dict().values()):
        torch.testing.assert_close(a, b)
    save_latent_action_model(model, tmp_path / "ck")
    from safetensors.torch import load_file
    assert not any(k.startswith("dcae.") for k in load_file(str(tmp_path / "ck" / "model.safetensors")))
    loaded = load_latent_action_model(tmp_path / "ck").eval()
    x = images(2, cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    # a bad checkpoint names what is wrong
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LatentActionCheckpointError, match="format"):
        load_latent_action_model(tmp_path / "ck")


def test_mixed_batches_follow_the_labelled_fraction():
    labelled = torch.zeros(1000, dtype=torch.bool)
    labelled[:50] = True
    g = torch.Generator().manual_seed(0)
    s = MixedBatchSampler(labelled, 64, 0.1, g)
    idx = torch.stack([s.sample() for _ in range(300)])
    share = labelled[idx].float().mean().item()
    assert abs(share - 0.1) < 0.01, share
    assert idx.min() >= 0 and idx.max() < 1000
    only_unlab = MixedBatchSampler(torch.zeros(10, dtype=torch.bool), 8, 0.1, g).sample()
    only_lab = MixedBatchSampler(torch.ones(10, dtype=torch.bool), 8, 0.1, g).sample()
    assert only_unlab.shape == only_lab.shape == (8,)


def test_trainer_logs_recon_kl_and_align_separately(tmp_path):
    cfg = small_cfg(**{"train.steps": 4, "train.batch_size": 6, "train.log_every": 1, "train.labelled_fraction": 0.5,
                       "train.beta": 0.01, "train.warmup_steps": 2})
    g = torch.Generator().manual_seed(5)
    n = 20
    clips = FlowClips(images=images(n, cfg).half(), actions=torch.randn(n, 2, generator=g),
                      labelled=torch.arange(n) % 2 == 0, episode=torch.arange(n), step=torch.zeros(n, dtype=torch.long))
    model, records = train_latent_actions(cfg, clips, out_dir=tmp_path / "run", progress=False, echo=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records)) and [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert {"recon", "kl", "align", "labelled", "grad_norm", "lr"} <= set(r)
        align_in_loss = (r["align"] or 0.0) * r["labelled"] / 6
        assert r["loss"] == pytest.approx(r["recon"] + cfg.train.lambda_a * align_in_loss + 0.01 * r["kl"],
                                          rel=1e-5)
    assert lines[0]["lr"] == pytest.approx(cfg.train.lr / 2)      # warmup
    loaded = load_latent_action_model(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 4
    with torch.no_grad():
        x = images(2, cfg, seed=9)
        torch.testing.assert_close(loaded.eval().encode(x), model.eval().encode(x), rtol=0, atol=0)


def test_config_round_trip_hash_and_paper_defaults():
    cfg = get_preset("tiny")
    assert LatentActionConfig.from_dict(json.loads(cfg.to_json())) == cfg
    other = cfg.override({"frame_spacing": 4, "flow.dis_preset": "fast"})
    assert other.frame_spacing == 4 and other.flow.dis_preset == "fast"
    assert other.config_hash() != cfg.config_hash() and cfg.config_hash() == get_preset("tiny").config_hash()
    paper = get_preset("motus")
    assert (paper.frame_spacing, paper.model.latent_dim, paper.train.lambda_a, paper.train.beta,
            paper.train.labelled_fraction, paper.dcae.trainable) == (6, 14, 1.0, 1e-6, 0.1, False)
    with pytest.raises(KeyError, match="unknown"):
        cfg.override({"train.nope": 1})
    with pytest.raises(ValueError, match="frame_spacing"):
        cfg.override({"frame_spacing": 0})
    with pytest.raises(ValueError, match="dis_preset"):
        cfg.override({"flow.dis_preset": "slow"})
    with pytest.raises(ValueError, match="latent_channels"):
        cfg.override({"dcae.latent_channels": 5})
