import json
import os
from pathlib import Path

# before torch loads OpenMP: spinning threads collapse when tests run servers and torchrun workers side by side
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from fixture_utils import assert_close_to_fixture, rel_l2  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MOTUS_FIXTURES", REPO.parent / "shared" / "fixtures"))
TINY = FIXTURES / "upstream_motus_tiny"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("MOTUS_BACKEND", "triton")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float tensor the ops allocate with torch.empty* starts as NaN."""
    def poison(fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapped
    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poison(torch.Tensor.new_empty))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reference_backend_by_default(monkeypatch):
    """Model-level tests run on the reference ops unless they ask for a backend (kernel tests and the parity tests
    parametrise MOTUS_BACKEND themselves): under TRITON_INTERPRET=1 the interpreted kernels would make every model
    test slow without testing anything new."""
    if "MOTUS_BACKEND" not in os.environ:
        monkeypatch.setenv("MOTUS_BACKEND", "reference")


@pytest.fixture(scope="session")
def tiny_fixture():
    if not TINY.is_dir():
        pytest.fail(f"parity fixture not found at {TINY} (set MOTUS_FIXTURES)")
    from safetensors.torch import load_file
    io = {k: v.clone() for k, v in load_file(str(TINY / "io.safetensors")).items()}  # aligned fresh copies
    return {"io": io, "config": json.loads((TINY / "config.json").read_text()), "dir": TINY}


@pytest.fixture(scope="session")
def tiny_model(tiny_fixture):
    from motus_fast.weights.upstream import load_upstream
    model = load_upstream(tiny_fixture["dir"] / "model.safetensors", upstream_config=tiny_fixture["config"],
                          dtype=torch.float32)
    return model.eval()
