"""Action chunking on the server side: real-time chunking (RTC) as guided inpainting of the action prefix.

A policy predicts ``action_horizon`` = K actions per observation and the robot executes the first
``execute_steps`` of them before asking again (``motus_fast.serve.broker.ActionChunkBroker`` does that on the
client). When the next chunk is computed while the previous one is still being executed (or simply to keep
consecutive chunks continuous), its first actions should agree with what the robot is about to do anyway: the
not-yet-executed remainder of the previous chunk, ``prefix`` [P, D] (P <= K, aligned so that prefix[j] is meant
for the same time as new action j).

Real-Time Chunking (Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies") treats this as
inpainting during flow sampling with a soft mask over the prefix: weight 1 on the first ``delay`` actions (they
will be executed before the new chunk arrives, so the new chunk must match them), an exponential decay over the
rest of the overlap, 0 beyond the prefix. RTC applies the mask through a vector-Jacobian product with the network.
We use a gradient-free variant that keeps the denoise loop a fixed sequence of forward passes (CUDA-graph
capturable) and costs nothing extra: at each Euler step at noise level s, the model's clean-action estimate
``x0 = a - s v`` is pulled toward the prefix, ``x0' = x0 + w (prefix - x0)``, and the step uses the velocity that
leads to it, ``v' = (a - x0') / s = v - w (prefix - x0) / s``. Since later steps see the guided actions, the free
part of the chunk adapts to the prefix; at the last step (s -> 0) the result is exactly ``x0'``, so actions with
w = 1 equal the prefix. With all weights 0 this is the plain sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def rtc_weights(horizon: int, prefix_len: int, delay: int) -> Tensor:
    """Soft inpainting mask [horizon] (fp64): 1 for j < delay, RTC's exponential decay
    c (e^c - 1) / (e - 1) with c = (P - j) / (P - delay + 1) for delay <= j < P, 0 for j >= P."""
    if not 0 <= prefix_len <= horizon:
        raise ValueError(f"prefix length {prefix_len} must be in 0..{horizon} (the action horizon)")
    if not 0 <= delay <= prefix_len:
        raise ValueError(f"inference_delay {delay} must be in 0..{prefix_len} (the prefix length)")
    j = torch.arange(horizon, dtype=torch.float64)
    c = ((prefix_len - j) / (prefix_len - delay + 1)).clamp(min=0.0)
    w = c * torch.expm1(c) / math.expm1(1.0)
    w = torch.where(j < delay, torch.ones_like(w), w)
    return torch.where(j < prefix_len, w, torch.zeros_like(w))


@dataclass
class PrefixGuidance:
    """What the denoise loop needs for RTC: the prefix padded to the horizon and the per-action weights."""

    target: Tensor      # [B, K, D] model-space actions; rows past the prefix are 0 (their weight is 0)
    weights: Tensor     # [B, K, 1] in [0, 1]

    @staticmethod
    def from_prefix(prefix: Tensor, horizon: int, delay: int) -> "PrefixGuidance":
        """prefix: [B, P, D] (model space) -> guidance over a K = horizon chunk (same dtype and device)."""
        B, P, D = prefix.shape
        w = rtc_weights(horizon, P, delay).to(prefix.device, prefix.dtype)
        target = prefix.new_zeros(B, horizon, D)
        target[:, :P] = prefix
        return PrefixGuidance(target=target, weights=w[None, :, None].expand(B, horizon, 1).contiguous())


def guide_velocity(a: Tensor, v: Tensor, sigma: Tensor, guidance: PrefixGuidance) -> Tensor:
    """The guided action velocity at noise level sigma > 0 (see the module docstring).

    a: noisy actions [B, K, D]; v: model velocity [B, K, D]; sigma: 0-d tensor -> [B, K, D]
    """
    x0 = a - sigma * v
    return v - guidance.weights * (guidance.target - x0) / sigma
