"""Meta-World for the CPU demo and the toy-scale experiments: environments with fast offscreen rendering, cameras,
scripted expert demonstrations. Used by data generation (motus_fast.data.metaworld writes the episodes as a
LeRobot v3 dataset), closed-loop evaluation (motus_fast.eval.metaworld) and the experiments.

Pinned to metaworld 3.1.1 + MuJoCo 3.3.0 + gymnasium 1.4.0 (requirements/cpu.txt). The choices, and why:

- **Rendering.** MuJoCo renders offscreen through EGL (``MUJOCO_GL=egl``, set as a default before MuJoCo is first
  imported; the Debian EGL libraries are enough, osmesa would need libosmesa6). We render with our own
  ``mujoco.Renderer`` rather than gymnasium's, and turn off what costs most on a software rasteriser and says
  nothing to a 64-pixel policy: shadows (a 4096^2 shadow map per frame), reflections (a second scene pass) and
  4x MSAA (shadows cost the most). At 64x64 on the 2-core machine that is ~250 frames per CPU-second instead
  of ~13 (``python -m motus_fast.envs.metaworld`` measures it).
- **Camera.** Meta-World's ``corner``/``corner2``/``corner3``/``corner4`` cameras render rolled (upside down or
  tilted), so they are refused. The default is a free camera looking at the workspace three-quarters from the
  front-left, which keeps the gripper, the object, the goal marker and the drawer handle in view for every demo
  task; the named ``topview``, ``behindGripper`` and ``gripperPOV`` cameras work too.
- **State** (21-D, float32): the current half of Meta-World's 39-D observation and its goal, i.e. ``obs[:18]``
  (hand xyz, gripper opening, two objects' xyz + quaternion, zero-padded) ``++ obs[36:39]`` (goal xyz). The
  other 18 values are the previous step's copy of the first 18 (frame stacking), which a policy fed the previous
  frames does not need. By default the goal is observable, as in Meta-World's multi-task (MT) benchmarks. With
  ``goal_in_state=False`` the goal entries are zeros (Meta-World's partially observable convention) and only
  the image shows where the goal is; then a policy without the video stream cannot solve reach-v3 (a
  behaviour-cloned state-only MLP fell from 95% to 5% success there, while push and drawer-open barely need the
  goal). The scripted experts always read the true goal from ``env_obs``.
- **Actions** (4-D, float32, in [-1, 1]): xyz displacement of the hand (1 cm per unit per step) and gripper
  effort. The scripted experts' raw outputs can exceed 1; we record (and the environment executes) them clipped.
- **Episodes.** Each episode is seeded: ``episode_seed(seed, task, index)`` seeds the environment's generator,
  which draws the object and goal positions at reset. Demonstration and evaluation episodes use different base
  seeds, so evaluation runs on held-out configurations. The control rate is 80 Hz (MuJoCo step 2.5 ms x 5).

Frames, state and actions are aligned: ``frames[t]`` and ``state[t]`` are observed before ``action[t]`` is taken
(the LeRobot convention); ``step_success[t]`` is Meta-World's ``info["success"]`` after ``action[t]``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

MUJOCO_VERSION = "3.3.0"                # pinned in setup.py's "sim" extra and requirements/cpu.txt
log = logging.getLogger("motus_fast")

# the tasks of the CPU demo: one reaching, one pushing, one articulated-object task
DEMO_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "drawer-open-v3")

# Instructions for the tasks a demo is likely to use. Other Meta-World tasks get their name as words
# ("peg-insert-side-v3" -> "peg insert side"), see instruction_for().
TASK_INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "move the gripper to the red target",
    "push-v3": "push the red puck onto the green target",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-v3": "press the button",
    "door-open-v3": "open the door",
    "window-open-v3": "slide the window open",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
    "coffee-button-v3": "press the button on the coffee machine",
    "faucet-open-v3": "turn the faucet on",
    "pick-place-v3": "pick up the puck and place it at the target",
}

STATE_NAMES: tuple[str, ...] = (
    ("hand_x", "hand_y", "hand_z", "gripper_opening")
    + tuple(f"obj{i}_{c}" for i in range(2) for c in ("x", "y", "z", "q0", "q1", "q2", "q3"))
    + ("goal_x", "goal_y", "goal_z"))
STATE_DIM = len(STATE_NAMES)            # 21
ACTION_NAMES: tuple[str, ...] = ("hand_dx", "hand_dy", "hand_dz", "gripper_effort")
ACTION_DIM = len(ACTION_NAMES)          # 4
_OBS_DIM = 39                           # Meta-World's observation: current 18, previous 18, goal 3

# Named cameras whose images come out rolled (upside down or tilted) in metaworld 3.1.1.
ROLLED_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})


@dataclass(frozen=True)
class FreeCamera:
    """A MuJoCo free camera: it looks at ``lookat`` (world metres) from ``distance`` metres away, at ``azimuth``
    and ``elevation`` degrees (MuJoCo's conventions: elevation < 0 looks down). Upright by construction."""

    lookat: tuple[float, float, float] = (0.0, 0.72, 0.15)
    distance: float = 0.85
    azimuth: float = -155.0
    elevation: float = -35.0


DEFAULT_CAMERA = FreeCamera()


@dataclass(frozen=True)
class RenderSettings:
    """What the offscreen renderer draws. The defaults are the fast settings; the MuJoCo/Meta-World defaults
    (shadows, reflections, 4 MSAA samples) are ``RenderSettings(shadows=True, reflections=True, multisamples=4)``,
    ~10x slower at 64x64 and only there to measure that."""

    height: int = 64
    width: int = 64
    camera: Union[FreeCamera, str] = DEFAULT_CAMERA
    shadows: bool = False
    reflections: bool = False
    multisamples: int = 0

    def __post_init__(self):
        if not (isinstance(self.height, int) and isinstance(self.width, int) and self.height > 0 and self.width > 0):
            raise ValueError(f"image size must be positive integers, got height={self.height!r} width={self.width!r}")
        if isinstance(self.camera, str) and self.camera in ROLLED_CAMERAS:
            raise ValueError(f"camera {self.camera!r} renders rolled/upside down in metaworld 3.1.1; use the default "
                             "FreeCamera or one of 'topview', 'behindGripper', 'gripperPOV'")
        if self.multisamples < 0:
            raise ValueError(f"multisamples must be >= 0, got {self.multisamples}")


@dataclass(frozen=True)
class Episode:
    """One recorded episode (T steps; see the module docstring for the alignment)."""

    task: str
    instruction: str
    seed: int
    frames: np.ndarray          # uint8 [T, H, W, 3]
    state: np.ndarray           # float32 [T, 21]
    action: np.ndarray          # float32 [T, 4] in [-1, 1]
    step_success: np.ndarray    # bool [T]: info["success"] after action t
    fps: float                  # control rate (Hz)

    @property
    def success(self) -> bool:
        return bool(self.step_success.any())

    @property
    def length(self) -> int:
        return len(self.action)


# ---- MuJoCo / Meta-World import ---------------------------------------------------------------------------------
def _backend():
    """Import mujoco + metaworld with the headless GL backend; clear errors when they are missing or when mujoco
    was already imported with another backend."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    _load_triton_before_llvmpipe()
    # PyOpenGL logs at INFO that its optional C accelerator is missing, in every process that renders
    logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)
    try:
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        raise ImportError(f"Meta-World support needs metaworld==3.1.1 and mujoco==3.3.0 ({e}); "
                          "install them with `pip install -r requirements/cpu.txt`") from e
    if mujoco.__version__ != MUJOCO_VERSION:
        log.warning("mujoco %s is installed, the demo and experiments are pinned to %s (MuJoCo 4 changes the "
                    "simulation): success counts are not comparable with the published ones",
                    mujoco.__version__, MUJOCO_VERSION)
    wanted = os.environ["MUJOCO_GL"].lower()
    got = mujoco.gl_context.GLContext.__module__.rsplit(".", 1)[-1]
    if wanted in ("egl", "osmesa", "glfw") and got != wanted:
        raise RuntimeError(f"mujoco was imported with the {got!r} GL backend before MUJOCO_GL={wanted!r} took effect; "
                           "set MUJOCO_GL=egl in the environment (or before anything imports mujoco or metaworld)")
    return mujoco, ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, ENV_POLICY_MAP


def _load_triton_before_llvmpipe() -> None:
    """Without a GPU, EGL renders with Mesa's llvmpipe, which loads its own LLVM (15 here) with the first GL
    context; triton's libtriton carries another LLVM and segfaults when it is loaded after that (and torch loads
    triton lazily, e.g. on first use of torch._dynamo). Loaded first, both work; so load triton (if installed)
    before any context exists. Measured with Mesa 22.3.6, mujoco 3.3.0, triton 3.7.1; costs ~0.25 s once."""
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


def available_tasks() -> list[str]:
    """Meta-World v3 tasks that have a scripted expert."""
    _, envs, policies = _backend()
    return sorted(t for t in policies if f"{t}-goal-observable" in envs)


def instruction_for(task: str) -> str:
    """The language instruction of a task (TASK_INSTRUCTIONS, else the task name as words)."""
    if task in TASK_INSTRUCTIONS:
        return TASK_INSTRUCTIONS[task]
    return task.removesuffix("-v3").replace("-", " ")


def episode_seed(seed: int, task: str, index: int) -> int:
    """The environment seed of episode ``index`` of ``task`` under base ``seed`` (stable across task lists)."""
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    return int(np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), int(index)]).generate_state(1)[0])


def scripted_expert(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted policy for ``task``: raw 39-D observation -> float32 [4] action clipped to [-1, 1]."""
    _, _, policies = _backend()
    if task not in policies:
        raise ValueError(f"no scripted expert for task {task!r}; known: {', '.join(sorted(policies))}")
    expert = policies[task]()

    def act(env_obs: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # the experts warn whenever their gains saturate; the env clips anyway
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            a = expert.get_action(np.asarray(env_obs, dtype=np.float64))
        return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)

    return act


