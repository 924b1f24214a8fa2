"""The training loop: FSDP2 per MotusBlock (under torchrun), mixed precision (bf16 compute, fp32 reduce), activation
checkpointing, AdamW, gradient clipping, the LR schedule (schedule.py), gradient accumulation, optional EMA (ema.py),
exact resume. ``Trainer.run`` is setup (process group, model, optimizer, checkpoint, data) -> step (micro-batches,
clip, optimizer, EMA) -> log (records, metrics, progress) -> checkpoint, per optimizer step.

With one process the model is not sharded (FSDP would only add collectives) and bf16 compute comes from autocast;
checkpoints are the same DCP format either way, so runs move between world sizes.

Exact resume needs no RNG or data state: the samples of step s are a pure function of (seed, s) through
``data.mixture.StepSampler`` (independent of the number of processes), and the flow draws of step s come from a
generator seeded by (seed, s, micro-step, rank). So a run can resume on another world size and see the same data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from motus_fast.config import MotusConfig, TrainConfig
from motus_fast.data.mixture import MixtureDataset, StepSampler
from motus_fast.flow import FlowBatch, FlowDraws, training_loss
from motus_fast.model import Conditioning, Motus
from motus_fast.train import stages
from motus_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from motus_fast.train.distributed import DistInfo, init_distributed, mean_across_ranks, shard_model
from motus_fast.train.ema import EMA
from motus_fast.train.metrics import MetricsLogger, forward_flops, peak_flops
from motus_fast.train.schedule import set_lr

log = logging.getLogger("motus_fast")


# ---- batches on the device ----------------------------------------------------------------------------------
def _to(batch: FlowBatch, device) -> FlowBatch:
    def mv(t):
        return None if t is None else t.to(device, non_blocking=True)
    c = batch.cond
    return FlowBatch(mv(batch.video), mv(batch.actions),
                     Conditioning(mv(c.text), mv(c.vlm), mv(c.state), mv(c.text_lens), mv(c.vlm_lens)),
                     mv(batch.has_actions))


def _for_stage(batch: FlowBatch, stage: int) -> FlowBatch:
    if stages.uses_action_stream(stage):
        return batch
    c = batch.cond   # stage 1: the video expert alone (no action or und stream)
    return FlowBatch(batch.video, None, Conditioning(c.text, None, None, c.text_lens, None))


# ---- the trainer ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    """Everything ``Trainer.setup`` builds for one run."""
    dist: DistInfo
    model: Motus
    opt: torch.optim.Optimizer
    ema: Optional[EMA]
    start: int                      # the first step to run (the resumed checkpoint's step, or 0)
    batches: object                 # an iterator of this rank's micro-batches (collated, not yet on the device)
    logger: MetricsLogger
    bar: tqdm
    peak_flops: Optional[float]
    t_last: float


class Trainer:
    def __init__(self, model_cfg: MotusConfig, cfg: TrainConfig, dataset, run_dir: str | Path,
                 collate_fn: Optional[Callable] = None, num_workers: int = 0, extra: Optional[dict] = None,
                 progress: bool = True, batch_transform: Optional[Callable] = None,
                 mixture: Optional[MixtureDataset] = None):
        """dataset: map-style; collate_fn turns a list of its items into a FlowBatch (default: items are FlowBatches)
        or, with `batch_transform`, into whatever that callable turns into a FlowBatch on the training device
        (e.g. data.dataset.collate -> RawBatch, then data.encode.BatchEncoder running the frozen encoders on the
        GPU). mixture: the MixtureDataset whose (index, draw seed) items the dataset takes (default: the dataset
        itself when it is one; otherwise items are plain indices, see data.mixture.StepSampler). extra: JSON
        metadata stored with every checkpoint (norm stats, serving hints)."""
        from motus_fast.data.batch import collate_flow_batches

        self.cfg = cfg
        self.model_cfg = stages.model_config_for_stage(model_cfg, cfg.stage)
        self.dataset, self.run_dir = dataset, Path(run_dir)
        self.mixture = mixture if mixture is not None else (dataset if isinstance(dataset, MixtureDataset) else None)
        self.collate_fn = collate_fn or collate_flow_batches
        self.num_workers, self.extra, self.progress = num_workers, extra, progress
        self.batch_transform = batch_transform

    def run(self, resume: bool = False) -> list[dict]:
        """Train to cfg.steps (continuing from the latest checkpoint of run_dir if `resume`). Returns the records
        logged by this process (rank 0's records are the rank-averaged ones also written to metrics.jsonl)."""
        run = self.setup(resume)
        records = []
        for step in range(run.start, self.cfg.steps):
            rec = self.step(run, step)
            records.append(self.log(run, step, rec))
            if (step + 1) % self.cfg.save_every == 0 or step + 1 == self.cfg.steps:
                save_checkpoint(self.run_dir, step + 1, run.model, run.opt, self._train_state(step + 1, run.dist),
                                run.ema, self.extra, self.cfg.keep_last, run.dist.is_main)
        run.bar.close()
        run.logger.close()
        return records

    # ---- setup ----
    def setup(self, resume: bool) -> RunState:
        """Process group, model (sharded, trainable set of the stage), optimizer, EMA, the resumed checkpoint, the
        data from the first step to run, the metrics writers."""
        cfg = self.cfg
        dist = init_distributed()
        latest = latest_checkpoint(self.run_dir) if resume else None
        if resume and latest is None and dist.is_main:
            log.info("no checkpoint in %s yet: starting from step 0", self.run_dir)
        model, opt, ema = self._build(dist, resuming=latest is not None)
        start = 0
        if latest is not None:
            state = load_checkpoint(latest, model, opt, ema)
            start = state["step"]
            if dist.is_main:
                log.info("resumed from %s at step %d (written by %d process(es), now %d)", latest, start,
                         state["world_size"], dist.world_size)
        if dist.is_main:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("stage %d: %.1fM trainable parameters; effective batch %d = %d per process x %d accumulation "
                     "x %d process(es); %d steps", cfg.stage, n_train / 1e6, self._global_batch(dist),
                     cfg.batch_size, cfg.grad_accum, dist.world_size, cfg.steps)
        sampler = StepSampler(len(self.dataset), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                              steps=cfg.steps, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                              start_step=start, mixture=self.mixture)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers)
        logger = MetricsLogger(self.run_dir, cfg.logger, {"train": dataclasses.asdict(cfg),
                                                          "model": self.model_cfg.to_dict()}, enabled=dist.is_main)
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train stage {cfg.stage}", unit="step",
                   disable=not (self.progress and dist.is_main))
        model.train()
        return RunState(dist, model, opt, ema, start, iter(loader), logger, bar, peak_flops(dist.device),
                        time.perf_counter())

    def _build(self, dist: DistInfo, resuming: bool, mesh=None, fused: Optional[bool] = None):
        """The model of the stage (sharded over `mesh` or the process group when there are several processes), the
        AdamW (`fused`: default on a GPU, else foreach) and the EMA. Also builds the memory plan's step (plan.py)."""
        cfg = self.cfg
        fused = dist.device.type == "cuda" if fused is None else fused
        torch.manual_seed(cfg.seed)               # the same fresh init on every rank before sharding
        model = Motus(self.model_cfg)
        if cfg.init_from and not resuming:
            stages.initial_weights(model, cfg.stage, cfg.init_from)
        trainable = stages.trainable_parameter_names(model, cfg.stage)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        model.activation_checkpointing = cfg.activation_checkpointing
        if dist.device.type != "cpu":           # built on the CPU: a move to it would copy fake tensors (plan.py)
            model.to(dist.device)
        if dist.world_size > 1:     # one process: FSDP would only add collectives; autocast gives the bf16 compute
            shard_model(model, torch.bfloat16 if cfg.param_dtype == "bf16" else None, mesh)
        if cfg.compile:
            for blk in model.blocks:
                blk.compile()
        video_names = {n for n, _ in model.expert_parameters()["video"]}
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if n not in video_names], "lr": cfg.lr},
                  {"params": [p for n, p in params if n in video_names], "lr": cfg.video_lr or cfg.lr}]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                fused=fused, foreach=not fused)
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        return model, opt, ema

    # ---- step ----
    def step(self, run: RunState, step: int) -> dict:
        """One optimizer step (grad_accum micro-batches). Returns this rank's mean losses and grad norm as tensors
        (read on the host only when logged: no device sync per micro-step), and the step's FLOPs and tokens."""
        cfg, dist, model = self.cfg, run.dist, run.model
        set_lr(run.opt, cfg, step)
        sums = {"loss": 0.0, "loss_video": 0.0, "loss_action": 0.0}
        flops = tokens = 0.0
        for micro in range(cfg.grad_accum):
            raw = next(run.batches)
            batch = self.batch_transform(raw) if self.batch_transform else _to(raw, dist.device)
            batch = _for_stage(batch, cfg.stage)
            g = torch.Generator(device=dist.device).manual_seed(
                ((cfg.seed * 1_000_003 + step) * 64 + micro) * 4096 + dist.rank)
            draws = FlowDraws.sample(batch, self.model_cfg.flow, g)
            if dist.world_size > 1:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with torch.autocast(dist.device.type, torch.bfloat16,
                                enabled=cfg.param_dtype == "bf16" and dist.world_size == 1):
                losses = training_loss(model, batch, draws)
            (losses["loss"] / cfg.grad_accum).backward()
            for k in sums:
                sums[k] = sums[k] + losses[k].detach() / cfg.grad_accum
            f_tok, n_tok = self._flops(batch)
            flops, tokens = flops + f_tok, tokens + n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(model)
        return dict(sums, grad_norm=grad_norm, flops=flops, tokens=tokens)

    # ---- log ----
    def log(self, run: RunState, step: int, out: dict) -> dict:
        """Rank-averaged losses, lr, throughput, MFU and peak memory of the step just run -> metrics writers and
        the progress bar. Returns the record."""
        dist = run.dist
        now = time.perf_counter()
        dt, run.t_last = now - run.t_last, now
        rec = mean_across_ranks({k: float(out[k]) for k in ("loss", "loss_video", "loss_action", "grad_norm")})
        rec.update(lr=run.opt.param_groups[0]["lr"], step_time_s=dt, samples_per_s=self._global_batch(dist) / dt,
                   tokens_per_s=out["tokens"] * dist.world_size / dt)
        if run.peak_flops:
            rec["mfu"] = out["flops"] / dt / run.peak_flops
        if dist.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
            run.logger.log(step + 1, rec)
        run.bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
        run.bar.update(1)
        return {"step": step + 1, **rec}

    def _global_batch(self, dist: DistInfo) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * dist.world_size

    def _train_state(self, step: int, dist: DistInfo) -> dict:
        return {"step": step, "world_size": dist.world_size, "samples_seen": step * self._global_batch(dist),
                "train_config": dataclasses.asdict(self.cfg), "model_config": self.model_cfg.to_dict()}

    def _flops(self, batch: FlowBatch) -> tuple[float, float]:
        """Training FLOPs (3x forward) and tokens of this micro-batch on this rank."""
        B, _, T, H, W = batch.video.shape
        pt, ph, pw = self.model_cfg.video.patch_size
        Lv = (T // pt) * (H // ph) * (W // pw)
        La = self.model_cfg.action.num_tokens if batch.actions is not None else 0
        Lu = batch.cond.vlm.shape[1] if batch.cond.vlm is not None else 0
        Lt = batch.cond.text.shape[1]
        f = forward_flops(self.model_cfg, Lv, La, Lu, Lt, with_action=La > 0, with_und=Lu > 0)
        return 3.0 * f * B, float(B * (Lv + La + Lu))
