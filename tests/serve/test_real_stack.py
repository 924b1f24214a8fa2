"""The real stack from the command line, at tiny size: an official-format Motus checkpoint (with the VLM it was
trained with under vlm_model.), the Wan2.2 VAE + umT5 in both public layouts and a Qwen3-VL folder, all written
by the real libraries.

- `motus-fast check` reads headers only and reports every component; `motus-fast serve --checkpoint --wan --vlm`
  in a subprocess answers an unmodified openpi-client with the actions the in-process policy (the same library
  call) gives for the same noise seed, bit for bit; both Wan layouts give identical actions;
- the VLM weights come from the checkpoint, not from the folder;
- bad inputs fail with an error naming the file and field, from `check` and from `serve`, before a port opens.
"""

import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from motus_fast.cli import main as cli_main
from motus_fast.serve.build import PolicySpec, build_policy, check_policy
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.schema import validate
from motus_fast.weights import CheckpointError
from real_stack import build_stack, tiny_qwen3_vl, write_qwen_folder

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
IMAGE = (64, 64)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return build_stack(tmp_path_factory.mktemp("real_stack"))


def spec(stack, layout="wan_original", **kw):
    kw = {"checkpoint": str(stack["ckpt"]), "wan": str(stack[layout]), "vlm": str(stack["qwen"]), "steps": 2,
          "image_size": IMAGE, "threads": 1, **kw}
    return PolicySpec(**kw)


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (*IMAGE, 3), dtype=np.uint8), "prompt": "pick up the red cube",
            "state": rng.standard_normal(14).astype(np.float32), "noise_seed": 11}


@pytest.fixture(scope="module")
def policies(stack):
    return {wan: build_policy(spec(stack, wan), ServeConfig(port=0))[0] for wan in ("wan_original", "wan_diffusers")}


def test_check_reports_every_component(stack, capsys):
    t = time.perf_counter()
    assert cli_main(["check", "--checkpoint", str(stack["ckpt"]), "--wan", str(stack["wan_original"]),
                     "--vlm", str(stack["qwen"])]) == 0
    assert time.perf_counter() - t < 5
    out = capsys.readouterr().out
    for line in ("motus    official", "vae      original .pth", "umt5     original .pth", "vlm      transformers",
                 "weights from", "vlm_model.", "no problems found"):
        assert line in out, out
    report = check_policy(spec(stack, "wan_diffusers"))
    assert report.ok and [c["layout"] for c in report.components][1:3] == ["diffusers", "transformers"]


def test_both_wan_layouts_serve_identical_actions(policies):
    obs = observation()
    a, b = (p.infer(validate(dict(obs), p.spec))["actions"] for p in policies.values())
    assert a.shape == (16, 14) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_vlm_weights_are_the_checkpoints(stack, policies):
    vlm = policies["wan_original"].engine.encoders.vlm.extractor.vlm.state_dict()
    trained, folder = stack["trained_vlm"].state_dict(), stack["folder_vlm"].state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[key], folder[key])
    assert all(torch.equal(v, trained[k]) for k, v in vlm.items())
    # the folder's own weights when the checkpoint carries none (our converted checkpoint without vlm.safetensors)
    assert cli_main(["convert", "--from-upstream", str(stack["ckpt"]), "--out", str(stack["ckpt"].parent / "ours")]) == 0
    assert (stack["ckpt"].parent / "ours" / "vlm.safetensors").is_file()


def serve(args, env_extra=None, timeout=180):
    """Start `motus-fast serve` on port 0; -> (proc, port or None, log text so far)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MOTUS_BACKEND="reference", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "motus_fast.cli", "serve", "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    log, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                return proc, None, "".join(log)
            continue
        log.append(line)
        if "listening on ws://" in line:
            return proc, int(line.split("listening on ws://")[1].split()[0].rsplit(":", 1)[1]), "".join(log)
    proc.kill()
    return proc, None, "".join(log)


def test_served_over_openpi_client_equals_the_library_call(stack, policies, openpi_client):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    proc, port, log = serve(["--checkpoint", str(stack["ckpt"]), "--wan", str(stack["wan_diffusers"]), "--vlm",
                             str(stack["qwen"]), "--steps", "2", "--image-size", *map(str, IMAGE)])
    try:
        assert port is not None, log
        assert "VLM weights: the Motus checkpoint's vlm_model.*" in log and "encoders: Wan2.2 VAE" in log, log
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        obs = observation(3)
        got = client.infer(dict(obs))["actions"]
        lib = policies["wan_original"]
        np.testing.assert_array_equal(got, lib.infer(validate(dict(obs), lib.spec))["actions"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- bad input: named before any port opens -------------------------------------------------------------------
def broken(stack, tmp_path, what):
    """A spec with one thing wrong, and the text the error must contain."""
    if what == "tokenizer":
        q = tmp_path / "qwen"
        shutil.copytree(stack["qwen"], q)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (q / f).unlink()
        return spec(stack, vlm=str(q)), f"{q}: no tokenizer"
    if what == "latent_channels":
        from diffusers import AutoencoderKLWan
        w = tmp_path / "wan"
        shutil.copytree(stack["wan_diffusers"], w)
        shutil.rmtree(w / "vae")
        AutoencoderKLWan(base_dim=16, decoder_base_dim=24, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                         patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 16,
                         latents_std=[1.0] * 16).save_pretrained(w / "vae")
        return spec(stack, "wan_diffusers", wan=str(w)), "video.in_channels=48"
    if what == "text_dim":
        t5 = stack["wan_original"].parent / "upstream_t5"
        if not t5.exists():          # the release fixture's umT5: d_model 32, the checkpoint's text_dim is 64
            from real_stack import FIXTURES
            shutil.copytree(FIXTURES / "upstream_wan22_tiny", t5)
            shutil.copytree(stack["wan_original"] / "google", t5 / "google")
        return spec(stack, t5=str(t5)), "video.text_dim=64"
    if what == "vlm_width":
        q = write_qwen_folder(tmp_path / "qwen64", tiny_qwen3_vl(hidden=64))
        return spec(stack, vlm=str(q)), "und.vlm_dim=96"
    if what == "truncated":
        w = tmp_path / "wan"
        shutil.copytree(stack["wan_original"], w)
        data = (w / "Wan2.2_VAE.pth").read_bytes()
        (w / "Wan2.2_VAE.pth").write_bytes(data[: len(data) // 3])
        return spec(stack, wan=str(w)), "Wan2.2_VAE.pth: cannot be read"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["tokenizer", "latent_channels", "text_dim", "vlm_width", "truncated"])
def test_bad_input_is_named_by_check_and_build(stack, tmp_path, what):
    bad, message = broken(stack, tmp_path, what)
    report = check_policy(bad)
    assert not report.ok and any(message in p for p in report.problems), report.render()
    with pytest.raises(CheckpointError, match="cannot serve") as err:
        build_policy(bad)
    assert message in str(err.value)


def test_serve_refuses_bad_input_before_opening_a_port(stack, tmp_path):
    bad, message = broken(stack, tmp_path, "vlm_width")
    proc, port, log = serve(["--checkpoint", bad.checkpoint, "--wan", bad.wan, "--vlm", bad.vlm])
    assert port is None and proc.wait(timeout=30) != 0 and message in log and "Traceback" not in log, log
    with pytest.raises(SystemExit) as exit_:
        cli_main(["check", "--checkpoint", bad.checkpoint, "--wan", bad.wan, "--vlm", bad.vlm])
    assert exit_.value.code == 1
