"""Rank and world size in one place, for a learner run over several processes (torchrun).

Ranks split the micro-batches (see Rollouts) and average LoRA gradients with one all-reduce per
optimizer step; only rank 0 pushes adapters, evaluates and writes outputs. On CPU the backend is
gloo. A single process needs none of this and never initialises torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(params, info: DistInfo) -> None:
    """Average the trainable parameters' gradients over ranks (one flat all-reduce)."""
    if info.world_size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_params(params, info: DistInfo) -> None:
    """Start every rank from rank 0's weights (the LoRA init is seeded alike, but make sure)."""
    if info.world_size == 1:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    if info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def broadcast_int(value: int, info: DistInfo) -> int:
    if info.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
