"""Joint attention benchmark: our Triton kernel against torch SDPA, torch varlen attention, FlexAttention and
flash-attn, forward and forward+backward.

    python -m bench.attention                  # on an H100: bf16, 24 heads x 128, the three shapes below
    python -m bench.attention --sweep          # also time alternative tile configurations of our kernels
    python -m bench.attention --profile        # torch-profiler trace (Perfetto / chrome://tracing) + kernel table
    python -m bench.attention --tune           # time every MOTUS_BACKEND=auto candidate per shape class, write
                                               # bench/results/attention_table.json, then time auto against them

Shapes (per sample: video | action | und tokens): ``inference`` B=1, 360 | 21 | 150 (motus-8b, one camera);
``training`` B=8 of the same; ``long`` B=1, 16384 | 21 | 150. Each runs with all experts visible (upstream) and
with the prefix-cache mask (und sees only und: "clean tokens do not see noisy tokens"); the dense baselines can
only express the mask as an explicit boolean mask (SDPA) or a mask_mod (Flex).

Baselines get the tokens already packed per sample as [video | action | und] (no copy is timed for them); ours
reads the three expert buffers in place. FLOPs follow FlashAttention's convention: forward 4 * (visible
query-key pairs) * H * D, backward 2.5x forward. Timing: CUDA events, warm-up, median (bench/common.py).
On a CPU the same code runs tiny fp32 shapes (our kernels under TRITON_INTERPRET=1); those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")        # read when the Triton kernels are imported

from bench.common import backend, device_info, kernel_table, peak_tflops, time_fn, write_results  # noqa: E402
from motus_fast.ops.joint_attention import joint_attention, varlen_attention  # noqa: E402

PREFIX_CACHE_MASK = [[True, True, True], [True, True, True], [False, False, True]]   # und sees only und


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    lengths: tuple[int, int, int]      # video, action, und tokens per sample
    heads: int
    head_dim: int


GPU_SHAPES = [Shape("inference", 1, (360, 21, 150), 24, 128), Shape("training", 8, (360, 21, 150), 24, 128),
              Shape("long", 1, (16384, 21, 150), 24, 128)]
CPU_SHAPES = [Shape("tiny", 1, (40, 5, 12), 2, 64), Shape("tiny-batch", 2, (40, 5, 12), 2, 64)]


# ---- problem ------------------------------------------------------------------------------------------------------
class Problem:
    """The same random q/k/v once per expert buffer ([T_e, H, D]) and once packed per sample ([T, H, D])."""

    def __init__(self, shape: Shape, masked: bool, dtype, device):
        self.shape, self.masked = shape, masked
        B, H, D = shape.batch, shape.heads, shape.head_dim
        gen = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda n: torch.randn(n, H, D, generator=gen).to(device, dtype)  # noqa: E731
        self.q, self.k, self.v, self.do = ([mk(B * n) for n in shape.lengths] for _ in range(4))
        self.cu = [torch.arange(B + 1, dtype=torch.int32, device=device) * n for n in shape.lengths]
        self.visible = torch.tensor(PREFIX_CACHE_MASK) if masked else None
        L = sum(shape.lengths)
        per_sample = lambda ts: torch.cat(  # noqa: E731  [T_e, H, D] x3 -> [B * L, H, D], [video|action|und] per sample
            [t.view(B, n, H, D) for t, n in zip(ts, shape.lengths)], dim=1).reshape(B * L, H, D)
        self.packed = [per_sample(ts) for ts in (self.q, self.k, self.v, self.do)]
        self.cu_packed = torch.arange(B + 1, dtype=torch.int32, device=device) * L
        expert = torch.cat([torch.full((n,), e, device=device) for e, n in enumerate(shape.lengths)])
        vis = torch.tensor(PREFIX_CACHE_MASK if masked else [[True] * 3] * 3, device=device)
        self.dense_mask = vis[expert[:, None], expert[None, :]]                     # [L, L] per sample
        self.expert_of = expert.repeat(B)                                            # packed index -> expert
        self.sample_of = torch.arange(B, device=device).repeat_interleave(L)         # packed index -> sample
        self.vis_table = vis

    def flops_fwd(self) -> float:
        lens = self.shape.lengths
        vis = self.vis_table.cpu()
        pairs = sum(lens[i] * lens[j] for i in range(3) for j in range(3) if vis[i, j])
        return 4.0 * self.shape.batch * pairs * self.shape.heads * self.shape.head_dim


# ---- methods: each returns (forward(), forward_backward()) closures, or raises Unavailable -----------------------
class Unavailable(Exception):
    pass


def _fwd_bwd(forward: Callable[[list], list], inputs: list, grads: list):
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        outs = forward(leaves)
        torch.autograd.grad(outs, leaves, grads)
    return run


def motus_joint(p: Problem):
    bounds = list(p.shape.lengths)

    def forward(xs):
        with backend("triton"):
            return joint_attention(xs[0:3], xs[3:6], xs[6:9], p.cu, p.visible, max_seqlens=bounds)

    def fwd():
        with torch.no_grad():
            forward(p.q + p.k + p.v)
    return fwd, _fwd_bwd(forward, p.q + p.k + p.v, p.do)


def motus_varlen_packed(p: Problem):
    if p.masked:
        raise Unavailable("no expert mask in the single-buffer API")
    L = sum(p.shape.lengths)

    def forward(xs):
        with backend("triton"):
            return [varlen_attention(*xs, p.cu_packed, p.cu_packed, L, L)]

    def fwd():
        with torch.no_grad():
            forward(p.packed[:3])
    return fwd, _fwd_bwd(forward, p.packed[:3], p.packed[3:])


def sdpa(p: Problem):
    B, L = p.shape.batch, sum(p.shape.lengths)
    H, D = p.shape.heads, p.shape.head_dim
    mask = p.dense_mask if p.masked else None

    def forward(xs):
        q, k, v = (x.view(B, L, H, D).transpose(1, 2) for x in xs)
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask)]

    def fwd():
        with torch.no_grad():
            forward(p.packed[:3])
    grads = [p.packed[3].view(B, L, H, D).transpose(1, 2)]
    return fwd, _fwd_bwd(forward, p.packed[:3], grads)


def torch_varlen(p: Problem):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise Unavailable(f"torch.nn.attention.varlen missing ({err})")
    if not ON_GPU:
        raise Unavailable("needs CUDA")
    if p.masked:
        raise Unavailable("no expert mask")
    L = sum(p.shape.lengths)

    def forward(xs):
        return [varlen_attn(*xs, p.cu_packed, p.cu_packed, L, L)]

    def fwd():
        with torch.no_grad():
            forward(p.packed[:3])
    return fwd, _fwd_bwd(forward, p.packed[:3], p.packed[3:])


def flash_attn(p: Problem):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise Unavailable(f"flash-attn not installed ({err.__class__.__name__})")
    if p.masked:
        raise Unavailable("no expert mask")
    L = sum(p.shape.lengths)

    def forward(xs):
        return [flash_attn_varlen_func(*xs, p.cu_packed, p.cu_packed, L, L)]

    def fwd():
        with torch.no_grad():
            forward(p.packed[:3])
    return fwd, _fwd_bwd(forward, p.packed[:3], p.packed[3:])


def flex(p: Problem):
    """The flex_attention kernel alone, on the pre-packed tokens with its block mask built once outside the timing
    (like the other baselines). The auto candidate ``flex`` (attention_dispatch.flex_joint: expert buffers
    concatenated, block mask per call) is timed with its overheads by ``--tune``; the two rows differ by them."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sample_of, expert_of, vis = p.sample_of, p.expert_of, p.vis_table

    def same_sample_visible(b, h, q_idx, kv_idx):
        return (sample_of[q_idx] == sample_of[kv_idx]) & vis[expert_of[q_idx], expert_of[kv_idx]]

    T = p.packed[0].shape[0]
    device = p.packed[0].device
    block_mask = create_block_mask(same_sample_visible, None, None, T, T, device=str(device))
    attend = torch.compile(flex_attention) if ON_GPU else flex_attention

    def forward(xs):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in xs)                    # [1, H, T, D]
        return [attend(q, k, v, block_mask=block_mask)]

    def fwd():
        with torch.no_grad():
            forward(p.packed[:3])
    grads = [p.packed[3].transpose(0, 1).unsqueeze(0)]
    return fwd, _fwd_bwd(forward, p.packed[:3], grads)


