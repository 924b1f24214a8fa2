"""availability.autocast_dtype: the autocast dtype of a tensor's device inside an autocast region there, with and
without torch's C check for any active region."""

import pytest
import torch

from motus_fast.ops import availability as AV


@pytest.mark.parametrize("fast_check", [True, False], ids=["C check", "per-device check only"])
def test_autocast_dtype(fast_check, monkeypatch):
    if not fast_check:
        monkeypatch.setattr(AV, "_ANY_AUTOCAST", None)
    x = torch.zeros(2)
    assert AV.autocast_dtype(x) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert AV.autocast_dtype(x) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert AV.autocast_dtype(x) is None
    assert AV.autocast_dtype(x) is None
