"""The CUDA C++ ops (csrc/).

On every machine with nvcc (CPU CI included): the .cu sources compile for sm_80 and sm_90a with no register
spills, ops.cpp compiles against torch's headers, and the top-level CMakeLists.txt configures, builds, links and
installs the library, which then registers the op schemas motus_fast.ops calls. (A CPU torch cannot run the
kernels; building and loading the library still checks everything but the device code's behaviour.)

On a GPU (``pytest -m gpu``): the ops against the fp64 reference with DESIGN.md section 6's rule, in fp32, fp16 and
bf16, at motus-8b and odd shapes, strided inputs, under CUDA-graph capture, and through the public API
(MOTUS_BACKEND=cuda). If the extension is not installed, these tests JIT-build it from csrc/.
"""

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motus_fast import backend as backend_mod
from kernel_checks import assert_fa_rule

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CU_SOURCES = ["adaln.cu", "euler_step.cu"]
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
SCHEMAS = {
    "adaln_modulate": "motus_fast_cuda::adaln_modulate(Tensor x, Tensor? shift, Tensor? scale, float eps, "
                      "bool rms) -> Tensor",
    "gated_residual_adaln": "motus_fast_cuda::gated_residual_adaln(Tensor x, Tensor y, Tensor? gate, Tensor? shift, "
                            "Tensor? scale, float eps, bool rms) -> (Tensor, Tensor)",
    "euler_step": "motus_fast_cuda::euler_step(Tensor[] xs, Tensor[] vs, Tensor dt, Tensor?[] conds) -> Tensor[]",
}


def find_nvcc():
    from torch.utils.cpp_extension import CUDA_HOME
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", CUDA_HOME and f"{CUDA_HOME}/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    pytest.skip("nvcc not found: the CUDA C++ sources cannot be compile-checked here")


