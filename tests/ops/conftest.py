"""Shared fixtures of the op tests."""

import sys

import pytest

from motus_fast.ops import attention_dispatch as AD


@pytest.fixture
def fresh(monkeypatch):
    """Attention dispatch from a clean slate: no table from the source tree, no remembered plans or log lines."""
    JA = sys.modules["motus_fast.ops.joint_attention"]
    monkeypatch.setattr(AD, "_logged", set())
    AD.load_table.cache_clear()
    JA._PLANS.clear()
    yield
    AD.load_table.cache_clear()
    JA._PLANS.clear()
