"""`motus-fast experiment ablations`: the job plan, the verdict rule, the latent-action helpers, and the quick
experiment end to end (the pipeline completes, the report says what ran, a rerun of a job repeats its numbers)."""

import dataclasses
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from motus_fast.experiments.ablations import (QUICK, ExperimentConfig, Job, _first_episodes, _step_actions,
                                              curve_job_name, plan_jobs, run_job, verdict)


def test_plan_runs_every_variant_seed_and_curve_point_once_with_dependencies():
    cfg = ExperimentConfig(seeds=2, demo_counts=(2, 5, 30), curve_seeds=1)
    jobs = plan_jobs(cfg)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    for v in cfg.variants:
        for s in range(2):
            assert f"ablation-{v}-s{s}" in names
    # stage 3 alone on all 30 demos with seed 0 is the ablation run ablation-motus-s0: not trained twice
    assert "curve-n30-scratch-s0" not in names and curve_job_name(cfg, 30, "scratch", 0) == "ablation-motus-s0"
    for n in (2, 5):
        assert f"curve-n{n}-scratch-s0" in names
    for n in (2, 5, 30):
        assert next(j for j in jobs if j.name == f"curve-n{n}-pretrained-s0").after == ("latent",)
    # every dependency is a job that starts earlier
    for i, j in enumerate(jobs):
        assert all(a in names[:i] for a in j.after), j


def test_config_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="variants"):
        ExperimentConfig(variants=("motus", "nope"))
    with pytest.raises(ValueError, match="demo_counts"):
        ExperimentConfig(episodes_per_task=5, demo_counts=(2, 10))


def test_verdict_rule():
    assert verdict((18, 20), (5, 20)) == "supported"          # intervals apart
    assert verdict((12, 20), (10, 20)) == "inconclusive"      # higher, intervals overlap
    assert verdict((10, 20), (10, 20)) == "not supported"
    assert verdict((5, 20), (18, 20)) == "not supported"


def test_step_actions_average_the_raw_actions_of_each_latent_step():
    rng = np.random.default_rng(0)
    for frames, s in ((17, 2), (18, 2), (20, 3), (5, 6)):
        action = rng.normal(size=(frames, 4)).astype(np.float32)
        got = _step_actions(action, s, frames)
        n = len(range(0, frames, s)) - 1              # latent steps between frames k*s and (k+1)*s
        assert got.shape == (max(n, 0), 4)
        for k in range(n):
            np.testing.assert_allclose(got[k], action[k * s:(k + 1) * s].mean(0), rtol=1e-6)


def test_first_episodes_keeps_the_first_n_per_task_in_order():
    W = dataclasses.make_dataclass("W", ["episode", "instruction"])
    windows = [W(e, t) for t, eps in (("a", [0, 1, 2]), ("b", [3, 4])) for e in eps for _ in range(2)]
    got = _first_episodes(windows, 2)
    assert [(w.episode, w.instruction) for w in got] == [(e, t) for e, t in ((0, "a"), (0, "a"), (1, "a"), (1, "a"),
                                                                               (3, "b"), (3, "b"), (4, "b"), (4, "b"))]
    assert _first_episodes(windows, 3) == windows


@pytest.mark.slow
def test_quick_experiment_completes_reports_and_repeats(tmp_path):
    pytest.importorskip("metaworld")
    pytest.importorskip("cv2")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from motus_fast.experiments.ablations import run_experiment

    out = tmp_path / "exp"
    report = run_experiment(out, QUICK, progress=False)
    for name in ("report.md", "report.png", "report.json"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    for v in QUICK.variants:
        assert f"| {v} |" in md
    assert report["provenance"]["torch"] and report["provenance"]["mujoco"] == "3.3.0"
    assert {c["verdict"] for c in report["claims"]} <= {"supported", "not supported", "inconclusive"}
    assert len(report["claims"]) == 4
    assert set(report["curve"]) == {str(n) for n in QUICK.demo_counts}
    for q in report["ablations"].values():
        assert q["pooled"]["episodes"] == QUICK.seeds * QUICK.eval_episodes * len(QUICK.tasks)
    modes = report["modes"]
    assert np.isfinite(modes["psnr"]["world_model_true_actions"]) and np.isfinite(modes["action_mse"]["idm_true_future"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["ablations"]["motus"]["pooled"] == report["ablations"]["motus"]["pooled"]

    # same seeds, same machine: one job rerun in a fresh directory gives the same losses and success counts
    again = tmp_path / "again"
    shutil.copytree(out / "prepared", again / "prepared")
    first = json.loads((out / "jobs" / "ablation-motus-s0" / "result.json").read_text())
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:   # a fresh process
        second = pool.submit(run_job, str(again), QUICK, Job("ablation-motus-s0", "ablation", "motus", 0)).result()
    assert second["final_loss"] == first["final_loss"]
    assert second["curve"]["loss"] == first["curve"]["loss"]
    assert second["eval"]["per_task"] == first["eval"]["per_task"]