def reference(p: Problem):
    def forward(xs):
        with backend("reference"):
            return [o for o in joint_attention(xs[0:3], xs[3:6], xs[6:9], p.cu, p.visible)]

    def fwd():
        with torch.no_grad():
            forward(p.q + p.k + p.v)
    return fwd, _fwd_bwd(forward, p.q + p.k + p.v, p.do)


METHODS = {"motus joint (triton)": motus_joint, "motus varlen packed (triton)": motus_varlen_packed,
           "torch sdpa": sdpa, "torch varlen": torch_varlen, "flex attention": flex, "flash-attn varlen": flash_attn,
           "reference (per-sample sdpa)": reference}


def check_against_sdpa(p: Problem) -> float:
    """Max |ours - SDPA| on this problem: a fast but wrong kernel must not produce a table row unnoticed."""
    with torch.no_grad(), backend("triton"):
        ours = joint_attention(p.q, p.k, p.v, p.cu, p.visible, max_seqlens=list(p.shape.lengths))
    B, L = p.shape.batch, sum(p.shape.lengths)
    H, D = p.shape.heads, p.shape.head_dim
    q, k, v = (x.view(B, L, H, D).transpose(1, 2).float() for x in p.packed[:3])
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=p.dense_mask).transpose(1, 2)
    split = dense.split(list(p.shape.lengths), dim=1)
    return max((o.float().view(B, -1, H, D) - s).abs().max().item() for o, s in zip(ours, split))


