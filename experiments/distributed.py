"""Data-parallel plumbing for `torchrun`: read the launcher's environment, start and stop the process group.

`torchrun --nproc_per_node=N -m experiments.train ...` sets RANK, WORLD_SIZE and LOCAL_RANK in every process; without
them a run is a single process and nothing here touches torch.distributed. The backend is gloo on CPU and nccl on
CUDA, where process LOCAL_RANK takes the GPU of the same index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the data-parallel processes.

    Attributes:
        rank: global rank (0 writes checkpoints and shows progress).
        world_size: number of processes; 1 means no process group.
        local_rank: rank on this machine; picks the GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env() -> DistContext:
    """Read RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; absent means a single process."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    ctx = DistContext(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"RANK={ctx.rank} WORLD_SIZE={ctx.world_size}: need 0 <= RANK < WORLD_SIZE")
    return ctx


def setup(device: str, ctx: DistContext | None = None) -> tuple[DistContext, str]:
    """Join the process group if launched by torchrun, and pick this process's device.

    Args:
        device: the configured device: "cpu", "cuda" or "cuda:N".
        ctx: the context to use; None reads the environment.

    Returns:
        The context and the device this process should use ("cuda:LOCAL_RANK" for a multi-process CUDA run).
    """
    ctx = ctx or context_from_env()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (set device: cpu)")
        if ctx.distributed:
            device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(torch.device(device if ":" in device else "cuda:0"))
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ctx, device


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; a no-op for a single process."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward pass, so after the last step of an epoch every rank holds
    statistics updated by its own last batch; this makes them identical again before a checkpoint or an evaluation.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)
