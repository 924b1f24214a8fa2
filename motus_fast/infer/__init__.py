"""Inference: the engine (exact caches, CUDA graphs), encoders protocol, action chunking (RTC), stage timers."""

from motus_fast.infer.chunking import PrefixGuidance, guide_velocity, rtc_weights
from motus_fast.infer.encoders import Encoders, FrozenEncoders, StubEncoders
from motus_fast.infer.engine import InferenceEngine, Prepared
from motus_fast.infer.timing import StageTimer

__all__ = ["Encoders", "FrozenEncoders", "InferenceEngine", "Prepared", "PrefixGuidance", "StageTimer", "StubEncoders",
           "guide_velocity", "rtc_weights"]