# ---- driver ---------------------------------------------------------------------------------------------------------
def run(shapes, modes, warmup: int, iters: int, dtype) -> list[dict]:
    device = "cuda" if ON_GPU else "cpu"
    peak = peak_tflops()
    rows = []
    for shape in shapes:
        for masked in (False, True):
            p = Problem(shape, masked, dtype, device)
            err = check_against_sdpa(p)
            tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
            if err > tolerance:
                raise RuntimeError(f"{shape.name}: our kernel differs from SDPA by {err:.3e}; not benchmarking it")
            motus_ms = {}
            for method, build in METHODS.items():
                try:
                    closures = dict(zip(("fwd", "fwd+bwd"), build(p)))
                except Unavailable as why:
                    print(f"  {shape.name:10s} {'masked' if masked else 'full':6s} {method}: skipped ({why})")
                    continue
                for mode in modes:
                    row = dict(shape=shape.name, batch=shape.batch, tokens="+".join(map(str, shape.lengths)),
                               mask="prefix-cache" if masked else "none", method=method, mode=mode)
                    try:
                        t = time_fn(closures[mode], warmup=warmup, iters=iters)
                    except Exception as ex:                    # report, never hide: the row says what failed
                        row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"
                        rows.append(row)
                        print(f"  {shape.name:10s} {'masked' if masked else 'full':6s} {method} {mode}: failed "
                              f"({row['error']})")
                        continue
                    flops = p.flops_fwd() * (3.5 if mode == "fwd+bwd" else 1.0)
                    tflops = flops / (t["median_ms"] * 1e-3) / 1e12
                    row.update(median_ms=t["median_ms"], tflops=tflops,
                               pct_peak=None if peak is None else 100 * tflops / peak)
                    if method.startswith("motus joint"):
                        motus_ms[mode] = t["median_ms"]
                        row["max_err_vs_sdpa"] = err
                    row["time_vs_motus"] = (t["median_ms"] / motus_ms[mode]) if mode in motus_ms else None
                    rows.append(row)
    return rows


