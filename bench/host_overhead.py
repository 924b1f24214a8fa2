"""Host time per call of the public ops, and of the bare custom ops beneath them, with the kernels stubbed out.

    python -m bench.host_overhead            # any machine: every Triton launch is stubbed out
    python -m bench.host_overhead --profile  # also where each public op's time goes (cProfile, no grad)

At inference shapes a kernel takes tens of microseconds on an H100, so the Python around it decides the speed of
eager code. This times that host work, minus Triton's own launch path: each `kernel[grid](...)` is replaced by a
no-op (no kernel runs, on CPU or GPU; the outputs are garbage). Each op is timed through its public function
(the plan of its input signature; in eager inference the outputs' allocation and the launch, else the custom op)
and as the bare ``torch.ops.motus_fast.*`` call, with grad mode on and off. Triton's launch binding (many
arguments per kernel) is not in these numbers: time it on a GPU. Shapes:
motus-8b inference, B=1 (360 video + 21 action + 150 und tokens, 24 heads x 128, width 3072), fp16 tensors on the
first CUDA device if there is one, else on the CPU under the Triton interpreter.

Next to each op, in the same run, the torch op it stands in for: ``scaled_dot_product_attention`` for the attention,
``layer_norm`` for the row kernels. Torch's host time is isolated by calling it on CPU tensors so small (one head,
one token, 16 features) that its compute is negligible: what remains is the Python binding, the dispatcher, the
kernel selection and the output allocation. (Meta tensors are no good for this: torch's meta kernels for these ops
are Python decompositions, 100x slower than the real dispatch.) Goal: public op <= 1.5x its torch counterpart.

Two ops replace more than one torch call, and are held against the torch code they replace, timed as such:
qk_norm_rope against six layer_norm calls (one launch of it produces six tensors, q and k of three experts, each
of which torch makes with at least one op of its own: an RMSNorm; the video expert's RoPE adds more), and
joint_attention against "sdpa packed", upstream's way (concatenate the three experts' q, k and v, one SDPA, split
the output). The ratio against the single torch op (one layer_norm, one SDPA) is reported too ("public / torch
x1"), for every op.

Measurement: every function (ours and torch's) is timed in the same rounds, interleaved, as batches of `--iters`
calls; each reports its best batch over `--repeats` rounds (on a shared machine the least disturbed estimate, and
both sides see the same disturbances). Two things of the CPU stand-in are not host time on a GPU machine and are
taken out: arguments (e.g. a frame slice of the latents) are built once, outside the timed call, as for every op;
and glibc is told (mallopt) to keep freed blocks instead of returning them to the OS, because our ops allocate
outputs of real size (MBs) where torch's side allocates 64 bytes: without it a freed MB block can be unmapped and
mapped again on the next call (gated_residual_adaln took 24 us instead of 6.7 us when timed right after
adaln_modulate), a cost CUDA's caching allocator does not have.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import backend, write_results  # noqa: E402


@contextlib.contextmanager
def stubbed_launches():
    """Every `kernel[grid](...)` becomes a no-op (JIT, autotuned and interpreted kernels)."""
    from triton.runtime import interpreter, jit

    classes = (jit.KernelInterface, interpreter.InterpretedFunction)
    saved = [c.__dict__.get("__getitem__") for c in classes]
    for c in classes:
        c.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for c, s in zip(classes, saved):
            if s is None:
                del c.__getitem__
            else:
                c.__getitem__ = s


def calls(device: str, dtype: torch.dtype) -> dict:
    """name -> (public op call, bare custom-op call), both with the same arguments."""
    from motus_fast.ops.adaln import adaln_modulate, gated_residual_adaln
    from motus_fast.ops.flow_step import euler_step
    from motus_fast.ops.joint_attention import joint_attention
    from motus_fast.ops.qk_norm_rope import ExpertQK, qk_norm_rope

    H, D, W = 24, 128, 3072
    lens = (360, 21, 150)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q, k, v = ([mk(n, H, D) for n in lens] for _ in range(3))
    cu = [torch.tensor([0, n], dtype=torch.int32, device=device) for n in lens]
    x, y, mod = mk(1, 360, W), mk(1, 360, W), mk(1, 1, 6, W)
    shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
    experts = [ExpertQK(mk(n, W), mk(n, W), mk(W), mk(W), 1e-6) for n in lens]
    lat, vel = mk(1, 48, 3, 24, 20), mk(1, 48, 3, 24, 20)
    cond = lat[:, :, :1]             # the condition frame: a strided slice, built once like every other argument
    dt = torch.tensor(-0.1, device=device, dtype=dtype)
    op = torch.ops.motus_fast
    return {
        "joint_attention": (lambda: joint_attention(q, k, v, cu, max_seqlens=list(lens)),
                            lambda: op.attention_fwd(q, [0, 1, 2], k, v, cu, cu, list(lens), list(lens), 511,
                                                     D ** -0.5, False)),
        "adaln_modulate": (lambda: adaln_modulate(x, shift, scale, 1e-6),
                           lambda: op.adaln_modulate(x, shift, scale, 1e-6, False)),
        "gated_residual_adaln": (lambda: gated_residual_adaln(x, y, gate, shift, scale, 1e-6),
                                 lambda: op.gated_residual_adaln(x, y, gate, shift, scale, 1e-6, False)),
        "qk_norm_rope (3 experts)": (
            lambda: qk_norm_rope(experts, H),
            lambda: op.qk_norm_rope([e.q for e in experts], [e.k for e in experts], [e.weight_q for e in experts],
                                    [e.weight_k for e in experts], [True] * 3, [None] * 3, [None] * 3, [1e-6] * 3,
                                    D)),
        "euler_step": (lambda: euler_step([lat], [vel], dt, [cond]),
                       lambda: op.euler_step([lat], [vel], dt, [cond])),
    }


def torch_calls() -> dict:
    """counterpart name -> call, at a size where torch's compute is negligible (see the module docstring)."""
    import torch.nn.functional as F

    q, x = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 16)
    experts = [[torch.randn(1, 1, 1, 16) for _ in range(3)] for _ in range(3)]   # q, k, v of three experts

    def layer_norm_x6():
        for _ in range(6):
            F.layer_norm(x, x.shape[-1:], eps=1e-6)

    def sdpa_packed():   # upstream's joint attention: pack the experts' tokens, one SDPA, split the output
        packed = [torch.cat(parts, dim=2) for parts in experts]
        return F.scaled_dot_product_attention(*packed).split(1, dim=2)
    return {"sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
            "sdpa packed": sdpa_packed,
            "layer_norm": lambda: F.layer_norm(x, x.shape[-1:], eps=1e-6),
            "layer_norm x6": layer_norm_x6}