def state_from_observation(obs: np.ndarray) -> np.ndarray:
    """Meta-World's 39-D observation -> our 21-D state (current 18 ++ goal 3), float32."""
    obs = np.asarray(obs)
    if obs.shape[-1] != _OBS_DIM:
        raise ValueError(f"expected a {_OBS_DIM}-D Meta-World observation, got shape {obs.shape}")
    return np.concatenate([obs[..., :18], obs[..., 36:39]], axis=-1).astype(np.float32)


class MetaWorldEnv:
    """One Meta-World v3 task: seeded resets, the 21-D state, an offscreen camera and the scripted expert.

        env = MetaWorldEnv("reach-v3")
        env.reset(seed=episode_seed(0, "reach-v3", 0))
        obs = env.observe()                       # {"image", "state", "instruction", "task", "env_obs"}
        success = env.step(env.expert_action())
        env.close()
    """

    def __init__(self, task: str, render: RenderSettings = RenderSettings(), goal_in_state: bool = True):
        mujoco, envs, policies = _backend()
        key = f"{task}-goal-observable"
        if key not in envs or task not in policies:
            known = ", ".join(sorted(t for t in policies if f"{t}-goal-observable" in envs))
            raise ValueError(f"unknown Meta-World task {task!r}; tasks with a scripted expert: {known}")
        self.task, self.settings, self.goal_in_state = task, render, goal_in_state
        self.instruction = instruction_for(task)
        self._mujoco = mujoco
        self._env = envs[key](seed=0)   # seed: its constructor then restores the global numpy RNG it draws from
        # goal-observable classes freeze one random configuration at construction; we draw a new one from the
        # env's own seeded generator at every reset instead
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._expert = scripted_expert(task)
        self.max_path_length = int(self._env.max_path_length)
        self.fps = 1.0 / (self._env.model.opt.timestep * self._env.frame_skip)
        self._renderer = self._make_renderer()
        self._env_obs: Optional[np.ndarray] = None
        self.steps = 0

    def _make_renderer(self):
        mujoco, model, s = self._mujoco, self._env.model, self.settings
        model.vis.quality.offsamples = s.multisamples          # read when the GL context is created
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, s.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, s.height)
        renderer = mujoco.Renderer(model, s.height, s.width)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = int(s.shadows)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(s.reflections)
        if isinstance(s.camera, FreeCamera):
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            cam.lookat[:] = s.camera.lookat
            cam.distance, cam.azimuth, cam.elevation = s.camera.distance, s.camera.azimuth, s.camera.elevation
            self._camera = cam
        else:
            names = [model.camera(i).name for i in range(model.ncam)]
            if s.camera not in names:
                renderer.close()
                raise ValueError(f"camera {s.camera!r} is not in the {self.task} model; cameras: {names}")
            self._camera = s.camera
        return renderer

    # ---- episode control -------------------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Start an episode whose object/goal positions are drawn from ``seed``."""
        self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self._env_obs = np.asarray(obs, dtype=np.float64)
        self.steps = 0

    def step(self, action: np.ndarray) -> bool:
        """Apply one 4-D action (clipped to [-1, 1], as the environment would); returns info["success"]."""
        if self._env_obs is None:
            raise RuntimeError("call reset(seed) before step()")
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        if self.steps >= self.max_path_length:
            raise RuntimeError(f"{self.task}: episode is over after {self.max_path_length} steps; reset first")
        obs, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._env_obs = np.asarray(obs, dtype=np.float64)
        self.steps += 1
        return bool(info["success"])

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current observation, float32 [4], clipped to [-1, 1]."""
        if self._env_obs is None:
            raise RuntimeError("call reset(seed) before expert_action()")
        return self._expert(self._env_obs)

    # ---- observation ------------------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """The camera image, uint8 [H, W, 3]."""
        self._renderer.update_scene(self._env.data, camera=self._camera)
        return self._renderer.render().copy()

    @property
    def env_obs(self) -> np.ndarray:
        """Meta-World's raw 39-D observation (float64), e.g. for the scripted experts."""
        if self._env_obs is None:
            raise RuntimeError("call reset(seed) first")
        return self._env_obs

    @property
    def state(self) -> np.ndarray:
        """The 21-D policy state (goal entries zero unless goal_in_state)."""
        state = state_from_observation(self.env_obs)
        if not self.goal_in_state:
            state[18:21] = 0.0
        return state

    def observe(self) -> dict:
        """The observation a policy sees: image uint8 [H, W, 3], state float32 [21], instruction, task; and the
        raw env_obs float64 [39] for the scripted experts (it holds the goal: learned policies must not read it)."""
        return {"image": self.render(), "state": self.state, "instruction": self.instruction, "task": self.task,
                "env_obs": self.env_obs.copy()}

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


