"""Encode once, train many times: the frozen encoders' outputs for a whole DataConfig, on disk.

``motus-fast encode`` runs the encoders over every window of every dataset once and writes

    CACHE/index.json                         format, encoders (files, layouts, dtypes), preprocessing, datasets
    CACHE/encoding.json                      the same description, written first (a resumed run must match it)
    CACHE/<dataset>/<episode>.safetensors    one shard per episode:
        latents.<cond>        VAE latents of the window at condition frame <cond>   [C, T', h, w] float32
        text.<i>              umT5 states of the episode's instruction i (trimmed)  [L_t, text_dim]
        vlm.<cond>.<i>        VLM features of the condition frame + instruction i   [L_u, vlm_dim]

Each window and each instruction is encoded on its own (batch 1), exactly as ``EncodedDataset`` encodes a sample
online, so training from the cache gives bit-identical batches. Shards are written atomically (temporary file +
rename): a killed run leaves only complete shards, and a rerun skips them. Under torchrun rank r encodes every
N-th episode of each dataset; rank 0 writes ``index.json`` once all ranks are done.

``EncodedCache`` reads it and refuses a cache made with other encoders or preprocessing, naming the field;
``CachedDataset`` serves FlowBatches from it to the trainer (frames are not decoded at all).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from motus_fast.data.dataset import MotusDataset
from motus_fast.data.errors import DataError
from motus_fast.data.mixture import MixtureDataset
from motus_fast.flow import FlowBatch
from motus_fast.model.mot import Conditioning

log = logging.getLogger("motus_fast")
FORMAT = "motus_fast/encoded/1"
Tensor = torch.Tensor


# ---- what a cache was made with ----------------------------------------------------------------------------------
def dataset_description(ds: MotusDataset) -> dict:
    """Everything about a dataset that changes its encoded windows."""
    return {"root": str(Path(ds.root).resolve()), "windows": int(len(ds)), "episodes": ds.num_episodes,
            "clip_fingerprint": ds.fingerprint}


def describe(encoders_desc: dict, mixture: MixtureDataset) -> dict:
    """The description a cache is made with and checked against: the encoders (``encoders_desc``: files, layouts,
    dtypes, prompt) and each dataset's windows (frame size, cameras, window: its clip fingerprint)."""
    return {"format": FORMAT, "encoders": encoders_desc,
            "datasets": {ds.name: dataset_description(ds) for ds in mixture.datasets}}


def first_difference(have, want, path: str = "") -> Optional[str]:
    """The first field where two descriptions differ, as 'a.b.c: cache X, this run Y'."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            d = first_difference(have.get(k), want.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if have == want else f"{path}: cache {have!r}, this run {want!r}"


def shard_path(root: Path, dataset: str, episode: str) -> Path:
    return root / dataset.replace("/", "_") / f"{episode.replace('/', '_')}.safetensors"


# ---- writing ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_episode(ds: MotusDataset, ep: int, encoders) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every window of episode `ep` and every instruction of it, each encoded alone -> (tensors, metadata)."""
    lo, hi = int(ds.offsets[ep]), int(ds.offsets[ep + 1])
    instructions = [ds.spec.instruction] if ds.spec.instruction is not None else ds.source.instructions(ep)
    tensors: dict[str, Tensor] = {}
    for i, text in enumerate(instructions):
        states, lens = encoders.encode_prompts([text])
        tensors[f"text.{i}"] = states[0] if lens is None else states[0, : int(lens[0])]
    conds = []
    for index in range(lo, hi):
        _, cond = ds.locate(index)
        sample = ds._load(ep, cond, 0)
        frames = sample.frames.permute(0, 2, 3, 1)[None]                     # 1, T, H, W, 3
        tensors[f"latents.{cond}"] = encoders.encode_frames(frames)[0]
        if encoders.vlm_dim is not None:
            for i, text in enumerate(instructions):
                hidden, lens = encoders.encode_vlm([encoders.vlm_prompt(frames[0, 0].numpy(), text)])
                tensors[f"vlm.{cond}.{i}"] = hidden[0] if lens is None else hidden[0, : int(lens[0])]
        conds.append(cond)
    meta = {"instructions": json.dumps(instructions), "conds": json.dumps(conds),
            "episode": ds.source.episode_name(ep), "clip_fingerprint": ds.fingerprint}
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, meta


