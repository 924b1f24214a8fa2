"""Shared checks of the kernel tests (DESIGN.md section 6): the FlashAttention tolerance rule and the skip marker
for Triton paths. (A plain module: several test folders have a conftest.py.)"""

import os

import pytest
import torch

interpreted = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tests that put CPU tensors through the Triton path (dispatch tests): only under the interpreter, even on a GPU box
cpu_interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                     reason="CPU tensors through the Triton path need TRITON_INTERPRET=1")


def assert_fa_rule(name, got, want, same_dtype, factor):
    """max|got - want| <= factor * max|same_dtype - want| + one ulp at want's scale; want in fp64."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == same_dtype.dtype, f"{name}: dtype {got.dtype} != {same_dtype.dtype}"
    if got.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or invalid elements)"
    got, want, same = (t.detach().double().cpu() for t in (got, want, same_dtype))   # the fp64 reference may be on CPU
    err, ref_err = (got - want).abs().max().item(), (same - want).abs().max().item()
    floor = torch.finfo(same_dtype.dtype).eps * max(want.abs().max().item(), 1e-30)
    assert err <= factor * ref_err + floor, f"{name}: error {err:.3e} > {factor} x {ref_err:.3e} + {floor:.1e}"