# the torch code each public op replaces (see the module docstring), and the single torch op within it
COUNTERPART = {"joint_attention": "sdpa packed", "qk_norm_rope (3 experts)": "layer_norm x6"}  # others: layer_norm
SINGLE = {"layer_norm x6": "layer_norm", "sdpa packed": "sdpa"}


def keep_freed_host_memory() -> bool:
    """mallopt: serve large CPU allocations from the heap and never trim it (see the module docstring). Linux/glibc
    only; False where it could not be set."""
    if ON_GPU or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 25) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def best_per_call_us(fns: dict, iters: int, repeats: int) -> dict:
    """name -> host us per call: the best batch of `iters` calls over `repeats` rounds, all functions interleaved
    in every round."""
    for fn in fns.values():
        for _ in range(max(3, iters // 10)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / iters)
    return {name: us * 1e6 for name, us in best.items()}


def profile(name: str, fn, calls: int, top: int = 12) -> None:
    """cProfile of `calls` calls of fn: the functions with the most own time (the profiler inflates the small
    ones; read the shares, not the microseconds)."""
    import cProfile
    import pstats

    def loop():
        for _ in range(calls):
            fn()
    fn()
    prof = cProfile.Profile()
    prof.runcall(loop)
    print(f"---- {name}: {calls} calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100, help="calls per timed batch")
    ap.add_argument("--repeats", type=int, default=20, help="rounds; each function reports its best batch")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each public op (no grad) first")
    args = ap.parse_args(argv)
    device, dtype = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float16)
    rows = []
    with backend("triton"), stubbed_launches():
        ops, theirs = calls(device, dtype), torch_calls()
        if args.profile:
            with torch.no_grad():
                for name, (public, _) in ops.items():
                    profile(name, public, 20 * args.iters)
        fns = dict(theirs)
        for name, (public, bare) in ops.items():
            fns[name], fns[name + " (bare)"] = public, bare
        # grad mode on (a plain script; no input needs grad) and off (torch.no_grad, as the inference engine)
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                us = best_per_call_us(fns, args.iters, args.repeats)
            for name in ops:
                p, b = us[name], us[name + " (bare)"]
                other = COUNTERPART.get(name, "layer_norm")
                single = SINGLE.get(other, other)
                rows.append({"op": name, "grad mode": grad_mode, "public op us": p, "bare custom op us": b,
                             "torch op": other, "torch op us": us[other], "public / torch": p / us[other],
                             "public / torch x1": p / us[single]})
                print(f"{name:>26} grad={grad_mode!s:5}: public {p:7.1f} us   bare custom op {b:7.1f} us   "
                      f"torch {other} {us[other]:6.1f} us   ratio {p / us[other]:5.2f} "
                      f"(x1 {p / us[single]:5.2f})", flush=True)
    write_results("host_overhead", rows, ["op", "grad mode", "public op us", "bare custom op us", "torch op",
                                          "torch op us", "public / torch", "public / torch x1"],
                  notes="Host time per call with every Triton launch stubbed out (no kernel runs, Triton's launch "
                        "binding excluded). Public op: what a caller pays (checks and launch plan cached per input "
                        "signature; no dispatcher when no gradient is needed); bare: the torch.ops.motus_fast.* "
                        "custom op (the torch.compile / autograd path). Torch op: the torch code the op replaces, its "
                        "host time on CPU tensors of 1x1x16 (compute negligible), same run, interleaved: "
                        "'layer_norm x6' (qk_norm_rope's) is six calls, one per tensor the op produces; 'sdpa "
                        "packed' (joint_attention's) is upstream's cat of the three experts' q, k, v + one SDPA + "
                        "split; 'public / torch x1' is the ratio to a single sdpa / layer_norm call. Best batch of "
                        f"{args.iters} calls over {args.repeats} rounds. Freed host memory kept by malloc: "
                        f"{HEAP_KEPT} (see bench/host_overhead.py). Shapes: motus-8b inference, B=1, {dtype}, "
                        f"{device}.", out_dir=args.out_dir)


HEAP_KEPT = False   # set by the command line only: mallopt lasts for the whole process (a test calling main keeps
                    # its allocator as it is)

if __name__ == "__main__":
    HEAP_KEPT = keep_freed_host_memory()
    main()
