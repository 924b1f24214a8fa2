"""Loading plumbing shared by the backbone loaders: folder resolution, header checks, strict transformers loads.

Before a library sees the files we open them ourselves (headers only): a missing shard or a truncated file fails
naming the file. After loading, every missing, unexpected or mis-shaped tensor is an error naming the key (the
libraries would re-initialise it at random and only warn). Every backbone comes back frozen (``requires_grad``
off) and in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from motus_fast.weights.mapping import CheckpointError, report
from motus_fast.weights.sources import TORCH_SUFFIXES, open_weights


def component_dir(path: str | Path, what: str, subfolder: Optional[str] = None) -> Path:
    """The folder holding one model: `path` itself, or `path`/`subfolder` when `path` is a diffusers pipeline
    folder (it has ``model_index.json``)."""
    p = Path(path)
    if subfolder and p.is_dir() and (p / "model_index.json").is_file() and (p / subfolder).is_dir():
        p = p / subfolder
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory ({what} loads from a folder with config.json and weights)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p / 'config.json'}: not found ({what} needs its config.json)")
    return p


def is_torch_file(path: str | Path) -> bool:
    return Path(path).suffix in TORCH_SUFFIXES


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def check_files(folder: Path) -> dict[str, str]:
    """Open the weights in `folder` (headers only) so that a missing shard or a truncated file is reported by
    name before a library reads them. Returns {key: file name} for naming keys in later errors."""
    with open_weights(folder, prefer=("model", "diffusion_pytorch_model")) as src:
        return {k: src.where(k) for k in src.keys()}


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def transformers_load(cls, folder: Path, dtype: torch.dtype, what: str):
    """``cls.from_pretrained(folder)`` with every key problem an error naming the key and its file."""
    files = check_files(folder)
    try:
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: {what} cannot be loaded by transformers ({type(e).__name__}: {e})") from e
    where = lambda k: f"{k} (in {files[k]})" if k in files else k  # noqa: E731
    misshaped = [f"{where(k)}: checkpoint {list(c)}, model expects {list(m)}"
                 for k, c, m in sorted(info.get("mismatched_keys", ()))]
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing or unexpected or misshaped or info.get("error_msgs"):
        msg = report(missing, [where(k) for k in unexpected], misshaped,
                     f"{folder}: {what} checkpoint does not match its config.json:")
        raise CheckpointError("\n".join([msg, *info.get("error_msgs", [])]))
    return freeze(model)


def parameter_count(shapes) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= int(d)
        n += k
    return n
