"""Frozen configuration dataclasses and named presets.

Everything the model needs to be built is here; nothing else is read from globals or paths. Presets:

- ``tiny``: the structure of motus-8b at toy widths (the shapes of the upstream parity fixture); CI-sized.
- ``small``: a single-GPU research size that keeps the real encoder widths (umT5-XXL 4096, Qwen3-VL-2B 2048).
- ``motus-8b``: upstream Motus (Wan2.2-TI2V-5B + action expert 1024 + und expert 512, 30 layers).

``MotusConfig.override({"action.dim": 256, ...})`` returns a new config with dotted fields replaced (the CLI uses it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass(frozen=True)
class VideoExpertConfig:
    """Wan2.2-style video diffusion transformer. Its heads define the joint attention head space."""

    dim: int = 3072
    ffn_dim: int = 14336
    num_heads: int = 24
    in_channels: int = 48           # VAE latent channels
    out_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256             # width of the time sinusoid
    text_dim: int = 4096            # umT5-XXL hidden size
    text_len: int = 512             # upstream pads/truncates a list-of-tensors context to this length
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class ActionExpertConfig:
    """Action diffusion expert: one layer per video layer, projecting into the video head space."""

    dim: int = 1024
    ffn_dim: int = 4096
    state_dim: int = 14
    action_dim: int = 14
    chunk_size: int = 16            # K actions per chunk
    num_registers: int = 4
    # "finetune": [state, K actions, registers]; "pretrain": [K latent actions] (stage 2, no state/registers)
    layout: Literal["finetune", "pretrain"] = "finetune"
    freq_dim: int = 256             # upstream fixes the action time sinusoid at 256 wide
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return self.chunk_size + (1 + self.num_registers if self.layout == "finetune" else 0)

    @property
    def pos_table_rows(self) -> int:
        # upstream allocates K + 2 + R rows in finetune mode (one more than used) and K in pretrain mode
        return self.chunk_size + (2 + self.num_registers if self.layout == "finetune" else 0)


@dataclass(frozen=True)
class UndExpertConfig:
    """Understanding expert: reads frozen VLM hidden states, contributes keys/values to the joint attention."""

    dim: int = 512
    ffn_dim: int = 2048
    vlm_dim: int = 2048             # Qwen3-VL-2B hidden size (adapter input)
    eps: float = 1e-5


@dataclass(frozen=True)
class FlowConfig:
    """Rectified flow + UniDiffuser timesteps, as upstream trains and samples."""

    num_train_timesteps: int = 1000
    train_shift: float = 5.0        # training sigma grid: sigma = shift*s / (1 + (shift-1)*s)
    sample_steps: int = 10
    sample_shift: float = 1.0       # upstream samples on an unshifted linear grid
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0
    # "independent" (UniDiffuser, Motus): video and action timesteps drawn separately, which trains every mode;
    # "shared": one timestep for both streams (the paper's "joint diffuser" ablation), which trains `joint` only.
    timesteps: Literal["independent", "shared"] = "independent"

    def __post_init__(self):
        if self.timesteps not in ("independent", "shared"):
            raise ValueError(f"flow.timesteps must be 'independent' or 'shared', got {self.timesteps!r}")


@dataclass(frozen=True)
class MotusConfig:
    num_layers: int = 30
    video: VideoExpertConfig = field(default_factory=VideoExpertConfig)
    action: ActionExpertConfig = field(default_factory=ActionExpertConfig)
    und: UndExpertConfig = field(default_factory=UndExpertConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # Joint-attention visibility. True (upstream): every query attends to every key. False: video and und queries
    # do not attend to action keys, so those streams do not depend on the actions and, in `vla` and `idm`, the
    # sampler runs them once per request and only the action expert per step (exact for a model trained so).
    video_und_see_actions: bool = True
    # False: the understanding expert takes no part (conditioning's vlm is ignored, its parameters are frozen and
    # unused): the "without the und stream" ablation of the paper's findings (motus_fast.experiments.ablations).
    und_stream: bool = True

    def __post_init__(self):
        v = self.video
        if v.dim % v.num_heads:
            raise ValueError(f"video.dim={v.dim} is not divisible by video.num_heads={v.num_heads}")
        if v.head_dim % 2:
            raise ValueError(f"head_dim={v.head_dim} must be even for RoPE")
        if len(v.patch_size) != 3:
            raise ValueError(f"video.patch_size must have 3 entries, got {v.patch_size}")
        if self.action.layout not in ("finetune", "pretrain"):
            raise ValueError(f"action.layout must be 'finetune' or 'pretrain', got {self.action.layout!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")

    # joint attention head space, set by the video expert
    @property
    def num_heads(self) -> int:
        return self.video.num_heads

    @property
    def head_dim(self) -> int:
        return self.video.head_dim

    # ---- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MotusConfig":
        d = dict(d)
        subs = {"video": VideoExpertConfig, "action": ActionExpertConfig, "und": UndExpertConfig, "flow": FlowConfig}
        for name, sub in subs.items():
            if name in d:
                d[name] = _build(sub, d[name], name)
        return _build(cls, d, "")

    def override(self, overrides: dict[str, Any]) -> "MotusConfig":
        """Return a copy with dotted fields replaced, e.g. ``{"num_layers": 4, "action.dim": 256}``."""
        d = self.to_dict()
        for key, value in overrides.items():
            node, parts = d, key.split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise KeyError(f"unknown config field {key!r}")
                node = node[p]
            if parts[-1] not in node:
                raise KeyError(f"unknown config field {key!r}")
            node[parts[-1]] = value
        return MotusConfig.from_dict(d)


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown field(s) {sorted(unknown)} in {where or 'config'}")
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """One training run (DESIGN.md section 7). Batch sizes are per process and micro-step; the effective batch is
    batch_size * grad_accum * world_size. Defaults follow upstream (AdamW 0.9/0.95, wd 0.01, clip 0.5, linear
    schedule after a 200-step warm-up)."""

    stage: int = 3                  # 1: video expert only; 2: all experts on latent actions; 3: target robot
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    video_lr: Optional[float] = None        # separate learning rate for the video expert (upstream wan_learning_rate)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    warmup_steps: int = 200
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    min_lr_ratio: float = 0.4               # lr multiplier at the last step (upstream f_min)
    ema_decay: float = 0.0                  # 0 disables EMA
    seed: int = 0
    param_dtype: Literal["bf16", "fp32"] = "bf16"   # FSDP compute dtype; gradients are reduced in fp32
    activation_checkpointing: bool = True
    compile: bool = False
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    logger: Literal["tensorboard", "wandb", "jsonl"] = "tensorboard"
    init_from: Optional[str] = None         # checkpoint dir to initialise weights from (stage transitions)

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def override(self, overrides: dict[str, Any]) -> "TrainConfig":
        d = dataclasses.asdict(self)
        unknown = set(overrides) - set(d)
        if unknown:
            raise KeyError(f"unknown train config field(s) {sorted(unknown)}")
        d.update(overrides)
        return _build(TrainConfig, d, "train")


PRESETS: dict[str, MotusConfig] = {
    # the shapes of ../shared/fixtures/upstream_motus_tiny (action eps as in that fixture)
    "tiny": MotusConfig(
        num_layers=2,
        video=VideoExpertConfig(dim=256, ffn_dim=512, num_heads=2, freq_dim=256, text_dim=64, text_len=16),
        action=ActionExpertConfig(dim=128, ffn_dim=512, chunk_size=16, eps=1e-6),
        und=UndExpertConfig(dim=64, ffn_dim=256, vlm_dim=96),
    ),
    "small": MotusConfig(
        num_layers=12,
        video=VideoExpertConfig(dim=1536, ffn_dim=6144, num_heads=12),
        action=ActionExpertConfig(dim=512, ffn_dim=2048),
        und=UndExpertConfig(dim=256, ffn_dim=1024),
    ),
    "motus-8b": MotusConfig(),
}


def get_preset(name: str) -> MotusConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


# ---- command-line helpers (every CLI overrides configs the same way) -------------------------------------------
def parse_overrides(items: Optional[list[str]]) -> dict:
    """["a.b=3", "c=foo"] -> {"a.b": 3, "c": "foo"} (values parsed as JSON when they are JSON)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_config_args(p, default_preset: str = "tiny") -> None:
    """--preset and repeatable --set KEY=VALUE on an argparse parser."""
    p.add_argument("--preset", default=default_preset, help="model preset: tiny, small, motus-8b")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set action.dim=256 (repeatable)")


def config_from_args(args) -> MotusConfig:
    return get_preset(args.preset).override(parse_overrides(args.set))
