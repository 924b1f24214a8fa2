"""Fused ops benchmark: achieved memory bandwidth of qk_norm_rope, adaln_modulate, gated_residual_adaln and the
flow-step ops against eager PyTorch (the reference) and torch.compile of the same reference expression, and the
number of kernel launches per denoise step, fused vs reference.

    python -m bench.ops                   # on a GPU: bf16 at motus-8b shapes (inference B=1 x 360 x 3072,
                                          # training 8 x 4096 x 3072), then the launch counts
    python -m bench.ops --launches        # only the launch counts (runs on a CPU: the kernels in the interpreter)

Bandwidth: each op's minimum memory traffic (every input read once, every output written once; modulation rows
and rope tables once) over its median time (bench/common.py), and that as a % of the GPU's HBM peak.

Launches per denoise step: `sample(steps=2)` minus `sample(steps=1)` (the setup cancels), counted on the torch
profiler's op tree: every Triton launch (wrapped in a profiler scope) and every GEMM / attention op counts 1, any
other ATen op that would launch a kernel counts 1 unless one of its sub-ops does (views, allocation and metadata
ops launch none). On a GPU this
is the host-side count; the CUDA kernel count from the profiler is reported beside it. Configs: `tiny`, and
`motus-8b` with its structure (30 layers, three experts, finetune layout, B=1) at reduced widths, heads and token
counts so it runs on a CPU; the count depends on none of these, which the run checks by counting each config at
two sizes (tiny: two widths; motus-8b: two widths and two token counts).

On a CPU the bandwidth part runs tiny fp32 shapes with the kernels in the Triton interpreter: those numbers say
nothing about GPU speed; the launch counts hold for any device.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")        # read when the Triton kernels are imported

from bench.common import backend, device_info, time_fn, write_results  # noqa: E402
from motus_fast.config import get_preset  # noqa: E402
from motus_fast.flow import sample  # noqa: E402
from motus_fast.model import Conditioning, Motus  # noqa: E402
from motus_fast.model.rope import rope_tables  # noqa: E402
from motus_fast.ops import adaln, flow_step  # noqa: E402
from motus_fast.ops.qk_norm_rope import ExpertQK, qk_norm_rope, qk_norm_rope_reference  # noqa: E402
from motus_fast.ops.availability import cuda_ops_loaded  # noqa: E402

# HBM peak (bytes/s) by device name, most specific first; used when the device does not report its memory clock
PEAK_HBM = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "GH200": 4.0e12,
            "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12}


def peak_bandwidth() -> Optional[float]:
    if not ON_GPU:
        return None
    p = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8      # double data rate
    for key, peak in PEAK_HBM.items():
        if all(part in p.name for part in key.split()):
            return peak
    return None


# ---- bandwidth ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: tuple[int, int, int]       # video, action, und tokens per sample
    width: int                         # video dim = H * D of the joint attention
    heads: int
    action_dim: int                    # action expert width (its AdaLN rows)
    latents: tuple[int, int, int]      # video latent frames, height, width (48 channels)


GPU_SHAPES = [Shape("inference", 1, (360, 21, 150), 3072, 24, 1024, (3, 20, 24)),
              Shape("training", 8, (4096, 21, 150), 3072, 24, 1024, (4, 64, 64))]
CPU_SHAPES = [Shape("tiny", 1, (72, 21, 10), 256, 2, 128, (3, 12, 8))]


@dataclass
class Case:
    op: str
    bytes: int
    fused: Callable[[], object]                 # the public op (backend chosen by the caller)
    reference: Callable[[], object]             # the plain-PyTorch reference: eager, and compiled
    cuda: bool = False                          # has a CUDA C++ implementation


def cases(shape: Shape, dtype: torch.dtype, device: str) -> list[Case]:
    g = torch.Generator(device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    es = torch.tensor([], dtype=dtype).element_size()
    B, (Lv, La, Lu), W = shape.batch, shape.tokens, shape.width
    out = []
    # AdaLN on the video stream, per-sample modulation (chunks of the [B, 6, D] table, as in the model)
    x, y, table = mk(B, Lv, W), mk(B, Lv, W), mk(B, 1, 6, W)
    gate, shift, scale = table[:, :, 2], table[:, :, 0], table[:, :, 1]
    out.append(Case("adaln_modulate", es * (2 * B * Lv * W + 2 * B * W),
                    lambda: adaln.adaln_modulate(x, shift, scale, 1e-6),
                    lambda: adaln.adaln_modulate_reference(x, shift, scale, 1e-6), cuda=True))
    out.append(Case("gated_residual_adaln", es * (4 * B * Lv * W + 3 * B * W),
                    lambda: adaln.gated_residual_adaln(x, y, gate, shift, scale, 1e-6),
                    lambda: adaln.gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6), cuda=True))
    # qk_norm_rope: q/k as chunks of each expert's qkv projection; video has RoPE, und is keys and queries
    qkv = [mk(B, Lv, 3 * W), mk(B, La, 3 * W), mk(B * Lu, 3 * W)]
    weights = [mk(W) for _ in range(6)]
    f, rest = shape.latents[0], Lv // shape.latents[0]
    rope = rope_tables((f, 2, rest // 2) if rest % 2 == 0 else (f, 1, rest), W // shape.heads, device=device)
    experts = [ExpertQK(t[..., :W], t[..., W:2 * W], weights[2 * i], weights[2 * i + 1], 1e-6,
                        rope if i == 0 else None) for i, t in enumerate(qkv)]
    rows = B * (Lv + La + Lu)
    out.append(Case("qk_norm_rope (3 experts)", es * (4 * rows * W + 6 * W) + 8 * Lv * (W // shape.heads),
                    lambda: qk_norm_rope(experts, shape.heads),
                    lambda: qk_norm_rope_reference(experts, shape.heads)))
    # flow step on the video latents [B, 48, T, H, W] (+ the action chunk for euler_step)
    lat = (B, 48, *shape.latents)
    x0, noise, pred = mk(*lat), mk(*lat), mk(*lat)
    sigma = torch.rand(B, generator=g, device=device)
    n = x0.numel()
    out.append(Case("noise_and_target (video)", es * 4 * n + 4 * B,
                    lambda: flow_step.noise_and_target(x0, noise, sigma, 1),
                    lambda: flow_step.noise_and_target_reference(x0, noise, sigma, 1)))
    out.append(Case("masked_mse (video)", es * 2 * n, lambda: flow_step.masked_mse(pred, noise, None, 1),
                    lambda: flow_step.masked_mse_reference(pred, noise, None, 1)))
    a, va = mk(B, 16, 14), mk(B, 16, 14)
    cond = x0[:, :, :1].contiguous()
    dt = torch.tensor(-0.1, device=device, dtype=dtype)
    out.append(Case("euler_step (video + action)", es * (3 * n + 3 * a.numel() + cond.numel()),
                    lambda: flow_step.euler_step([x0, a], [pred, va], dt, [cond, None]),
                    lambda: flow_step.euler_step_reference([x0, a], [pred, va], dt, [cond, None]), cuda=True))
    return out


def bandwidth_rows(shapes, dtype, device, compile_reference: bool) -> list[dict]:
    peak = peak_bandwidth()
    rows = []
    for shape in shapes:
        for case in cases(shape, dtype, device):
            variants = [("triton", lambda c=case: _with_backend("triton", c.fused)),
                        ("eager", case.reference)]
            if case.cuda and ON_GPU and cuda_ops_loaded():
                variants.insert(1, ("cuda", lambda c=case: _with_backend("cuda", c.fused)))
            if compile_reference:
                variants.append(("torch.compile", torch.compile(case.reference)))
            times = {}
            with torch.no_grad():
                for name, fn in variants:
                    times[name] = time_fn(fn, warmup=3 if ON_GPU else 1, iters=20 if ON_GPU else 3)["median_ms"]
            for name, ms in times.items():
                gbps = case.bytes / (ms * 1e-3) / 1e9
                rows.append({"shape": shape.name, "op": case.op, "impl": name, "ms": ms, "GB/s": gbps,
                             "% HBM peak": None if peak is None else 100 * gbps * 1e9 / peak,
                             "x eager": times["eager"] / ms,
                             "x compile": times["torch.compile"] / ms if "torch.compile" in times else None})
    return rows


def _with_backend(name: str, fn):
    with backend(name):
        return fn()


# ---- launch counts --------------------------------------------------------------------------------------------------
MOTUS_8B_SMALL = {"video.dim": 128, "video.num_heads": 2, "video.ffn_dim": 256, "video.text_dim": 64,
                  "action.dim": 64, "action.ffn_dim": 128, "und.dim": 64, "und.ffn_dim": 128, "und.vlm_dim": 64}

# ATen ops that launch no kernel: views, metadata, allocation, no-op conversions
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::reshape",
    "aten::as_strided", "aten::expand", "aten::expand_as", "aten::permute", "aten::transpose", "aten::t",
    "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::unflatten", "aten::flatten", "aten::alias",
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::contiguous", "aten::to", "aten::result_type", "aten::size", "aten::stride", "aten::numel", "aten::dim",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::resize_", "aten::view_as",
    "aten::broadcast_tensors", "aten::movedim", "aten::swapaxes", "aten::_reshape_alias", "aten::new_empty",
    "aten::promote_types", "aten::scalar_tensor",
}
# ATen ops that are one kernel on a GPU whatever their CPU implementation calls (addmm's CPU path copies the bias
# into the output first; cuBLASLt fuses it): counted once, their sub-ops not at all
ONE_LAUNCH = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmv",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention"}


@contextlib.contextmanager
def triton_launch_scopes():
    """Wrap every Triton kernel launch (compiled or interpreted) in a profiler scope 'triton::<kernel>'."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def scoped(orig):
        def run(self, *args, **kwargs):
            with torch.profiler.record_function(f"triton::{self.fn.__name__}"):
                return orig(self, *args, **kwargs)
        return run
    for cls, orig in saved.items():
        cls.run = scoped(orig)
    try:
        yield
    finally:
        for cls, orig in saved.items():
            cls.run = orig


