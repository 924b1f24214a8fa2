"""Training checkpoints: sharded DCP state (model, optimizer, EMA) + gathered ``model.safetensors`` in our native
format + ``train_state.json``.

Layout of a run directory::

    <run>/checkpoints/step_00000010/{dcp/, model.safetensors, [ema.safetensors], config.json, train_state.json}
    <run>/checkpoints/latest            # text: the name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed when every file is on disk; only then is ``latest``
replaced (atomically, via os.replace). A process killed mid-save leaves a ``.tmp`` directory that is ignored and
cleaned up by the next save, and ``latest`` still names the previous checkpoint. DCP shards reload on any world size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from motus_fast.train.distributed import barrier, broadcast_object
from motus_fast.weights.native import save_state_dict

log = logging.getLogger("motus_fast")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise RuntimeError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, train_state: dict, ema=None,
                    extra: Optional[dict] = None, keep_last: int = 3, is_main: bool = True) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint path."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.save(state, checkpoint_id=str(tmp / "dcp"))

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_ema = ema.full_state_dict() if ema is not None else None
    if is_main:
        _write_weights(full, model.cfg, tmp, extra, "model.safetensors")
        if full_ema is not None:
            _write_weights(full_ema, model.cfg, tmp, extra, "ema.safetensors")
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
        if final.exists():            # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _replace_text(root / "latest", name)
        _prune(root, keep_last)
    barrier()
    return final


def _write_weights(sd: dict, cfg, out_dir: Path, extra: Optional[dict], filename: str) -> None:
    save_state_dict(sd, cfg, out_dir, extra=extra, filename=filename)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp_pointer")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model, optimizer, ema=None) -> dict:
    """Collective: restore model/optimizer (and EMA) from a checkpoint's DCP shards, on any world size. Returns the
    train state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    train_state = json.loads((path / "train_state.json").read_text())
    return broadcast_object(train_state)
