"""MOTUS_BACKEND=auto for joint attention (motus_fast/ops/attention_dispatch.py): the table lookup, the rule for
keys not in the table, the fallback of a candidate that cannot run, and each CPU-runnable candidate's numerics
through the public op against a float64 reference."""

import json
import logging
import sys

import pytest
import torch

from motus_fast.ops import attention_dispatch as AD
from motus_fast.ops.joint_attention import joint_attention, joint_attention_reference

JA = sys.modules["motus_fast.ops.joint_attention"]
CPU = torch.device("cpu")
MASK = [[True, True, True], [True, True, True], [False, False, True]]


def write_table(path, *entries):
    rows = [dict(op="joint_attention", capability="cpu", dtype="fp32", shape_class=c, choice=ch) for c, ch in entries]
    path.write_text(json.dumps({"entries": rows}))
    return path


def test_shape_classes():
    assert AD.shape_class(None, [360, 21, 150]) == "all/s"
    assert AD.shape_class([[True] * 3] * 3, [1000, 21, 150]) == "all/m"
    assert AD.shape_class(MASK, [16384, 21, 150]) == "masked/l"
    assert AD.shape_class(MASK, [1024, 0, 0]) == "masked/s"      # bounds are inclusive


def test_table_choice_default_rule_and_fallback(fresh, tmp_path, caplog):
    table = AD.load_table(str(write_table(tmp_path / "t.json", ("all/s", "sdpa"), ("masked/s", "flash_attn"))))
    pick = lambda vis, lens: AD.select("joint_attention", CPU, torch.float32, vis, lens, table)  # noqa: E731
    assert pick(None, [40, 5, 12]) == "sdpa"                          # in the table
    assert pick(None, [4000, 5, 12]) == AD.DEFAULT_CHOICE == "triton"  # all/m: not in the table -> the rule
    assert AD.select("joint_attention", CPU, torch.float16, None, [40, 5, 12], table) == "triton"  # other dtype
    with caplog.at_level(logging.INFO, logger="motus_fast"):
        assert pick(MASK, [40, 5, 12]) == "triton"                    # flash_attn cannot run here: fallback
        assert pick(MASK, [40, 5, 12]) == "triton"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flash_attn" in warnings[0].getMessage()


def test_malformed_table_names_file_and_field(fresh, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"op": "joint_attention", "capability": "cpu", "dtype": "fp32",
                                            "choice": "sdpa"}]}))
    with pytest.raises(ValueError, match=r"bad\.json.*entries\[0\].*shape_class"):
        AD.load_table(str(bad))
    bad.write_text(json.dumps({"entries": [{"op": "joint_attention", "capability": "cpu", "dtype": "fp32",
                                            "shape_class": "all/s", "choice": "cudnn"}]}))
    with pytest.raises(ValueError, match="choice"):
        AD.load_table(str(bad))


@pytest.mark.skipif(not JA.interpreting(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("choice", ["triton", "sdpa"])
@pytest.mark.parametrize("visible", [None, MASK])
def test_auto_runs_the_table_choice_with_the_right_numbers(fresh, tmp_path, monkeypatch, choice, visible):
    cls = AD.shape_class(visible, [20, 3, 8])
    monkeypatch.setenv(AD.TABLE_ENV, str(write_table(tmp_path / "t.json", (cls, choice))))
    monkeypatch.setenv("MOTUS_BACKEND", "auto")
    ran = []
    monkeypatch.setattr(JA, "joint_attention_reference",
                        lambda *a, **kw: ran.append("sdpa") or joint_attention_reference(*a, **kw))
    g = torch.Generator().manual_seed(3)
    lens, B, H, D = (20, 3, 8), 2, 2, 64
    q, k, v = ([torch.randn(B * n, H, D, generator=g) for n in lens] for _ in range(3))
    cu = [torch.arange(B + 1, dtype=torch.int32) * n for n in lens]
    with torch.no_grad():
        got = joint_attention(q, k, v, cu, visible, max_seqlens=list(lens))
    want, _ = joint_attention_reference([t.double() for t in q], [t.double() for t in k], [t.double() for t in v],
                                        cu, visible)
    assert ran == (["sdpa"] if choice == "sdpa" else [])
    for e in range(3):
        torch.testing.assert_close(got[e].double(), want[e], atol=2e-5, rtol=2e-5)
