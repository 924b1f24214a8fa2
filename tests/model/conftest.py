"""Shared fixtures of the model tests."""

import pytest
import torch


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Each op backend in turn (triton: where its kernels run, a GPU or TRITON_INTERPRET=1)."""
    from motus_fast.ops.availability import triton_runs_on
    if request.param == "triton" and not triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("MOTUS_BACKEND", request.param)
    return request.param