# ---- scripted demonstrations ------------------------------------------------------------------------------------
def record_expert_episode(env: MetaWorldEnv, seed: int, max_steps: int = 150,
                          steps_after_success: Optional[int] = 10) -> Episode:
    """Roll out the scripted expert from ``seed``, rendering every step. Stops ``steps_after_success`` steps after
    the first success (None: always runs ``max_steps``)."""
    if not 1 <= max_steps <= env.max_path_length:
        raise ValueError(f"max_steps must be in 1..{env.max_path_length}, got {max_steps}")
    env.reset(seed)
    frames, states, actions, success = [], [], [], []
    first_success = None
    for t in range(max_steps):
        frames.append(env.render())
        states.append(env.state)
        a = env.expert_action()
        actions.append(a)
        success.append(env.step(a))
        if success[-1] and first_success is None:
            first_success = t
        if first_success is not None and steps_after_success is not None and t - first_success >= steps_after_success:
            break
    return Episode(task=env.task, instruction=env.instruction, seed=int(seed), frames=np.stack(frames),
                   state=np.stack(states), action=np.stack(actions), step_success=np.array(success, dtype=bool),
                   fps=env.fps)


def generate_demonstrations(tasks: Sequence[str] = DEMO_TASKS, episodes_per_task: int = 30, seed: int = 0, *,
                            render: RenderSettings = RenderSettings(), max_steps: int = 150,
                            steps_after_success: Optional[int] = 10, only_successful: bool = True,
                            goal_in_state: bool = True, progress: bool = True) -> Iterator[Episode]:
    """Scripted expert demonstrations: ``episodes_per_task`` episodes of each task, in task order.

    Episode i of a task is seeded with ``episode_seed(seed, task, i)``. With ``only_successful`` the rare failed
    rollout is dropped and the next seed index is used instead (at most ``episodes_per_task`` extra tries per
    task, then a RuntimeError), so every yielded episode succeeded.
    """
    from tqdm.auto import tqdm

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="meta-world demos", unit="ep", disable=not progress)
    try:
        for task in tasks:
            with MetaWorldEnv(task, render, goal_in_state) as env:
                kept, index = 0, 0
                while kept < episodes_per_task:
                    if index >= 2 * episodes_per_task:
                        raise RuntimeError(f"{task}: the scripted expert failed {index - kept} of {index} rollouts "
                                           f"(max_steps={max_steps}); raise max_steps or use only_successful=False")
                    ep = record_expert_episode(env, episode_seed(seed, task, index), max_steps, steps_after_success)
                    index += 1
                    if only_successful and not ep.success:
                        continue
                    kept += 1
                    bar.set_postfix(task=task, steps=ep.length)
                    bar.update(1)
                    yield ep
    finally:
        bar.close()


