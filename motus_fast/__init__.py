"""motus_fast: a kernel-optimised, checkpoint-compatible implementation of Motus.

Top-level names load lazily, so light modules (the policy client, the chunk broker) import without torch.
"""

__version__ = "0.1.0"
__all__ = ["Motus", "MotusConfig", "Conditioning", "PRESETS", "get_preset", "__version__"]

_LAZY = {"Motus": "motus_fast.model", "Conditioning": "motus_fast.model", "MotusConfig": "motus_fast.config",
         "PRESETS": "motus_fast.config", "get_preset": "motus_fast.config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'motus_fast' has no attribute {name!r}")
