"""An optional disk cache of VAE latents, one small safetensors file per training window.

The file name is a hash of the sample's ``video_id`` (dataset name, episode, condition frame and a fingerprint of
everything that changes the clip: window, frame size, cameras, layout) and of the cache ``tag`` (name the VAE
there: latents of another VAE must not be reused). Writes are atomic (temporary file + rename), so ranks that
encode the same window at once cannot leave a torn file. The workers still decode frames; the cache saves the
VAE pass, the expensive part on the device.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch


class LatentCache:
    def __init__(self, directory: str | Path, tag: str):
        self.dir, self.tag = Path(directory), str(tag)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, video_id: str) -> Path:
        h = hashlib.sha256(f"{self.tag}\n{video_id}".encode()).hexdigest()[:40]
        return self.dir / h[:2] / f"{h}.safetensors"

    def get(self, video_id: str) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path(video_id)
        if not p.is_file():
            return None
        return load_file(str(p))["latents"]

    def put(self, video_id: str, latents: torch.Tensor) -> None:
        from safetensors.torch import save_file

        p = self.path(video_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"video_id": video_id, "tag": self.tag})
        tmp.replace(p)
