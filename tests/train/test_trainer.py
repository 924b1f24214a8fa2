"""The training stack on CPU: exact resume under torchrun (2 gloo processes), resume on another world size, a
checkpoint write killed by SIGKILL, stages 1 -> 2 -> 3, the data order and the FLOP count behind MFU."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from motus_fast.config import TrainConfig, get_preset
from motus_fast.data.mixture import StepSampler
from motus_fast.data.synthetic import SyntheticDataset
from motus_fast.train.checkpoint import latest_checkpoint
from motus_fast.train.metrics import forward_flops, read_metrics
from motus_fast.train.stages import model_config_for_stage
from motus_fast.train.schedule import lr_factor
from motus_fast.train.trainer import Trainer
from motus_fast.weights import load_pretrained

TRAIN = ["--train", "batch_size=1", "--train", "param_dtype=fp32", "--train", "logger=jsonl", "--train", "log_every=1",
         "--train", "warmup_steps=2", "--train", "lr=0.001", "--train", "save_every=4", "--data", "synthetic:16"]


def torchrun(nproc: int, out: Path, steps: int, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "motus_fast.cli", "train", "--out", str(out), "--train", f"steps={steps}", *TRAIN, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MOTUS_BACKEND="reference")
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "Warning" not in l and "warn" not in l)[:8000]


def losses_by_step(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}   # a re-run step overwrites the killed run's record


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    steps = 12
    torchrun(2, root / "straight", steps)

    proc = torchrun(2, root / "killed", steps, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = latest_checkpoint(root / "killed")
        if latest is not None:
            break
        time.sleep(0.05)
    still_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest is not None and still_running, "the run finished before it could be killed"
    torchrun(2, root / "killed", steps, "--resume")
    return root, steps


def test_resumed_loss_curve_equals_the_straight_one(two_process_runs):
    root, steps = two_process_runs
    a, b = losses_by_step(root / "straight"), losses_by_step(root / "killed")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_two_process_checkpoint_resumes_on_one_process(two_process_runs, tmp_path):
    root, steps = two_process_runs
    import shutil
    shutil.copytree(root / "killed", tmp_path / "run")
    before = load_pretrained(latest_checkpoint(tmp_path / "run"))
    torchrun(1, tmp_path / "run", steps + 1, "--resume")
    state = json.loads((latest_checkpoint(tmp_path / "run") / "train_state.json").read_text())
    assert state["step"] == steps + 1 and state["world_size"] == 1
    after = load_pretrained(latest_checkpoint(tmp_path / "run"))
    num = sum((p - q).pow(2).sum() for p, q in zip(after.parameters(), before.parameters())).sqrt()
    den = sum(p.pow(2).sum() for p in before.parameters()).sqrt()
    assert 0 < num / den < 0.05     # one optimizer step away from the loaded weights, not a fresh model


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import motus_fast.train.checkpoint as ck
    from motus_fast.cli import main
    calls = {"n": 0}
    write = ck._write_weights
    def hanging_write(sd, cfg, out_dir, extra, filename):
        calls["n"] += 1
        if calls["n"] == 2:                                     # the second checkpoint: half-write, then hang
            (Path(out_dir) / filename).write_bytes(b"partial")
            Path(sys.argv[1], "WRITING").write_text("x")
            time.sleep(600)
        write(sd, cfg, out_dir, extra, filename)
    ck._write_weights = hanging_write
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_DURING_SAVE)
    args = ["train", "--out", str(run), "--train", "steps=8", *TRAIN]
    proc = subprocess.Popen([sys.executable, str(script), str(run), *args], start_new_session=True,
                            env=dict(os.environ, MOTUS_BACKEND="reference"), stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "WRITING").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(run)
    assert latest.name == "step_00000004"
    assert list((run / "checkpoints").glob("*.tmp"))              # the half-written one is left aside ...
    load_pretrained(latest)                                        # ... and the previous one loads
    r = subprocess.run([sys.executable, "-m", "motus_fast.cli", *args, "--resume"], capture_output=True, text=True,
                       env=dict(os.environ, MOTUS_BACKEND="reference"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert latest_checkpoint(run).name == "step_00000008"
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_stages_one_two_three_back_to_back(tmp_path):
    """Stage 1 on action-free video, stage 2 on latent actions (pretrain layout), stage 3 on the target robot's
    real actions, each initialised from the previous one, on tiny on-disk datasets through the real loaders."""
    from motus_fast.data.tiny import tiny_pyramid
    from motus_fast.train.cli import build_dataset

    data = tiny_pyramid(tmp_path / "data")
    base = get_preset("tiny")
    common = dict(steps=2, batch_size=2, param_dtype="fp32", logger="jsonl", save_every=2, warmup_steps=1,
                  lr=1e-3, activation_checkpointing=False)
    runs = {}
    for stage in (1, 2, 3):
        spec = tmp_path / f"data{stage}.json"
        spec.write_text(json.dumps(data[stage].to_dict()))
        train_data = build_dataset(str(spec), base, stage, seed=0)
        init = runs.get(stage - 1)
        cfg = TrainConfig(stage=stage, init_from=str(latest_checkpoint(init)) if init else None, **common)
        runs[stage] = tmp_path / f"stage{stage}"
        recs = Trainer(base, cfg, train_data.dataset, runs[stage], collate_fn=train_data.collate_fn,
                       extra=train_data.extra, mixture=train_data.mixture, progress=False).run()
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
        if stage == 1:
            assert all(r["loss_action"] == 0 for r in recs)     # video expert alone
        else:   # an action loss exactly on the steps whose samples (drawn by the sampler) carry actions
            mixture = train_data.mixture
            scored = [any(mixture[i].has_actions for i in items)
                      for items in StepSampler(len(mixture), batch_size=2, steps=2, mixture=mixture)]
            assert [r["loss_action"] > 0 for r in recs] == scored and any(scored)
    s1, s2, s3 = (load_pretrained(latest_checkpoint(runs[s])) for s in (1, 2, 3))
    assert s2.cfg.action.layout == "pretrain" and s3.cfg.action.layout == "finetune"
    # stage 1 trained only the video expert: its action weights are still the fresh init (same seed)
    torch.manual_seed(0)
    fresh = type(s1)(model_config_for_stage(base, 1))
    assert torch.equal(s1.blocks[0].action.qkv.weight, fresh.blocks[0].action.qkv.weight)
    assert not torch.equal(s1.blocks[0].video.qkv.weight, fresh.blocks[0].video.qkv.weight)
    assert not hasattr(s2.action, "state_encoder") and hasattr(s3.action, "state_encoder")
    assert json.loads((latest_checkpoint(runs[3]) / "config.json").read_text())["extra"]["norm_mode"] == "none"


def test_raw_batches_encoded_on_the_training_device(tmp_path):
    """The GPU data path: the loader yields RawBatches (uint8 frames), the frozen encoders run in batch_transform."""
    from motus_fast.data.dataset import collate
    from motus_fast.data.encode import BatchEncoder
    from motus_fast.encoders import build_tiny_encoders
    from motus_fast.data.mixture import build_mixture
    from motus_fast.data.tiny import tiny_pyramid

    data = tiny_pyramid(tmp_path / "data")[3]
    base = get_preset("tiny")
    enc = build_tiny_encoders(base, text_len=base.video.text_len)
    mixture = build_mixture(data, vlm_prompt=enc.vlm_prompt)
    cfg = TrainConfig(stage=3, steps=2, batch_size=2, param_dtype="fp32", logger="jsonl", save_every=2,
                      warmup_steps=1, activation_checkpointing=False)
    recs = Trainer(base, cfg, mixture, tmp_path / "run", collate_fn=collate, progress=False,
                   batch_transform=BatchEncoder(enc)).run()
    assert len(recs) == 2 and all(r["loss_action"] > 0 and r["loss_video"] > 0 for r in recs)


def test_data_order_does_not_depend_on_the_world_size():
    def sampler(B, rank, world, start=0):
        return StepSampler(7, batch_size=B, grad_accum=2, steps=5, seed=0, rank=rank, world_size=world,
                           start_step=start)
    one = list(sampler(2, 0, 1))
    two = [list(sampler(1, r, 2)) for r in (0, 1)]
    flat_one = [i for b in one for i in b]
    flat_two = [i for step in range(10) for r in (0, 1) for i in two[r][step]]
    assert flat_one == flat_two
    resumed = list(sampler(2, 0, 1, start=3))
    assert resumed == one[3 * 2:]
    assert sorted(flat_one[:7]) == list(range(7))                 # an epoch is a permutation
    assert sorted(flat_one[7:14]) == list(range(7)) and flat_one[7:14] != flat_one[:7]


def test_lr_schedule():
    cfg = TrainConfig(steps=101, warmup_steps=10, schedule="linear", min_lr_ratio=0.4)
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0) and lr_factor(cfg, 100) == pytest.approx(0.4)
    cos = TrainConfig(steps=101, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(cos, 50) == pytest.approx(0.5) and lr_factor(cos, 100) == pytest.approx(0.0, abs=1e-12)


def test_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from motus_fast.model import Motus
    cfg = get_preset("tiny")
    model = Motus(cfg)
    b = SyntheticDataset(cfg, size=1, text_len=8, vlm_len=6)[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(b.video, torch.tensor([500.0]), b.actions, torch.tensor([500.0]), b.cond)
    L_v = 3 * 6 * 4
    ours = forward_flops(cfg, L_v, cfg.action.num_tokens, 6, 8)
    assert abs(ours / counter.get_total_flops() - 1) < 0.05, (ours, counter.get_total_flops())


def test_one_process_bf16_training_runs_under_autocast(tmp_path):
    """The default param_dtype (bf16) with one process trains under torch.autocast: the ops meet bf16 projections
    beside fp32 streams and modulation. Its first loss matches the fp32 run's to bf16 precision."""
    from motus_fast.data.tiny import tiny_pyramid
    from motus_fast.train.cli import build_dataset

    data = tiny_pyramid(tmp_path / "data")
    spec = tmp_path / "data3.json"
    spec.write_text(json.dumps(data[3].to_dict()))
    base = get_preset("tiny")
    train_data = build_dataset(str(spec), base, 3, seed=0)
    first = {}
    for dtype in ("fp32", "bf16"):
        cfg = TrainConfig(stage=3, steps=2, batch_size=2, param_dtype=dtype, logger="jsonl", save_every=2,
                          warmup_steps=1, lr=1e-3)
        recs = Trainer(base, cfg, train_data.dataset, tmp_path / dtype, collate_fn=train_data.collate_fn,
                       extra=train_data.extra, mixture=train_data.mixture, progress=False).run()
        assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
        first[dtype] = recs[0]["loss"]
    assert abs(first["bf16"] - first["fp32"]) <= 0.05 * abs(first["fp32"]), first
