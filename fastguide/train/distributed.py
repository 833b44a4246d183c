"""Distributed state built from the torchrun environment, falling back to one process. No globals."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistState:
    """Who this process is in the job."""

    rank: int = 0  # global rank
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine (picks the GPU)
    device: torch.device = torch.device("cpu")  # where this rank computes

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place and returned (no-op for one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistState:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, or run as one process.

    Args:
        device: "auto" (the local GPU if CUDA is available, else CPU), "cpu", or "cuda".
    Returns:
        the :class:`DistState`; with several processes the default process group is initialised
        (nccl on GPU, gloo on CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        store = _attempt_store(rank, world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return DistState(rank, world_size, local_rank, dev)


def _attempt_store(rank: int, world_size: int):
    """Under torchrun, a key-value store private to this restart attempt, or None.

    torchrun's agent keeps one store across restarts; the addresses that the killed attempt's ranks
    published there would otherwise be read by the new attempt (gloo then connects to a dead peer).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else the process group hosts its own
    if attempt is None or not shared or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"fastguide/attempt-{attempt}", store)


def kill_if_asked(variable: str, count: int, rank: int) -> None:
    """Fault injection for the restart tests: SIGKILL this process when the environment variable ``variable``
    reads "COUNT:RANK" with this ``count`` and ``rank``, on torchrun's first attempt only."""
    spec = os.environ.get(variable)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    at, who = (int(v) for v in spec.split(":"))
    if count == at and rank == who:
        os.kill(os.getpid(), signal.SIGKILL)
