"""Triton kernels of motus_fast, installed as ``motus_fast.kernels``.

Importing this package needs triton; callers check ``triton_available()`` first (motus_fast.ops does).
Under ``TRITON_INTERPRET=1`` (CPU), we patch the interpreter's bf16 ``tl.dot`` (it multiplies the raw bits) and
autotune with a CPU timer.
"""

from __future__ import annotations

import importlib.util
import os
import time


_TRITON_FOUND = importlib.util.find_spec("triton") is not None   # once: torch.compile cannot trace find_spec


def triton_available() -> bool:
    return _TRITON_FOUND


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def constexpr_order(kernel, count: int) -> tuple[str, ...]:
    """The names of `kernel`'s last `count` parameters (its constexprs), in order: launchers pass them positionally,
    which spares building keyword arguments on every launch. Read once, at import (tests may swap a kernel object
    for a counting wrapper later)."""
    return tuple(kernel.arg_names[len(kernel.arg_names) - count:])


def patch_interpreter_bf16_dot() -> None:
    """Triton's interpreter (3.7-3.9) runs np.matmul on bf16's uint16 storage; upcast bf16 operands to fp32."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    orig = interp.InterpreterBuilder.create_dot
    if getattr(orig, "_bf16_patched", False):
        return

    def up(h):
        if h.dtype == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_patched = True
    interp.InterpreterBuilder.create_dot = create_dot


def cpu_do_bench(fn, quantiles=None, **_):
    """`do_bench` replacement for @triton.autotune under the interpreter (one timed call; the choice is moot)."""
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotune_bench():
    """The `do_bench` to give @triton.autotune: the CPU timer under the interpreter, Triton's default otherwise."""
    return cpu_do_bench if interpreting() else None


if interpreting() and triton_available():
    patch_interpreter_bf16_dot()
