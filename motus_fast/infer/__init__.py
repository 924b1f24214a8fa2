"""Inference: the engine (exact caches, CUDA graphs), action chunking (RTC), stage timers. The encoders it calls
live in ``motus_fast.encoders``."""

from motus_fast.infer.chunking import PrefixGuidance, guide_velocity, rtc_weights
from motus_fast.infer.engine import InferenceEngine, Prepared
from motus_fast.infer.timing import StageTimer

__all__ = ["InferenceEngine", "Prepared", "PrefixGuidance", "StageTimer", "guide_velocity", "rtc_weights"]
