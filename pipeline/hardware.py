"""Where tensors run and how fast: the device, the autocast precision, channels_last models and
batches on every device, and the CUDA fast path (cudnn autotuning, pinned host memory with
non-blocking copies, fed DataLoaders), and host memory that batches reuse instead of faulting in afresh.

Every stage (extract, fit-head, finetune, evaluate, predict) takes its device and precision from here,
so `--device` and `--precision` mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal

import torch
from torch.utils.data import DataLoader
from torch import nn

from pipeline import DEVICES, PRECISIONS, distributed, stops
from pipeline.errors import TLError


def resolve_device(device: str) -> torch.device:
    """cpu or cuda; under torchrun, CUDA means this process's own GPU (LOCAL_RANK)."""
    if device not in DEVICES:
        raise TLError(f"unknown --device {device}; valid: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TLError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = distributed.world().local_rank
        if local_rank >= torch.cuda.device_count():
            raise TLError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                          "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast dtype's name, or float32 for none. `auto`: float32 on the CPU, float16 on CUDA, in
    training too (with a GradScaler). float16 keeps 3 more mantissa bits than bfloat16, and heads on
    standardized codes magnify small errors: the quickstart head as a model scored the test digits
    with accuracy 0.883 in float32 and under float16 autocast, 0.842 under bfloat16 (README)."""
    if precision not in PRECISIONS:
        raise TLError(f"unknown --precision {precision}; valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "float16" if device.type == "cuda" else "float32"


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass; for float32, IEEE float32 (float32_math)."""
    if precision == "float32":
        return float32_math(precision)
    return torch.autocast(device.type, dtype=getattr(torch, precision))


@contextlib.contextmanager
def float32_math(precision: str):
    """For float32, CUDA's convolutions and matrix products in IEEE float32 within the block, whatever
    the process had set: cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs (10
    mantissa bits: alexnet's fc7 0.04% away from float32, as far as float16 is), and a cache, a head or a
    model that says float32 holds float32 results. float16 and bfloat16 leave the flags alone. The flags
    concern CUDA kernels only: setting them on a CPU run changes nothing there."""
    if precision != "float32":
        yield
        return
    settings = tf32_settings()
    saved = [getattr(owner, name) for owner, name, _ in settings]
    for owner, name, value in settings:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(settings, saved):
            setattr(owner, name, value)


def tf32_settings() -> list[tuple]:
    """(owner, attribute, IEEE value) of what decides TF32 for CUDA convolutions and matrix products:
    torch's per-operator `fp32_precision` where it has it (setting the legacy `allow_tf32` flags after
    those is an error there), else the legacy flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling, on only for float16 (whose small gradients would underflow); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")


def prepare_module(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` on `device` in channels_last layout (on CUDA with cudnn choosing the fastest kernels).
    channels_last pays on the CPU too: oneDNN runs the forward pass 1.2x (resnet50) to 1.4x
    (efficientnet_lite0) and a training step of every layer up to 1.7x faster on it than on NCHW
    (bench/RESULTS.md, "channels_last on the CPU")."""
    module = module.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return module._apply(_channels_last)


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels_last memory; others as they are. Module.to(memory_format=) also converts
    5-D tensors, which channels_last refuses: a traced graph's constants may be 5-D (Swin's attention masks)."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory for a CUDA device, so the copy to it can run asynchronously."""
    return tensor.pin_memory() if device.type == "cuda" and not tensor.is_pinned() else tensor


