"""`motus-fast plan` on the tiny model: the traced plan against the per-rank peak measured in a real 2-process FSDP2
step under torchrun (gloo, the Triton kernels in the interpreter), and its state rows against the parameter
counts. The plan starts a fake process group, so it runs in its own process (the CLI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from motus_fast.train.plan import StepShape

PROBE = Path(__file__).with_name("step_memory_probe.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MOTUS_BACKEND="triton", TRITON_INTERPRET="1")


def plan(*args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "motus_fast.cli", "plan", "--preset", "tiny", "--json", *args],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_rank_plan_matches_the_measured_peak(tmp_path):
    batch, frames, (H, W) = 4, 8, (192, 128)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", str(PROBE),
           str(tmp_path), str(batch), str(frames), str(H), str(W), "bf16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank{i}.json").read_text())["peak"] for i in range(2)]
    [p] = plan("--world-size", "2", "--batch", str(batch), "--video-frames", str(frames), "--image-size", str(H),
               str(W))
    assert p["at_peak"]["activations"] > 0.15 * p["peak"]          # the shape exercises the activation trace
    for m in measured:
        assert abs(p["peak"] / m - 1) < 0.2, (p["peak"], measured)
    print(f"plan {p['peak']} B, measured per rank {measured} B")


def test_state_rows_follow_the_parameter_counts():
    """Sharded fp32 parameters and AdamW's two fp32 states per trained parameter, split over the ranks; stage 1
    trains the video expert alone (fewer states, same parameters)."""
    s3, s1 = (plan("--world-size", "4", "--batch", "1", "--video-frames", "4", "--image-size", "64", "64",
                   "--stage", str(stage))[0] for stage in (3, 1))
    for p in (s3, s1):
        assert p["at_peak"]["params"] == pytest.approx(4 * p["parameters"] / 4, rel=0.02)
        assert p["at_peak"]["optimizer"] == pytest.approx(8 * p["trainable"] / 4, rel=0.02)
    assert s1["trainable"] < s3["trainable"] and s1["at_peak"]["optimizer"] < s3["at_peak"]["optimizer"]


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="video_frames=7"):
        StepShape(1, 7, (384, 320))
    with pytest.raises(ValueError, match="image_size=100x320"):
        StepShape(1, 8, (100, 320))
    assert StepShape(2, 8, (384, 320)).latent == (3, 24, 20) and StepShape(2, 8, (384, 320)).und_tokens == 150
