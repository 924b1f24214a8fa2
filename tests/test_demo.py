"""The README's first command, shortened: Meta-World data -> training -> `motus-fast serve` -> closed loop ->
imagination -> report. The trained policy must beat the random one on reach-v3 (fixed seeds)."""

import json

import pytest


@pytest.mark.slow
def test_quick_demo_beats_random_on_reach(tmp_path):
    from motus_fast.demo import QUICK, run_demo

    report = run_demo(tmp_path / "demo", QUICK)
    ev = report["eval"]
    assert ev["motus"]["success_rates"]["reach-v3"] > ev["random"]["success_rates"]["reach-v3"]
    for name in ("report.md", "report.png", "report.json", "imagination.png", "imagination.gif"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["eval"]["motus"]["success_rates"] == ev["motus"]["success_rates"]    # the report says what ran
    assert set(report["server_latency_ms"]) >= {"denoise_ms", "infer_ms"}
    assert report["imagination"]["psnr_predicted"] > 0
