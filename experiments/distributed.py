"""Data-parallel plumbing for `torchrun`: read the launcher's environment, start and stop the process group.

`torchrun --nproc_per_node=N -m experiments.train ...` sets RANK, WORLD_SIZE and LOCAL_RANK in every process; without
them a run is a single process and nothing here touches torch.distributed. The backend is gloo on CPU and nccl on
CUDA, where process LOCAL_RANK takes the GPU of the same index.

`Crew` is for jobs whose work is mostly rank 0's alone, with data-parallel parts in between (search.py: rank 0
measures, searches and exports; every rank trains): rank 0 decides and posts orders, the other ranks follow them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

POLL_S = 0.5  # how often a waiting rank looks at the store (a cheap read); also how soon it sees Ctrl-C
JOIN_TIMEOUT = timedelta(minutes=5)  # for every rank to reach the store: rank 0 may import slowly on a busy machine
LEAVE_WAIT_S = 30.0  # how long rank 0 waits at the end for the others to read that the job is over


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


def setup(device: str, ctx: DistContext | None = None, store: dist.Store | None = None) -> tuple[DistContext, str]:
    """Join the process group if launched by torchrun, and pick this process's device.

    Args:
        device: the configured device: "cpu", "cuda" or "cuda:N".
        ctx: the context to use; None reads the environment.
        store: the key-value store to meet in (a `Crew`'s); None: the one torchrun's environment names.

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
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if store is None:
            dist.init_process_group(backend=backend)
        else:  # the prefix init_process_group gives the store it makes itself, so the keys cannot meet a Crew's
            dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=ctx.rank,
                                    world_size=ctx.world_size)
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


# ---- rank 0 decides, the others follow ------------------------------------------------------------------------------


class CrewError(ValueError):
    """Another rank stopped, or holds another experiment: reported as one line, exit code 2."""


class Dismissed(Exception):  # noqa: N818 (not an error: how a follower learns that the job is over)
    """Raised in a follower when rank 0 has ended the job; `code` is rank 0's exit code, the follower's too."""

    def __init__(self, code: int) -> None:
        super().__init__(f"rank 0 ended the job with exit code {code}")
        self.code = code


