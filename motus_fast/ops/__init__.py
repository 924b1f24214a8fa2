"""Fused ops behind one API each; ``MOTUS_BACKEND`` picks the implementation (see motus_fast.backend)."""

from motus_fast.ops.adaln import adaln_modulate, gated_residual_adaln, layer_norm
from motus_fast.ops.joint_attention import joint_attention
from motus_fast.ops.qk_norm_rope import apply_rope, qk_norm_rope, rms_norm

__all__ = ["adaln_modulate", "gated_residual_adaln", "layer_norm", "joint_attention", "apply_rope",
           "qk_norm_rope", "rms_norm"]
