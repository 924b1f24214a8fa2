"""The official-checkpoint converter: alias folding, DeepSpeed wrappers, strict key accounting, our format."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from motus_fast.cli import main as cli_main
from motus_fast.config import get_preset
from motus_fast.model import Conditioning
from motus_fast.weights import CheckpointError, load_pretrained, load_upstream, save_pretrained
from motus_fast.weights.upstream import canonical_state_dict, infer_config, read_checkpoint


@pytest.fixture(scope="module")
def full_upstream_sd(tiny_fixture):
    """The exact upstream state_dict (aliases included), rebuilt as the fixture README describes."""
    path = str(tiny_fixture["dir"] / "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    aliases, order = json.loads(meta["aliases"]), json.loads(meta["key_order"])
    return {k: stored[aliases.get(k, k)] for k in order}


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_deepspeed_file_with_aliases_and_vlm_keys(tmp_path, full_upstream_sd, tiny_model, tiny_fixture):
    sd = dict(full_upstream_sd)
    sd["vlm_model.model.embed_tokens.weight"] = torch.zeros(4, 4)           # frozen VLM rides along: skipped
    sd["und_module.vlm_model.model.embed_tokens.weight"] = sd["vlm_model.model.embed_tokens.weight"]
    (tmp_path / "ckpt").mkdir()
    torch.save({"module": sd, "global_steps": 7}, tmp_path / "ckpt" / "mp_rank_00_model_states.pt")
    model = load_upstream(tmp_path / "ckpt", upstream_config=tiny_fixture["config"], dtype=torch.float32)
    assert_same_model(model, tiny_model)


def test_shapes_alone_determine_the_sizes(full_upstream_sd):
    sd = canonical_state_dict(full_upstream_sd)
    tiny = get_preset("tiny")
    assert infer_config(sd, base=tiny) == tiny
    pre = infer_config({k: v for k, v in sd.items() if "state_encoder" not in k and "registers" not in k})
    assert pre.action.layout == "pretrain" and pre.action.chunk_size == 22   # all 22 table rows are action rows


def test_default_dtype_is_the_stored_one(tiny_fixture):
    model = load_upstream(tiny_fixture["dir"] / "model.safetensors", upstream_config=tiny_fixture["config"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing key"),
    ("extra", "unexpected key"),
    ("shape", "mis-shaped key"),
    ("alias", "alias"),
])
def test_mismatches_are_named(tmp_path, full_upstream_sd, tiny_fixture, damage, message):
    sd = dict(full_upstream_sd)
    key = "action_expert.blocks.1.wan_action_qkv"
    if damage == "drop":
        del sd[key], sd["action_module." + key]
    elif damage == "extra":
        sd["action_expert.blocks.1.bonus"] = torch.zeros(3)
        key = "action_expert.blocks.1.bonus"
    elif damage == "shape":
        sd[key] = sd["action_module." + key] = torch.zeros(3, 2, 128, 64)
    else:
        sd["action_module." + key] = sd[key] + 1
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        load_upstream(tmp_path / "bad.pt", upstream_config=tiny_fixture["config"])
    assert key in str(err.value)


def test_unreadable_files_are_named(tmp_path, tiny_fixture):
    data = (tiny_fixture["dir"] / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")
    torch.save({"module": {"a": torch.zeros(2)}}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pt"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "absent.pt")


def test_pickled_code_is_refused(tmp_path):
    torch.save({"module": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.pt")


def test_native_roundtrip_and_cli(tmp_path, tiny_model, tiny_fixture):
    io = tiny_fixture["io"]
    save_pretrained(tiny_model, tmp_path / "native")
    again = load_pretrained(tmp_path / "native")
    assert_same_model(again, tiny_model)
    cond = Conditioning(io["fwd.in.t5_context"], io["fwd.in.vlm_hidden"], io["fwd.in.state"])
    args = (io["fwd.in.video_latents"], io["fwd.in.t_video"], io["fwd.in.actions"], io["fwd.in.t_action"], cond)
    with torch.no_grad():
        for x, y in zip(again(*args), tiny_model(*args)):
            assert torch.equal(x, y)

    (tmp_path / "cfg.json").write_text(json.dumps(tiny_fixture["config"]))
    assert cli_main(["convert", "--from-upstream", str(tiny_fixture["dir"] / "model.safetensors"),
                     "--upstream-config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "cli"),
                     "--dtype", "fp32"]) == 0
    assert_same_model(load_pretrained(tmp_path / "cli"), tiny_model)


def test_native_loader_is_strict(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path / "ok")
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    del sd["blocks.0.video.o.weight"]
    sd["blocks.0.video.extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "ok" / "model.safetensors"), metadata={"format": "motus_fast/1"})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.video\.o\.weight[\s\S]*blocks\.0\.video\.extra"):
        load_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
