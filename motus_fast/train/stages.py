"""The three Motus training stages (DESIGN.md section 7).

| stage | streams trained                        | action tokens                 | initialised from            |
|-------|----------------------------------------|-------------------------------|-----------------------------|
| 1     | video expert alone (no action/und)     | -                             | Wan2.2 (motus-fast init)    |
| 2     | all experts, VLM frozen                | pretrain layout, latent acts  | stage 1: its video expert   |
| 3     | all experts, VLM frozen                | finetune layout, robot acts   | stage 2, minus the action   |
|       |                                        |                               | encoder/decoder (upstream)  |

Stage 3 initialises from a stage-2 checkpoint exactly as upstream's ``load_pretrain_weights`` does: every weight
except the action expert's input encoder (state/action encoders, position table, registers) and decoder, which are
freshly initialised because the state and action spaces change.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from motus_fast.config import MotusConfig

log = logging.getLogger("motus_fast")

# our names of upstream's action_expert.input_encoder.* / decoder.* (+ registers, absent in the pretrain layout)
ACTION_IO = ("action.state_encoder.", "action.action_encoder.", "action.pos_table", "action.registers",
             "action.decoder_modulation", "action.head.")


def model_config_for_stage(cfg: MotusConfig, stage: int) -> MotusConfig:
    """Stage 2 trains the pretrain token layout; stages 1 and 3 the finetune layout."""
    want = "pretrain" if stage == 2 else "finetune"
    if cfg.action.layout != want:
        log.info("stage %d uses the %s action layout (config had %s)", stage, want, cfg.action.layout)
        cfg = cfg.override({"action.layout": want})
    return cfg


def uses_action_stream(stage: int) -> bool:
    return stage != 1


def trainable_parameter_names(model, stage: int) -> set[str]:
    """Stage 1 trains the video expert only; stages 2 and 3 train every expert (the VLM lives outside the model).
    Parameters without any effect on the outputs stay frozen."""
    groups = model.expert_parameters()
    names = {n for n, _ in groups["video"]} if stage == 1 else {n for g in groups.values() for n, _ in g}
    return names - model.unused_parameter_names()


def initial_weights(model, stage: int, source: str | Path) -> None:
    """Load the weights a stage starts from (a motus_fast checkpoint dir: model.safetensors + config.json) into an
    unsharded model, reporting what stays freshly initialised."""
    from motus_fast.weights.native import read_weights
    from motus_fast.weights.upstream import CheckpointError

    path = Path(source) / "model.safetensors"
    src = read_weights(source)
    ours = model.state_dict()
    if stage == 2:        # from stage 1: the video expert only; action/und start fresh as upstream
        take = {k for k in src if k in ours and (k.startswith("video.") or ".video." in k)}
    elif stage == 3:      # from stage 2: everything but the action encoder/decoder
        take = {k for k in src if k in ours and not k.startswith(ACTION_IO)}
    else:
        take = set(src) & set(ours)
    misshaped = [f"{k}: file {list(src[k].shape)}, model {list(ours[k].shape)}" for k in sorted(take)
                 if src[k].shape != ours[k].shape]
    if misshaped:
        raise CheckpointError(f"{path}: mis-shaped tensors for stage {stage}:\n  " + "\n  ".join(misshaped[:20]))
    with torch.no_grad():
        for k in take:
            ours[k].copy_(src[k])
    fresh = sorted(set(ours) - take)
    log.info("stage %d: initialised %d tensors from %s; %d stay fresh%s", stage, len(take), source, len(fresh),
             f" (e.g. {', '.join(fresh[:4])})" if fresh else "")