@dataclass
class Crew:
    """The processes of one job: rank 0 decides and posts orders, the other ranks (followers) carry them out.

    Orders are JSON objects in the key-value store every rank already meets in (torchrun's, or rank 0's without the
    torchrun agent), read by polling, not collectives: a follower can wait for hours while rank 0 searches without a
    collective timing out, and it sees Ctrl-C within `POLL_S`. A crew of one (no torchrun) has no store, and its
    orders go nowhere.

    Each order is a handshake: rank 0 posts it with what it sees of the files the order is about (a checkpoint to
    resume from), each follower answers with what it sees, and only when they agree do they start: a follower on a
    machine that does not share rank 0's files is refused in one line instead of training from another checkpoint.

    The keys: `ready/R` (rank R prepared, with what it loaded), `go` (every rank agreed), `order/N` (rank 0's N-th
    order), `took/N/R` (what follower R sees for it), `go/N` (start it), `exit` (rank 0's exit code: the job is
    over), `left/R` (follower R's exit code).

    Attributes:
        ctx: this process among the others.
        store: the job's store (None for a crew of one).
    """

    ctx: DistContext = field(default_factory=DistContext)
    store: dist.Store | None = None
    _keys: dist.Store | None = field(default=None, init=False, repr=False)  # the store, under a prefix of its own
    _orders: int = field(default=0, init=False, repr=False)  # orders posted (rank 0) or taken (a follower)

    def __post_init__(self) -> None:
        if self.store is not None:
            self._keys = dist.PrefixStore("crew", self.store)

    @classmethod
    def join(cls, ctx: DistContext) -> Crew:
        """Meet the other ranks' processes in the store torchrun's environment names (nothing for one process).

        Raises:
            ValueError: MASTER_ADDR or MASTER_PORT missing (torch's message).
            CrewError: the store could not be reached within JOIN_TIMEOUT.
        """
        if not ctx.distributed:
            return cls(ctx)
        try:
            store, _, _ = next(dist.rendezvous("env://", rank=ctx.rank, world_size=ctx.world_size,
                                               timeout=JOIN_TIMEOUT))
        except RuntimeError as e:  # torch's DistStoreError and DistNetworkError
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise CrewError(f"rank {ctx.rank}: could not reach the job's store at {where} within {JOIN_TIMEOUT} "
                            f"({e})") from None
        return cls(ctx, store)

    # -- every rank

    def agree(self, status: dict[str, Any]) -> None:
        """Wait until every rank has prepared; on rank 0, check that they all loaded what rank 0 did.

        Args:
            status: what this rank loaded (JSON); rank 0 compares the followers' with its own.

        Raises:
            CrewError: on rank 0, a follower that stopped (its own line said why) or loaded another `status`.
            Dismissed: on a follower, rank 0 ended the job instead.
        """
        keys = self._keys
        if keys is None:
            return
        keys.set(f"ready/{self.ctx.rank}", json.dumps(status, sort_keys=True))
        if not self.ctx.is_main:
            self._wait(["go"])
            return
        for rank, theirs in self._answers(lambda r: f"ready/{r}", "before the job started"):
            if theirs != status:
                differ = sorted(k for k in status.keys() | theirs.keys() if status.get(k) != theirs.get(k))
                raise CrewError(f"rank {rank} loaded another experiment than rank 0 (it differs in "
                                f"{', '.join(differ)}): give every machine the same files and the same command")
        keys.set("go", "1")

    def start(self, device: str) -> str:
        """Join the process group (gloo on CPU, nccl on CUDA); returns this process's device."""
        _, device = setup(device, self.ctx, self.store)
        return device

    def finish(self, code: int) -> None:
        """End this process's part: rank 0 tells the others the job is over (leaving the process group first, so
        a follower blocked in a collective is released) and waits a while for them to read it; a follower says
        that it left."""
        keys = self._keys
        if keys is None:
            return
        if self.ctx.is_main:
            keys.set("exit", str(code))
            shutdown()
            deadline = time.monotonic() + LEAVE_WAIT_S
            try:
                for rank in range(1, self.ctx.world_size):
                    while not keys.check([f"left/{rank}"]) and time.monotonic() < deadline:
                        time.sleep(POLL_S / 5)
            except KeyboardInterrupt:  # a second Ctrl-C: the job is over anyway
                pass
        else:
            keys.set(f"left/{self.ctx.rank}", str(code))

    # -- rank 0

    def order(self, do: str, sees: dict[str, Any], **args: Any) -> None:
        """Post the next order and return once every follower has taken it; each then carries it out while rank 0
        does its own part of it.

        Args:
            do: what to do; args: with what (JSON).
            sees: what rank 0 sees of the files the order is about; every follower must see the same.

        Raises:
            CrewError: a follower has left, or sees other files (it names them both ways).
        """
        keys = self._keys
        if keys is None:
            return
        n = self._orders
        keys.set(f"order/{n}", json.dumps({"do": do, **args}))
        self._orders += 1
        for rank, theirs in self._answers(lambda r: f"took/{n}/{r}", f"and cannot {do}"):
            if theirs != sees:
                raise CrewError(f"{do}: rank {rank} sees {theirs} where rank 0 sees {sees}: every rank must see the "
                                f"same files (on several machines, put the run directory and the supernet store on "
                                f"a file system they all share)")
        keys.set(f"go/{n}", "1")

    # -- followers

    def next_order(self, sees: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Wait for rank 0's next order, answer with what this rank sees for it, and return it once rank 0 says
        start.

        Args:
            sees: what this rank sees of the files an order is about (as rank 0 computes it for `order`).

        Raises:
            Dismissed: rank 0 ended the job (also when it had posted an order just before: it gave up on that one).
        """
        n = self._orders
        order = json.loads(self._keys.get(self._wait([f"order/{n}"])))
        self._orders += 1
        self._keys.set(f"took/{n}/{self.ctx.rank}", json.dumps(sees(order)))
        self._wait([f"go/{n}"])
        return order

    def dismissed(self) -> int | None:
        """Rank 0's exit code if it has ended the job, else None."""
        if self._keys is None or not self._keys.check(["exit"]):
            return None
        return int(self._keys.get("exit"))

    def _answers(self, key_of: Callable[[int], str], instead: str) -> Iterator[tuple[int, Any]]:
        """Each follower's answer under `key_of(rank)`, in rank order; a follower that left instead is refused.

        Raises:
            CrewError: naming the rank, its exit code and what it did not do (`instead`).
        """
        for rank in range(1, self.ctx.world_size):
            key = self._wait([key_of(rank), f"left/{rank}"])
            if key.startswith("left/"):
                raise CrewError(f"rank {rank} stopped (exit code {int(self._keys.get(key))}) {instead}; its own "
                                f"message says why")
            yield rank, json.loads(self._keys.get(key))

    def _wait(self, keys: list[str]) -> str:
        """The first of `keys` to be set, polling; on a follower, raises Dismissed once rank 0 has ended the job."""
        store = self._keys
        while True:
            if not self.ctx.is_main and (code := self.dismissed()) is not None:
                raise Dismissed(code)
            for key in keys:
                if store.check([key]):
                    return key
            time.sleep(POLL_S)
