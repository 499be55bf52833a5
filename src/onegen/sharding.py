"""Sharded work under `torch.distributed`: a process group for the length of a job, and strided
shards gathered back into their original order on every rank.

`process_group` uses a group that is already initialised, or makes one when the process was started
by `torchrun` (WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA) and closes it afterwards; without either
it is a single process (rank 0 of 1). Shard i of n items is items i, i + world, ... (`items[rank::world]`),
which balances length-sorted work across ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def process_group(device: torch.device | str | None = None) -> Iterator[tuple[int, int]]:
    """(rank, world) of the running process group; one is made (and closed after) under torchrun."""
    import torch.distributed as dist

    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device(device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        if dist.is_available() and dist.is_initialized():
            yield dist.get_rank(), dist.get_world_size()
        else:
            yield 0, 1
    finally:
        if created:
            dist.destroy_process_group()


def gather_strided(vectors: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """All-gather each rank's (len(range(rank, n, world)), D) rows into (n, D) in corpus order."""
    import torch.distributed as dist

    width = -(-n // world)  # shards differ by at most one row: pad each to the largest
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((width, vectors.shape[1]), dtype=torch.float32, device=device)
    padded[: vectors.shape[0]] = vectors.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, vectors.shape[1]), dtype=torch.float32)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))].cpu()
    return out
