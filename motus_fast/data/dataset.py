"""Map-style windowed dataset over one on-disk dataset: index -> one training sample, deterministically.

Index space: every (episode, candidate condition frame) pair, in episode order (``WindowSpec`` says which frames a
window reads). ``__getitem__`` takes an int or ``(index, draw_seed)`` -- the sampler passes the seed of that draw,
which picks among an episode's instructions (upstream picks at random) so a resumed run reads exactly the same
samples. Any failure while reading becomes ``DataError`` naming the dataset root, the file and the episode.

A ``Sample`` is raw and small (uint8 frames; the VAE, umT5 and the VLM run later on the device, see
``encode.BatchEncoder``); ``collate`` stacks samples into a ``RawBatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from motus_fast.data.config import DataConfig, DatasetSpec
from motus_fast.data.errors import DataError
from motus_fast.data.image import compose, resize_with_pad
from motus_fast.data.latent_actions import LatentActionStore
from motus_fast.data.norm import DatasetStats, FeatureStats, normalize
from motus_fast.data.source import EpisodeSource, open_source

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass
class Sample:
    """frames: uint8 [T, 3, H, W] (T = 1 + num_video_frames, frame 0 = the condition frame); actions: float32
    [K, A], normalised (zeros when has_actions is False); state: float32 [S] normalised, or None (pretrain layout);
    text: cached umT5 states [L, text_dim] if available; vlm_inputs: the VLM's preprocessed inputs if a VLM is
    configured; key: "<dataset>/<episode>/<condition frame>"; video_id: the key plus a fingerprint of everything
    that shapes the clip (window, frame size, cameras, layout), naming cached latents."""

    frames: Tensor
    actions: Tensor
    state: Optional[Tensor]
    has_actions: bool
    instruction: str
    key: str
    level: str
    video_id: str = ""
    text: Optional[Tensor] = None
    vlm_inputs: Optional[dict] = None


@dataclass
class RawBatch:
    """A collated batch before the encoders. frames: uint8 [B, T, 3, H, W]; actions: [B, K, A]; state: [B, S] or
    None; has_actions: bool [B]; text: per-sample cached umT5 states or None; vlm_inputs: per-sample dicts or None."""

    frames: Tensor
    actions: Tensor
    state: Optional[Tensor]
    has_actions: Tensor
    instructions: list[str]
    keys: list[str]
    levels: list[str]
    text: list[Optional[Tensor]] = field(default_factory=list)
    vlm_inputs: Optional[list[dict]] = None
    video_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.frames.shape[0]

    def pin_memory(self) -> "RawBatch":
        """DataLoader(pin_memory=True) calls this in its pinning thread."""
        pin = lambda t: None if t is None else t.pin_memory()   # noqa: E731
        return RawBatch(pin(self.frames), pin(self.actions), pin(self.state), pin(self.has_actions),
                        self.instructions, self.keys, self.levels, [pin(t) for t in self.text], self.vlm_inputs,
                        self.video_ids)


def collate(samples: list[Sample]) -> RawBatch:
    states = [s.state for s in samples]
    if any(s is None for s in states) and not all(s is None for s in states):
        raise ValueError("a batch mixes samples with and without state (datasets disagree on with_state)")
    shapes = {tuple(s.actions.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"action chunks of one batch differ in shape {sorted(shapes)} (set data.action_dim to pad "
                         "every dataset to one width)")
    return RawBatch(
        frames=torch.stack([s.frames for s in samples]),
        actions=torch.stack([s.actions for s in samples]),
        state=None if states[0] is None else torch.stack(states),
        has_actions=torch.tensor([s.has_actions for s in samples], dtype=torch.bool),
        instructions=[s.instruction for s in samples],
        keys=[s.key for s in samples],
        levels=[s.level for s in samples],
        text=[s.text for s in samples],
        vlm_inputs=None if any(s.vlm_inputs is None for s in samples) else [s.vlm_inputs for s in samples],
        video_ids=[s.video_id for s in samples],
    )


def _default_keys(source: EpisodeSource) -> tuple[Optional[str], Optional[str]]:
    keys = source.lowdim_keys
    state = next((k for k in ("observation.state", "qpos", "state") if k in keys), None)
    action = next((k for k in ("action", "actions", "qpos") if k in keys), None)
    return state, action


class MotusDataset(Dataset):
    """One dataset of a DataConfig, windowed. ``stats``: its normalisation statistics (None with mode "none");
    ``text_cache``: a TextCache; ``vlm_preprocess``: ``(image uint8 [H, W, 3], text) -> dict`` run per sample;
    ``read_frames`` False: samples carry no frames (their encodings come from an encoded cache)."""

    def __init__(self, spec: DatasetSpec, cfg: DataConfig, stats: Optional[DatasetStats] = None,
                 text_cache=None, vlm_preprocess=None, read_frames: bool = True):
        self.spec, self.cfg, self.window = spec, cfg, cfg.window
        self.name = spec.display_name
        kwargs = {}
        if spec.episodes is not None:
            kwargs["episodes"] = spec.episodes
        if spec.tasks is not None:
            kwargs["tasks"] = spec.tasks
        self.source = open_source(spec.root, spec.format, **kwargs)
        self.root = self.source.root
        default_state, default_action = _default_keys(self.source)
        self.state_key = spec.state_key or default_state
        self.action_key = spec.action_key or default_action
        self.cameras = list(spec.cameras) or self.source.cameras
        unknown = [c for c in self.cameras if c not in self.source.cameras]
        if unknown:
            raise DataError(f"cameras {unknown} not in the dataset (has {self.source.cameras})", root=self.root)
        if spec.layout == "single" and len(self.cameras) != 1:
            raise DataError(f"layout 'single' needs exactly one camera; the dataset has {self.cameras} (set "
                            "`cameras` or another layout)", root=self.root)
        if cfg.with_state and self.state_key is None and spec.actions != "none":
            raise DataError(f"no state column (has {self.source.lowdim_keys}; set state_key)", root=self.root)
        self.latents = None
        stride = self.window.condition_stride
        if spec.actions == "dataset" and self.action_key is None:
            raise DataError(f"no action column (has {self.source.lowdim_keys}; set action_key or actions='none')",
                            root=self.root)
        if spec.actions == "latent":
            self.latents = LatentActionStore(spec.latent_dir or Path(spec.root) / "latent_actions", root=self.root)
            if self.window.global_downsample_rate != self.latents.frame_spacing:
                raise DataError(f"latent actions are spaced {self.latents.frame_spacing} frames apart but "
                                f"global_downsample_rate is {self.window.global_downsample_rate}; they must match",
                                root=self.root, file=self.latents.dir)
            stride = stride * self.latents.frame_spacing // math.gcd(stride, self.latents.frame_spacing)
        self.condition_stride = stride

        # normalisation
        self.stats = stats
        if cfg.normalization != "none":
            need = (["state"] if cfg.with_state and spec.actions != "none" else []) + \
                   (["action"] if spec.actions != "none" else [])
            missing = [r for r in need if stats is None or getattr(stats, r) is None]
            if missing:
                raise DataError(f"normalization {cfg.normalization!r} needs {missing} statistics for dataset "
                                f"{self.name!r} (run `motus-fast stats`)", root=self.root)
        self.action_dim = self._action_dim()
        self.state_dim = self._state_dim()

        # index: (episode, condition) pairs
        counts = []
        for ep in self.source.episodes:
            last = max(0, ep.length - self.window.span - 1) if ep.length >= 2 else -1
            counts.append(0 if last < 0 else last // stride + 1)
        self.windows_per_episode = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.windows_per_episode)])
        if self.offsets[-1] == 0:
            raise DataError("no usable window (every episode is shorter than 2 frames)", root=self.root)
        self.text_cache, self.vlm_preprocess, self.read_frames = text_cache, vlm_preprocess, read_frames
        clip = (dataclasses.astuple(self.window), cfg.height, cfg.width, spec.layout, tuple(self.cameras),
                self.condition_stride)
        self.fingerprint = hashlib.sha256(repr(clip).encode()).hexdigest()[:12]

    def _action_dim(self) -> Optional[int]:
        if self.spec.actions == "none":
            native = None
        elif self.spec.actions == "latent":
            native = self.latents.dim
        else:
            native = int(self.source.read_lowdim(0, self.action_key, [0]).shape[1])
        want = self.cfg.action_dim
        if want is None:
            if native is None:
                raise DataError("an action-free dataset needs data.action_dim (the width of the zero chunk)",
                                root=self.root)
            return native
        if native is not None and native > want:
            raise DataError(f"actions have {native} dims, more than data.action_dim={want}", root=self.root)
        return want

    def _state_dim(self) -> Optional[int]:
        if not self.cfg.with_state:
            return None
        native = None if self.spec.actions == "none" or self.state_key is None else \
            int(self.source.read_lowdim(0, self.state_key, [0]).shape[1])
        want = self.cfg.state_dim
        if want is None:
            if native is None:
                raise DataError("an action-free dataset in the finetune layout needs data.state_dim", root=self.root)
            return native
        if native is not None and native > want:
            raise DataError(f"state has {native} dims, more than data.state_dim={want}", root=self.root)
        return want

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_episodes(self) -> int:
        return len(self.source.episodes)

    def locate(self, index: int) -> tuple[int, int]:
        """index -> (episode position, condition frame)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows of {self.name!r}")
        ep = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return ep, int(index - self.offsets[ep]) * self.condition_stride

    def __getitem__(self, item) -> Sample:
        index, draw = (item, 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))
        ep, cond = self.locate(int(index))
        try:
            return self._load(ep, cond, draw)
        except DataError:
            raise
        except Exception as e:   # anything unexpected still names where it happened
            raise DataError(f"cannot build sample at condition frame {cond} ({type(e).__name__}: {e})",
                            root=self.root, episode=self.source.episode_name(ep)) from e

    # ---- one sample ------------------------------------------------------------------------------------------------
    def _pad(self, x: np.ndarray, dim: int) -> np.ndarray:
        return x if x.shape[-1] == dim else np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])

    def _load(self, ep: int, cond: int, draw: int) -> Sample:
        info = self.source.episodes[ep]
        video_idx, action_idx = self.window.indices(cond, info.length)
        frames = None
        if self.read_frames:
            frame_idx = np.concatenate([[cond], video_idx])
            uniq, inverse = np.unique(frame_idx, return_inverse=True)
            per_camera = [self.source.read_frames(ep, cam, uniq)[inverse] for cam in self.cameras]
            frames = resize_with_pad(compose(per_camera, self.spec.layout), self.cfg.height, self.cfg.width)
            frames_t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)   # T, 3, H, W
        else:
            frames_t = torch.empty((0, 3, self.cfg.height, self.cfg.width), dtype=torch.uint8)

        mode = self.cfg.normalization
        K = self.window.chunk_size
        has_actions = self.spec.actions != "none"
        if self.spec.actions == "dataset":
            actions = self.source.read_lowdim(ep, self.action_key, action_idx).astype(np.float32)
        elif self.spec.actions == "latent":
            actions = self.latents.chunk(info.index, cond, K)
        else:
            actions = None
        if actions is not None:
            actions = self._pad(normalize(actions, self.stats.action if self.stats else None, mode), self.action_dim)
        else:
            actions = np.zeros((K, self.action_dim), dtype=np.float32)
        state = None
        if self.cfg.with_state:
            if has_actions:
                s = self.source.read_lowdim(ep, self.state_key, [cond]).astype(np.float32)
                state = self._pad(normalize(s, self.stats.state if self.stats else None, mode), self.state_dim)[0]
            else:
                state = np.zeros(self.state_dim, dtype=np.float32)

        rng = np.random.default_rng([draw, ep, cond])
        if self.spec.instruction is not None:
            instructions, pick = [self.spec.instruction], 0
        else:
            instructions = self.source.instructions(ep)
            pick = int(rng.integers(len(instructions)))
        instruction = instructions[pick]
        text = None
        if self.spec.instruction is None:
            embeddings = self.source.text_embeddings(ep)
            if embeddings is not None:
                if len(embeddings) != len(instructions):
                    raise DataError(f"{len(embeddings)} cached text embeddings for {len(instructions)} instructions",
                                    root=self.root, episode=self.source.episode_name(ep))
                text = embeddings[pick].float()
        if text is None and self.text_cache is not None:
            text = self.text_cache.get(instruction)
        vlm_inputs = None if self.vlm_preprocess is None or frames is None else self.vlm_preprocess(frames[0],
                                                                                                     instruction)
        return Sample(frames=frames_t, actions=torch.from_numpy(np.asarray(actions, dtype=np.float32)),
                      state=None if state is None else torch.from_numpy(np.asarray(state, dtype=np.float32)),
                      has_actions=has_actions, instruction=instruction,
                      key=f"{self.name}/{self.source.episode_name(ep)}/{cond}", level=self.spec.level, text=text,
                      vlm_inputs=vlm_inputs,
                      video_id=f"{self.name}/{self.source.episode_name(ep)}/{cond}@{self.fingerprint}")


