"""What recording a finished shard costs as a cache grows: 100,000 one-row shards written through
CacheWriter (the forward pass is not what this measures), the time of each `write_shard` (build the
shard, write it atomically, append its record) around shard 1,000 against the last ones, plus what the
earlier design (the whole manifest rewritten after every shard) costs at the same count, and how long
opening the finished cache takes (its records streamed).

Writes the section "shard records: constant cost per shard" of bench/RESULTS.md (a ratio from one run
is the figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import publish  # noqa: E402

SECTION = "## shard records: constant cost per shard"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--early", type=int, default=1_000, help="the shard count compared with the last")
    parser.add_argument("--window", type=int, default=200, help="shards timed around each point (median)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)

    from cache.manifest import Manifest, ShardEntry, load_manifest
    from cache.reader import CacheReader
    from cache.writer import CacheWriter
    from pipeline.files import write_bytes

    key = {"backbone": "synthetic", "weights": "none", "taps": ["f"], "layout": {"shard_rows": 1}, "patches": None}
    seconds = np.zeros(args.shards)
    codes, targets = {"f": np.ones((1, 4), np.float32)}, np.zeros(1, np.int64)
    with tempfile.TemporaryDirectory(prefix="tl-records-") as folder:
        root = Path(folder) / "cache"
        started = time.perf_counter()
        with CacheWriter(root, key, ["a"], {"f": 4}, "float16", 1, args.shards) as writer:
            for index in range(args.shards):
                tick = time.perf_counter()
                writer.write_shard(index, codes, targets, [f"s{index}"], [])
                seconds[index] = time.perf_counter() - tick
            tick = time.perf_counter()
            writer.finish()
            finish = time.perf_counter() - tick
        total = time.perf_counter() - started
        tick = time.perf_counter()
        reader = CacheReader(root, verify=False)
        opened = time.perf_counter() - tick
        assert reader.manifest.complete and len(reader.shards) == args.shards
        tick = time.perf_counter()
        load_manifest(root)
        loaded = time.perf_counter() - tick
        # the earlier design: the manifest (with every shard listed) replaced after each shard
        old = Manifest.new(key, ["a"], {"f": 4}, "float16", 1, args.shards)
        old.shards = [ShardEntry(k, f"shard-{k:05d}.h5", 1, 4000, "0" * 64, k, 1, "0" * 64) for k in range(args.shards)]
        document = {**old.header(), "shards": [vars(shard) for shard in old.shards]}
        tick = time.perf_counter()
        write_bytes(Path(folder) / "old-manifest.json", json.dumps(document, indent=1).encode())
        rewrite = time.perf_counter() - tick

    half = args.window // 2
    early = float(np.median(seconds[max(0, args.early - half):args.early + half]))
    late = float(np.median(seconds[-args.window:]))
    header = (f"{args.shards:,} one-row shards written by CacheWriter on {platform.machine()} "
              f"({total:.0f} s in all); median of {args.window} shards at each point "
              f"(`python bench/shard_records.py --shards {args.shards}`).")
    table = ["| measure | value |", "|---|---:|",
             f"| recording shard {args.early:,} (write + record), ms | {early * 1000:.2f} |",
             f"| recording shard {args.shards:,}, ms | {late * 1000:.2f} |",
             f"| ratio, last to early (target ≤ 1.5) | {late / early:.2f} |",
             f"| finish (manifest with the content digest), s | {finish:.2f} |",
             f"| opening the finished cache (records streamed), s | {opened:.2f} |",
             f"| load_manifest alone, s | {loaded:.2f} |",
             f"| earlier design: one rewrite of a manifest listing {args.shards:,} shards, s | {rewrite:.3f} |"]
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