def demangle(name: str) -> str:
    """'adaln_kernel<__nv_bfloat16, 8, true>' from the mangled name (c++filt, if present)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    full = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
    short = re.search(r"(\w+<[^()]*>)\(", full)
    return short.group(1) if short else full


def run_all(cmds, cwd, timeout=300):
    """Run the commands in parallel (one per core); fail with the compiler's message if any fails."""
    procs = [(cmd, subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for cmd in cmds]
    outputs = []
    for cmd, p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
        outputs.append(out)
    return outputs


# ---- compile checks (any machine with nvcc) ----------------------------------------------------------------------
def test_cuda_sources_compile_for_sm80_and_sm90a_without_spills(tmp_path, capsys):
    from torch.utils.cpp_extension import include_paths

    nvcc = find_nvcc()
    cmds = [[nvcc, "-c", str(CSRC / cu), "-o", str(tmp_path / f"{cu}.o"), "-std=c++17", "-O3", *GENCODE,
             "-Xptxas", "-v"] for cu in CU_SOURCES]
    cmds.append([nvcc, "-c", str(CSRC / "ops.cpp"), "-o", str(tmp_path / "ops.o"), "-std=c++20", "-O2",
                 *(f"-I{p}" for p in include_paths())])
    outputs = run_all(cmds, cwd=REPO)
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'" ... "N bytes spill stores, M bytes spill loads" ...
    # "Used R registers"
    report, spilled = [], []
    for out in outputs[:len(CU_SOURCES)]:
        for fn, arch, body in re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'(.*?)(?=Compiling entry|\Z)",
                                         out, re.S):
            st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body).groups())
            regs = int(re.search(r"Used (\d+) registers", body).group(1))
            line = f"{demangle(fn)} {arch}: regs={regs} spills(st/ld)={st}/{ld}"
            report.append(line)
            if st or ld:
                spilled.append(line)
    assert len(report) >= 2 * len(CU_SOURCES), f"no ptxas report parsed:\n{outputs[0][-2000:]}"
    with capsys.disabled():
        print("\ncsrc ptxas report:\n  " + "\n  ".join(sorted(report)))
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_cmake_builds_installs_and_registers_the_ops(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    nvcc = find_nvcc()
    build, prefix = tmp_path / "build", tmp_path / "install"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(REPO), "-B", str(build), *gen, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    run_all([configure], cwd=REPO)
    run_all([[cmake, "--build", str(build), "-j", "2"]], cwd=REPO)
    run_all([[cmake, "--install", str(build), "--prefix", str(prefix)]], cwd=REPO)
    lib = prefix / "motus_fast" / "_cuda_ops.so"
    assert lib.is_file(), f"cmake --install did not produce {lib}"
    # load it in a fresh process: the schemas are what motus_fast.ops calls and fakes
    script = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
              "[print(getattr(torch.ops.motus_fast_cuda, n).default._schema) for n in sys.argv[2:]]")
    out = subprocess.run([sys.executable, "-c", script, str(lib), *SCHEMAS], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split("\n")[:len(SCHEMAS)] == list(SCHEMAS.values())


# ---- GPU: the kernels against the reference --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_ops():
    """The installed extension, or a JIT build of csrc/ (registers the same torch.ops.motus_fast_cuda ops)."""
    from motus_fast.ops.availability import cuda_ops_loaded
    if not cuda_ops_loaded():
        from torch.utils.cpp_extension import load
        load(name="motus_fast_cuda_ops_jit", sources=[str(CSRC / f) for f in ("ops.cpp", *CU_SOURCES)],
             extra_cuda_cflags=["-O3"], is_python_module=False)
        assert cuda_ops_loaded(), "the JIT-built library did not register torch.ops.motus_fast_cuda"
    return torch.ops.motus_fast_cuda


def draw(B, L, D, mod, dtype, seed, stride_pad=0):
    """(fp64 CPU inputs, the same as strided `dtype` CUDA views): x, y [B, L, D] (rows D + stride_pad apart in
    memory), gate/shift/scale as chunks of one [B, 1|L, 6, D] table (or None), as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) + 0.2)  # noqa: E731
    x_full, y_full = mk(B, L, D + stride_pad), mk(B, L, D + stride_pad)
    rows = {"sample": 1, "token": L}.get(mod)
    table = None if rows is None else 0.5 * mk(B, rows, 6, D)

    def views(x_full, y_full, table):
        mods = (None, None, None) if table is None else table.unbind(2)[:3]
        return [x_full[..., :D], y_full[..., :D], *mods]
    cuda = lambda t: None if t is None else t.to("cuda", dtype)  # noqa: E731
    return views(x_full, y_full, table), views(cuda(x_full), cuda(y_full), cuda(table))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,D,mod,pad", [(1, 360, 3072, "sample", 0), (8, 4096, 3072, "sample", 0),
                                           (2, 21, 1024, "token", 0), (3, 7, 512, None, 0), (2, 5, 96, "sample", 8),
                                           (2, 9, 123, "token", 0), (1, 3, 3072, "sample", 3)])
@pytest.mark.parametrize("rms", [False, True])
def test_adaln_ops_match_reference(cuda_ops, dtype, B, L, D, mod, pad, rms):
    from motus_fast.ops.adaln import adaln_modulate_reference, gated_residual_adaln_reference

    (x, y, gate, shift, scale), (xc, yc, gc, shc, scc) = draw(B, L, D, mod, dtype, seed=L + D, stride_pad=pad)
    norm = "rms" if rms else "layer"
    h = cuda_ops.adaln_modulate(xc, shc, scc, 1e-6, rms)
    assert_fa_rule("adaln_modulate", h, adaln_modulate_reference(x, shift, scale, 1e-6, norm),
                   adaln_modulate_reference(xc, shc, scc, 1e-6, norm), 2)
    for g, gcu in ((gate, gc), (None, None)):
        got = cuda_ops.gated_residual_adaln(xc, yc, gcu, shc, scc, 1e-6, rms)
        want = gated_residual_adaln_reference(x, y, g, shift, scale, 1e-6, norm)
        same = gated_residual_adaln_reference(xc, yc, gcu, shc, scc, 1e-6, norm)
        for i in range(2):
            assert_fa_rule(f"gated_residual_adaln[{i}] gate={g is not None}", got[i], want[i], same[i], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample_dt", [False, True])
def test_euler_step_matches_reference(cuda_ops, dtype, per_sample_dt):
    from motus_fast.ops.flow_step import euler_step_reference

    g = torch.Generator().manual_seed(2 * per_sample_dt)
    shapes = [(2, 48, 3, 24, 20), (2, 16, 14), (2, 5, 3, 7, 3)]   # video, actions, an odd video (second launch)
    xs, vs = ([torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(2))
    conds = [torch.randn(2, 48, 1, 24, 20, generator=g, dtype=torch.float64), None,
             torch.randn(2, 5, 2, 7, 3, generator=g, dtype=torch.float64)]
    dt = -torch.rand(2 if per_sample_dt else (), generator=g, dtype=torch.float64)
    to = lambda ts: [None if t is None else t.to("cuda", dtype) for t in ts]  # noqa: E731
    got = cuda_ops.euler_step(to(xs), to(vs), dt.to("cuda", dtype), to(conds))
    dt_q = dt.to(dtype).double()
    want = euler_step_reference(xs, vs, dt_q, conds)
    same = euler_step_reference(to(xs), to(vs), dt.to("cuda", dtype), to(conds))
    for i in range(3):
        assert_fa_rule(f"stream {i}", got[i], want[i], same[i], 2)
        if conds[i] is not None:
            assert torch.equal(got[i][:, :, :conds[i].shape[2]], to(conds)[i])


@pytest.mark.gpu
def test_ops_capture_in_a_cuda_graph(cuda_ops):
    """The inference path runs under CUDA graphs: the ops must capture and replay (no host syncs)."""
    x = torch.randn(1, 360, 3072, device="cuda", dtype=torch.bfloat16)
    m = torch.randn(1, 1, 6, 3072, device="cuda", dtype=torch.bfloat16)
    lat, v = (torch.randn(1, 48, 3, 24, 20, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dt = torch.tensor(-0.1, device="cuda", dtype=torch.bfloat16)
    run = lambda: (cuda_ops.gated_residual_adaln(x, x, m[:, :, 2], m[:, :, 0], m[:, :, 1], 1e-6, False),  # noqa
                   cuda_ops.euler_step([lat], [v], dt, [lat[:, :, :1]]))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.add_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    fresh = run()
    assert torch.equal(captured[0][1], fresh[0][1]) and torch.equal(captured[1][0], fresh[1][0])
    assert not torch.equal(captured[0][1], eager[0][1])


@pytest.mark.gpu
def test_public_api_uses_cuda_for_inference_and_triton_for_gradients(cuda_ops, monkeypatch, caplog):
    from motus_fast.ops import euler_step, gated_residual_adaln

    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    monkeypatch.setattr(backend_mod, "_logged", set())
    x = torch.randn(2, 9, 1024, device="cuda", dtype=torch.bfloat16)
    m = torch.randn(2, 1, 3, 1024, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        with torch.no_grad():
            gated_residual_adaln(x, x, m[:, :, 0], m[:, :, 1], m[:, :, 2], 1e-6)
            euler_step([x], [x], torch.tensor(-0.1, device="cuda", dtype=torch.bfloat16))
        assert "gated_residual_adaln: using the cuda backend" in caplog.text
        assert "euler_step: using the cuda backend" in caplog.text
        monkeypatch.setattr(backend_mod, "_logged", set())
        xg = x.clone().requires_grad_()
        gated_residual_adaln(xg, x, m[:, :, 0], m[:, :, 1], m[:, :, 2], 1e-6)[1].float().sum().backward()
        assert "gated_residual_adaln: using the triton backend" in caplog.text
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
