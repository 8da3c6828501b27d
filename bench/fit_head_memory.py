"""Peak memory of `tl fit-head` on a cache 4x larger than a memory budget: streaming heads (mlp,
logreg --solver sgd) stay within the budget; logreg lbfgs, which loads the layer, does not.

Each fit runs in a fresh process; its peak RSS (getrusage) is compared with the same fit on a tiny
cache, which holds the interpreter, torch, scikit-learn and the model. Writes the section
"fit-head memory" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache.writer import CacheWriter  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## fit-head memory"
CHILD = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.training import TrainingOptions
settings = json.loads({settings!r})
training = TrainingOptions(**settings.pop("training"))
fit_head(FitHeadConfig(training=training, **settings))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def write_cache(root: Path, rows: int, width: int, shard_rows: int, classes: int = 10) -> int:
    """Gaussian classes written shard by shard (the parent never holds the cache); returns bytes."""
    centres = np.random.default_rng(0).normal(0, 1, (classes, width)).astype(np.float32)
    key = {"backbone": "synthetic", "weights": "synthetic", "taps": ["feat"], "precision": "float32",
           "preprocessing": {}, "dataset": {"rows": rows}, "layout": {"dtype": "float32", "shard_rows": shard_rows},
           "patches": None}
    with CacheWriter(root, key, [f"c{c}" for c in range(classes)], {"feat": width}, "float32", shard_rows, rows,
                     overwrite=True) as writer:
        for index, start in enumerate(range(0, rows, shard_rows)):
            rng = np.random.default_rng(index + 1)
            count = min(shard_rows, rows - start)
            targets = np.arange(start, start + count) % classes
            codes = centres[targets] + rng.normal(0, 3, (count, width)).astype(np.float32)
            writer.write_shard(index, {"feat": codes}, targets, [f"r{i}" for i in range(start, start + count)], [])
        manifest = writer.finish()
    return sum(shard.bytes for shard in manifest.shards)


def peak_rss_mib(settings: dict) -> float:
    code = CHILD.format(repo=str(REPO), settings=json.dumps(settings, default=str))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--budget-mib", type=int, default=128, help="memory allowed above the tiny-cache run")
    parser.add_argument("--block-rows", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cache_bytes = write_cache(scratch / "big", args.rows, args.width, shard_rows=8192)
        write_cache(scratch / "tiny", 1024, args.width, shard_rows=1024)
        cases = {
            "mlp (hidden 512, streamed)": {"head": "mlp", "hidden": [512], "training": {"max_epochs": 1}},
            "logreg --solver sgd (streamed)": {"head": "logreg", "solver": "sgd", "training": {"max_epochs": 1}},
            "logreg lbfgs (loads the layer)": {"head": "logreg", "max_iter": 5, "training": {}},
        }
        lines = []
        for name, case in cases.items():
            peaks = {}
            for cache in ("tiny", "big"):
                settings = {"cache": str(scratch / cache), "out": str(scratch / f"{cache}.pt"),
                            "block_rows": args.block_rows, **case}
                peaks[cache] = peak_rss_mib(settings)
            above = peaks["big"] - peaks["tiny"]
            verdict = "within" if above <= args.budget_mib else "over"
            lines.append(f"| {name} | {peaks['tiny']:.0f} | {peaks['big']:.0f} | {above:+.0f} | {verdict} |")
            print(lines[-1], flush=True)
    cache_mib = cache_bytes / 2**20
    header = (f"Cache of {args.rows} rows x {args.width} float32 codes = {cache_mib:.0f} MiB in 8 shards, "
              f"{cache_mib / args.budget_mib:.1f}x the budget of {args.budget_mib} MiB above the same fit on a "
              f"1,024-row cache. `--block-rows {args.block_rows}`, one epoch, {platform.machine()} CPU. "
              f"Command: `python bench/fit_head_memory.py`.")
    table = ["| head | peak RSS tiny cache (MiB) | peak RSS big cache (MiB) | difference (MiB) | budget |",
             "|---|---:|---:|---:|---|"] + lines
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
