"""The training loop: FSDP2 per MotusBlock (under torchrun), mixed precision (bf16 compute, fp32 reduce), activation checkpointing,
AdamW, gradient clipping, warm-up + linear/cosine schedules, gradient accumulation, optional EMA, exact resume.

With one process the model is not sharded (FSDP would only add collectives) and bf16 compute comes from autocast;
checkpoints are the same DCP format either way, so runs move between world sizes.

Exact resume needs no RNG state: the samples of step s are a pure function of (seed, s) through an epoch
permutation over the dataset, and the flow draws of step s come from a generator seeded by (seed, s, micro-step,
rank). The global sample order does not depend on the number of processes, so a run can resume on another world
size and see the same data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from motus_fast.config import MotusConfig, TrainConfig
from motus_fast.flow import FlowBatch, FlowDraws, training_loss
from motus_fast.model import Conditioning, Motus
from motus_fast.train import stages
from motus_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from motus_fast.train.distributed import DistInfo, init_distributed, mean_across_ranks, shard_model
from motus_fast.train.metrics import MetricsLogger, forward_flops, peak_flops

log = logging.getLogger("motus_fast")


# ---- data order ----------------------------------------------------------------------------------------------
class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index lists for steps start..steps-1, micro-step by micro-step. Global position p of the
    run maps to dataset index perm_{p // n}[p % n], a fresh permutation per epoch seeded by (seed, epoch)."""

    def __init__(self, n: int, cfg: TrainConfig, rank: int, world: int, start_step: int):
        if n < 1:
            raise ValueError("the training dataset is empty")
        self.n, self.cfg, self.rank, self.world, self.start = n, cfg, rank, world, start_step
        self._perm: dict[int, torch.Tensor] = {}

    def index(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))}
        return int(self._perm[epoch][p % self.n])

    def __iter__(self):
        B, A, W = self.cfg.batch_size, self.cfg.grad_accum, self.world
        for step in range(self.start, self.cfg.steps):
            for micro in range(A):
                first = step * B * A * W + (micro * W + self.rank) * B
                yield [self.index(p) for p in range(first, first + B)]

    def __len__(self) -> int:
        return (self.cfg.steps - self.start) * self.cfg.grad_accum


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32 and sharded like them."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, sd: dict) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])

    def full_state_dict(self) -> dict:
        """Collective under FSDP: gathers every shard."""
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in self.shadow.items()}


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
class Trainer:
    def __init__(self, model_cfg: MotusConfig, cfg: TrainConfig, dataset, run_dir: str | Path,
                 collate_fn: Optional[Callable] = None, num_workers: int = 0, extra: Optional[dict] = None,
                 progress: bool = True, batch_transform: Optional[Callable] = None):
        """dataset: map-style; collate_fn turns a list of its items into a FlowBatch (default: items are FlowBatches)
        or, with `batch_transform`, into whatever that callable turns into a FlowBatch on the training device
        (e.g. data.dataset.collate -> RawBatch, then data.encode.BatchEncoder running the frozen encoders on the
        GPU). extra: JSON metadata stored with every checkpoint (norm stats, serving hints)."""
        from motus_fast.data.batch import collate_flow_batches

        self.cfg = cfg
        self.model_cfg = stages.model_config_for_stage(model_cfg, cfg.stage)
        self.dataset, self.run_dir = dataset, Path(run_dir)
        self.collate_fn = collate_fn or collate_flow_batches
        self.num_workers, self.extra, self.progress = num_workers, extra, progress
        self.batch_transform = batch_transform

    def _build(self, dist: DistInfo, resuming: bool):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)               # the same fresh init on every rank before sharding
        model = Motus(self.model_cfg)
        if cfg.init_from and not resuming:
            stages.initial_weights(model, cfg.stage, cfg.init_from)
        trainable = stages.trainable_parameter_names(model, cfg.stage)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        model.activation_checkpointing = cfg.activation_checkpointing
        model.to(dist.device)
        if dist.world_size > 1:     # one process: FSDP would only add collectives; autocast gives the bf16 compute
            shard_model(model, torch.bfloat16 if cfg.param_dtype == "bf16" else None)
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
                                fused=dist.device.type == "cuda", foreach=dist.device.type != "cuda")
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        return model, opt, ema

    def run(self, resume: bool = False) -> list[dict]:
        """Train to cfg.steps (continuing from the latest checkpoint of run_dir if `resume`). Returns the records
        logged by this process (rank 0's records are the rank-averaged ones also written to metrics.jsonl)."""
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
        global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
        if dist.is_main:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("stage %d: %.1fM trainable parameters; effective batch %d = %d per process x %d accumulation "
                     "x %d process(es); %d steps", cfg.stage, n_train / 1e6, global_batch, cfg.batch_size,
                     cfg.grad_accum, dist.world_size, cfg.steps)
        sampler = StepBatchSampler(len(self.dataset), cfg, dist.rank, dist.world_size, start)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers)
        logger = MetricsLogger(self.run_dir, cfg.logger, {"train": dataclasses.asdict(cfg),
                                                          "model": self.model_cfg.to_dict()}, enabled=dist.is_main)
        peak = peak_flops(dist.device)
        records, it = [], iter(loader)
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train stage {cfg.stage}", unit="step",
                   disable=not (self.progress and dist.is_main))
        model.train()
        t_last = time.perf_counter()
        for step in range(start, cfg.steps):
            f = lr_factor(cfg, step)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            sums = {"loss": 0.0, "loss_video": 0.0, "loss_action": 0.0}
            flops = tokens = 0.0
            for micro in range(cfg.grad_accum):
                raw = next(it)
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
                    sums[k] += losses[k].item() / cfg.grad_accum
                f_tok, n_tok = self._flops(batch)
                flops, tokens = flops + f_tok, tokens + n_tok
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)

            now = time.perf_counter()
            dt, t_last = now - t_last, now
            rec = mean_across_ranks(dict(sums, grad_norm=grad_norm))
            rec.update(lr=opt.param_groups[0]["lr"], step_time_s=dt, samples_per_s=global_batch / dt,
                       tokens_per_s=tokens * dist.world_size / dt)
            if peak:
                rec["mfu"] = flops / dt / peak
            if dist.device.type == "cuda":
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            records.append({"step": step + 1, **rec})
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                logger.log(step + 1, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(self.run_dir, step + 1, model, opt, self._train_state(step + 1, dist), ema,
                                self.extra, cfg.keep_last, dist.is_main)
        bar.close()
        logger.close()
        return records

    def _train_state(self, step: int, dist: DistInfo) -> dict:
        return {"step": step, "world_size": dist.world_size,
                "samples_seen": step * self.cfg.batch_size * self.cfg.grad_accum * dist.world_size,
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
