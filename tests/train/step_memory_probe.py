"""Measures rank r's peak tensor memory in one steady-state training step of the tiny model on the CPU, for the
memory plan's check (test_memory_plan.py). Run as a script, alone or under torchrun (gloo):

    MOTUS_BACKEND=triton TRITON_INTERPRET=1 python tests/train/step_memory_probe.py OUT_DIR BATCH FRAMES H W PARAM_DTYPE

The measurement does not use the plan's tracker: bytes of the distinct tensor storages alive when the step starts
(parameters, optimizer state, the batch not yet consumed), plus the peak of the running sum of the CPU allocator's
allocations and frees during the step (torch.profiler's memory events). Writes OUT_DIR/rank{r}.json.
"""

import json
import sys
from pathlib import Path

import torch

from motus_fast.config import TrainConfig, get_preset
from motus_fast.train.distributed import init_distributed, shutdown
from motus_fast.train.plan import StepShape, step_batch
from motus_fast.train.trainer import RunState, Trainer


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        if st.data_ptr() not in seen and st.nbytes():
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def main(out: str, batch: int, frames: int, H: int, W: int, param_dtype: str) -> None:
    dist = init_distributed()
    shape = StepShape(batch, frames, (H, W))
    cfg = TrainConfig(stage=3, batch_size=batch, param_dtype=param_dtype)
    trainer = Trainer(get_preset("tiny"), cfg, None, out, progress=False)
    model, opt, ema = trainer._build(dist, resuming=True, fused=True)
    g = torch.Generator().manual_seed(dist.rank)
    batches = [step_batch(trainer.model_cfg, shape, g) for _ in range(2)]
    run = RunState(dist, model, opt, ema, 0, iter(batches), logger=None, bar=None, peak_flops=None, t_last=0.0)
    model.train()
    trainer.step(run, 0)                                  # creates the AdamW state
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    baseline = storage_bytes([*model.parameters(), *model.buffers(), *state, *_tensors(batches[1])])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(run, 1)
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")   # +alloc / -free
    running = peak = 0
    for _, d in deltas:
        running += d
        peak = max(peak, running)
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps({"baseline": baseline, "step_peak": peak,
                                                              "peak": baseline + peak}))
    shutdown()


def _tensors(batch):
    c = batch.cond
    return [t for t in (batch.video, batch.actions, c.text, c.vlm, c.state) if t is not None]


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6])