# ---- measurements (python -m motus_fast.envs.metaworld) ---------------------------------------------------------
def measure_render_fps(task: str = "push-v3", settings: RenderSettings = RenderSettings(),
                       frames: int = 100) -> dict[str, float]:
    """env.render() rate (scene update + draw + readback): frames per wall second and per CPU second of this
    process (llvmpipe's threads included; on a shared machine the CPU rate is the one that transfers)."""
    with MetaWorldEnv(task, settings) as env:
        env.reset(0)
        env.render()                                            # first frame compiles shaders/uploads textures
        t, c = time.perf_counter(), time.process_time()
        for _ in range(frames):
            env.render()
        return {"wall": frames / (time.perf_counter() - t), "cpu": frames / (time.process_time() - c)}


def _bench(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m motus_fast.envs.metaworld",
                                description="measure Meta-World rendering, expert success and demo generation")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 96, 128], help="render sizes to time")
    p.add_argument("--episodes", type=int, default=30, help="demonstrations per task for the generation timing")
    p.add_argument("--size", type=int, default=64, help="image size for the generation timing")
    p.add_argument("--max-steps", type=int, default=150)
    args = p.parse_args(argv)
    results: dict = {"render_fps": {}, "generation": {}}
    for s in args.sizes:
        slow = measure_render_fps(settings=RenderSettings(s, s, shadows=True, reflections=True, multisamples=4),
                                  frames=30)
        fast = measure_render_fps(settings=RenderSettings(s, s), frames=300)
        results["render_fps"][f"{s}x{s}"] = {"mujoco_defaults": slow, "fast": fast}
        print(f"render {s}x{s}: shadows+reflections+4xMSAA {slow['wall']:.0f} fps ({slow['cpu']:.0f} per CPU-s) "
              f"-> without {fast['wall']:.0f} fps ({fast['cpu']:.0f} per CPU-s)")
    t, c = time.perf_counter(), time.process_time()
    eps = list(generate_demonstrations(args.tasks, args.episodes, seed=0, max_steps=args.max_steps,
                                       render=RenderSettings(args.size, args.size), only_successful=False))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    for task in args.tasks:
        mine = [e for e in eps if e.task == task]
        first = [int(np.argmax(e.step_success)) + 1 for e in mine if e.success]
        results["generation"][task] = {"episodes": len(mine),
                                       "expert_success": float(np.mean([e.success for e in mine])),
                                       "steps_to_success_mean": float(np.mean(first)) if first else None,
                                       "steps_to_success_max": int(max(first)) if first else None,
                                       "frames": int(sum(e.length for e in mine))}
        print(f"{task}: expert success {sum(e.success for e in mine)}/{len(mine)}, steps to success "
              f"mean {np.mean(first) if first else float('nan'):.0f} max {max(first) if first else 0}, "
              f"{sum(e.length for e in mine)} frames")
    n_frames = sum(e.length for e in eps)
    results["generation"].update(wall_s=wall, cpu_s=cpu, frames=n_frames)
    print(f"generated {len(eps)} episodes ({n_frames} frames at {args.size}x{args.size}) in {wall:.1f} s wall, "
          f"{cpu:.1f} CPU-s ({n_frames / cpu:.0f} steps per CPU-s)")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    _bench()
