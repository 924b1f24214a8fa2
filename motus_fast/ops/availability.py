"""Which op implementations can run for given tensors: Triton kernels and the optional CUDA C++ extension.

The CUDA C++ ops (csrc/) are one shared library, ``motus_fast/_cuda_ops*.so``, built by ``setup.py`` (when torch
has CUDA) or by ``CMakeLists.txt`` (``cmake --install`` puts it into the package). Loading it registers the
``torch.ops.motus_fast_cuda`` namespace. It is optional: when it is absent the ops use Triton or the reference and
``motus_fast.backend.choose`` logs that choice; when it is present but fails to load we raise, never hide it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import operator
import os
from pathlib import Path
from typing import Optional, Sequence

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
# whether they need grad), so the ops compute them once per signature and keep the result in a PlanCache.
def signature(*tensors: Optional[torch.Tensor]) -> tuple:
    """The plan key of `tensors` in Python: shape, strides, dtype, device, requires_grad (None stays None). ~0.4 us
    per tensor; PlanCache.get avoids it on the common path."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                  for t in tensors])


# MOTUS_BACKEND is part of every plan key (a change must be seen by the next call). os.environ.get costs ~0.7 us
# (it encodes the key and decodes the value); on POSIX os.environ keeps the same bytes mapping it writes through
# (os.environ[...] = ... and monkeypatch.setenv update it), and one lookup there is ~0.05 us.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def backend_setting():
    """MOTUS_BACKEND as a plan-key component (raw: motus_fast.backend parses it when a plan is built)."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(b"MOTUS_BACKEND")
    return os.environ.get("MOTUS_BACKEND")



@functools.lru_cache(maxsize=None)
def tensor_guards():
    """torch's C++ tensor-signature check (torch._C._dynamo.guards.TensorGuards, what torch.compile guards graphs
    with): built over some tensors, ``check(*others)`` is True iff the others match them in type, dispatch keys,
    dtype, device, shape, strides and requires_grad (and alias nothing) -- our signature, compared in ~0.35 us +
    ~0.09 us per tensor instead of the ~0.4 us per tensor of building a Python key. Private API: it is used only after a self-test shows
    it rejects each difference the plans depend on; otherwise None, with one log line, and the Python keys."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        def build(*tensors):   # sizes and strides given are checked; a None would mark a dynamic one
            return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                dynamic_dims_strides=[list(t.stride()) for t in tensors])

        f32 = torch.float32   # (explicit: not the process's default dtype)
        g = build(torch.zeros(2, 3, dtype=f32))
        others = {"shape": torch.zeros(4, 3, dtype=f32), "strides": torch.zeros(3, 2, dtype=f32).t(),  # (only one)
                  "dtype": torch.zeros(2, 3, dtype=torch.float64),
                  "requires_grad": torch.zeros(2, 3, dtype=f32, requires_grad=True)}
        wrong = [name for name, t in others.items() if g.check(t)]
        if not g.check(torch.ones(2, 3, dtype=f32)) or wrong:
            raise RuntimeError(f"its check does not tell {wrong or 'equal signatures'} apart")
        return build
    except Exception as err:   # noqa: BLE001 (any failure of a private API: use the Python keys, say so)
        logging.getLogger("motus_fast").info(
            "op plans: torch's C++ tensor guards are unusable here (%s); plan keys are built in Python (~0.4 us "
            "per tensor per call)", err)
        return None


class PlanCache:
    """(key, tensors) -> plan, for plans that depend on the op's parameters (`key`, hashable) and on its tensor
    arguments' signatures (`tensors`, None allowed). Plans are stored under the Python signature; each also gets a
    C++ guard (tensor_guards), and a lookup first tries the guards of the first `slots` plans of this key, in order.
    Tensors that alias each other cannot be guarded (the check refuses them): their plans, and those of a key's
    later signatures, are found through the Python key. Cleared when it holds `size` plans (shapes that never
    repeat cannot grow it)."""

    def __init__(self, size: int = 512, slots: int = 8):
        self.size, self.slots = size, slots
        self._plans: dict = {}         # (key, signature) -> plan
        self._guarded: dict = {}       # key -> [(guard, tensor count, positions of None, pick the others, plan)]
        self._unguarded: set = set()   # (key, signature) of plans whose tensors could not be guarded

    def __len__(self) -> int:
        return len(self._plans)

    def values(self):
        """The cached plans."""
        return self._plans.values()

    def clear(self) -> None:
        self._plans.clear()
        self._guarded.clear()
        self._unguarded.clear()

    def get(self, key, tensors: Sequence):
        """The plan of `key` and these tensors' signature, or None."""
        slots = self._guarded.get(key)
        n = len(tensors)
        for guard, count, nones, pick, plan in slots or ():
            if count != n:
                continue
            if nones is None:     # a None where the guard has a tensor fails its type check
                if guard.check(*tensors):
                    return plan
            elif all(tensors[i] is None for i in nones) and guard.check(*pick(tensors)):
                return plan
        full = (key, signature(*tensors))
        plan = self._plans.get(full)
        if plan is not None and full not in self._unguarded:
            self._guard(key, tensors, plan, full)
        return plan

    def put(self, key, tensors: Sequence, plan):
        if len(self._plans) >= self.size:
            self.clear()
        full = (key, signature(*tensors))
        self._plans[full] = plan
        self._guard(key, tensors, plan, full)
        return plan

    def _guard(self, key, tensors, plan, full) -> None:
        build = tensor_guards()
        slots = self._guarded.setdefault(key, [])
        present = [i for i, t in enumerate(tensors) if t is not None]
        # the first `slots` signatures of a key keep their guards (no eviction: signatures in rotation would
        # rebuild a guard, ~15 us, on every call); later ones are found through the Python key
        guard = None if build is None or not present or len(slots) >= self.slots else \
            build(*[tensors[i] for i in present])
        if guard is None or not guard.check(*[tensors[i] for i in present]):   # aliasing tensors, full, no guards
            self._unguarded.add(full)
            return
        nones = None if len(present) == len(tensors) else [i for i, t in enumerate(tensors) if t is None]
        pick = None if nones is None else (lambda ts, i=present[0]: (ts[i],)) if len(present) == 1 else \
            operator.itemgetter(*present)
        slots.append((guard, len(tensors), nones, pick, plan))


# Is an autocast region active anywhere? torch's C check (~0.15 us) where this torch has it; otherwise the per-device
# check below always runs (~1 us: it builds the device type).
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype of t's device inside an autocast region there, else None."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return None
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def eager_call() -> bool:
    """A call outside torch.compile tracing: the ops may take their cached, dispatcher-free path. Under tracing they
    go through the custom ops (fake implementations, autograd)."""
    return not torch.compiler.is_compiling()
