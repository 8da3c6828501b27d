"""Runs under torchrun: who this process is (rank, world size, local rank) from torchrun's environment,
and a torch.distributed process group (gloo on CPU, nccl on CUDA) when there is more than one.

Without torchrun every call here is a no-op for a world of one, so the stages read the same either way.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_distributed

from pipeline import stops
from pipeline.errors import TLError



class DistributedError(TLError):
    """Another rank failed or the process group could not form."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, as torchrun (or srun with the same variables) describes it."""
    try:
        return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start tl with torchrun") from None


def timeout_seconds() -> int:
    """Seconds a rank waits for the others (TL_DISTRIBUTED_TIMEOUT, default 1800)."""
    text = os.environ.get("TL_DISTRIBUTED_TIMEOUT", "1800")
    if not (text.strip().isascii() and text.strip().isdigit() and int(text) > 0):  # "²".isdigit() too
        raise DistributedError(f"TL_DISTRIBUTED_TIMEOUT must be a whole number of seconds above 0, got '{text}'")
    return int(text)


def start(current: World, device: torch.device) -> None:
    """Join the process group (once). torchrun sends SIGTERM to every rank when one fails and when it is
    stopped itself: that stays tl's stop (stops.terminated), one line per rank, as without torchrun. On
    CUDA the group is bound to this rank's GPU (resolve_device set it current), which nccl's barrier
    otherwise takes with a warning on rank 0 ("barrier(): using the device under current context")."""
    if not current.distributed or torch_distributed.is_initialized():
        return
    cuda = device.type == "cuda"
    dies_with_launcher(signal.SIGKILL)  # while it joins: see dies_with_launcher
    try:
        torch_distributed.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                             timeout=datetime.timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the process group ({str(exc).splitlines()[0]}); start tl with "
                               "torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE") from None
    finally:
        dies_with_launcher(0)  # joined: a rank whose launcher dies now finishes its shards, as before
    signal.signal(signal.SIGTERM, stops.terminated)


def dies_with_launcher(signal_number: int) -> bool:
    """Have Linux send `signal_number` to this process when its parent (torchrun's agent) dies; 0 clears it.
    A rank blocked in joining the process group runs no Python signal handler, so one whose launcher was
    SIGKILLed then (a job step killed) waited out TL_DISTRIBUTED_TIMEOUT, 30 minutes, holding its GPU, and
    only SIGKILL ended it; nothing is written before the group forms. Whether it was set (not on macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signal_number, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl in this C library
        return False


def barrier(current: World, what: str) -> None:
    """Wait for every rank; a rank that never arrives (it died) is reported within the timeout."""
    if not current.distributed:
        return
    try:
        torch_distributed.barrier()
    except RuntimeError as exc:
        raise DistributedError(f"rank {current.rank}: another rank did not reach '{what}' "
                               f"({str(exc).splitlines()[0][:160]}); {stops.RESUME_HINT}") from None


def broadcast(current: World, value):
    """Rank 0's `value` on every rank."""
    if not current.distributed:
        return value
    holder = [value]
    torch_distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def each_rank(current: World, work) -> list:
    """`work()` run on every rank, its values in rank order on every rank. A TLError of any rank (a tar it
    cannot read) stops every rank with that rank's one line, the first rank's if several failed: a rank
    that raised alone would leave the others waiting here for the timeout."""
    try:
        value, refusal = work(), None
    except TLError as exc:
        if not current.distributed:
            raise
        value, refusal = None, str(exc)
    if not current.distributed:
        return [value]
    gathered = [None] * current.size
    try:
        torch_distributed.all_gather_object(gathered, (value, refusal))
    except RuntimeError as exc:  # a rank that died (torchrun stops the rest) or never came
        raise DistributedError(f"rank {current.rank}: another rank did not send its part "
                               f"({str(exc).splitlines()[0][:160]}); {stops.RESUME_HINT}") from None
    for rank, (_, message) in enumerate(gathered):
        if message is not None:
            raise DistributedError(f"rank {rank}: {message}")
    return [value for value, _ in gathered]


def all_sum(current: World, values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (float64)."""
    if not current.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch_distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch_distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def stop(current: World) -> None:
    if current.distributed and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()
