"""Closed-loop Meta-World evaluation: the loop, the baselines, the CLI."""

import json
import math
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")    # headless; must be set before importorskip imports mujoco
pytest.importorskip("metaworld")

from motus_fast.envs.metaworld import RenderSettings, episode_seed  # noqa: E402
from motus_fast.eval.metaworld import (RandomPolicy, ScriptedPolicy, evaluate, wilson_interval)  # noqa: E402

SMALL = RenderSettings(32, 32)


def test_scripted_policy_succeeds():
    r = evaluate(ScriptedPolicy(), ["reach-v3"], episodes=2, seed=1000, max_steps=150, render=SMALL, progress=False)
    assert r.success_rates == {"reach-v3": 1.0}
    for e in r.episodes:
        assert e.success and e.steps < 150 and e.policy_calls == e.steps   # one action per call
        assert e.seed == episode_seed(1000, "reach-v3", e.index)


def test_random_policy_rarely_succeeds():
    r = evaluate(RandomPolicy(chunk_size=16, seed=0), ["reach-v3"], episodes=6, seed=1000, max_steps=100,
                 execute_steps=8, render=SMALL, progress=False)
    assert r.success_rates["reach-v3"] <= 1 / 6
    for e in r.episodes:
        assert e.steps == 100 or e.success
        assert e.policy_calls == math.ceil(e.steps / 8)


class CountingPolicy:
    """Returns chunks of 5 zero-motion actions; counts calls and resets; checks the observation it gets."""

    def __init__(self, size):
        self.calls, self.resets, self.size = 0, 0, size

    def reset(self):
        self.resets += 1

    def __call__(self, obs):
        assert obs["image"].shape == (*self.size, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (21,) and obs["state"].dtype == np.float32
        assert obs["env_obs"].shape == (39,) and obs["task"] == "reach-v3" and obs["instruction"]
        self.calls += 1
        return np.zeros((5, 4), np.float32)


@pytest.mark.parametrize("execute_steps, calls", [(3, 7), (None, 4), (8, 4)])
def test_chunk_execution_and_frames(execute_steps, calls):
    p = CountingPolicy((24, 40))
    r = evaluate(p, ["reach-v3"], episodes=2, seed=5, max_steps=20, execute_steps=execute_steps,
                 render=RenderSettings(24, 40), record_frames=True, progress=False)
    assert p.resets == 2 and p.calls == 2 * calls
    for e in r.episodes:
        assert not e.success and e.steps == 20 and e.policy_calls == calls
        assert e.frames.shape == (21, 24, 40, 3)
    assert r.latency_ms()["calls"] == 2 * calls
    d = r.to_dict()
    json.dumps(d)
    assert d["per_task"]["reach-v3"]["successes"] == 0 and len(d["episodes"]) == 2


@pytest.mark.parametrize("bad, match", [(np.zeros((2, 3)), "shape"), (np.full((2, 4), np.nan), "non-finite"),
                                        ({"actions": np.zeros((2, 4))}, "reply")])
def test_bad_policy_output_fails_clearly(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate(lambda obs: bad, ["reach-v3"], episodes=1, max_steps=5, render=SMALL, progress=False)


def test_wilson_interval():
    n, z = 10, 1.96
    assert wilson_interval(0, n) == (0.0, pytest.approx(z * z / (n + z * z)))
    lo, hi = wilson_interval(n, n)
    assert hi == 1.0 and lo == pytest.approx(n / (n + z * z))
    for k in range(n + 1):
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1


def test_cli_random_and_missing_engine(tmp_path, monkeypatch, capsys):
    from motus_fast.cli import build_parser, main

    out = tmp_path / "eval.json"
    assert main(["eval", "metaworld", "--policy", "random", "--tasks", "reach-v3", "--episodes", "1",
                 "--max-steps", "10", "--image-size", "32", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["policy"] == "random" and set(d["success_rates"]) == {"reach-v3"} and d["episodes"][0]["steps"] == 10
    assert "| reach-v3 |" in capsys.readouterr().out

    args = build_parser().parse_args(["eval", "metaworld", "--checkpoint", str(tmp_path), "--tasks", "reach-v3"])
    monkeypatch.setitem(sys.modules, "motus_fast.serve.build", None)  # as if the engine/server were not there
    with pytest.raises(SystemExit, match="inference engine"):
        args.func(args)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny Motus with Meta-World's state (21) and action (4) sizes: its actions mean
    nothing, but every stage of the engine and the server runs."""
    import torch

    from motus_fast.config import get_preset
    from motus_fast.model import Motus
    from motus_fast.weights import save_pretrained

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("metaworld") / "ckpt"
    save_pretrained(Motus(get_preset("tiny").override({"action.state_dim": 21, "action.action_dim": 4})), path)
    return path


def test_cli_checkpoint_runs_the_engine(tiny_checkpoint, tmp_path):
    from motus_fast.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "metaworld", "--checkpoint", str(tiny_checkpoint), "--tasks", "reach-v3", "--episodes", "1",
                 "--max-steps", "16", "--execute-steps", "8", "--sample-steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["episodes"][0]["steps"] == 16 and d["episodes"][0]["policy_calls"] == 2
    assert len(d["server_timing"]) == 2 and all(t["denoise_ms"] > 0 for t in d["server_timing"])


def test_served_policy_over_websocket(tiny_checkpoint, tmp_path):
    """The closed loop through `motus-fast serve`'s stack and the websocket client; a fixed noise seed
    reproduces the rollout exactly, another seed changes it."""
    from motus_fast.cli import main
    from motus_fast.eval.metaworld import ServedPolicy
    from motus_fast.serve.build import PolicySpec, build_policy
    from motus_fast.serve.config import ServeConfig
    from motus_fast.serve.client import MotusClient
    from motus_fast.serve.server import PolicyServer

    policy, config, _ = build_policy(PolicySpec(checkpoint=str(tiny_checkpoint), steps=2, threads=1,
                                                image_size=(64, 64)), ServeConfig(port=0))
    runs, out = [], tmp_path / "eval.json"
    with PolicyServer(policy, config).start_in_thread() as running, MotusClient("127.0.0.1", running.port) as client:
        assert client.metadata["image_shape"] == [64, 64, 3]
        for noise_seed in (7, 7, 8):
            served = ServedPolicy(client, noise_seed=noise_seed)
            runs.append(evaluate(served, ["reach-v3"], episodes=1, seed=3, max_steps=16, execute_steps=8,
                                 render=RenderSettings(64, 64), record_frames=True, progress=False))
            assert len(served.server_timing) == 2 and served.server_timing[0]["infer_ms"] > 0
        assert main(["eval", "metaworld", "--server", f"127.0.0.1:{running.port}", "--tasks", "reach-v3",
                     "--episodes", "1", "--max-steps", "8", "--out", str(out)]) == 0
    d = json.loads((tmp_path / "eval.json").read_text())
    assert d["policy"].startswith("server") and d["episodes"][0]["policy_calls"] == 1 and len(d["server_timing"]) == 1
    frames = [r.episodes[0].frames for r in runs]
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])
