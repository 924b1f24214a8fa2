"""availability.PlanCache: a plan is found again only for tensors of its signature, through torch's C++ tensor
guards where they are usable and the Python key otherwise, and the fallback says so once."""

import logging

import pytest
import torch

from motus_fast.ops import availability as AV
from motus_fast.ops.availability import PlanCache


def _variants(x):
    """Tensors that differ from x in one part of the signature each."""
    return {"shape": torch.zeros(x.shape[0] + 1, x.shape[1]),                 # same strides
            "strides": torch.zeros(x.shape[1], x.shape[0]).t(),                 # same shape
            "dtype": torch.zeros(x.shape, dtype=torch.float64),
            "requires_grad": torch.zeros(x.shape, requires_grad=True),
            "None": None}


@pytest.fixture(params=["guards", "python keys"])
def lookup(request, monkeypatch):
    """Both lookup paths: the C++ guards (the pinned torch passes their self-test) and the Python keys alone."""
    if request.param == "guards":
        assert AV.tensor_guards() is not None, "torch's tensor guards failed their self-test on the pinned torch"
    else:
        monkeypatch.setattr(AV, "tensor_guards", lambda: None)
    return request.param


def test_a_plan_is_found_only_for_its_signature(lookup):
    cache = PlanCache()
    x, y = torch.randn(2, 3), torch.randn(4)
    cache.put("op", (x, y), "plan xy")
    assert cache.get("op", (torch.randn(2, 3), torch.ones(4))) == "plan xy"     # other values, same signature
    assert cache.get("other op", (x, y)) is None
    for what, other in _variants(x).items():
        assert cache.get("op", (other, y)) is None, what
    cache.put("op", (None, y), "plan y")                                        # a None in the signature
    assert cache.get("op", (None, torch.zeros(4))) == "plan y"
    assert cache.get("op", (torch.zeros(4), None)) is None
    assert cache.get("op", (torch.zeros(4), torch.zeros(4))) is None           # a tensor where the plan has None
    assert cache.get("op", (torch.zeros(4),)) is None                           # fewer tensors under the key
    cache.put("op", (x, y, None), "plan xy-")                                   # a None past a shorter call's end
    assert cache.get("op", (torch.zeros(4),)) is None
    cache.put("op", (y,), "plan 1")                                             # after plans of other lengths
    keys = []
    real = AV.signature
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AV, "signature", lambda *ts: keys.append(1) or real(*ts))
        assert cache.get("op", (torch.ones(4),)) == "plan 1"
    assert keys == ([] if lookup == "guards" else [1])                          # the guard found it
    assert cache.get("op", (x, y, y)) is None                                   # more
    assert cache.get("op", (x, y)) == "plan xy"


def test_guards_are_used_and_aliasing_tensors_use_the_python_key(monkeypatch):
    assert AV.tensor_guards() is not None
    cache = PlanCache()
    x = torch.randn(2, 3)
    cache.put("op", (x, torch.randn(2, 3)), "distinct")
    cache.put("op", (x, x), "aliased")                    # the guards refuse aliasing tensors: Python key only
    keys = []
    real = AV.signature
    monkeypatch.setattr(AV, "signature", lambda *ts: keys.append(1) or real(*ts))
    assert cache.get("op", (torch.randn(2, 3), torch.randn(2, 3))) == "distinct"
    assert keys == []                                     # found by a guard: no Python key built
    assert cache.get("op", (x, x)) == "aliased"
    assert keys == [1]


def test_more_signatures_than_slots_are_still_found(lookup, monkeypatch):
    """Past `slots` signatures of a key, plans are found through the Python key, and no guard is built per call
    (signatures in rotation would rebuild one every time)."""
    cache = PlanCache(slots=2)
    shapes = [(n, 3) for n in range(1, 6)]
    for s in shapes:
        cache.put("op", (torch.zeros(s),), s)
    build, builds = AV.tensor_guards(), []
    if build is not None:
        monkeypatch.setattr(AV, "tensor_guards", lambda: lambda *ts: builds.append(1) or build(*ts))
    for _ in range(2):
        for s in reversed(shapes):
            assert cache.get("op", (torch.ones(s),)) == s
    assert builds == []


def test_the_cache_is_bounded():
    cache = PlanCache(size=3)
    for n in range(1, 8):
        cache.put("op", (torch.zeros(n),), n)
        assert len(cache) <= 3
    assert cache.get("op", (torch.zeros(7),)) == 7


def test_unusable_guards_fall_back_with_one_log_line(monkeypatch, caplog):
    """A torch whose guard check does not tell signatures apart fails the self-test: Python keys, one INFO line."""
    import torch._C._dynamo.guards as guards

    class Blind:                     # accepts everything
        def __init__(self, *tensors, **kwargs):
            pass

        def check(self, *tensors):
            return True

    monkeypatch.setattr(guards, "TensorGuards", Blind)
    AV.tensor_guards.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="motus_fast"):
            assert AV.tensor_guards() is None
            assert AV.tensor_guards() is None
        lines = [r.getMessage() for r in caplog.records if "tensor guards" in r.getMessage()]
        assert len(lines) == 1 and "shape" in lines[0], lines
        cache = PlanCache()
        cache.put("op", (torch.zeros(2, 3),), "plan")
        assert cache.get("op", (torch.zeros(3, 2),)) is None
        assert cache.get("op", (torch.ones(2, 3),)) == "plan"
    finally:
        AV.tensor_guards.cache_clear()
