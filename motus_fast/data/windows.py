"""Which raw frames one training sample reads: a condition frame, F future video frames and a K-step action chunk.

Upstream (``RobotWinTaskDataset._calculate_sampling_indices``, identical in ``LeRobotMotusDataset``), with
g = ``global_downsample_rate``, r = ``video_action_freq_ratio``, F = ``num_video_frames`` and K = F * r:

    condition c  ~ uniform over 0 .. max(0, T - K*g - 1)          (T = episode length in raw frames)
    action i     = raw frame min(c + (i + 1) * g, T - 1)            i = 0 .. K-1   (the action rate is fps / g)
    video j      = action index (j + 1) * r - 1                     j = 0 .. F-1   (the video rate is fps / (g r))
    state        = raw frame c                                      (the robot state at the condition frame)

So the last video frame shows the state the last action reaches, and an episode shorter than one chunk still gives
one sample (c = 0, indices clamped to the last frame, i.e. the chunk is padded by holding the final pose).
Upstream draws c at random per call; ``WindowSpec`` enumerates the candidate conditions instead (every
``condition_stride``-th one), so the index -> sample map is deterministic and the sampler does the drawing.
The clip fed to the VAE is [c] + video frames: 1 + F frames (the Wan2.2 VAE wants 1 + 4n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSpec:
    num_video_frames: int = 8           # F future frames (upstream `num_video_frames`)
    video_action_freq_ratio: int = 2    # r actions per video frame (upstream `video_action_freq_ratio`)
    global_downsample_rate: int = 3     # g raw frames per action step (upstream `global_downsample_rate`)
    condition_stride: int = 1           # candidate condition frames every this many raw frames

    def __post_init__(self):
        for name in ("num_video_frames", "video_action_freq_ratio", "global_downsample_rate", "condition_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WindowSpec.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def chunk_size(self) -> int:
        """K = num_video_frames * video_action_freq_ratio actions per sample."""
        return self.num_video_frames * self.video_action_freq_ratio

    @property
    def clip_frames(self) -> int:
        """Frames given to the VAE: the condition frame plus the future frames."""
        return 1 + self.num_video_frames

    @property
    def span(self) -> int:
        """Raw frames from the condition frame to the last action."""
        return self.chunk_size * self.global_downsample_rate

    def num_conditions(self, length: int) -> int:
        """How many candidate condition frames an episode of ``length`` raw frames has (0 if it has < 2 frames,
        which upstream skips)."""
        if length < 2:
            return 0
        last = max(0, length - self.span - 1)
        return last // self.condition_stride + 1

    def condition_frame(self, j: int) -> int:
        return j * self.condition_stride

    def indices(self, cond: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(video frame indices [F], action frame indices [K]) for condition frame ``cond``."""
        g, r = self.global_downsample_rate, self.video_action_freq_ratio
        actions = np.minimum(cond + (np.arange(self.chunk_size) + 1) * g, length - 1)
        video = actions[(np.arange(self.num_video_frames) + 1) * r - 1]
        return video, actions
