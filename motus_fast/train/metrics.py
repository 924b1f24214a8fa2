"""Training metrics: FLOP counts for MFU, and the log writers (JSONL always; tensorboard or wandb on top)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from motus_fast.config import MotusConfig

log = logging.getLogger("motus_fast")

# dense bf16 tensor-core peaks (vendor datasheets, SXM parts) used for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


def forward_flops(cfg: MotusConfig, video_tokens: int, action_tokens: int, und_tokens: int, text_tokens: int,
                  with_action: bool = True, with_und: bool = True) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass for one sample."""
    v, a, u = cfg.video, cfg.action, cfg.und
    W = cfg.num_heads * cfg.head_dim
    La = action_tokens if with_action else 0
    Lu = und_tokens if with_und else 0
    per_layer = video_tokens * (4 * v.dim * v.dim + 2 * v.dim * v.dim + 2 * v.dim * v.ffn_dim)   # qkv+o, cross q+o, ffn
    per_layer += text_tokens * 2 * v.dim * v.dim                                               # cross k, v
    per_layer += 2 * video_tokens * text_tokens * v.dim                                        # cross QK^T + PV
    per_layer += La * (4 * a.dim * W + 2 * a.dim * a.ffn_dim) + Lu * (4 * u.dim * W + 2 * u.dim * u.ffn_dim)
    L = video_tokens + La + Lu
    per_layer += 2 * L * L * W                                                                 # joint QK^T + PV
    embed = video_tokens * (v.in_channels * 4 * v.dim + v.dim * v.out_channels * 4) + text_tokens * (
        v.text_dim * v.dim + v.dim * v.dim) + La * a.dim * (a.action_dim + a.dim * 2) + Lu * u.dim * (u.vlm_dim + 2 * u.dim)
    return 2.0 * (cfg.num_layers * per_layer + embed)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


class MetricsLogger:
    """Writes every record to <run>/metrics.jsonl; mirrors scalars to tensorboard or wandb when asked."""

    def __init__(self, run_dir: str | Path, backend: str, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
                self.tb.add_text("config", json.dumps(config, indent=2))
            except ImportError:
                log.warning("tensorboard is not installed: logging to %s only", self.path)
        elif backend == "wandb":
            import wandb   # optional dependency: fail loudly if asked for and missing
            self.wandb = wandb.init(project="motus_fast", config=config, dir=str(run_dir))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
