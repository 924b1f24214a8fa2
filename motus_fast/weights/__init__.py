"""Checkpoint I/O: our format (native) and converters from other formats (upstream Motus, ...)."""

from motus_fast.weights.native import load_pretrained, save_pretrained
from motus_fast.weights.upstream import CheckpointError, load_upstream

__all__ = ["CheckpointError", "load_pretrained", "load_upstream", "save_pretrained"]
