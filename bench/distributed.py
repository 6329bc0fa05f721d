"""Training on several processes (one per GPU), as ``torchrun --nproc_per_node N`` starts them.

Each process computes its share of every step's batch; their gradients are averaged before the
optimiser steps, so all processes hold the same weights, and a step equals the step of one
process on the whole batch (up to the order of floating-point sums). One process (rank 0)
writes the log, state and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

BUCKET_ELEMENTS = 1 << 25  # gradients are averaged in flat buckets of at most this many values


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: list) -> list:
        """This process's contiguous share of a list whose length the process count divides."""
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]


def from_environment() -> Processes:
    """The place torchrun gives this process (RANK, LOCAL_RANK, WORLD_SIZE); alone without it."""
    try:
        return Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                         int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None


def process_device(device: str, procs: Processes) -> str:
    """The device of this process: with several, each takes the GPU of its local rank."""
    if not procs.distributed:
        return device
    if device.startswith("cuda:"):
        raise ValueError(f"with {procs.world} processes give --device cuda, not {device}: "
                         "each process takes the GPU of its local rank")
    return f"cuda:{procs.local_rank}" if device == "cuda" else device


def start(procs: Processes, device: str) -> None:
    """Join the process group (NCCL on GPUs, gloo on the CPU)."""
    import torch
    import torch.distributed as dist

    if not procs.distributed or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=procs.rank,
                            world_size=procs.world, timeout=timedelta(minutes=30))


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(procs: Processes) -> None:
    import torch.distributed as dist

    if procs.distributed:
        dist.barrier()


def total(values, procs: Processes):
    """The sum over the processes of a tensor every process holds (itself when alone)."""
    import torch.distributed as dist

    if not procs.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def mean(values, procs: Processes):
    """The mean over the processes of a tensor every process holds."""
    return total(values, procs) / procs.world


def broadcast(tensors, procs: Processes) -> None:
    """Give every process rank 0's values of ``tensors`` (in place)."""
    import torch
    import torch.distributed as dist

    if not procs.distributed:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters, procs: Processes) -> None:
    """Replace each parameter's gradient by its mean over the processes (a missing one counts as zeros)."""
    import torch

    if not procs.distributed:
        return
    open_buckets: dict = {}  # dtype -> gradients waiting, fewer than BUCKET_ELEMENTS values
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket = open_buckets.setdefault(p.grad.dtype, [])
        if bucket and sum(g.numel() for g in bucket) + p.grad.numel() > BUCKET_ELEMENTS:
            _average_bucket(bucket, procs.world)
            bucket.clear()
        bucket.append(p.grad)
    for bucket in open_buckets.values():
        _average_bucket(bucket, procs.world)


def _average_bucket(grads: list, world: int) -> None:
    import torch
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of one per tensor
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