# ---- statistics ------------------------------------------------------------------------------------------------------
def compute_dataset_stats(spec: DatasetSpec, with_state: bool = True, progress: bool = True) -> DatasetStats:
    """State and action statistics over every frame of every episode (latent actions: every row)."""
    from tqdm.auto import tqdm

    kwargs = {}
    if spec.episodes is not None:
        kwargs["episodes"] = spec.episodes
    if spec.tasks is not None:
        kwargs["tasks"] = spec.tasks
    source = open_source(spec.root, spec.format, **kwargs)
    default_state, default_action = _default_keys(source)
    state_key, action_key = spec.state_key or default_state, spec.action_key or default_action
    eps = range(len(source.episodes))
    state = action = None
    if spec.actions == "none":
        return DatasetStats()
    if with_state and state_key is not None:
        rows = [source.read_lowdim(e, state_key) for e in tqdm(eps, desc=f"stats {spec.display_name}: {state_key}",
                                                               disable=not progress, leave=False)]
        state = FeatureStats.compute(np.concatenate(rows), state_key)
    if spec.actions == "latent":
        store = LatentActionStore(spec.latent_dir or Path(spec.root) / "latent_actions", root=source.root)
        rows = [store.read(source.episodes[e].index) for e in tqdm(eps, desc=f"stats {spec.display_name}: latent",
                                                                   disable=not progress, leave=False)]
        action = FeatureStats.compute(np.concatenate(rows), "latent_actions")
    elif action_key is not None:
        rows = [source.read_lowdim(e, action_key) for e in tqdm(eps, desc=f"stats {spec.display_name}: {action_key}",
                                                                disable=not progress, leave=False)]
        action = FeatureStats.compute(np.concatenate(rows), action_key)
    else:
        raise DataError(f"no action column (has {source.lowdim_keys})", root=source.root)
    return DatasetStats(state=state, action=action)
