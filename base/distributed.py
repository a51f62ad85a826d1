"""Process groups for multi-rank runs, started by `torchrun`, the `deepspeed` launcher, or nothing.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the `deepspeed`
launcher also passes `--local_rank`). A plain `python train_*.py` is a one-process job: it gets the same
variables for a world of one, so every code path below runs unchanged. Collectives go through NCCL on
GPUs and gloo on CPUs. Waiting for work another rank does on disk (token-cache shards) polls the file
system instead of blocking in a collective. Every wait on other ranks, on disk or in a collective, ends
after `distributed.wait_timeout` minutes: on several nodes each node's launcher ends only its own ranks, so
a hung rank elsewhere would otherwise stall the job forever.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Callable

import torch

from .errors import UserError
from .schema import DistributedConfig

__all__ = ["WAIT_TIMEOUT", "WaitTimeout", "all_gather_object", "all_reduce_sum", "available_ranks", "barrier",
           "ensure_launch_env", "free_port", "init_process_group", "local_device", "local_rank", "local_world_size",
           "rank", "shutdown", "threads_per_rank", "wait_for", "world_size"]

WAIT_TIMEOUT = DistributedConfig.wait_timeout  # minutes; the config key's default, for callers without a config


class WaitTimeout(UserError, TimeoutError):
    """Other ranks did not deliver in time: one line naming what is missing (exit code 2)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env(local_rank: int | None = None) -> None:
    """Give a process started without a launcher the environment of a one-rank job (else DeepSpeed
    falls back to mpi4py discovery); `local_rank` is the `deepspeed` launcher's `--local_rank`."""
    if local_rank is not None and local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device, timeout_minutes: float = WAIT_TIMEOUT) -> tuple[int, int]:
    """Join the launcher's process group (a no-op for one rank); returns (rank, world_size).
    `timeout_minutes` (`distributed.wait_timeout`) bounds the join and every later collective."""
    if launched_world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank(), world_size()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    # the deepspeed launcher exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU when `device` is CUDA (one GPU per local rank), else `device` itself."""
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return device


def available_ranks() -> int:
    """Ranks a launcher should start on this machine: one per GPU; on CPUs 2 gloo ranks (1 on one core),
    which exercise the multi-rank code paths at little cost."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


def threads_per_rank(requested: int = 0) -> int:
    """Torch CPU threads for this rank: `requested`, else the cores shared evenly by the local ranks."""
    return requested or max(1, (os.cpu_count() or 1) // local_world_size())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over ranks (float64): every rank gets the same numbers, so NaN checks and
    logged averages agree everywhere."""
    stats = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats.tolist()


def wait_for(missing: Callable[[], str | None], timeout_minutes: float = WAIT_TIMEOUT, poll_s: float = 1.0,
             notice_after_s: float = 30.0) -> None:
    """Poll `missing()` (what other ranks have not delivered yet, None once everything is there) until it
    is None; prints one notice if it takes long, and raises `WaitTimeout` naming what is still missing
    after `timeout_minutes` (`distributed.wait_timeout`): a launcher ends only the ranks of its own node."""
    started, noticed = time.monotonic(), False
    while (what := missing()) is not None:
        waited = time.monotonic() - started
        if waited > 60 * timeout_minutes:
            raise WaitTimeout(f"rank {rank()}: gave up after {timeout_minutes:g} min (distributed.wait_timeout) "
                              f"waiting for {what}; did another rank die?")
        if not noticed and waited > notice_after_s:
            print(f"rank {rank()}: waiting for {what}", flush=True)
            noticed = True
        time.sleep(min(poll_s, max(0.0, 60 * timeout_minutes - waited)))


def shutdown() -> None:
    """All ranks finish together, then the group is torn down. A rank that exits while another still
    holds gloo connections (rank 0 exporting) can abort at exit with "terminate called without an
    active exception"."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
