"""Host memory that batches reuse: while a stage runs a backbone over images on the CPU, glibc keeps the
large blocks that one batch's tensors free for the next, instead of handing them back to the kernel.

glibc serves every block above its mmap threshold (at most 32 MiB; a batch of 64 float crops is 38 MiB,
a conv layer's output more) with fresh pages and unmaps them when freed, so every batch pays a page
fault per 4 KiB of every large tensor. On 2 cores that made efficientnet_lite0's forward pass 2.6x
to 2.9x slower, resnet50's 1.7x to 1.8x, alexnet's 1.04x, training steps 1.1x to 1.6x, and normalizing
a batch 2x (bench/RESULTS.md, "reused host memory on the CPU"). The price is a higher peak of the main
process, which varies from run to run with how the heap fragments: 6% (alexnet) and 12% to 50%
(efficientnet_lite0) for a whole `tl extract` of 320 photos.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading

import torch

from pipeline.errors import TLError

REUSE_VARIABLE = "TL_REUSE_MEMORY"  # 0: leave glibc's allocator as it is

# glibc's mallopt parameters (malloc.h, mallopt(3)). Setting any of them ends glibc's own adjustment of
# its thresholds for the rest of the process (which raises the mmap threshold to the size of a freed
# mapped block, up to 32 MiB, and the trim threshold to twice that); on leaving they are set where that
# adjustment ends up: mmap above 32 MiB, trim above 64 MiB.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no mapped blocks; the heap's top stays unless 2 GiB are free
LEFT = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}


class _Allocator:
    """This process's reused-memory scopes: how deep they nest, and glibc's handle while they are on."""

    def __init__(self):
        self.depth = 0
        self.lock = threading.Lock()
        self.libc = None  # set while memory is kept


_scopes = _Allocator()


def glibc_allocator():
    """glibc's handle with mallopt and malloc_trim typed, or None where tl leaves the allocator alone:
    another C library, TL_REUSE_MEMORY=0, or an allocator the user tuned (GLIBC_TUNABLES naming malloc,
    a MALLOC_*_ variable)."""
    setting = os.environ.get(REUSE_VARIABLE, "1")
    if setting not in ("0", "1"):
        raise TLError(f"{REUSE_VARIABLE} must be 1 (reuse host memory between batches) or 0 (leave glibc's "
                      f"allocator alone), got '{setting}'")
    if setting == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
            name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _set(libc, settings: dict) -> bool:
    """mallopt each setting; whether glibc took them all (it returns 1 for each it accepts)."""
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings.items()])


@contextlib.contextmanager
def reused_memory(device: torch.device):
    """Within it, on a CPU `device`, large blocks freed by one batch's tensors are reused by the next
    (see the module docstring). Leaving the outermost scope sets glibc's thresholds as its own
    adjustment leaves them (above, and over any mallopt of a host program) and gives the kept memory
    back (malloc_trim). Worker processes forked inside start with those leaving settings. A no-op for
    other devices (activations live there) and where glibc_allocator() is None. Threads other than
    the main one have arenas of at most 64 MiB: their larger blocks are still mapped afresh."""
    if device.type != "cpu":
        yield
        return
    entered_by = os.getpid()
    with _scopes.lock:
        if _scopes.depth == 0:
            libc = glibc_allocator()
            if libc is not None and _set(libc, KEPT):
                _scopes.libc = libc
            elif libc is not None:  # glibc refused one: leave nothing half set
                _set(libc, LEFT)
        _scopes.depth += 1
    try:
        yield
    finally:
        if os.getpid() == entered_by:  # a forked child leaving its parent's frames: see _after_fork_in_child
            with _scopes.lock:
                _scopes.depth -= 1
                if _scopes.depth == 0 and _scopes.libc is not None:
                    _set(_scopes.libc, LEFT)
                    _scopes.libc.malloc_trim(0)
                    _scopes.libc = None


def memory_kept() -> bool:
    """Whether this process keeps freed host memory for reuse now (glibc took every setting)."""
    return _scopes.libc is not None


def _after_fork_in_child() -> None:
    """A DataLoader worker forked inside a scope would keep its freed memory for life (its scope never
    ends there): it starts with glibc's leaving settings and no scope instead."""
    global _scopes
    if _scopes.libc is not None:
        _set(_scopes.libc, LEFT)
    _scopes = _Allocator()  # a fresh lock: another thread may have held the parent's at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
