"""Memory plan: the peak memory per rank of one training step, without a GPU.

The trainer's own step (``Trainer._build`` + ``Trainer.step``: FSDP2 per MotusBlock with bf16 compute and fp32
reduce, activation checkpointing, AdamW with fp32 parameters and states) runs once to create the optimizer state and
once more under torch's ``FSDPMemTracker``, on fake tensors (``FakeTensorMode``: shapes, no storage) over a fake
process group of ``world_size`` ranks; rank 0's tensor bytes are tallied by kind. The trace goes through the Triton
ops the GPU trains with (their fake kernels give the outputs; nothing runs), and is marked a compile-time trace so
the ops do not read device values (sequence boundaries are trusted, as on a GPU).

What it counts: every tensor the step holds (sharded and gathered parameters, gradients, AdamW states, activations
and backward temporaries, collective buffers, the batch). What it does not: the CUDA context, NCCL buffers and the
caching allocator's fragmentation; keep ~10% headroom for those (``fits`` uses ``headroom``).

The shape: ``video_frames`` future frames at ``image_size`` (H, W), as upstream's ``num_video_frames`` /
``video_height`` / ``video_width``; the Wan2.2 VAE maps 1 + F frames to 1 + F/4 latent frames at 1/16 resolution
(``vae_strides``); the text context is padded to ``video.text_len`` (512, as upstream); the VLM sees the condition
frame: (H/32)(W/32) image tokens (Qwen3-VL: 16-pixel patches, 2x2 merge) plus ``prompt_tokens`` of chat template
and instruction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch

from motus_fast.config import MotusConfig, TrainConfig

GiB = 2 ** 30
VAE_STRIDES = (4, 16)          # Wan2.2-TI2V-5B VAE: temporal, spatial
VLM_PATCH = 32                 # Qwen3-VL: 16-pixel patches, 2x2 merged into one token
PROMPT_TOKENS = 30             # chat template + a short instruction, besides the image tokens


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One rank's micro-batch: ``batch`` samples of ``video_frames`` future frames at ``image_size`` (H, W)."""
    batch: int
    video_frames: int
    image_size: tuple[int, int]
    vlm_tokens: Optional[int] = None        # default: image tokens + PROMPT_TOKENS
    vae_strides: tuple[int, int] = VAE_STRIDES

    def __post_init__(self):
        ft, fs = self.vae_strides
        H, W = self.image_size
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.video_frames < 0 or self.video_frames % ft:
            raise ValueError(f"video_frames={self.video_frames}: the VAE encodes 1 + {ft}n frames")
        if H % (2 * fs) or W % (2 * fs):
            raise ValueError(f"image_size={H}x{W} must be divisible by {2 * fs} (VAE stride x patch size)")

    @property
    def latent(self) -> tuple[int, int, int]:
        """(latent frames incl. the condition frame, latent H, latent W)."""
        ft, fs = self.vae_strides
        return 1 + self.video_frames // ft, self.image_size[0] // fs, self.image_size[1] // fs

    @property
    def und_tokens(self) -> int:
        H, W = self.image_size
        return self.vlm_tokens if self.vlm_tokens is not None else (H // VLM_PATCH) * (W // VLM_PATCH) + PROMPT_TOKENS


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    stage: int
    shape: StepShape
    parameters: int                 # counts, for the report
    trainable: int
    at_peak: dict                   # bytes by kind at the moment of the peak
    peak: int                       # bytes

    def fits(self, budget_gib: float, headroom: float = 0.1) -> bool:
        return self.peak <= budget_gib * GiB * (1 - headroom)

    def report(self) -> str:
        s = self.shape
        T, h, w = s.latent
        lines = [f"memory plan per rank: stage {self.stage}, {self.world_size} rank(s), batch {s.batch} per rank, "
                 f"{s.video_frames} future frames at {s.image_size[0]}x{s.image_size[1]} (latent {T}x{h}x{w}, "
                 f"{s.und_tokens} VLM tokens)",
                 f"  {self.parameters / 1e9:.3f}B parameters, {self.trainable / 1e9:.3f}B trained; FSDP2 + "
                 "activation checkpointing + AdamW (fp32 parameters and states, bf16 compute)"]
        for kind, b in self.at_peak.items():
            lines.append(f"  {kind:<18} {human_bytes(b, self.peak):>12}")
        lines.append(f"  {'total':<18} {human_bytes(self.peak):>12} (tensor bytes at the peak)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "stage": self.stage, "shape": dataclasses.asdict(self.shape),
                "parameters": self.parameters, "trainable": self.trainable, "at_peak": self.at_peak,
                "peak": self.peak}


def human_bytes(n: int, scale: Optional[int] = None) -> str:
    """In GiB when ``scale`` (default n) is at least 1 GiB, else in MiB."""
    return f"{n / GiB:.3f} GiB" if (scale or n) >= GiB else f"{n / 2 ** 20:.3f} MiB"


# the tracker's kinds -> the plan's rows
_KINDS = {"Sharded Param": "params", "Unsharded Param": "params (gathered)", "Buffer": "params",
          "Sharded Grad": "grads", "Unsharded Grad": "grads (full)", "OptState": "optimizer",
          "Activation": "activations", "Temp": "activations", "Inputs": "batch",
          "All Gather": "collectives", "Reduce Scatter": "collectives", "Other": "ema"}


def step_batch(model_cfg: MotusConfig, shape: StepShape, generator: Optional[torch.Generator] = None):
    """A FlowBatch of this shape (Gaussian; the plan needs shapes, the measurement numbers)."""
    from motus_fast.data.synthetic import synthetic_batch
    T, h, w = shape.latent
    return synthetic_batch(model_cfg, batch=shape.batch, latent_frames=T, latent_hw=(h, w),
                           text_len=model_cfg.video.text_len, vlm_len=shape.und_tokens, generator=generator)


def plan_memory(model_cfg: MotusConfig, train_cfg: TrainConfig, world_size: int, shape: StepShape) -> MemoryPlan:
    """Trace the trainer's step (see the module docstring). Needs a process without a process group (it starts a
    fake one of ``world_size`` ranks and ends it)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from motus_fast.train.distributed import DistInfo
    from motus_fast.train.trainer import RunState, Trainer

    if dist.is_initialized():
        raise RuntimeError("plan_memory starts its own (fake) process group: run it in a process without one")
    cfg = dataclasses.replace(train_cfg, batch_size=shape.batch, grad_accum=1, init_from=None, compile=False)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))      # outside fake mode: the mesh reads real rank tensors
        trainer = Trainer(model_cfg, cfg, dataset=None, run_dir=".", progress=False)
        rank0 = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
        with _kernel_trace(), FakeTensorMode():
            model, opt, ema = trainer._build(rank0, resuming=True, mesh=mesh, fused=True)   # as on a GPU
            n_params = sum(p.numel() for p in model.parameters())          # a DTensor counts its global shape
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            batches = iter([step_batch(trainer.model_cfg, shape) for _ in range(2)])
            run = RunState(rank0, model, opt, ema, 0, batches, logger=None, bar=None, peak_flops=None, t_last=0.0)
            model.train()
            trainer.step(run, 0)                               # creates the AdamW state: step 1 is the steady state
            tracker = FSDPMemTracker(model, opt) if world_size > 1 else MemTracker()
            if world_size == 1:
                tracker.track_external(model, opt)
            if ema is not None:
                tracker.track_external(*ema.shadow.values())
            with tracker:
                trainer.step(run, 1)
            snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        dist.destroy_process_group()
    at_peak: dict[str, int] = {}
    for kind, b in snap.items():
        name = _KINDS.get(str(getattr(kind, "value", kind)))
        if name is not None and b:
            at_peak[name] = at_peak.get(name, 0) + int(b)
    return MemoryPlan(world_size, cfg.stage, shape, n_params, n_train, at_peak, int(snap["Total"]))


@contextlib.contextmanager
def _kernel_trace():
    """The Triton ops (the kernels a GPU trains with; under fake tensors only their shape functions run), in a
    compile-time trace (the ops then trust sequence boundaries instead of reading them)."""
    from torch._export.utils import _compiling_state_context

    from motus_fast.kernels import triton_available
    if not triton_available():
        raise RuntimeError("the memory plan traces the Triton ops' shape functions: install triton "
                           "(pip install -e '.[triton]')")
    saved = {k: os.environ.get(k) for k in ("MOTUS_BACKEND", "TRITON_INTERPRET")}
    os.environ.update(MOTUS_BACKEND="triton", TRITON_INTERPRET="1")   # Triton on CPU tensors: see ops.availability
    try:
        with _compiling_state_context():
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
