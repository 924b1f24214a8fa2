"""motus_fast: a kernel-optimised, checkpoint-compatible implementation of Motus."""

from motus_fast.config import PRESETS, MotusConfig, get_preset
from motus_fast.model import Conditioning, Motus

__version__ = "0.1.0"
__all__ = ["Motus", "MotusConfig", "Conditioning", "PRESETS", "get_preset", "__version__"]
