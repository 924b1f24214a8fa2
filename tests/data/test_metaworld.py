"""Meta-World: environments, offscreen rendering, scripted demonstrations, the LeRobot v3 write step."""

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")    # headless; must be set before importorskip imports mujoco
pytest.importorskip("metaworld")

from motus_fast.data.metaworld import IMAGE_FEATURE, STATE_FEATURE, write_lerobot_dataset  # noqa: E402
from motus_fast.envs.metaworld import (ACTION_DIM, STATE_DIM, FreeCamera, MetaWorldEnv, RenderSettings,  # noqa: E402
                                       episode_seed, generate_demonstrations, instruction_for, state_from_observation)


@pytest.fixture(scope="module")
def reach_demos():
    """Two scripted reach-v3 episodes at a non-square size (failures kept, so the test sees the real rate)."""
    return list(generate_demonstrations(["reach-v3"], 2, seed=0, render=RenderSettings(48, 80), max_steps=150,
                                        steps_after_success=5, only_successful=False, progress=False))


def test_scripted_expert_succeeds_on_reach(reach_demos):
    for ep in reach_demos:
        assert ep.success, f"scripted reach-v3 expert failed from seed {ep.seed}"
        first = int(np.argmax(ep.step_success))
        assert ep.length == first + 1 + 5                 # steps_after_success=5 more steps after the first success
        assert ep.task == "reach-v3" and ep.instruction == instruction_for("reach-v3")
        assert ep.fps == pytest.approx(80.0)


def test_episode_arrays(reach_demos):
    for ep in reach_demos:
        T = ep.length
        assert ep.frames.shape == (T, 48, 80, 3) and ep.frames.dtype == np.uint8
        assert ep.state.shape == (T, STATE_DIM) and ep.state.dtype == np.float32
        assert ep.action.shape == (T, ACTION_DIM) and ep.action.dtype == np.float32
        assert ep.step_success.shape == (T,) and ep.step_success.dtype == bool
        assert np.all(np.abs(ep.action) <= 1.0)
        # the hand moves, and the movement follows the xyz actions (1 cm per unit per step, mocap-driven)
        moved = ep.state[-1, :3] - ep.state[0, :3]
        assert np.linalg.norm(moved) > 0.02
        assert np.dot(moved, ep.action[:, :3].sum(0)) > 0
        # the goal sits at the end of the state and stays put during the episode
        assert np.allclose(ep.state[:, 18:21], ep.state[0, 18:21])
        # frames change over the episode (the arm moves in view) and are not blank
        diff = np.abs(ep.frames[-1].astype(int) - ep.frames[0].astype(int)).mean()
        assert diff > 1.0, f"first and last frame differ by only {diff:.2f} on average"
        assert ep.frames.std() > 10


def test_seeds_reproduce_and_differ():
    with MetaWorldEnv("push-v3", RenderSettings(32, 32)) as env:
        env.reset(123)
        s1, f1 = env.state, env.render()
        env.step(np.array([1.0, 0.0, 0.0, 0.0]))
        assert not np.array_equal(env.render(), f1)
        env.reset(123)
        assert np.array_equal(env.state, s1) and np.array_equal(env.render(), f1)
        env.reset(124)
        assert not np.allclose(env.state[18:21], s1[18:21]), "a different seed should move the goal"
    a, b = episode_seed(0, "push-v3", 0), episode_seed(0, "push-v3", 1)
    assert a != b and a != episode_seed(1000, "push-v3", 0) and a != episode_seed(0, "reach-v3", 0)
    assert a == episode_seed(0, "push-v3", 0)


def test_state_is_current_half_plus_goal():
    obs = np.random.default_rng(0).standard_normal((5, 39))
    state = state_from_observation(obs)
    want = np.stack([np.r_[o[0:18], o[36:39]] for o in obs]).astype(np.float32)
    assert state.dtype == np.float32 and np.array_equal(state, want)
    with pytest.raises(ValueError, match="39-D"):
        state_from_observation(np.zeros(21))


def test_goal_can_be_hidden():
    """goal_in_state=False zeros the goal in the policy state only; the expert (reading env_obs) still succeeds."""
    with MetaWorldEnv("reach-v3", RenderSettings(16, 16), goal_in_state=False) as env:
        env.reset(3)
        obs = env.observe()
        full = state_from_observation(obs["env_obs"])
        assert np.all(obs["state"][18:21] == 0) and np.linalg.norm(full[18:21]) > 0.1
        assert np.array_equal(obs["state"][:18], full[:18])
        success = False
        while not success and env.steps < 150:
            success = env.step(env.expert_action())
        assert success


def test_render_settings_are_applied():
    """Shadows on vs off must change the picture (the flags reach the renderer); a named camera renders too."""
    with MetaWorldEnv("reach-v3", RenderSettings(32, 32, shadows=True)) as env:
        env.reset(7)
        shadowed = env.render()
    with MetaWorldEnv("reach-v3", RenderSettings(32, 32)) as env:
        env.reset(7)
        plain = env.render()
    assert not np.array_equal(shadowed, plain)
    with MetaWorldEnv("reach-v3", RenderSettings(24, 40, camera="topview")) as env:
        env.reset(7)
        top = env.render()
    assert top.shape == (24, 40, 3) and top.std() > 10


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="rolled"):
        RenderSettings(camera="corner")
    with pytest.raises(ValueError, match="positive"):
        RenderSettings(0, 64)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        MetaWorldEnv("reach-v9")
    with pytest.raises(ValueError, match="not in the"):
        MetaWorldEnv("reach-v3", RenderSettings(16, 16, camera="no-such-camera"))
    with MetaWorldEnv("reach-v3", RenderSettings(16, 16, camera=FreeCamera(distance=1.2))) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset(0)
        with pytest.raises(ValueError, match="finite"):
            env.step(np.array([np.nan, 0, 0, 0]))
        with pytest.raises(ValueError, match="4 finite"):
            env.step(np.zeros(3))


def test_lerobot_round_trip(reach_demos, tmp_path):
    from motus_fast.data.lerobot import LeRobotV3Source
    from motus_fast.data.video import VideoCodec

    summary = write_lerobot_dataset(reach_demos, tmp_path / "mw", codec=VideoCodec.lossless())
    assert summary["episodes"] == 2 and summary["frames"] == sum(e.length for e in reach_demos)
    src = LeRobotV3Source(tmp_path / "mw")
    assert src.fps == 80 and src.cameras == [IMAGE_FEATURE]
    for i, ep in enumerate(reach_demos):
        assert src.instructions(i) == [ep.instruction]
        assert np.array_equal(src.read_lowdim(i, STATE_FEATURE), ep.state)
        assert np.array_equal(src.read_lowdim(i, "action"), ep.action)
        idx = [0, ep.length // 2, ep.length - 1]
        assert np.array_equal(src.read_frames(i, IMAGE_FEATURE, idx), ep.frames[idx])   # lossless codec


def test_rendering_then_importing_triton_does_not_crash():
    """Mesa's llvmpipe LLVM + triton's LLVM: loading triton after the first GL context segfaults unless
    MetaWorldEnv loads triton first. Checked in a fresh process (this one may have imported triton already)."""
    import subprocess
    import sys

    code = ("from motus_fast.envs.metaworld import MetaWorldEnv, RenderSettings\n"
            "with MetaWorldEnv('reach-v3', RenderSettings(16, 16)) as env:\n"
            "    env.reset(0); env.render()\n"
            "import triton._C.libtriton\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MUJOCO_GL="egl"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"rc {r.returncode}: {r.stderr[-2000:]}"
