"""Data parallelism across processes for the LoRA trainers (torch.distributed: gloo on CPU, nccl on GPUs).

Launch with ``torchrun --nproc_per_node N ...`` (or ``accelerate launch --multi_gpu --num_processes N ...``):
both set RANK / WORLD_SIZE / MASTER_ADDR for :func:`init_from_env`. Without them everything here is the
single-process identity (``World()`` has rank 0, size 1) and costs nothing.

How the trainers use it (:class:`flowopd_core.training.base.LoraTrainer`): every rank holds the same trainer
state; shared draws (prompts, windows) come from the shared generator, so they agree on every rank; each rank
samples a contiguous share of the epoch's groups (:meth:`World.shard`) with its own per-epoch generator;
rewards are gathered so advantages and metrics are the whole epoch's; gradients are averaged (weighted by
samples) before each optimizer step, so the LoRA stays identical on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "FLOWOPD_DIST_TIMEOUT_S"
"""Seconds a rank waits in a collective (e.g. while rank 0 alone runs an evaluation node); default one day."""
BACKEND_ENV = "FLOWOPD_DIST_BACKEND"
"""Force a backend (``gloo`` / ``nccl``); default nccl where CUDA is available, else gloo."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: ``rank`` of ``size``; collectives on ``device``."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @staticmethod
    def current() -> World:
        """The initialised default process group's world, else the single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return World()
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        return World(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s (default: this rank's) contiguous share of ``n`` items."""
        r = self.rank if rank is None else rank
        return r * n // self.size, (r + 1) * n // self.size

    def shard(self, n: int) -> range:
        return range(*self.shard_bounds(n))

    def shard_sizes(self, n: int, each: int = 1) -> list[int]:
        """Every rank's share of ``n`` items, times ``each`` (e.g. samples per group)."""
        return [(b - a) * each for a, b in (self.shard_bounds(n, r) for r in range(self.size))]

    # ---------------------------------------------------------------------------------- collectives

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks (``sum`` / ``max`` / ``min``); returns the result (same device/dtype)."""
        if self.size == 1:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        buffer = tensor.detach().to(self.device).clone()
        dist.all_reduce(buffer, op=ops[op])
        return buffer.to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's ``tensor`` (first dimension ``sizes[rank]``) concatenated in rank order, on every rank."""
        if self.size == 1:
            return tensor
        if tensor.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows, expected {sizes[self.rank]}")
        longest = max(sizes)
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
        padded[: tensor.shape[0]] = tensor.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any."""
        if self.size == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)]), "max").item())

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """``src``'s ``value`` on every rank."""
        if self.size == 1:
            return value
        buffer = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(buffer, src)
        return int(buffer.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def identical(self, tensors: Iterable[torch.Tensor]) -> bool:
        """True on every rank iff ``tensors`` are bit-identical on all ranks (a sha256 compared by min/max)."""
        if self.size == 1:
            return True
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        words = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).clone()
        return torch.equal(self.all_reduce(words, "max"), self.all_reduce(words, "min"))


def init_from_env() -> World:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment (WORLD_SIZE
    > 1): nccl with one GPU per process (LOCAL_RANK) where CUDA is available, else gloo (``BACKEND_ENV``
    overrides it). Returns the world; the single process when WORLD_SIZE is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "86400")))
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV} must be gloo or nccl, got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return World.current()


def shutdown() -> None:
    """Leave the process group (all ranks meet at a barrier first)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