def sweep(shape: Shape, warmup: int, iters: int, dtype, kernels=("fwd", "dkdv", "dq", "hopper")) -> list[dict]:
    """Time alternative tile configurations of our kernels (GPU): to retune kernels/joint_attention.py and
    kernels/joint_attention_hopper.py (kind ``hopper``: the Hopper forward, on sm_90 only)."""
    from motus_fast.kernels.joint_attention import (AttentionConfig, BlockConfig, attention_backward,
                                                     attention_forward, default_config, visibility_bits)

    p = Problem(shape, False, dtype, "cuda")
    base = default_config(shape.head_dim, dtype)
    fwd_tiles = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
    dkdv_tiles = [(32, 64, 8, 3), (16, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 2), (16, 64, 4, 3)]
    dq_tiles = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)]
    bits = visibility_bits(None, 3)
    bounds = list(shape.lengths)
    scale = 1 / math.sqrt(shape.head_dim)
    out, lse = attention_forward(p.q, p.k, p.v, p.cu, p.cu, bounds, visible_bits=bits, softmax_scale=scale)
    rows = []

    def timed(row, fn):
        try:
            row["median_ms"] = time_fn(fn, warmup=warmup, iters=iters)["median_ms"]
        except Exception as ex:                              # e.g. out of shared memory: say so
            row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"
        rows.append(row)
        print(row)

    for kind, tiles in (("fwd", fwd_tiles), ("dkdv", dkdv_tiles), ("dq", dq_tiles)):
        if kind not in kernels:
            continue
        for tile in tiles:
            blocks = BlockConfig(*tile)
            cfg = AttentionConfig(fwd=blocks if kind == "fwd" else base.fwd,
                                  dkdv=blocks if kind == "dkdv" else base.dkdv, dq=blocks if kind == "dq" else base.dq)
            if kind == "fwd":
                fn = lambda: attention_forward(p.q, p.k, p.v, p.cu, p.cu, bounds, visible_bits=bits,  # noqa: E731
                                               softmax_scale=scale, config=cfg)
            else:
                fn = lambda: attention_backward(p.do, p.q, p.k, p.v, out, lse, p.cu, p.cu, bounds,  # noqa: E731
                                                bounds, visible_bits=bits, softmax_scale=scale, config=cfg)
            timed(dict(shape=shape.name, kernel=kind, tile="%dx%d w%d s%d" % tile,
                       default=(blocks == getattr(base, kind))), fn)
    if "hopper" in kernels and torch.cuda.get_device_capability()[0] == 9:
        from motus_fast.kernels import joint_attention_hopper as JH

        base_h = JH.default_config(shape.head_dim, dtype)
        for tile in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)]:
            cfg_h = JH.HopperConfig(*tile)
            fn = lambda: JH.attention_forward(p.q, p.k, p.v, p.cu, p.cu, bounds, visible_bits=bits,  # noqa: E731
                                              softmax_scale=scale, config=cfg_h)
            timed(dict(shape=shape.name, kernel="hopper fwd", tile="%dx%d w%d s%d" % tile,
                       default=(cfg_h == base_h)), fn)
    return rows


LATE_CANDIDATES = ("flex",)   # torch.compile per shape: timed last by --tune (see tune)


def tune(shapes, warmup: int, iters: int, dtype, table_path) -> list[dict]:
    """Forward time of every auto candidate (motus_fast/ops/attention_dispatch.py) at each shape, all-visible and
    masked; the fastest that runs becomes the table entry of its key, written to `table_path` after every timed
    candidate, so a GPU session's time limit cutting this phase keeps what was measured. Candidates that compile
    per shape (LATE_CANDIDATES: flex, tens of seconds each on a GPU) are timed after every other candidate of every
    key. Then auto itself is timed with that table (it should match the best candidate)."""
    import json
    import sys
    from pathlib import Path

    from motus_fast.ops import attention_dispatch as AD

    JA = sys.modules["motus_fast.ops.joint_attention"]   # the module (motus_fast.ops exports the function)

    device = torch.device("cuda" if ON_GPU else "cpu")
    rows, entries = [], {}
    table_path = Path(table_path)
    old = json.loads(table_path.read_text()).get("entries", []) if table_path.exists() else []

    def write_table():   # the old entries of other keys, and this run's
        kept = [e for e in old if (e["op"], e["capability"], e["dtype"], e["shape_class"]) not in entries]
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps({"device": device_info(), "entries": kept + list(entries.values())},
                                         indent=2))

    timings: dict = {}
    for late in (False, True):   # candidates slow to start (compiling per shape) after all others of every key
        for shape in shapes:
            for masked in (False, True):
                p = Problem(shape, masked, dtype, device)
                visible = None if p.visible is None else p.visible.tolist()
                bounds = list(shape.lengths)
                cls = AD.shape_class(visible, bounds)
                key = AD.table_key("joint_attention", device, dtype, cls)
                timed = timings.setdefault(key, {})
                for cand in AD.CANDIDATES:
                    if (cand in LATE_CANDIDATES) != late:
                        continue
                    why = AD.runnable(cand, device, cls, inputs=(p.q, p.k, p.v))
                    if why is None and cand == "triton" and not JA._triton_can_run(p.k[0], 3):
                        why = "our kernel does not run on these tensors"
                    if why is not None:
                        rows.append(dict(shape=shape.name, shape_class=cls, method=cand, error=why))
                        print(rows[-1], flush=True)
                        continue
                    fn = _candidate_call(cand, p, visible, bounds)
                    timed[cand] = time_fn(fn, warmup=warmup, iters=iters)["median_ms"]
                    rows.append(dict(shape=shape.name, shape_class=cls, method=cand, median_ms=timed[cand]))
                    entries[key] = dict(op=key[0], capability=key[1], dtype=key[2], shape_class=key[3],
                                        choice=min(timed, key=timed.get), shape=shape.name, median_ms=dict(timed))
                    write_table()
                    print(rows[-1], flush=True)   # (the log keeps what a cut-off phase measured)
    print(f"wrote {table_path}")
    # auto with the new table, side by side with the candidates
    with attention_table(table_path):
        for shape in shapes:
            for masked in (False, True):
                p = Problem(shape, masked, dtype, device)
                visible = None if p.visible is None else p.visible.tolist()
                bounds = list(shape.lengths)
                fn = _candidate_call("auto", p, visible, bounds)
                rows.append(dict(shape=shape.name, shape_class=AD.shape_class(visible, bounds), method="auto",
                                 median_ms=time_fn(fn, warmup=warmup, iters=iters)["median_ms"]))
    return rows


