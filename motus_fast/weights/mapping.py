"""Key maps: rules that build each of our tensors from named tensors of another checkpoint layout, applied strictly.

A ``Rule`` names one of our state-dict keys, the source key(s) it is made from, and how (``kind``):

- ``copy``: the source tensor as is;
- ``cat``: source tensors concatenated along dim 0 (q|k|v into one fused Linear, k|v into one);
- ``heads``: a raw ``[3, N, D, head_dim]`` projection (upstream's action/und q/k/v) -> Linear weight ``[3*N*hd, D]``;
- ``patch``: a Conv3d patch-embedding kernel ``[dim, C, pt, ph, pw]`` -> Linear weight over flattened patches.

``convert`` first accounts for every key using shapes only (no tensor data is read), so a checkpoint that does not
fit fails fast with one report naming every missing, unexpected and mis-shaped key and the file it lives in; only
then does it read the tensors, one rule at a time, from a lazy source (see ``motus_fast.weights.sources``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from motus_fast.config import MotusConfig


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names every offending key or file."""


class TensorSource(Protocol):
    """Named tensors whose shapes are known without reading them (``motus_fast.weights.sources``)."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def load(self, key: str) -> torch.Tensor: ...

    def where(self, key: str) -> str: ...


@dataclass(frozen=True)
class Rule:
    ours: str
    sources: tuple[str, ...]
    kind: str = "copy"  # copy | cat | heads (raw [3,N,D,hd]) | patch (Conv3d -> Linear)


def linear_rules(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    """weight (and bias) of one Linear (or affine norm) under another name."""
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",))]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def mlp_rules(ours: str, theirs: str, idx=(0, 2, 4)) -> list[Rule]:
    """The Linears of an nn.Sequential whose indices are the same on both sides (``.0``, ``.2``, ...)."""
    return [r for i in idx for r in linear_rules(f"{ours}.{i}", f"{theirs}.{i}")]


def source_shapes(rule: Rule, shape: tuple[int, ...], cfg: Optional[MotusConfig]) -> list[tuple[int, ...]]:
    """The shape each source tensor of `rule` must have for our tensor to come out as `shape` (`cfg` is needed by
    the ``heads`` and ``patch`` kinds only)."""
    if rule.kind == "copy":
        return [shape]
    if rule.kind == "cat":
        n = len(rule.sources)
        return [(shape[0] // n,) + tuple(shape[1:])] * n
    if rule.kind == "heads":
        return [(3, cfg.num_heads, shape[1], cfg.head_dim)]
    if rule.kind == "patch":
        return [(shape[0], cfg.video.in_channels) + tuple(cfg.video.patch_size)]
    raise AssertionError(rule.kind)


def apply_rule(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "cat":
        return torch.cat(tensors, dim=0)
    if rule.kind == "heads":        # q[..., n, e] = sum_d x[d] W[i, n, d, e]  ->  Linear row i*N*hd + n*hd + e
        w = tensors[0]
        return w.permute(0, 1, 3, 2).reshape(-1, w.shape[2])
    if rule.kind == "patch":
        return tensors[0].reshape(tensors[0].shape[0], -1)
    raise AssertionError(rule.kind)


def account(source: TensorSource, rules: list[Rule], expected: dict[str, torch.Size], cfg: Optional[MotusConfig],
            header: str) -> None:
    """Check, from shapes alone, that `source` holds exactly the tensors `rules` need with the shapes `expected`
    (our key -> shape) implies. Raises ``CheckpointError`` with the whole report."""
    missing_ours = sorted(set(expected) - {r.ours for r in rules})
    assert not missing_ours, f"key map does not cover {missing_ours[:5]}"  # a bug in the key map, not in the input
    have = set(source.keys())
    used, missing, misshaped = set(), [], []
    for rule in rules:
        if rule.ours not in expected:
            continue
        for key, want in zip(rule.sources, source_shapes(rule, tuple(expected[rule.ours]), cfg)):
            if key not in have:
                missing.append(key)
                continue
            used.add(key)
            got = tuple(source.shape(key))
            if got != want:
                misshaped.append(f"{key} (in {source.where(key)}): checkpoint {list(got)}, model expects {list(want)}")
    unexpected = [f"{k} (in {source.where(k)})" for k in sorted(have - used)]
    if missing or unexpected or misshaped:
        raise CheckpointError(report(missing, unexpected, misshaped, header))


def convert(source: TensorSource, rules: list[Rule], expected: dict[str, torch.Size], cfg: Optional[MotusConfig],
            dtype: Optional[torch.dtype] = None, header: str = "checkpoint does not match the model:",
            progress: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Our tensors for every key of `expected`, built from `source` by `rules`, strictly (see ``account``).

    Tensors are read one rule at a time and cast to `dtype` (None: keep the stored dtype); a tensor that needs no
    change stays a zero-copy view of the memory-mapped file. `progress`: a tqdm description, or None for no bar.
    """
    account(source, rules, expected, cfg, header)
    todo = [r for r in rules if r.ours in expected]
    if progress is not None:
        from tqdm.auto import tqdm
        todo = tqdm(todo, desc=progress, unit="tensor", leave=False)
    out = {}
    for rule in todo:
        t = apply_rule(rule, [source.load(k) for k in rule.sources])
        out[rule.ours] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
    return out


def report(missing, unexpected, misshaped, header: str = "checkpoint does not match the model:",
           limit: int = 20) -> str:
    """A readable list of what is wrong, at most `limit` lines per kind."""
    lines = [header]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines.append(f"  {len(items)} {title} key(s):")
            lines += [f"    {k}" for k in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)