def encode_mixture(mixture: MixtureDataset, encoders, out: str | Path, encoders_desc: dict, rank: int = 0,
                   world_size: int = 1, progress: bool = True) -> int:
    """Write this rank's shards (every `world_size`-th episode of each dataset), skipping finished ones. Returns
    the number of episodes encoded now. Rank 0 later calls ``write_index``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    desc = describe(encoders_desc, mixture)
    started = out / "encoding.json"
    if started.is_file():                     # a resumed run must encode the same way
        diff = first_difference(json.loads(started.read_text()), desc)
        if diff:
            raise DataError(f"{started}: this cache was started with other encoders or data ({diff}); use a new "
                            "--out or delete it")
    elif rank == 0:
        tmp = started.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(desc, indent=2))
        os.replace(tmp, started)
    todo = [(ds, ep) for ds in mixture.datasets for ep in range(rank, ds.num_episodes, world_size)
            if ds.windows_per_episode[ep] > 0]
    done = 0
    for ds, ep in tqdm(todo, desc=f"encode (rank {rank})", unit="episode", disable=not progress):
        path = shard_path(out, ds.name, ds.source.episode_name(ep))
        if path.is_file():
            continue
        tensors, meta = encode_episode(ds, ep, encoders)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        done += 1
    return done


def write_index(mixture: MixtureDataset, out: str | Path, encoders_desc: dict) -> Path:
    """index.json, once every shard is there (names the first missing one otherwise)."""
    out = Path(out)
    for ds in mixture.datasets:
        for ep in range(ds.num_episodes):
            if ds.windows_per_episode[ep] > 0 and not shard_path(out, ds.name, ds.source.episode_name(ep)).is_file():
                raise DataError(f"{shard_path(out, ds.name, ds.source.episode_name(ep))}: missing; the encode run did "
                                "not finish (run it again: finished episodes are skipped)")
    path = out / "index.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(describe(encoders_desc, mixture), indent=2))
    os.replace(tmp, path)
    return path


# ---- reading ---------------------------------------------------------------------------------------------------------
class EncodedCache:
    """A finished cache, checked against what this run would encode (``expect``: a ``describe`` dict; None: no
    check, e.g. when the encoders are not at hand)."""

    def __init__(self, path: str | Path, expect: Optional[dict] = None):
        self.root = Path(path)
        index = self.root / "index.json"
        if not index.is_file():
            raise DataError(f"{index}: not found; not a finished encoded cache (run `motus-fast encode`, or rerun it "
                            "to finish)")
        self.index = json.loads(index.read_text())
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index}: format {self.index.get('format')!r} is not {FORMAT!r}")
        if expect is not None:
            diff = first_difference(self.index, expect)
            if diff:
                raise DataError(f"{index}: the cache was made differently from this run ({diff}); encode again")
        self._open: dict[Path, tuple] = {}

    def shard(self, dataset: str, episode: str):
        """(safe_open handle, instructions) of one episode's shard."""
        from safetensors import SafetensorError, safe_open

        path = shard_path(self.root, dataset, episode)
        if path not in self._open:
            try:
                f = safe_open(str(path), framework="pt")
                meta = f.metadata() or {}
                instructions = json.loads(meta["instructions"])
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                raise DataError(f"{path}: a corrupt or missing cache shard ({type(e).__name__}: {e}); delete it and "
                                "rerun `motus-fast encode`") from e
            if len(self._open) > 64:
                self._open.clear()
            self._open[path] = (f, instructions)
        return self._open[path]

    def check_shards(self) -> None:
        """Open every shard's header once: a corrupt one fails here, before training starts."""
        for name, d in self.index["datasets"].items():
            folder = self.root / name.replace("/", "_")
            if d["windows"] and not folder.is_dir():
                raise DataError(f"{folder}: missing from the cache")
            for p in sorted(folder.glob("*.safetensors")):
                self.shard(name, p.stem)
        self._open.clear()


class CachedDataset(torch.utils.data.Dataset):
    """FlowBatches (batch size 1, as ``EncodedDataset`` gives them) from an ``EncodedCache``: actions, state and the
    instruction draw come from the mixture (frames are not read), the encodings from the cache."""

    def __init__(self, mixture: MixtureDataset, cache: EncodedCache):
        self.mixture, self.cache = mixture, cache

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, item) -> FlowBatch:
        s = self.mixture[item]
        name, episode, cond = s.key.rsplit("/", 2)
        f, instructions = self.cache.shard(name, episode)
        try:
            i = instructions.index(s.instruction)
            video, text = f.get_tensor(f"latents.{cond}"), f.get_tensor(f"text.{i}")
            keys = set(f.keys())
            vlm = f.get_tensor(f"vlm.{cond}.{i}") if f"vlm.{cond}.{i}" in keys else None
        except (ValueError, KeyError) as e:
            raise DataError(f"{shard_path(self.cache.root, name, episode)}: no encoding of window {cond} / "
                            f"instruction {s.instruction!r} ({e}); the cache does not match the data") from e
        cond_ = Conditioning(text=text[None], vlm=None if vlm is None else vlm[None],
                             state=None if s.state is None else s.state[None])
        return FlowBatch(video=video[None], actions=s.actions[None], cond=cond_,
                         has_actions=torch.tensor([s.has_actions]))
