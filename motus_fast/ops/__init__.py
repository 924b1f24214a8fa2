"""Fused ops behind one API each; ``MOTUS_BACKEND`` picks the implementation (see motus_fast.backend)."""

from motus_fast.ops.adaln import adaln_modulate, gated_residual_adaln, layer_norm
from motus_fast.ops.flow_step import euler_step, masked_mse, noise_and_target
from motus_fast.ops.joint_attention import joint_attention, varlen_attention
from motus_fast.ops.qk_norm_rope import ExpertQK, apply_rope, qk_norm_rope, rms_norm

__all__ = ["adaln_modulate", "gated_residual_adaln", "layer_norm", "euler_step", "masked_mse", "noise_and_target",
           "joint_attention", "varlen_attention", "ExpertQK", "apply_rope", "qk_norm_rope", "rms_norm"]
