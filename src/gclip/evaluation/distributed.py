"""Sharding and reductions across ``torchrun`` processes (gloo on CPU, nccl on GPUs).

Each rank takes the indices ``rank, rank + world, ...``: no padding, so no image is scored twice, and the
integer area sums are exactly the single-process sums.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shard"]


@dataclass(frozen=True)
class DistContext:
    """This process's place among the evaluation processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise int64 sum of ``values`` over all ranks (a no-op in one process)."""
        if not self.active:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(use_cuda: bool) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        use_cuda: use nccl (one GPU per local rank) instead of gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(rank, world, local_rank, dist.get_backend())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return DistContext(rank, world, local_rank, backend)


def shard(n: int, ctx: DistContext) -> list[int]:
    """This rank's indices of ``range(n)``: ``rank::world_size`` (disjoint, together exactly all)."""
    return list(range(ctx.rank, n, ctx.world_size))
