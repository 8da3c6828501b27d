"""What an opened webdataset source holds per image: N images in T tars (keys such as `000123456`, a .cls label
each), listed from synthesised tar listings (the header reading is not what this measures, so the tars are empty
files and `_list_tar` answers with what a real tar of those entries would list). Reports the bytes per image the
opened source holds (tracemalloc, numpy's arrays included), the peak while it opens, the same samples as one
Python `Sample` object each (the layout before the columnar store), what one torchrun rank of `tl extract` keeps
(the samples of its tars), and the seconds to open, fingerprint and plan the shards. Writes the section
"webdataset samples held in memory" of bench/RESULTS.md.

    python bench/sample_memory.py
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import publish, where_and_when  # noqa: E402

SECTION = "## webdataset samples held in memory"
CLASSES = 1000
RANKS = 8  # torchrun ranks: one holds the samples of every 8th tar


def synthetic_listing(number: int, per_tar: int) -> dict:
    """The listing `_list_tar` gives for tar `number` of img2dataset's layout: KEY.jpg of ~40 kB then KEY.cls."""
    entries, offset = [], 512
    for index in range(number * per_tar, (number + 1) * per_tar):
        size = 30_000 + index % 20_000
        entries.append([f"{index:09d}", offset, size, index % CLASSES, None])
        offset += 512 + -(-size // 512) * 512 + 1024  # the image's header and blocks, the label's header and block
    return {"entries": entries, "notes": [], "dotted": "", "unpaired": [0, ""]}


def held(work) -> tuple[object, int, int, float]:
    """(what `work()` returns, the bytes it still holds, the peak bytes while it ran, its seconds), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - started
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, current - before, peak - before, seconds


def opened(folder: Path, tars: int, per_tar: int):
    """The webdataset source of the `tars` empty tars in `folder`, listed as if each held `per_tar` images."""
    from pipeline.formats import open_source
    from pipeline.formats.webdataset import WebDatasetSource

    numbers = {str(Path(folder) / f"{number:05d}.tar"): number for number in range(tars)}
    listing = WebDatasetSource.__dict__["_list_tar"]  # the staticmethod itself: put back, it stays one
    WebDatasetSource._list_tar = staticmethod(lambda path, *_: synthetic_listing(numbers[str(path)], per_tar))
    try:
        return open_source("webdataset", folder)
    finally:
        WebDatasetSource._list_tar = listing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--tars", type=int, default=400)
    parser.add_argument("--traced-images", type=int, default=200_000,
                        help="images of the opening measured by tracemalloc (it slows allocation several times)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if min(args.images, args.traced_images) < args.tars or args.tars < 1:
        raise SystemExit(f"--images and --traced-images must be at least --tars ({args.tars}), and --tars at least 1")

    from pipeline.datasets import Sample
    from pipeline.formats.tar_samples import HeldSamples

    per_tar, traced_per_tar = args.images // args.tars, args.traced_images // args.tars
    images, traced = per_tar * args.tars, traced_per_tar * args.tars
    with tempfile.TemporaryDirectory(prefix="tl-samples-") as folder:
        for number in range(args.tars):
            (Path(folder) / f"{number:05d}.tar").touch()
        opened(Path(folder), args.tars, 1)  # imports and first-call caches, not counted below
        small, held_bytes, peak_bytes, _ = held(lambda: opened(Path(folder), args.tars, traced_per_tar))
        # fresh strings (a slice that is not the whole string is a new one): what each Sample held before
        _, object_bytes, _, _ = held(lambda: [Sample(s.sample_id[:-1] + s.sample_id[-1], s.target,
                                                     s.location[:-1] + s.location[-1], s.stamp) for s in small.samples])
        small = None  # freed before the next opening (not `del`: the lambda above names it)

        def one_rank():  # what a rank of tl extract keeps once the shard plan is made: the samples of its tars
            source = opened(Path(folder), args.tars, traced_per_tar)
            source.hold([(shard.first, shard.first + shard.samples) for shard in source.shard_plan(4096)
                         if shard.unit % RANKS == 0])
            return source
        _, rank_bytes, _, _ = held(one_rank)
        started = time.perf_counter()
        source = opened(Path(folder), args.tars, per_tar)
        open_seconds = time.perf_counter() - started
    started = time.perf_counter()
    source.fingerprint()
    fingerprint_seconds = time.perf_counter() - started
    started = time.perf_counter()
    source.shard_plan(4096)
    plan_seconds = time.perf_counter() - started
    spread = range(0, images, max(1, images // 100_000))  # what a loader asks for, one image at a time
    started = time.perf_counter()
    for index in spread:
        source.samples[index]
    sample_seconds = (time.perf_counter() - started) / len(spread)
    table = ["| layout | bytes per image held | peak bytes per image while opening | open s | fingerprint s | "
             "shard plan s | one samples[i] µs |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| the opened source (`{type(source.samples).__name__}`) | {held_bytes / traced:.0f} "
             f"| {peak_bytes / traced:.0f} | {open_seconds:.1f} | {fingerprint_seconds:.2f} | {plan_seconds:.2f} "
             f"| {sample_seconds * 1e6:.1f} |",
             f"| a rank of {RANKS} in `tl extract`, once the shard plan is made (`{HeldSamples.__name__}`) "
             f"| {rank_bytes / traced:.0f} | | | | | |",
             f"| one Python `Sample` each, in a list (the layout before `TarSamples`) | {object_bytes / traced:.0f} "
             "| | | | | |"]
    header = (f"{images:,} images in {args.tars} tars (keys 000000000.., a .cls label of {CLASSES} classes each), "
              f"listed from synthesised listings (their making is in the open time); bytes by tracemalloc (numpy's "
              f"arrays included) over an opening of {traced:,} of them; {where_and_when()}. "
              "Command: `python bench/sample_memory.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
