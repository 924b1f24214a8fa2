"""Latent-action checkpoints: a directory with ``model.safetensors`` and ``config.json``.

``config.json``: {"format": "motus_fast.latent_action/1", "config": LatentActionConfig as a dict, "config_hash",
"step", "dcae_config": the diffusers config of the DC-AE whose weights are stored (or null), "dcae_weights":
"stored" | "pretrained_path"}.

The DC-AE's weights (``dcae.*`` keys) are stored unless the DC-AE is frozen and came from ``dcae.pretrained_path``:
then the checkpoint refers to that path instead of duplicating a large frozen network, and loading needs it.
Every file is written to a temporary name and renamed, config.json last, so a killed save never leaves a
directory that loads with mismatched parts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from motus_fast.latent_action.config import LatentActionConfig
from motus_fast.latent_action.dcae import build_dcae, dcae_from_config
from motus_fast.latent_action.model import LatentActionVAE

FORMAT = "motus_fast.latent_action/1"


class LatentActionCheckpointError(RuntimeError):
    pass


def _stores_dcae(cfg: LatentActionConfig) -> bool:
    return cfg.dcae.trainable or cfg.dcae.pretrained_path is None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_latent_action_model(model: LatentActionVAE, out_dir: str | Path, step: int = 0) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stores = _stores_dcae(model.cfg)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
          if stores or not k.startswith("dcae.")}
    meta = {"format": FORMAT, "config": model.cfg.to_dict(), "config_hash": model.cfg.config_hash(), "step": step,
            "dcae_weights": "stored" if stores else "pretrained_path",
            "dcae_config": dict(model.dcae.config) if stores else None}
    _atomic_write(out / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": FORMAT}))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=_jsonable)))
    return out


def _jsonable(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise LatentActionCheckpointError(f"{path}: not found (a latent-action checkpoint directory has "
                                          "config.json and model.safetensors)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise LatentActionCheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_latent_action_model(ckpt_dir: str | Path, device: Optional[str | torch.device] = None) -> LatentActionVAE:
    """Rebuild the model a checkpoint directory holds (strict: missing/unexpected/mis-shaped keys raise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(ckpt_dir)
    cfg = LatentActionConfig.from_dict(meta["config"])
    stored = meta["dcae_weights"] == "stored"
    dcae = dcae_from_config(meta["dcae_config"]) if stored else build_dcae(cfg.dcae)
    model = LatentActionVAE(cfg, dcae=dcae)
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LatentActionCheckpointError(f"{path}: cannot be read ({e})") from e
    expected = {k: v for k, v in model.state_dict().items() if stored or not k.startswith("dcae.")}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    misshaped = [f"{k}: file {list(sd[k].shape)}, model {list(expected[k].shape)}"
                 for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise LatentActionCheckpointError(f"{path}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                                          f"mis-shaped {misshaped[:8]}")
    model.load_state_dict(sd, strict=False)   # strictness checked above (dcae.* may live at pretrained_path)
    return model.to(device) if device is not None else model
