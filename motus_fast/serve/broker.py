"""Client-side action chunking: one action per control step from the last chunk, a new chunk every
``execute_steps`` steps, optionally with real-time chunking (RTC).

The server returns ``action_horizon`` = K actions per request; executing only the first ``execute_steps`` <= K
of them before asking again trades reactivity (small) against fewer requests (large). With
``real_time_chunking`` the broker sends the not-yet-executed rest of the current chunk as ``prev_actions`` (and
``inference_delay``: how many of them the robot will still execute before the new chunk arrives, 0 when it waits),
and the server inpaints the new chunk's prefix to follow it (``motus_fast.infer.chunking``), so consecutive chunks
join without a jump. Works with any policy that has ``infer(obs) -> {"actions": [K, D], ...}`` (ours or openpi's
``WebsocketClientPolicy``). Imports only numpy.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class ActionChunkBroker:
    def __init__(self, policy, execute_steps: int, *, real_time_chunking: bool = False, inference_delay: int = 0):
        if execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {execute_steps}")
        if inference_delay < 0:
            raise ValueError(f"inference_delay must be >= 0, got {inference_delay}")
        self.policy, self.execute_steps = policy, execute_steps
        self.real_time_chunking, self.inference_delay = real_time_chunking, inference_delay
        self._chunk: Optional[np.ndarray] = None
        self._step = 0
        self.last_response: Optional[dict] = None

    def infer(self, obs: dict) -> dict:
        """-> {"actions": the action [D] for this control step, "chunk_step": its index in the chunk}"""
        if self._chunk is None or self._step >= self.execute_steps:
            request = dict(obs)
            if self.real_time_chunking and self._chunk is not None and self._step < len(self._chunk):
                rest = self._chunk[self._step:]
                request["prev_actions"] = np.ascontiguousarray(rest, dtype=np.float32)
                request["inference_delay"] = min(self.inference_delay, len(rest))
            response = self.policy.infer(request)
            chunk = np.asarray(response["actions"])
            if chunk.ndim != 2 or len(chunk) < self.execute_steps:
                raise ValueError(f"expected an action chunk [K >= {self.execute_steps}, D], got shape "
                                 f"{list(chunk.shape)}")
            self._chunk, self._step, self.last_response = chunk, 0, response
        action = self._chunk[self._step]
        self._step += 1
        return {"actions": action, "chunk_step": self._step - 1}

    def reset(self) -> None:
        self._chunk, self._step, self.last_response = None, 0, None
        self.policy.reset()
