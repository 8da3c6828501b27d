"""What an opened webdataset source holds per image: N images in T tars (keys such as `000123456`, a .cls label
each), listed from synthesised tar listings (the header reading is not what this measures, so the tars are empty
files and `_list_tar` answers with what a real tar of those entries would list). Reports the bytes per image the
opened source holds (tracemalloc, numpy's arrays included), the peak while it opens, the same samples as one
Python `Sample` object each (the layout before the columnar store), what the tar listings waiting to be kept in
OUT/listings add, what one torchrun rank of `tl extract` keeps (the samples of its tars) and its peak while it
opens the source and plans the shards among RANKS gloo processes (as torchrun starts them, exchanging what tl
extract exchanges), and the seconds to open, fingerprint and plan the shards. Writes the section "webdataset
samples held in memory" of bench/RESULTS.md.

    python bench/sample_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
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


def opened(folder: Path, tars: int, per_tar: int, **options):
    """The webdataset source of the `tars` empty tars in `folder`, listed as if each held `per_tar` images
    (`options`: open_source's)."""
    from pipeline.formats import open_source
    from pipeline.formats.webdataset import WebDatasetSource

    numbers = {str(Path(folder) / f"{number:05d}.tar"): number for number in range(tars)}
    listing = WebDatasetSource.__dict__["_list_tar"]  # the staticmethod itself: put back, it stays one
    WebDatasetSource._list_tar = staticmethod(lambda path, *_: synthetic_listing(numbers[str(path)], per_tar))
    try:
        return open_source("webdataset", folder, **options)
    finally:
        WebDatasetSource._list_tar = listing


def one_rank(folder: Path, tars: int, per_tar: int) -> dict:
    """In a rank of RANKS (started by ranked): the bytes per image its source holds once `tl extract` holds its
    shards, and its peak while opening the source and planning the shards, as tl extract does both."""
    import torch

    from pipeline import distributed

    current = distributed.world()
    distributed.start(current, torch.device("cpu"))
    opened(folder, tars, 1, world=current, own_share=True)  # imports and first-call caches, not counted below

    def extracting():
        source = opened(folder, tars, per_tar, world=current, own_share=True)
        source.hold([(shard.first, shard.first + shard.samples) for shard in source.shard_plan(4096)
                     if shard.unit % current.size == current.rank])
        return source
    _, held_bytes, peak_bytes, _ = held(extracting)
    distributed.stop(current)
    return {"held": held_bytes, "peak": peak_bytes}


def ranked(folder: Path, tars: int, per_tar: int, ranks: int) -> list[dict]:
    """one_rank's answer of each of `ranks` processes started as torchrun starts them (RANK, WORLD_SIZE, ...)."""
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, __file__, "--rank-of", str(folder), str(tars), str(per_tar)],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
                 for rank in range(ranks)]
    answers = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit(f"a rank failed: {[process.returncode for process in processes]}")
    return [json.loads(answer.strip().splitlines()[-1]) for answer in answers]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--tars", type=int, default=400)
    parser.add_argument("--traced-images", type=int, default=200_000,
                        help="images of the opening measured by tracemalloc (it slows allocation several times)")
    parser.add_argument("--ranks", type=int, default=RANKS, help="gloo processes of the torchrun row (0: none)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--rank-of", nargs=3, help=argparse.SUPPRESS)  # FOLDER TARS PER_TAR: be one rank (ranked)
    args = parser.parse_args(argv)
    if args.rank_of:
        print(json.dumps(one_rank(Path(args.rank_of[0]), int(args.rank_of[1]), int(args.rank_of[2]))))
        return
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
        # the listings made are kept (OUT/listings) once the cache is opened: until then the source holds them
        _, pending_bytes, pending_peak, _ = held(lambda: opened(Path(folder), args.tars, traced_per_tar,
                                                                listings=Path(folder) / "listings"))
        ranks = ranked(Path(folder), args.tars, traced_per_tar, args.ranks) if args.ranks > 1 else []

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
             f"| the opened source and its tar listings to keep in OUT/listings | {pending_bytes / traced:.0f} "
             f"| {pending_peak / traced:.0f} | | | | |",
             *([f"| a rank of {args.ranks} in `tl extract` (gloo processes), once it holds its shards "
                f"(`{HeldSamples.__name__}`); the peak: the most of any rank while opening and planning "
                f"| {max(rank['held'] for rank in ranks) / traced:.0f} "
                f"| {max(rank['peak'] for rank in ranks) / traced:.0f} | | | | |"] if ranks else []),
             f"| one Python `Sample` each, in a list (the layout before `TarSamples`) | {object_bytes / traced:.0f} "
             "| | | | | |"]
    header = (f"{images:,} images in {args.tars} tars (keys 000000000.., a .cls label of {CLASSES} classes each), "
              f"listed from synthesised listings (their making is in the open time); bytes by tracemalloc (numpy's "
              f"arrays included; not torch's buffers of an exchange between ranks) over an opening of {traced:,} of "
              f"them; {where_and_when()}. "
              "Command: `python bench/sample_memory.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