@contextlib.contextmanager
def attention_table(path, keep_plans: bool = False):
    """MOTUS_ATTENTION_TABLE=path inside the block (the table is re-read and plans rebuilt there), restored after;
    with keep_plans the plans built inside stay cached."""
    import sys

    from motus_fast.ops import attention_dispatch as AD

    JA = sys.modules["motus_fast.ops.joint_attention"]   # the module (motus_fast.ops exports the function)
    saved = os.environ.get(AD.TABLE_ENV)
    os.environ[AD.TABLE_ENV] = str(path)
    AD.load_table.cache_clear()
    JA._PLANS.clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(AD.TABLE_ENV)
        else:
            os.environ[AD.TABLE_ENV] = saved
        AD.load_table.cache_clear()
        if not keep_plans:
            JA._PLANS.clear()


def profile(shapes, dtype, out_dir) -> list[dict]:
    """One torch-profiler trace of the inference forward of ours and of SDPA (the reference) at each shape, all
    experts visible, written as attention_trace.json (open it in Perfetto), and a per-kernel table: time per call,
    and for attention kernels TFLOP/s and % of the bf16 dense peak (FlashAttention's FLOP convention)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    device = torch.device("cuda" if ON_GPU else "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    problems = [Problem(shape, False, dtype, device) for shape in shapes]
    calls = [(p, cand, _candidate_call(cand, p, None, list(p.shape.lengths))) for p in problems
             for cand in ("triton", "sdpa")]
    for _, _, fn in calls:                     # warm-up outside the trace (compiles, autotuning)
        fn()
    with torch_profile(activities=activities) as prof:
        for p, cand, fn in calls:
            with record_function(f"bench {p.shape.name} {cand}"):
                fn()
            if ON_GPU:
                torch.cuda.synchronize()
    out = Path(out_dir or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "attention_trace.json"
    prof.export_chrome_trace(str(trace))
    print(f"wrote {trace}")
    flops_per_call = sum(p.flops_fwd() for p in problems) / len(problems)   # exact for one shape (--shapes X)

    def flops(ev):   # attention kernels only
        attention = not ev.key.startswith(("aten::", "bench ")) and any(
            s in ev.key.lower() for s in ("_fwd_kernel", "flash", "attention", "fmha", "sdpa"))
        return flops_per_call if attention else None
    return kernel_table(prof, ON_GPU, flops, peak_tflops())


def _candidate_call(candidate: str, p: Problem, visible, bounds) -> Callable[[], object]:
    """Inference forward (no grad) of one auto candidate, or of auto itself, through the public op."""
    from motus_fast.ops import attention_dispatch as AD

    if candidate in ("triton_hopper", "flex"):   # no MOTUS_BACKEND names them: auto with a table that picks one
        return _auto_with_choice(candidate, p, visible, bounds)

    def fwd():
        with torch.no_grad():
            if candidate == "flash_attn":
                AD.flash_attn_joint(p.q, p.k, p.v, p.cu, bounds, p.shape.head_dim ** -0.5)
                return
            name = {"triton": "triton", "sdpa": "reference", "auto": "auto"}[candidate]
            with backend(name):
                joint_attention(p.q, p.k, p.v, p.cu, visible, max_seqlens=bounds)
    return fwd


def _auto_with_choice(candidate: str, p: Problem, visible, bounds) -> Callable[[], object]:
    """The public op under MOTUS_BACKEND=auto with a one-entry table naming `candidate` for this call's key, so the
    candidate is timed with the same host path as the others. The table only matters when the plan is built (the
    first call, made here); later calls reuse that plan."""
    import json
    import tempfile
    from pathlib import Path

    from motus_fast.ops import attention_dispatch as AD

    key = AD.table_key("joint_attention", p.k[0].device, p.k[0].dtype, AD.shape_class(visible, bounds))
    path = Path(tempfile.gettempdir()) / f"motus_attention_table_{candidate}.json"
    path.write_text(json.dumps({"entries": [dict(zip(("op", "capability", "dtype", "shape_class"), key),
                                                 choice=candidate)]}))

    def fwd():
        with torch.no_grad(), backend("auto"):
            joint_attention(p.q, p.k, p.v, p.cu, visible, max_seqlens=bounds)

    with attention_table(path, keep_plans=True):
        fwd()                                # builds (and caches) the plan with the one-entry table
    return fwd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list of shape names (default: all for this device)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--warmup", type=int, default=10 if ON_GPU else 1)
    ap.add_argument("--iters", type=int, default=50 if ON_GPU else 3)
    ap.add_argument("--sweep", action="store_true", help="GPU: also time alternative tile configurations")
    ap.add_argument("--sweep-only", action="store_true", help="GPU: only the tile sweep (no comparison table)")
    ap.add_argument("--sweep-kernels", default="fwd,dkdv,dq,hopper", help="which kernels the sweep retiles")
    ap.add_argument("--tune", action="store_true", help="time the auto candidates, write the dispatch table")
    ap.add_argument("--profile", action="store_true", help="torch-profiler trace and per-kernel table")
    ap.add_argument("--table", default=None, help="where --tune writes the table (default: the one auto reads)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    shapes = GPU_SHAPES if ON_GPU else CPU_SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in GPU_SHAPES + CPU_SHAPES if s.name in wanted]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    info = device_info()
    print(f"bench.attention on {info.get('gpu') or 'CPU'}: {dtype}, peak {peak_tflops()} TFLOP/s (bf16 dense)")
    if args.profile:
        rows = profile(shapes, dtype, args.out_dir)
        write_results("attention_profile", rows, ["kernel", "calls", "total_ms", "ms_per_call", "pct_time",
                                                   "tflops", "pct_peak"],
                      notes="Self device time per kernel (CPU time on a CPU) over one inference forward of ours "
                            "and of SDPA per shape; trace: attention_trace.json.", out_dir=args.out_dir)
        return
    if args.tune:
        from motus_fast.ops.attention_dispatch import default_table_path

        rows = tune(shapes, args.warmup, args.iters, dtype, args.table or default_table_path())
        write_results("attention_tune", rows, ["shape", "shape_class", "method", "median_ms", "error"],
                      notes="Inference forward per MOTUS_BACKEND=auto candidate; 'auto' is timed with the table "
                            "just written.", out_dir=args.out_dir)
        return
    if args.sweep_only:
        args.sweep = True
    rows = [] if args.sweep_only else run(shapes, args.modes.split(","), args.warmup, args.iters, dtype)
    columns = ["shape", "batch", "tokens", "mask", "method", "mode", "median_ms", "tflops", "pct_peak",
               "time_vs_motus", "max_err_vs_sdpa", "error"]
    notes = ("tflops: FlashAttention convention (fwd 4*pairs*H*D, fwd+bwd 3.5x). time_vs_motus > 1: the method "
             "is slower than ours. Baselines read pre-packed [video|action|und] buffers; ours reads the three "
             "expert buffers in place. prefix-cache mask: und tokens see only und tokens.")
    if rows:
        write_results("attention", rows, columns, notes=notes, out_dir=args.out_dir)
    if args.sweep:
        if not ON_GPU:
            print("--sweep needs a GPU; skipped")
        else:
            kernels = tuple(args.sweep_kernels.split(","))
            sweep_rows = [r for s in shapes for r in sweep(s, args.warmup, args.iters, dtype, kernels)]
            write_results("attention_sweep", sweep_rows, ["shape", "kernel", "tile", "default", "median_ms", "error"],
                          out_dir=args.out_dir)


if __name__ == "__main__":
    main()
