"""Kernel backend selection: ``MOTUS_BACKEND=auto|triton|cuda|reference``.

``auto`` picks the fastest implementation available on the device (reference on CPU unless ``TRITON_INTERPRET=1``).
The choice is logged once per op, and so is every case where a requested backend cannot run (we then use the
reference, never silently).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("motus_fast")

BACKENDS = ("auto", "triton", "cuda", "reference")
_logged: set[tuple[str, str]] = set()


def requested_backend() -> str:
    name = os.environ.get("MOTUS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MOTUS_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def choose(op: str, available: dict[str, bool], device_type: str) -> str:
    """Pick the backend for `op` given which implementations can run here ({"triton": bool, "cuda": bool}).

    Order under auto: cuda > triton > reference on a GPU; triton under TRITON_INTERPRET=1 on CPU; else reference.
    """
    want = requested_backend()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if want == "auto":
        if device_type == "cuda" and available.get("cuda"):
            got = "cuda"
        elif available.get("triton") and (device_type == "cuda" or interp):
            got = "triton"
        else:
            got = "reference"
    elif want == "reference" or available.get(want):
        got = want
    else:
        got = "reference"
        _log_once(op, f"{want}-unavailable", logging.WARNING,
                  f"{op}: MOTUS_BACKEND={want} requested but no {want} implementation can run here; using reference")
    _log_once(op, got, logging.INFO, f"{op}: using the {got} backend")
    return got


def _log_once(op: str, key: str, level: int, msg: str) -> None:
    import torch
    if torch.compiler.is_compiling():   # dynamo cannot trace logging; the eager call logs it
        return
    if (op, key) not in _logged:
        _logged.add((op, key))
        log.log(level, msg)
