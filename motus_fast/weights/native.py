"""Our checkpoint format: a directory with ``model.safetensors`` (our key names) and ``config.json`` (MotusConfig
plus "extra" metadata: norm stats, serving hints, backbones). This module alone reads and writes it.

Loading is strict: missing, unexpected or mis-shaped tensors raise ``CheckpointError`` naming them.
``load_model`` also takes an official Motus checkpoint (converted on the fly by ``weights.upstream``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from motus_fast.config import MotusConfig
from motus_fast.weights.upstream import CheckpointError

FORMAT = "motus_fast/1"


def save_pretrained(model, out_dir: str | Path, dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None):
    """Write model.safetensors + config.json into out_dir (created). `extra`: more JSON-able metadata
    (e.g. norm stats) stored in config.json under "extra"."""
    return save_state_dict(model.state_dict(), model.cfg, out_dir, dtype, extra)


def save_state_dict(state_dict: dict, cfg: MotusConfig, out_dir: str | Path, dtype: Optional[torch.dtype] = None,
                    extra: Optional[dict] = None, filename: str = "model.safetensors", progress: Optional[str] = None):
    """save_pretrained for a state dict we already hold (e.g. gathered from FSDP shards). Streams tensor by tensor
    (no second copy of the weights) and writes config.json last."""
    from motus_fast.weights.sources import write_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / filename, state_dict, dtype, metadata={"format": FORMAT}, progress=progress)
    meta = {"format": FORMAT, "config": cfg.to_dict()}
    if extra:
        meta["extra"] = extra
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def load_extra(ckpt_dir: str | Path) -> dict:
    """The "extra" metadata stored with a checkpoint (norm stats, ...); {} if none."""
    path = resolve_checkpoint(ckpt_dir) / "config.json"
    return json.loads(path.read_text()).get("extra", {}) if path.is_file() else {}


def load_config(ckpt_dir: str | Path) -> MotusConfig:
    path = resolve_checkpoint(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a motus_fast checkpoint directory has config.json and "
                              "model.safetensors)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return MotusConfig.from_dict(meta["config"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A training run's newest checkpoint when `path` is the run directory or its ``checkpoints/latest`` pointer
    (a text file naming the step directory); `path` itself otherwise."""
    p = Path(path)
    for pointer in (p / "checkpoints" / "latest", p / "latest", p):
        if pointer.is_file() and pointer.name == "latest":
            step = pointer.parent / pointer.read_text().strip()
            if not step.is_dir():
                raise CheckpointError(f"{pointer}: names {step.name}, which does not exist")
            return step
    return p


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is one of our checkpoint directories (else: an official checkpoint, or nothing)."""
    p = resolve_checkpoint(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def read_weights(ckpt_dir: str | Path, device=None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory's model.safetensors, by our key names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_checkpoint(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a motus_fast checkpoint directory has config.json and "
                              "model.safetensors)")
    try:
        return load_file(str(path), device=str(device or "cpu"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e


def load_pretrained(ckpt_dir: str | Path, dtype: Optional[torch.dtype] = None, device=None):
    """Build our Motus from a motus_fast checkpoint directory (strict)."""
    from motus_fast.model import Motus

    cfg = load_config(ckpt_dir)
    path = resolve_checkpoint(ckpt_dir) / "model.safetensors"
    sd = read_weights(ckpt_dir, device)
    with torch.device("meta"):
        model = Motus(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = [f"{k}: file {list(sd[k].shape)}, model {list(expected[k].shape)}"
                 for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        from motus_fast.weights.upstream import _report
        raise CheckpointError(f"{path}: " + _report(missing, unexpected, misshaped))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


VLM_FILE = "vlm.safetensors"


def save_vlm_weights(tensors: dict[str, torch.Tensor], ckpt_dir: str | Path, progress: Optional[str] = None) -> Path:
    """The frozen VLM a checkpoint was trained with, beside its model (transformers key names)."""
    from motus_fast.weights.sources import write_safetensors

    return write_safetensors(Path(ckpt_dir) / VLM_FILE, tensors, metadata={"format": FORMAT, "kind": "qwen3_vl"},
                             progress=progress)


def load_vlm_weights(path: str | Path) -> tuple[Optional[dict[str, torch.Tensor]], str]:
    """The VLM weights a checkpoint carries, and where they are: our directory's vlm.safetensors, or an official
    checkpoint's ``vlm_model.*`` tensors. (None, "") when it carries none."""
    from motus_fast.weights.upstream import read_checkpoint, upstream_vlm_state_dict

    if is_checkpoint_dir(path):
        f = resolve_checkpoint(path) / VLM_FILE
        if not f.is_file():
            return None, ""
        from motus_fast.weights.sources import open_weights
        with open_weights(f) as src:
            return {k: src.load(k) for k in src.keys()}, str(f)
    vlm = upstream_vlm_state_dict(read_checkpoint(path), str(path))
    return (vlm or None), (f"{path} (vlm_model.*)" if vlm else "")


def load_model(path: str | Path, *, dtype: Optional[torch.dtype] = None, device=None, upstream_config=None):
    """Our checkpoint directory or an official checkpoint (converted on the fly) -> (model in eval mode, the
    checkpoint's "extra" metadata: norm stats etc.; {} for an official checkpoint)."""
    from motus_fast.weights.upstream import load_upstream

    if is_checkpoint_dir(path):
        path = resolve_checkpoint(path)
        return load_pretrained(path, dtype=dtype, device=device).eval(), load_extra(path)
    model = load_upstream(path, dtype=dtype, upstream_config=upstream_config)
    return model.to(device).eval(), {}
