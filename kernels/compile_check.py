"""Ahead-of-time compile of a @triton.jit kernel for H100 (sm_90a) on a machine without a GPU, plus its resource
usage read with the ptxas shipped in the triton wheel. Used by the compile tests; must run in a process where
``TRITON_INTERPRET`` is unset (the interpreter replaces @triton.jit functions)."""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class CompileReport:
    name: str
    n_regs: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_mem_bytes: int
    num_warps: int
    vector_loads: int = 0      # 16-byte global accesses in the PTX (ld/st.global[.modifiers].v4.b32 or .v2.b64)
    vector_stores: int = 0

    def line(self) -> str:
        return (f"{self.name}: regs={self.n_regs} spills(st/ld)={self.spill_store_bytes}/{self.spill_load_bytes} "
                f"smem={self.shared_mem_bytes}B warps={self.num_warps} "
                f"v4 ld/st={self.vector_loads}/{self.vector_stores}")


def vector_accesses(ptx: str) -> tuple[int, int]:
    """(16-byte global loads, 16-byte global stores) in `ptx`."""
    wide = r"(?:\.[\w:]+)*?\.(?:v4\.(?:b|u|s|f)32|v2\.(?:b|u|s|f)64)"
    return (len(re.findall(r"\bld\.global" + wide, ptx)), len(re.findall(r"\bst\.global" + wide, ptx)))


def aot_compile(fn, signature: dict, constexprs: dict, attrs: dict | None = None, arch: int = 90,
                num_warps: int = 4, num_stages: int = 3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    opts = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or {})
    return triton.compile(src, target=target, options=opts.__dict__)


def ptxas_usage(ptx: str, arch: int = 90) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        r = subprocess.run([tool.path, "-v", f"--gpu-name=sm_{arch}a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                           capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    st = int(re.search(r"(\d+) bytes spill stores", r.stderr).group(1))
    ld = int(re.search(r"(\d+) bytes spill loads", r.stderr).group(1))
    return regs, st, ld


def compile_report(name: str, fn, signature: dict, constexprs: dict, attrs: dict | None = None, arch: int = 90,
                   num_warps: int = 4, num_stages: int = 3) -> CompileReport:
    """Compile `fn` for sm_{arch} and report registers, spills and shared memory."""
    ck = aot_compile(fn, signature, constexprs, attrs, arch, num_warps, num_stages)
    regs, st, ld = ptxas_usage(ck.asm["ptx"], arch)
    return CompileReport(name, regs, st, ld, ck.metadata.shared, ck.metadata.num_warps,
                         *vector_accesses(ck.asm["ptx"]))


def kernel_signature(fn, consts: dict, pointer_type, is_float=lambda name: False, aligned=lambda name: False,
                     absent=lambda name: False) -> dict:
    """ASTSource signature, constexprs and attrs of `fn`, as compile_report takes them. Each argument is a
    constexpr (in `consts`, or a pointer for which `absent(name)`: an unused per-expert slot, passed as None), a
    pointer (`pointer_type(name)` gives its type, e.g. "*bf16"; None for a scalar), an fp32 scalar (`is_float`) or
    an i32. Pointers, and the ints for which `aligned(name)`, carry the 16-divisibility Triton derives at run time
    for aligned buffers and strides."""
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        pointer = None if name in consts else pointer_type(name)
        if name in consts or (pointer and absent(name)):
            signature[name] = "constexpr"
            constexprs.setdefault(name, None)
        elif pointer:
            signature[name] = pointer
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif is_float(name):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if aligned(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(signature=signature, constexprs=constexprs, attrs=attrs)
