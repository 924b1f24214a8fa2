"""Named text encoders for the CLI (``motus-fast encode-text --text-encoder NAME``): "tiny" is built in; a
"package.module:function" name is imported and called like a registered factory."""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from motus_fast.encoders.umt5 import UMT5TextEncoder

TEXT_ENCODERS: dict[str, Callable[..., UMT5TextEncoder]] = {}


def register_text_encoder(name: str, factory: Callable[..., UMT5TextEncoder]) -> None:
    """factory(cfg: MotusConfig, device, dtype) -> UMT5TextEncoder. The weights loaders register "umt5-xxl" etc."""
    TEXT_ENCODERS[name] = factory


def build_text_encoder(name: str, cfg, device=None, dtype=torch.float32) -> UMT5TextEncoder:
    """A registered name, or "package.module:function" (called like a registered factory)."""
    if name in TEXT_ENCODERS:
        factory = TEXT_ENCODERS[name]
    elif ":" in name:
        module, fn = name.split(":", 1)
        factory = getattr(importlib.import_module(module), fn)
    else:
        raise KeyError(f"unknown text encoder {name!r}; registered: {sorted(TEXT_ENCODERS)} (or give "
                       "'package.module:function')")
    return factory(cfg, device, dtype)


def _tiny_text_factory(cfg, device=None, dtype=torch.float32) -> UMT5TextEncoder:
    from motus_fast.encoders.tiny import tiny_umt5
    return tiny_umt5(cfg.video.text_dim, max(cfg.video.text_len, 8)).to(device=device, dtype=dtype)


register_text_encoder("tiny", _tiny_text_factory)
