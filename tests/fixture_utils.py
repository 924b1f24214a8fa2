"""Comparison helpers for the fixture parity tests (a plain module: several test folders have a conftest.py,
so `from conftest import ...` is ambiguous)."""

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_close_to_fixture(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5):
    """The fixture README's rule: rel-L2 <= tol and max|a-b| <= tol * max|b|."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    r = rel_l2(got, want)
    m = (got.double() - want.double()).abs().max().item() / want.double().abs().max().item()
    assert r <= tol and m <= tol, f"{name}: rel-L2 {r:.2e}, max-abs-rel {m:.2e} (tol {tol:.0e})"
