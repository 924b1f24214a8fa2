"""Frozen configuration for the latent-action pipeline, with presets.

- ``tiny``: CI-sized: a small random DC-AE at 32 x 32 (8 x 8 tokens of width 8), flow computed at 64 x 64.
- ``motus``: the paper's setting: DC-AE f128c512 at 256 x 256 (2 x 2 = 4 tokens of width 512). Its DC-AE weights
  are not bundled: set ``dcae.pretrained_path`` to a local diffusers ``AutoencoderDC`` directory.

``LatentActionConfig.override({"train.steps": 100, "frame_spacing": 4})`` returns a new config with dotted fields
replaced (the CLI's ``--set`` uses it). ``config_hash()`` fingerprints a config (it is written next to every set of
labels, so a stage-2 run can tell which latent-action model produced them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

DIS_PRESETS = ("ultrafast", "fast", "medium")


@dataclass(frozen=True)
class OpticalFlowConfig:
    # "dis": OpenCV DIS (no weights). Anything else is "package.module:factory", a learned flow model:
    # factory(OpticalFlowConfig) -> FlowEstimator (see optical_flow.py).
    method: str = "dis"
    dis_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    # (H, W) the frames are resized to before the flow is computed; None = as decoded. Flow is then resampled to
    # the model's image_size, so this only trades flow quality for time.
    flow_size: Optional[tuple[int, int]] = None
    # speed at which the colour wheel saturates, as a fraction of the image's longer side per latent step
    max_flow: float = 0.1

    def __post_init__(self):
        if self.method == "dis" and self.dis_preset not in DIS_PRESETS:
            raise ValueError(f"flow.dis_preset must be one of {DIS_PRESETS}, got {self.dis_preset!r}")
        if self.method != "dis" and ":" not in self.method:
            raise ValueError(f"flow.method must be 'dis' or 'package.module:factory', got {self.method!r}")
        if self.flow_size is not None and (len(self.flow_size) != 2 or min(self.flow_size) < 8):
            raise ValueError(f"flow.flow_size must be (H, W) with both >= 8, got {self.flow_size}")
        if not self.max_flow > 0:
            raise ValueError(f"flow.max_flow must be > 0, got {self.max_flow}")


@dataclass(frozen=True)
class DCAEConfig:
    """The deep-compression autoencoder (diffusers ``AutoencoderDC``) that turns a flow image into tokens.

    With ``pretrained_path`` the architecture and weights come from that local directory; otherwise a randomly
    initialised DC-AE of the shape below is built (CI). Its stages are ResBlocks with EfficientViT attention in the
    last one, as in the released DC-AEs; the spatial compression is 2 ** (len(block_out_channels) - 1)."""

    pretrained_path: Optional[str] = None
    latent_channels: int = 8
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: tuple[int, ...] = (1, 1, 1)
    attention_head_dim: int = 8
    trainable: bool = False          # False: frozen (eval mode, no gradients); True: fine-tuned at `lr`
    lr: float = 1e-5

    def __post_init__(self):
        # an empty shape is allowed here (the "motus" preset: weights must come from a path); build_dcae says so
        if len(self.layers_per_block) != len(self.block_out_channels):
            raise ValueError(f"dcae.layers_per_block {self.layers_per_block} must have one entry per stage of "
                             f"dcae.block_out_channels {self.block_out_channels}")
        if self.block_out_channels and self.block_out_channels[-1] % self.latent_channels:
            # AutoencoderDC's shortcuts average/repeat the last stage's channels in groups of latent_channels
            raise ValueError(f"dcae.block_out_channels[-1]={self.block_out_channels[-1]} must be a multiple of "
                             f"dcae.latent_channels={self.latent_channels}")


@dataclass(frozen=True)
class LatentActionModelConfig:
    """The VAE around the DC-AE: tokens [N, C] -> lightweight encoder -> (mean, log-variance) of a latent action
    -> lightweight decoder -> tokens -> DC-AE decoder -> flow image."""

    image_size: tuple[int, int] = (256, 256)   # (H, W) of the flow image fed to the DC-AE
    latent_dim: int = 14
    token_proj_dim: int = 64     # each DC-AE token is projected to this width, then all are flattened
    hidden_dim: int = 512
    num_hidden_layers: int = 2

    def __post_init__(self):
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"model.image_size must be (H, W), got {self.image_size}")
        for name in ("latent_dim", "token_proj_dim", "hidden_dim", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class LatentActionTrainConfig:
    """Loss: L_recon + lambda_a * ||a_real - a_pred||^2 (labelled samples only) + beta * KL (paper section 4.2).
    Optimiser as DESIGN.md section 7: AdamW (0.9, 0.95), weight decay 0.01, grad clip 0.5, warmup + cosine."""

    steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    warmup_steps: int = 500
    lambda_a: float = 1.0
    beta: float = 1e-6
    # expected share of labelled samples per batch (the paper's 90% unlabelled / 10% labelled mix); when one pool
    # is empty every sample comes from the other
    labelled_fraction: float = 0.1
    seed: int = 0
    log_every: int = 50
    save_every: int = 2000       # 0: only at the end

    def __post_init__(self):
        if not 0.0 <= self.labelled_fraction <= 1.0:
            raise ValueError(f"train.labelled_fraction must be in [0, 1], got {self.labelled_fraction}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"train.steps must be >= 0 and train.batch_size >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.log_every < 1 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("train.log_every must be >= 1, train.save_every and train.warmup_steps >= 0")


@dataclass(frozen=True)
class LatentActionConfig:
    # Raw video frames between the two frames of one latent action. Row k of an episode's labels is the motion from
    # raw frame k * frame_spacing to raw frame (k + 1) * frame_spacing. Default 6: upstream's stage-2 data samples
    # one latent action every 6 raw frames (the paper leaves the spacing open).
    frame_spacing: int = 6
    flow: OpticalFlowConfig = field(default_factory=OpticalFlowConfig)
    dcae: DCAEConfig = field(default_factory=DCAEConfig)
    model: LatentActionModelConfig = field(default_factory=LatentActionModelConfig)
    train: LatentActionTrainConfig = field(default_factory=LatentActionTrainConfig)

    def __post_init__(self):
        if self.frame_spacing < 1:
            raise ValueError(f"frame_spacing must be >= 1, got {self.frame_spacing}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of the canonical JSON of this config."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentActionConfig":
        d = dict(d)
        subs = {"flow": OpticalFlowConfig, "dcae": DCAEConfig, "model": LatentActionModelConfig,
                "train": LatentActionTrainConfig}
        for name, sub in subs.items():
            if name in d:
                d[name] = _build(sub, d[name], name)
        return _build(cls, d, "")

    def override(self, overrides: dict[str, Any]) -> "LatentActionConfig":
        """Return a copy with dotted fields replaced, e.g. ``{"train.steps": 100, "flow.dis_preset": "fast"}``."""
        d = self.to_dict()
        for key, value in overrides.items():
            node, parts = d, key.split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise KeyError(f"unknown latent-action config field {key!r}")
                node = node[p]
            if parts[-1] not in node:
                raise KeyError(f"unknown latent-action config field {key!r}")
            node[parts[-1]] = value
        return LatentActionConfig.from_dict(d)


def _tupled(v):
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown field(s) {sorted(unknown)} in latent-action config {where or '(top level)'}")
    return cls(**{k: _tupled(v) for k, v in d.items()})


PRESETS: dict[str, LatentActionConfig] = {
    "tiny": LatentActionConfig(
        frame_spacing=2,
        flow=OpticalFlowConfig(dis_preset="ultrafast", flow_size=(64, 64), max_flow=0.1),
        # a random DC-AE has nothing to preserve: it is trained with the rest (frozen, its random decoder cannot
        # draw flow images and the reconstruction term carries no signal)
        dcae=DCAEConfig(latent_channels=8, block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1),
                        attention_head_dim=8, trainable=True, lr=1e-3),
        model=LatentActionModelConfig(image_size=(32, 32), token_proj_dim=16, hidden_dim=256, num_hidden_layers=2),
        train=LatentActionTrainConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=30, log_every=25,
                                      save_every=0),
    ),
    # paper section 4.2: DC-AE f128c512 at 256 x 256 gives 4 tokens x 512; 14-D latent; lambda_a 1, beta 1e-6
    "motus": LatentActionConfig(
        dcae=DCAEConfig(block_out_channels=(), layers_per_block=()),
        model=LatentActionModelConfig(image_size=(256, 256)),
    ),
}


def get_preset(name: str) -> LatentActionConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown latent-action preset {name!r}; choose from {sorted(PRESETS)}") from None
