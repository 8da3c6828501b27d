"""What a grid of heads costs against one head, as whole `tl` processes on one cache in one run: a
mini-batch grid (20 logreg --solver sgd heads, 10 C x 2 lr, trained in shared passes) against one such
head by `tl fit-head`, and 10 lbfgs heads (C values, one loaded standardised copy) against one.

The cache holds codes shaped like AlexNet fc7 of a 20-class set (4096 float16 columns, class
clusters plus noise; the speed does not depend on what the codes mean). Writes the section
"sweep: a grid against one head" of bench/RESULTS.md (a ratio from one run is the figure).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results import publish  # noqa: E402

SECTION = "## sweep: a grid against one head"


def write_cache(root: Path, rows: int, width: int, classes: int, seed: int = 0) -> None:
    from cache.writer import CacheWriter

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, width)).astype(np.float32)
    key = {"backbone": "synthetic", "weights": "synthetic", "taps": ["fc7"], "precision": "float32",
           "preprocessing": {"resize": 0, "crop": 0, "mean": [0, 0, 0], "std": [1, 1, 1]},
           "dataset": {"format": "synthetic", "rows": rows}, "layout": {"dtype": "float16", "shard_rows": 4096},
           "patches": None}
    with CacheWriter(root, key, [f"class{c}" for c in range(classes)], {"fc7": width}, "float16", 4096, rows) as writer:
        for index, start in enumerate(range(0, rows, 4096)):
            stop = min(start + 4096, rows)
            targets = rng.integers(0, classes, stop - start)
            codes = np.maximum(centres[targets] + rng.normal(0, 2.0, (stop - start, width)), 0).astype(np.float16)
            writer.write_shard(index, {"fc7": codes}, targets, [f"row{i:07d}" for i in range(start, stop)], [])
        writer.finish()


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def training_pass(cache: Path, costs: list[float], epochs: int) -> tuple[float, float]:
    """Seconds of the shared training pass alone, in this process: one sgd logreg head, then 20 (10 C x
    2 lr) on the same rows and validation split, standardisation and scoring left out on both sides."""
    from cache.reader import CacheReader
    from pipeline.fit_head import training_rows
    from pipeline.heads import LogRegHead
    from pipeline.training import TrainingOptions, train_networks

    rows, val = training_rows(CacheReader(cache), "fc7", None, 0.2, 0, 4096)
    seconds = []
    for grid, rates in (([1.0], [0.05]), (costs, [0.01, 0.05])):
        trainees = []
        for lr in rates:
            head = LogRegHead(grid if len(grid) > 1 else grid[0], solver="sgd",
                              training=TrainingOptions(max_epochs=epochs, batch_size=256, lr=lr))
            trainees += head.trainees(rows, val)
        started = time.perf_counter()
        train_networks(trainees, rows, val, 0)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lbfgs-rows", type=int, default=4000, help="rows of the lbfgs comparison (in memory)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    costs = [10.0 ** k for k in np.linspace(-3, 2, 10)]
    grid = ",".join(f"{c:.4g}" for c in costs)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_cache(scratch / "cache", args.rows, args.width, args.classes)
        write_cache(scratch / "small", args.lbfgs_rows, args.width, args.classes, seed=1)
        common = ["--max-epochs", str(args.epochs), "--batch-size", "256", "--quiet"]
        sgd_one = timed(["fit-head", "--cache", str(scratch / "cache"), "--solver", "sgd", "--C", "1", "--lr", "0.05",
                         "--val-fraction", "0.2", "--out", str(scratch / "one.pt"), *common])
        sgd_grid = timed(["sweep", "--cache", str(scratch / "cache"), "--solver", "sgd", "--C", grid, "--lr", "0.01,0.05",
                          "--out", str(scratch / "sgd"), *common])
        lbfgs_one = timed(["fit-head", "--cache", str(scratch / "small"), "--C", "1", "--val-fraction", "0.2",
                           "--out", str(scratch / "one-lbfgs.pt"), "--quiet", "--max-iter", "200"])
        pass_one, pass_grid = training_pass(scratch / "cache", costs, args.epochs)
        lbfgs_grid = timed(["sweep", "--cache", str(scratch / "small"), "--C", grid, "--out", str(scratch / "lbfgs"),
                            "--quiet", "--max-iter", "200"])
    header = (f"Whole `tl` processes in one run (`python bench/sweep_cost.py`), {platform.machine()} CPU, "
              f"{os.cpu_count()} cores; codes like AlexNet fc7 ({args.width} float16 columns, {args.classes} classes). "
              f"The figure is the ratio; absolute seconds on a shared machine are not.")
    table = ["| what | rows | heads | seconds | ratio to one head |", "|---|---:|---:|---:|---:|",
             f"| `tl fit-head --solver sgd`, {args.epochs} epochs | {args.rows} | 1 | {sgd_one:.1f} | 1.00 |",
             f"| `tl sweep --solver sgd` (10 C x 2 lr), {args.epochs} epochs | {args.rows} | 20 | {sgd_grid:.1f} | "
             f"{sgd_grid / sgd_one:.2f} |",
             f"| the training pass alone (in-process), {args.epochs} epochs | {args.rows} | 1 | {pass_one:.1f} | 1.00 |",
             f"| the training pass alone (in-process), {args.epochs} epochs | {args.rows} | 20 | {pass_grid:.1f} | "
             f"{pass_grid / pass_one:.2f} |",
             f"| `tl fit-head` lbfgs | {args.lbfgs_rows} | 1 | {lbfgs_one:.1f} | 1.00 |",
             f"| `tl sweep` lbfgs (10 C) | {args.lbfgs_rows} | 10 | {lbfgs_grid:.1f} | {lbfgs_grid / lbfgs_one:.2f} |"]
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