def count_launches(fn) -> tuple[collections.Counter, int]:
    """(launches by op name, CUDA kernels seen by the profiler or 0 on a CPU) while fn() runs."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ON_GPU else [])
    with triton_launch_scopes(), torch.profiler.profile(activities=acts) as prof:
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    counts: collections.Counter = collections.Counter()

    def visit(e) -> int:
        if e.name.startswith("triton::") or e.name in ONE_LAUNCH:
            counts[e.name] += 1
            return 1
        below = sum(visit(c) for c in e.cpu_children)
        if below == 0 and e.name.startswith("aten::") and e.name not in NO_LAUNCH:
            counts[e.name] += 1
            return 1
        return below
    events = prof.events()
    for e in events:
        if e.cpu_parent is None and e.device_type == torch.autograd.DeviceType.CPU:
            visit(e)
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return counts, kernels


# launch-count configs: (preset, overrides) at two sizes each; the count must come out the same for both
COUNT_CONFIGS = {
    "tiny": [({}, (3, 12, 8)), ({"video.dim": 512, "video.num_heads": 4}, (3, 12, 8))],
    # motus-8b's structure (30 layers, 3 experts, finetune layout) at small widths and 2 heads of 64 / 128 (head
    # dims the joint-attention kernel supports), with two token counts
    "motus-8b": [(dict(MOTUS_8B_SMALL), (3, 4, 4)), (dict(MOTUS_8B_SMALL, **{"video.dim": 256}), (3, 6, 4))],
}


def denoise_step_launches(preset: str, overrides: dict, latents: tuple, mode: str, backend_name: str,
                          device: str):
    """Launches of one denoise step: sample(steps=2) minus sample(steps=1), B = 1."""
    torch.manual_seed(0)
    cfg = get_preset(preset).override(overrides)
    model = Motus(cfg).to(device).eval()
    g = torch.Generator(device).manual_seed(1)
    cond = Conditioning(text=torch.randn(1, 8, cfg.video.text_dim, generator=g, device=device),
                        vlm=torch.randn(1, 10, cfg.und.vlm_dim, generator=g, device=device),
                        state=torch.randn(1, cfg.action.state_dim, generator=g, device=device))
    clip = torch.randn(1, cfg.video.in_channels, *latents, generator=g, device=device)
    actions = torch.randn(1, cfg.action.chunk_size, cfg.action.action_dim, generator=g, device=device)
    kw = dict(cond=cond, num_frames=latents[0], generator=g,
              cond_latent=None if mode == "idm" else clip[:, :, :1], video=clip if mode == "idm" else None,
              actions=actions if mode == "world_model" else None)
    with backend(backend_name), torch.no_grad():
        sample(model, mode, steps=1, **kw)                      # warm-up (first-call compiles, autotuning)
        one, k1 = count_launches(lambda: sample(model, mode, steps=1, **kw))
        two, k2 = count_launches(lambda: sample(model, mode, steps=2, **kw))
    per_step = collections.Counter({k: two[k] - one[k] for k in two if two[k] != one[k]})
    return per_step, k2 - k1


def launch_rows(device: str, modes=("joint", "vla"), presets=tuple(COUNT_CONFIGS)) -> tuple[list[dict], str]:
    fused = "auto" if ON_GPU else "triton"
    rows, details = [], []
    for preset in presets:
        sizes = COUNT_CONFIGS[preset]
        for mode in modes:
            counts = {}
            for name in ("reference", fused):
                totals = []
                for overrides, latents in sizes:
                    per_step, kernels = denoise_step_launches(preset, overrides, latents, mode, name, device)
                    totals.append(sum(per_step.values()))
                assert len(set(totals)) == 1, f"{preset} {mode} {name}: the count depends on the size: {totals}"
                counts[name] = (totals[0], kernels, per_step)
                top = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in per_step.most_common(10))
                details.append(f"- {preset} {mode} {name}: {totals[0]} launches/step; most: {top}")
            ref, fus = counts["reference"], counts[fused]
            rows.append({"config": preset, "mode": mode, "reference launches/step": ref[0],
                         "fused launches/step": fus[0], "reduction": ref[0] / max(fus[0], 1),
                         "CUDA kernels ref/fused": f"{ref[1]}/{fus[1]}" if ON_GPU else None})
    return rows, "\n".join(details)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", action="store_true", help="only count launches per denoise step")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--presets", default=",".join(COUNT_CONFIGS), help="launch-count configs (comma list)")
    ap.add_argument("--modes", default="joint,vla", help="sampling modes of the launch count (comma list)")
    ap.add_argument("--out-dir", default=None, help="where the result files go (default bench/results)")
    args = ap.parse_args(argv)
    device = "cuda" if ON_GPU else "cpu"
    info = device_info()
    if not args.launches:
        dtype = torch.bfloat16 if ON_GPU else torch.float32
        shapes = GPU_SHAPES if ON_GPU else CPU_SHAPES
        rows = bandwidth_rows(shapes, dtype, device, compile_reference=ON_GPU and not args.no_compile)
        write_results("ops_bandwidth", rows,
                      ["shape", "op", "impl", "ms", "GB/s", "% HBM peak", "x eager", "x compile"],
                      notes=f"dtype {dtype}; bytes = minimum traffic (each input read once, each output written "
                            f"once); device {info.get('gpu') or info.get('cpu')}", out_dir=args.out_dir)
    rows, details = launch_rows(device, tuple(args.modes.split(",")), tuple(args.presets.split(",")))
    write_results("ops_launches", rows, ["config", "mode", "reference launches/step", "fused launches/step",
                                         "reduction", "CUDA kernels ref/fused"],
                  notes="Per denoise step (sample(steps=2) - sample(steps=1)), B=1. motus-8b: its structure "
                        "(30 layers, 3 experts, finetune layout) at reduced widths, heads and token counts; each "
                        "count was the same at two sizes.\n\n" + details, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
