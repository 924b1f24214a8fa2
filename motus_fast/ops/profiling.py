"""NVTX ranges around the public ops, each Motus layer ("MotusBlock") and each expert's part of a layer before and
after the joint attention ("video.pre_attention", ..., "und.post_attention"), so an Nsight Systems timeline reads
layer by layer, stream by stream, op by op. The decorated functions live with what they time (model/mot.py,
model/wan.py, model/action.py, model/und.py, the ops).

Off by default and then free: ``annotate`` returns the function itself, so nothing runs per call. With
``MOTUS_NVTX=1`` in the environment before motus_fast is imported, each annotated function pushes a range named after
it, through the ``nvtx`` package if installed, else ``torch.cuda.nvtx`` (CUDA builds of torch); with neither, one
log line and no ranges.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

log = logging.getLogger("motus_fast")

ENABLED = os.environ.get("MOTUS_NVTX") == "1"


def _range_api():
    """(push(name), pop()) of the NVTX implementation here, or None."""
    if importlib.util.find_spec("nvtx") is not None:
        import nvtx
        return nvtx.push_range, nvtx.pop_range
    import torch
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    log.warning("MOTUS_NVTX=1 but neither the nvtx package nor a CUDA torch is here: no NVTX ranges")
    return None


_API = _range_api() if ENABLED else None


def annotate(name: str):
    """Decorator: an NVTX range `name` around each call when enabled; the undecorated function otherwise."""
    def wrap(fn):
        if _API is None:
            return fn
        push, pop = _API

        @functools.wraps(fn)
        def ranged(*args, **kwargs):
            push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                pop()
        return ranged
    return wrap
