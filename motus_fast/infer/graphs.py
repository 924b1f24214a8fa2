"""CUDA graphs of the whole denoise loop: one graph per (mode, batch, shapes, steps, shift, guidance) key.

A denoise loop is a fixed sequence of kernels once its shapes are fixed, so it is captured once and replayed per
request: the request's tensors are copied into the graph's static input buffers, the graph replays, and the
outputs are cloned out. This removes the per-kernel launch overhead, which dominates at batch 1.

Capture can fail (an op that synchronises with the host, e.g. ``.tolist()`` on a device tensor, or a kernel that
allocates outside the graph pool). Then that key runs eagerly from now on, and the failure is logged once with
the key and the reason: never a silent fallback.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

log = logging.getLogger("motus_fast")


@dataclass
class _Captured:
    graph: Any                  # torch.cuda.CUDAGraph
    inputs: list                # static input tensors (the flattened pytree's leaves; None stays None)
    spec: Any                   # pytree spec of the inputs
    outputs: Any                # static outputs (pytree of tensors)
    loop_fn: Callable[..., Any]  # holds what the graph reads besides its inputs (e.g. time tables) alive
    sources: list               # per input: the tensor last copied in, if it may be reused without a copy


class DenoiseGraphs:
    """Captures ``loop_fn(**inputs)`` per key and replays it. ``inputs`` is a pytree of tensors (and Nones)."""

    def __init__(self, max_graphs: int = 8, warmup_runs: int = 2):
        self.max_graphs, self.warmup_runs = max_graphs, warmup_runs
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self.failed: dict[Hashable, str] = {}     # key -> why it runs eagerly
        self.replays = self.captures = 0

    def run(self, key: Hashable, loop_fn: Callable[..., Any], inputs: dict,
            immutable: tuple[str, ...] = ()) -> tuple[Any, bool]:
        """-> (outputs, replayed) where replayed is False when the loop ran eagerly. ``immutable`` names inputs
        whose tensors are never modified in place (cache entries): when the same tensor object comes again, its
        copy into the graph's buffer is skipped."""
        if key in self.failed:
            return loop_fn(**inputs), False
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(loop_fn, inputs, immutable)
            except Exception as e:  # noqa: BLE001  (any capture failure falls back, logged below)
                self.failed[key] = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed for %s; this key runs eagerly from now on (%s)", key,
                            self.failed[key])
                _recover_after_failed_capture()
                return loop_fn(**inputs), False
            self.captures += 1
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        leaves, spec = tree_flatten(inputs)
        if spec != entry.spec:
            raise RuntimeError(f"CUDA graph {key}: inputs have a different structure than at capture")
        reusable = _leaf_flags(inputs, immutable)
        for i, (static, new) in enumerate(zip(entry.inputs, leaves)):
            if static is None or (reusable[i] and new is entry.sources[i]):
                continue
            static.copy_(new)
            entry.sources[i] = new if reusable[i] else None
        entry.graph.replay()
        self.replays += 1
        return _clone(entry.outputs), True

    def capture(self, loop_fn: Callable[..., Any], inputs: dict, immutable: tuple[str, ...] = ()) -> _Captured:
        """Static copies of the inputs, then the graph of loop_fn on them (see ``record``)."""
        leaves, spec = tree_flatten(inputs)
        if not all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise TypeError("graph inputs must be a pytree of tensors (and Nones)")
        static = [None if leaf is None else leaf.clone() for leaf in leaves]
        graph, outputs = self.record(loop_fn, tree_unflatten(static, spec))
        reusable = _leaf_flags(inputs, immutable)
        return _Captured(graph=graph, inputs=static, spec=spec, outputs=outputs, loop_fn=loop_fn,
                         sources=[leaf if r else None for leaf, r in zip(leaves, reusable)])


    def record(self, loop_fn: Callable[..., Any], static_inputs: dict):
        """-> (a replayable CUDA graph of loop_fn(**static_inputs), its static outputs)."""
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        if any(t is not None and not t.is_cuda for t in tree_flatten(static_inputs)[0]):
            # a graph captured over CPU tensors is empty: its replay would return stale outputs, silently
            raise RuntimeError("CUDA graphs need every input on a CUDA device")
        # warm up on a side stream (lazy initialisation, cuBLAS workspaces, autotuning happen outside the graph)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):
                loop_fn(**static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = loop_fn(**static_inputs)
        return graph, outputs


def _leaf_flags(inputs: dict, names: tuple[str, ...]) -> list[bool]:
    """For each leaf of tree_flatten(inputs): does it belong to one of the top-level inputs `names`?"""
    return [path[0].key in names for path, _ in tree_flatten_with_path(inputs)[0]]


def _clone(tree):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def _recover_after_failed_capture() -> None:
    """Make sure no capture is left open and pending errors are surfaced (they are logged, not raised)."""
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        log.warning("CUDA error after a failed graph capture: %s", e)
