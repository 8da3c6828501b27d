"""pipeline.allocator: inside reused_memory glibc keeps large freed blocks for the next batch; outside,
in forked workers, for other devices and where the user tuned the allocator, glibc's own ways hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.allocator import REUSE_VARIABLE, glibc_allocator, memory_kept, reused_memory
from pipeline.errors import TLError
from tests.conftest import REPO

CPU = torch.device("cpu")
GLIBC = glibc_allocator() is not None

# Run in a fresh process: what glibc does with a block depends on what the process freed before.
# Every figure is a byte count of glibc's own (mallinfo2): `mapped` in blocks of their own (mmap),
# `heap` in the main arena.
PROBE = r"""
import ctypes, json, os, sys
import torch
from pipeline.allocator import memory_kept, reused_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
MiB = 2**20

def mapped_by(size):
    before = libc.mallinfo2().hblkhd
    block = torch.empty(size, dtype=torch.uint8)
    grew = libc.mallinfo2().hblkhd - before
    return block, grew >= size

found = {}
block, found["outside_mapped"] = mapped_by(48 * MiB)
del block
with reused_memory(torch.device(sys.argv[1])):
    found["kept"] = memory_kept()
    with reused_memory(torch.device("cpu")):  # nested: kept until the outermost ends
        found["kept_nested"] = memory_kept()
    found["kept_after_nested"] = memory_kept()
    block, found["inside_mapped"] = mapped_by(100 * MiB)
    heap = libc.mallinfo2().arena
    del block
    found["heap_kept_after_free"] = libc.mallinfo2().arena >= heap  # not trimmed back to the kernel
    child = os.fork()
    if child == 0:  # a worker forked inside: glibc's leaving settings, no scope
        block, mapped = mapped_by(256 * MiB)
        os._exit(0 if mapped and not memory_kept() else 1)
    found["child_mapped"] = os.waitpid(child, 0)[1] == 0
found["kept_after"] = memory_kept()
block, found["after_mapped"] = mapped_by(256 * MiB)  # larger than anything the heap holds free
del block
blocks, maps = zip(*[mapped_by(8 * MiB) for _ in range(40)])  # more than the heap holds free
found["after_8MiB_from_heap"] = not any(maps)  # under the 32 MiB threshold glibc's adjustment reaches
print(json.dumps(found))
"""


def probe(device: str = "cpu", **environment) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, device], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **environment})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator, left at its defaults")
def test_inside_large_blocks_come_from_the_heap_and_stay_outside_and_in_forked_workers_glibcs_ways_hold():
    assert probe() == {"outside_mapped": True, "kept": True, "kept_nested": True, "kept_after_nested": True,
                       "inside_mapped": False,
                       "heap_kept_after_free": True, "child_mapped": True, "kept_after": False,
                       "after_mapped": True, "after_8MiB_from_heap": True}


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator, left at its defaults")
def test_other_devices_and_a_user_tuned_allocator_are_left_alone():
    for device, environment in (("cuda", {}), ("cpu", {REUSE_VARIABLE: "0"}),
                                ("cpu", {"GLIBC_TUNABLES": "glibc.malloc.check=0"}),
                                ("cpu", {"MALLOC_ARENA_MAX_": "4"})):
        found = probe(device, **environment)
        assert not found["kept"] and found["inside_mapped"], (device, environment)


def test_a_bad_setting_is_one_line_and_a_failing_stage_gives_the_allocator_back(monkeypatch):
    monkeypatch.setenv(REUSE_VARIABLE, "yes")
    with pytest.raises(TLError, match=f"{REUSE_VARIABLE} must be 1 .* or 0 .*, got 'yes'"):
        with reused_memory(CPU):
            raise AssertionError("a bad TL_REUSE_MEMORY must stop the stage before its work")
    monkeypatch.delenv(REUSE_VARIABLE)
    with pytest.raises(RuntimeError, match="boom"):
        with reused_memory(CPU):
            assert memory_kept() == GLIBC
            raise RuntimeError("boom")
    assert not memory_kept()
