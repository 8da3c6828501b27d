"""What stage one builds shard by shard: the batches of a shard plan (never straddling shards), the
shard a sample falls in, the rows of the shard being built (codes checked for NaN and the float16
range), and a stopwatch of the loop's parts (waiting for decoded batches, the forward pass, writing).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from cache.manifest import PlannedShard
from cache.writer import CacheWriter
from pipeline.errors import TLError, counted


def shard_batches(pending: list[int], plan: list[PlannedShard], batch_size: int) -> list[list[int]]:
    """Batches never straddle shards, so a resumed shard sees exactly the batches of an unbroken run."""
    batches = []
    for shard in pending:
        start, stop = plan[shard].first, plan[shard].first + plan[shard].samples
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


class ShardOf:
    """The shard of a sample under a plan (a binary search over the shards' first samples)."""

    def __init__(self, plan: list[PlannedShard]):
        self.plan = plan
        self.firsts = np.array([shard.first for shard in plan], dtype=np.int64)

    def __call__(self, index: int) -> int:
        return int(np.searchsorted(self.firsts, index, side="right")) - 1

    def last(self, shard: int) -> int:
        """The last sample of a shard."""
        return self.plan[shard].first + self.plan[shard].samples - 1


def check_codes(codes: dict[str, np.ndarray], dtype: str, ids: list[str]) -> None:
    for tap, array in codes.items():
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise TLError(
                f"the backbone produced NaN or Inf in {tap} for {ids[int(np.argmax(bad))]} "
                f"({counted(int(bad.sum()), 'row')}); check the weights file"
            )
        if dtype == "float16" and np.abs(array).max(initial=0) > np.finfo(np.float16).max:
            raise TLError(f"codes of {tap} exceed the float16 range; pass --dtype float32")


class Stopwatch:
    """Seconds spent in named parts of a loop (waiting for batches, the forward pass, writing)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def waited(self, iterable, name: str = "wait"):
        """`iterable`'s items, timing how long each took to arrive."""
        iterator = iter(iterable)
        while True:
            with self.part(name):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item


class ShardRows:
    """The rows of the shard being built: codes per tap, targets, ids, other columns, skipped images."""

    def __init__(self, taps: list[str], dtype: str):
        self.dtype = dtype
        self.codes: dict[str, list[np.ndarray]] = {tap: [] for tap in taps}
        self.targets: list = []
        self.ids: list[str] = []
        self.columns: dict[str, list] = {}
        self.skipped: list[dict] = []

    def add(self, codes: dict[str, np.ndarray], targets: list, ids: list[str], columns: dict[str, list]) -> None:
        check_codes(codes, self.dtype, ids)
        for tap, array in codes.items():
            self.codes[tap].append(array.astype(self.dtype, copy=False))
        self.targets += list(targets)
        self.ids += ids
        for name, values in columns.items():
            self.columns.setdefault(name, []).extend(values)

    def publish(self, writer: CacheWriter, shard: int) -> None:
        codes = {tap: np.concatenate(parts) if parts else np.zeros((0, writer.taps[tap]), np.float32)
                 for tap, parts in self.codes.items()}
        columns = {name: np.asarray(values) for name, values in self.columns.items()}
        writer.write_shard(shard, codes, np.asarray(self.targets, dtype=np.int64), self.ids, self.skipped, columns)


def take_patches(waiting: list, count: int) -> list:
    """Remove the first `count` patches from the waiting (item, start, stop) segments and return them."""
    taken = []
    while count:
        item, start, stop = waiting[0]
        step = min(count, stop - start)
        taken.append((item, start, start + step))
        if start + step == stop:
            waiting.pop(0)
        else:
            waiting[0] = (item, start + step, stop)
        count -= step
    return taken
