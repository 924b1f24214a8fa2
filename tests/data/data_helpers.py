"""Shared helpers of the data tests: random episodes and a LeRobot v3 writer call."""

import numpy as np
from motus_fast.data.lerobot import LeRobotV3Writer
from motus_fast.data.video import VideoCodec

T_EP = 40   # frames per episode (the brief's tiny size: 3 episodes x 40 frames at 64x64)


def episodes(seed: int = 0, n: int = 3, lengths=None):
    """Random episodes: noise video (the hardest case for a lossless round trip) and random vectors."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        T = lengths[e] if lengths else T_EP
        out.append({"observation.state": rng.normal(size=(T, 6)).astype(np.float32),
                    "action": rng.normal(size=(T, 7)).astype(np.float32),
                    "observation.images.top": rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                    "observation.images.wrist": rng.integers(0, 256, (T, 32, 48, 3), dtype=np.uint8)})
    return out


FEATURES = {"observation.state": {"dtype": "float32", "shape": [6], "names": None},
            "action": {"dtype": "float32", "shape": [7], "names": None},
            "observation.images.top": {"dtype": "video", "shape": [64, 64, 3], "names": None},
            "observation.images.wrist": {"dtype": "video", "shape": [32, 48, 3], "names": None}}
TASKS = [["pick the cube"], ["place the cube", "put it down"], ["pick the cube"]]


def write(root, eps, codec=None, episodes_per_file=2):
    with LeRobotV3Writer(root, fps=10, features=FEATURES, codec=codec or VideoCodec.lossless(),
                         episodes_per_file=episodes_per_file) as w:
        for ep, tasks in zip(eps, TASKS * 10):
            w.add_episode(ep, tasks)
    return root
