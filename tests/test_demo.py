"""The README's first command, shortened: Meta-World data -> training -> `motus-fast serve` -> closed loop ->
imagination -> report. Run twice at once (two processes, as two users would): the trained policy must beat the
random one on reach-v3, and the two runs must agree exactly (same seeds, same machine, same numbers)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_beats_random_and_repeats_exactly(tmp_path):
    pytest.importorskip("metaworld")
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "motus_fast.cli", "demo", "--quick", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for out in runs]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    a, b = (json.loads((out / "report.json").read_text()) for out in runs)

    ev = a["eval"]
    assert ev["motus"]["success_rates"]["reach-v3"] > ev["random"]["success_rates"]["reach-v3"]
    for name in ("report.md", "report.png", "report.json", "imagination.png", "imagination.gif"):
        assert (runs[0] / name).stat().st_size > 0
    assert set(a["server_latency_ms"]) >= {"denoise_ms", "infer_ms"}
    assert a["imagination"]["psnr_predicted"] > 0

    for policy in ev:
        assert [(e["task"], e["index"], e["success"], e["steps"]) for e in a["eval"][policy]["episodes"]] == \
               [(e["task"], e["index"], e["success"], e["steps"]) for e in b["eval"][policy]["episodes"]], policy
    assert a["training"] == b["training"]                          # final losses, bit for bit
    assert a["imagination"]["psnr_predicted"] == b["imagination"]["psnr_predicted"]
