"""Process group, FSDP2 wrapping and small collective helpers.

We always run under a process group (world size 1 without torchrun, through a file store) so that one code path
(FSDP2 + DCP) serves a laptop and a cluster, and a checkpoint written by N processes loads on M.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("motus_fast")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """torchrun sets RANK/WORLD_SIZE; otherwise start a one-process group. NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        rank, world, local = 0, 1, 0
        store = tempfile.NamedTemporaryFile(prefix="motus_pg_", delete=False).name
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None, mesh=None) -> torch.nn.Module:
    """FSDP2: one shard unit per MotusBlock (all three experts of a layer gather together), then the root.
    ``mesh``: the device mesh (default: all ranks of the process group; the memory plan passes one built outside
    its fake-tensor mode)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
