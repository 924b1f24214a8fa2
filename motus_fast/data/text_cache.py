"""A disk cache of umT5 states, one entry per unique instruction (``motus-fast encode-text`` writes it).

One safetensors file: tensor ``<key>`` = the states [L, text_dim] of one instruction, ``key = sha256(text)[:32]``;
the metadata holds ``{"format", "encoder", "texts": {key: instruction}}`` so the file says what it contains. Readers
open it lazily per process (memory-mapped), so DataLoader workers share the pages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

FORMAT = "motus_fast/text_cache/1"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class TextCache:
    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: text cache not found (build it with `motus-fast encode-text`)")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a motus_fast text cache (format {meta.get('format')!r})")
        self.encoder = meta.get("encoder")
        self.texts: dict[str, str] = json.loads(meta.get("texts", "{}"))
        self._handle = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self.texts

    def __len__(self) -> int:
        return len(self.texts)

    def get(self, text: str) -> Optional[torch.Tensor]:
        key = text_key(text)
        if key not in self.texts:
            return None
        if self._handle is None:
            from safetensors import safe_open
            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_tensor(key)


def build_text_cache(texts: Iterable[str], encoder, path: str | Path, batch_size: int = 16,
                     encoder_name: str = "", progress: bool = True) -> Path:
    """Encode each unique text once and write the cache (atomically). Returns the path."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    unique = sorted(set(texts))
    if not unique:
        raise ValueError("no instructions to encode")
    tensors, names = {}, {}
    for i in tqdm(range(0, len(unique), batch_size), desc="encode-text", disable=not progress):
        chunk = unique[i: i + batch_size]
        for text, states in zip(chunk, encoder(chunk)):
            key = text_key(text)
            tensors[key] = states.detach().float().cpu().contiguous()
            names[key] = text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "encoder": encoder_name, "texts": json.dumps(names)})
    tmp.replace(path)
    return path
