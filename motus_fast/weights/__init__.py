"""Checkpoint I/O: our format (native, its only reader and writer) and converters from other formats (upstream
Motus incl. the VLM weights it carries, Wan2.2 video expert). The frozen encoders (Qwen3-VL, umT5, Wan VAE) load
through ``motus_fast.encoders`` (needs ``motus_fast[backbones]``)."""

from motus_fast.weights.mapping import CheckpointError
from motus_fast.weights.native import load_pretrained, save_pretrained
from motus_fast.weights.upstream import load_upstream
from motus_fast.weights.wan import load_wan_video, locate_wan

__all__ = ["CheckpointError", "load_pretrained", "load_upstream", "load_wan_video", "locate_wan", "save_pretrained"]