def stack_channels_last(images: list[torch.Tensor]) -> torch.Tensor:
    """(N, C, H, W) in channels_last memory from (C, H, W) images, in one copy: the layout the model
    runs in (prepare_module), made by the collating worker rather than by a second copy in the main
    process. Crops from PIL are (H, W, C) in memory already, so for them this copy is a plain one."""
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`: non-blocking from pinned memory, images in channels_last (the layout
    prepare_module gives the model; a no-op for batches already in it)."""
    cuda = device.type == "cuda"
    tensor = tensor.to(device, non_blocking=cuda)
    if tensor.ndim == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


MAX_WORKERS = 16  # decoding processes a run starts by default, at most

def default_workers(workers: int | None) -> int:
    """DataLoader workers: as given, else the cores this process may use shared among the processes
    torchrun started on this machine, at most 16."""
    if workers is not None:
        if workers < 0:
            raise TLError(f"--workers must be 0 (decode in this process) or more, got {workers}")
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MAX_WORKERS, cores // max(1, local)))


def loader_options(device: torch.device, workers: int | None, prefetch: int = 4) -> dict:
    """DataLoader keyword arguments that keep the device fed: worker processes, `prefetch` batches in
    flight per worker, and pinned batches for CUDA."""
    workers = default_workers(workers)
    return {"num_workers": workers, "pin_memory": device.type == "cuda",
            "prefetch_factor": prefetch if workers else None}


def worker_timeout() -> float:
    """Seconds a decoding worker may take to deliver one batch (TL_WORKER_TIMEOUT, default 600)."""
    text = os.environ.get("TL_WORKER_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise TLError(f"TL_WORKER_TIMEOUT must be a number of seconds above 0, got '{text}'")
    return seconds


def _batch_not_sent(exc, obj) -> None:
    """In a worker: a batch that cannot be handed over (shared memory full, a file-size limit) would be
    dropped by multiprocessing's feeder thread with a traceback, and the main process would wait for
    it forever. The worker exits instead, which the main process notices at once."""
    os._exit(75)


def _worker_start(worker_id: int) -> None:
    import multiprocessing.queues

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_batch_not_sent)


class WorkerLoader(DataLoader):
    """A DataLoader whose lost batch is a one-line error instead of a hang or a traceback: a worker that
    cannot hand its batch over exits (see _batch_not_sent), and a worker that delivers nothing for
    worker_timeout() seconds is given up on."""

    def __init__(self, dataset, device: torch.device, workers: int | None, prefetch: int = 4, **options):
        settings = {**loader_options(device, workers, prefetch), **options}
        if settings["num_workers"]:
            settings.update(timeout=worker_timeout(), worker_init_fn=_worker_start)
        super().__init__(dataset, **settings)

    def __iter__(self):
        batches, done = super().__iter__(), object()
        while True:
            try:
                batch = next(batches, done)
            except RuntimeError as exc:
                raise self._lost(exc, batches) from None
            if stops.LOST_WORKERS:  # torch's SIGCHLD handler raised the death inside a finalizer (stops.unraisable)
                raise self._lost(stops.LOST_WORKERS.pop(), batches) from None
            if batch is done:
                return
            yield batch

    @staticmethod
    def _lost(exc: RuntimeError, batches) -> BaseException:
        """The one line for a worker's death (the workers' exit codes name a signal torch's words may not)."""
        return lost_worker(exc, [worker.exitcode for worker in getattr(batches, "_workers", [])]) or exc


def lost_worker(exc: BaseException, exit_codes=()) -> BaseException | None:
    """What a decoding worker's death is, to raise instead of torch's RuntimeError (which its SIGCHLD
    handler raises wherever the main process is): a worker that SIGTERM or Ctrl-C took down (torchrun
    signals a rank's workers too) is that stop; one killed otherwise (the out-of-memory killer's
    SIGKILL, a crash), timed out, or unable to hand over its batch, or a lost pin-memory thread, is a
    one-line TLError; None: another error (one a worker caught and torch re-raised: "Caught ..."). torch
    says "exited unexpectedly" when it notices the death before its SIGCHLD handler runs: the workers'
    `exit_codes` (negative: the signal) then say how."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or text.startswith("Caught ") or not (
            text.startswith(("DataLoader timed out", "Pin memory thread exited unexpectedly"))
            or ("DataLoader worker" in text and ("exited unexpectedly" in text or "is killed by signal" in text))):
        return None  # (torch's other subprocesses, a compile worker say, are not decoding workers)
    killed = re.search(r"is killed by signal: ([^.]+)", text)
    name = killed[1] if killed else next((signal.strsignal(-code) for code in exit_codes
                                          if code is not None and code < 0), None)  # as torch words it: strsignal
    if name in ("Terminated", "Interrupt"):
        stops.STOPPING.set()
        return stops.Terminated() if name == "Terminated" else KeyboardInterrupt()
    how = f"was killed by signal {name}" if name else "died or could not hand over its batch"
    return TLError(f"a decoding worker {how} (shared memory in /dev/shm full, a file-size limit, out of memory, "
                   "or a crash); free space or memory, or pass --workers 0 to decode in this process, and re-run the "
                   "same command")
