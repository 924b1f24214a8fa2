"""Meta-World episodes as a LeRobot v3 dataset: the recording half of the demo's data generation (the
environments, cameras and scripted experts live in motus_fast.envs.metaworld)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

import numpy as np

from motus_fast.envs.metaworld import ACTION_DIM, ACTION_NAMES, STATE_DIM, STATE_NAMES, Episode

if TYPE_CHECKING:
    from motus_fast.data.video import VideoCodec

# LeRobot feature names of what generate_demonstrations records
IMAGE_FEATURE = "observation.images.scene"
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"
SUCCESS_FEATURE = "next.success"


# ---- LeRobot v3 --------------------------------------------------------------------------------------------------
def lerobot_features(height: int, width: int) -> dict:
    """The LeRobot v3 features of our episodes (for LeRobotV3Writer)."""
    return {
        IMAGE_FEATURE: {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"]},
        STATE_FEATURE: {"dtype": "float32", "shape": [STATE_DIM], "names": list(STATE_NAMES)},
        ACTION_FEATURE: {"dtype": "float32", "shape": [ACTION_DIM], "names": list(ACTION_NAMES)},
        SUCCESS_FEATURE: {"dtype": "bool", "shape": [1], "names": None},
    }


def episode_to_lerobot(episode: Episode) -> dict[str, np.ndarray]:
    """An episode as the per-frame columns of lerobot_features() (the instruction goes in as the episode's task)."""
    return {IMAGE_FEATURE: episode.frames, STATE_FEATURE: episode.state, ACTION_FEATURE: episode.action,
            SUCCESS_FEATURE: episode.step_success[:, None]}


def write_lerobot_dataset(episodes: Iterable[Episode], root: Union[str, Path], *, overwrite: bool = False,
                          codec: Optional["VideoCodec"] = None) -> dict:
    """Write episodes as a LeRobot v3 dataset at ``root`` (through motus_fast.data.lerobot.LeRobotV3Writer).

    The instruction is each episode's task string. ``codec``: the writer's default (H.264 yuv420p, CRF 18) unless
    given; ``VideoCodec.lossless()`` keeps the frames bit-exact at ~6x the size. Returns a summary: root,
    episodes, frames, fps, and per task the episode count and the expert success rate.
    """
    from motus_fast.data.lerobot import LeRobotV3Writer
    from motus_fast.data.video import VideoCodec

    it = iter(episodes)
    first = next(it, None)
    if first is None:
        raise ValueError("no episodes to write")
    H, W = first.frames.shape[1:3]
    fps = int(round(first.fps))
    if abs(first.fps - fps) > 1e-6:
        raise ValueError(f"LeRobot needs an integer fps; the episodes run at {first.fps} Hz")
    counts: dict[str, list[int]] = {}
    frames = 0
    with LeRobotV3Writer(root, fps=fps, features=lerobot_features(H, W), robot_type="sawyer",
                         codec=codec or VideoCodec(), overwrite=overwrite) as writer:
        for ep in itertools.chain([first], it):
            if ep.frames.shape[1:3] != (H, W):
                raise ValueError(f"episode of {ep.task} (seed {ep.seed}) has frames {ep.frames.shape[1:3]}, "
                                 f"the dataset {(H, W)}")
            writer.add_episode(episode_to_lerobot(ep), ep.instruction)
            counts.setdefault(ep.task, []).append(int(ep.success))
            frames += ep.length
    return {"root": str(root), "episodes": sum(len(v) for v in counts.values()), "frames": frames, "fps": fps,
            "tasks": {t: {"episodes": len(v), "expert_success": float(np.mean(v))} for t, v in counts.items()}}
