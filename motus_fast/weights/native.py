"""Our checkpoint format: a directory with ``model.safetensors`` (our key names) and ``config.json`` (MotusConfig).

Loading is strict: missing, unexpected or mis-shaped tensors raise ``CheckpointError`` naming them.
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
                    extra: Optional[dict] = None, filename: str = "model.safetensors"):
    """save_pretrained for a state dict we already hold (e.g. gathered from FSDP shards)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in state_dict.items()}
    save_file(sd, str(out / filename), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "config": cfg.to_dict()}
    if extra:
        meta["extra"] = extra
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def load_extra(ckpt_dir: str | Path) -> dict:
    """The "extra" metadata stored with a checkpoint (norm stats, ...); {} if none."""
    path = Path(ckpt_dir) / "config.json"
    return json.loads(path.read_text()).get("extra", {}) if path.is_file() else {}


def load_config(ckpt_dir: str | Path) -> MotusConfig:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a motus_fast checkpoint directory has config.json and "
                              "model.safetensors)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return MotusConfig.from_dict(meta["config"])


def load_pretrained(ckpt_dir: str | Path, dtype: Optional[torch.dtype] = None, device=None):
    """Build our Motus from a motus_fast checkpoint directory (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from motus_fast.model import Motus

    cfg = load_config(ckpt_dir)
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        sd = load_file(str(path), device=str(device or "cpu"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
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
