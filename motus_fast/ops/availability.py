"""Which op implementations can run for given tensors: Triton kernels and the optional CUDA C++ extension.

The CUDA C++ ops (csrc/) are one shared library, ``motus_fast/_cuda_ops*.so``, built by ``setup.py`` (when torch
has CUDA) or by ``CMakeLists.txt`` (``cmake --install`` puts it into the package). Loading it registers the
``torch.ops.motus_fast_cuda`` namespace. It is optional: when it is absent the ops use Triton or the reference and
``motus_fast.backend.choose`` logs that choice; when it is present but fails to load we raise, never hide it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from motus_fast.kernels import interpreting, triton_available

CUDA_OPS_MODULE = "motus_fast._cuda_ops"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def installed_cuda_ops() -> Optional[str]:
    """Load the installed CUDA C++ extension once; its path, or None if it is not built (or torch has no CUDA)."""
    if not torch.cuda.is_available():
        return None
    spec = importlib.util.find_spec(CUDA_OPS_MODULE)
    if spec is None or spec.origin is None:
        return None
    torch.ops.load_library(spec.origin)   # raises with the loader's message if the build is broken
    return str(Path(spec.origin))


@torch.compiler.assume_constant_result   # torch.compile runs it once at trace time (it cannot trace find_spec)
def cuda_ops_loaded() -> bool:
    """Are the torch.ops.motus_fast_cuda ops registered (the installed extension, or a library loaded by hand,
    e.g. a JIT build)? Registers their fake implementations the first time."""
    installed_cuda_ops()
    try:
        torch.ops.motus_fast_cuda.adaln_modulate.default
    except (AttributeError, RuntimeError):
        return False
    _register_fakes()
    return True


def cuda_ops_run_on(device: torch.device) -> bool:
    return device.type == "cuda" and cuda_ops_loaded()


@functools.lru_cache(maxsize=None)
def _register_fakes() -> None:
    """Shape functions of the CUDA ops, so torch.compile and CUDA-graph capture trace through them."""
    lib = "motus_fast_cuda"

    @torch.library.register_fake(f"{lib}::adaln_modulate")
    def _(x, shift, scale, eps, rms):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{lib}::gated_residual_adaln")
    def _(x, y, gate, shift, scale, eps, rms):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake(f"{lib}::euler_step")
    def _(xs, vs, dt, conds):
        return [x.new_empty(x.shape) for x in xs]


def launch_budget(device: torch.device, reduction: bool) -> tuple[int, int]:
    """(max programs, elements per tile) for the row kernels. On a GPU: one tile per program (the most rows in
    flight) unless the kernel reduces across rows (`reduction`: a few programs per SM, each writing one partial),
    and tiles of ~4k elements. In the interpreter, which runs programs one by one and each tile op once: few
    programs, big tiles."""
    if device.type == "cuda":
        return (4 * _sm_count() if reduction else 1 << 30), 4096
    return 8, 1 << 15


@torch.compiler.assume_constant_result
def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


# ---- per-signature launch plans ---------------------------------------------------------------------------------
# At inference shapes a kernel runs for tens of microseconds, so the host work around it must be small: checks,
# backend choice and launch arguments depend only on the inputs' signature (shapes, strides, dtypes, devices,
# whether they need grad), so the ops compute them once per signature and keep the result here.
def signature(grad: bool, *tensors: Optional[torch.Tensor]) -> tuple:
    """The plan key of `tensors`: shape, strides, dtype, device, and (only when grad mode is on, `grad`: the one
    case where it changes the plan) requires_grad. ~0.4 us per tensor, the cheapest complete key found in Python
    (attrgetter/methodcaller, flat tuples and get_device() were slower)."""
    if grad:
        return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                      for t in tensors])
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors])


# MOTUS_BACKEND is part of every plan key (a change must be seen by the next call). os.environ.get costs ~0.7 us
# (it encodes the key and decodes the value); on POSIX os.environ keeps the same bytes mapping it writes through
# (os.environ[...] = ... and monkeypatch.setenv update it), and one lookup there is ~0.05 us.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def backend_setting():
    """MOTUS_BACKEND as a plan-key component (raw: motus_fast.backend parses it when a plan is built)."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(b"MOTUS_BACKEND")
    return os.environ.get("MOTUS_BACKEND")


class PlanCache(dict):
    """signature key -> plan; cleared when it reaches `size` entries (shapes that never repeat cannot grow it)."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size

    def put(self, key, plan):
        if len(self) >= self.size:
            self.clear()
        self[key] = plan
        return plan


def eager_call() -> bool:
    """A call outside torch.compile tracing: the ops may take their cached, dispatcher-free path. Under tracing they
    go through the custom ops (fake implementations, autograd)."""
    return not torch.compiler.is_compiling()
