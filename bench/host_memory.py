"""Reused host memory on the CPU: the frozen tap model's forward pass (batch 64, extract's default) and a
training step of every layer (batch 32, finetune's default), with glibc's default allocator settings
and inside allocator.reused_memory, as tl's stages run them. Both run in channels_last. Then its price:
the peak memory of a whole `tl extract` of photos (bench/photos.py) with TL_REUSE_MEMORY=0 and 1.
Each measure is a whole process (glibc adapts its thresholds to what a process freed before, so one
process cannot show both settings as a fresh `tl` meets them); the settings alternate round after
round, and the tables hold the medians. Writes the section "reused host memory on the CPU" of
bench/RESULTS.md.

    python bench/host_memory.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from channels_last import _model, comparison_row, forward_rate, training_rate  # noqa: E402
from pipeline.backbones import get_backbone  # noqa: E402
from pipeline.allocator import REUSE_VARIABLE, memory_kept, reused_memory  # noqa: E402
from photos import write_photo_set  # noqa: E402
from results import publish, where_and_when  # noqa: E402

SECTION = "## reused host memory on the CPU"
CPU = torch.device("cpu")
SETTINGS = {"glibc defaults": contextlib.nullcontext, "reused (tl)": lambda: reused_memory(CPU)}
EXTRACT_BACKBONES = {"alexnet": "none", "efficientnet_lite0": "imagenet"}  # name: weights (offline)


def _measure_main(args) -> None:
    """One measure in this process; prints its rate as the last line."""
    size = get_backbone(args.backbones).input_size
    with SETTINGS[args.setting]():
        model = _model(args.backbones, torch.channels_last)
        if args.measure == "forward":
            images = torch.randn(args.forward_batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            rate = forward_rate(model, images, args.batches)
        else:
            images = torch.randn(args.training_batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            rate = training_rate(model, images, args.batches)
    print(json.dumps({"rate": rate}))


def _in_process(args, name: str, measure: str, setting: str) -> float:
    command = [sys.executable, __file__, "--measure", measure, "--setting", setting, "--backbones", name,
               "--forward-batch", str(args.forward_batch), "--training-batch", str(args.training_batch),
               "--batches", str(args.batches)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{measure} {name} ({setting}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rate"]


def _memory_of(pid: int) -> tuple[int, int]:
    """(resident bytes of process `pid`, proportional bytes of it and every process below it: pages
    shared after a fork counted once in all), from /proc; (0, 0) once it is gone."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, added = {pid}, True
    while added:
        below = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= below
        added = bool(below)
    resident, proportional = 0, 0
    for member in tree:
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:] if line.endswith("kB")}
        proportional += fields.get("Pss", 0)
        if member == pid:
            resident = fields.get("Rss", 0)
    return resident, proportional


def measure_extract(name: str, photos: Path, out: Path, reuse: str) -> dict:
    """A whole `tl extract` of the photos with TL_REUSE_MEMORY=reuse: its wall time and the peaks of
    _memory_of, sampled every 0.1 s."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cli", "extract", "--data", str(photos), "--out", str(out), "--backbone", name,
               "--weights", EXTRACT_BACKBONES[name], "--quiet"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, REUSE_VARIABLE: reuse},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main, peak_tree = 0, 0
    while process.poll() is None:
        main_bytes, tree_bytes = _memory_of(process.pid)
        peak_main, peak_tree = max(peak_main, main_bytes), max(peak_tree, tree_bytes)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"tl extract {name} failed:\n{process.stderr.read()[-2000:]}")
    return {"wall": wall, "main": peak_main / 2**30, "tree": peak_tree / 2**30}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="alexnet,vgg16,resnet50,efficientnet_lite0")
    parser.add_argument("--forward-batch", type=int, default=64)
    parser.add_argument("--training-batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="forward batches (and training steps) per measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extract-photos", type=int, default=320, help="photos for the whole-extract table (0: none)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--measure", choices=("forward", "training"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=tuple(SETTINGS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        return _measure_main(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be 1 or more, got {args.rounds}")
    with reused_memory(CPU):
        if not memory_kept():
            raise SystemExit("reused_memory changes nothing here (not glibc, or GLIBC_TUNABLES / MALLOC_*_ set): "
                             "nothing to compare")
    columns = [f"{what} {setting} img/s" for what in ("forward", "training step (every layer)") for setting in SETTINGS]
    table = ["| backbone | " + " | ".join(columns[:2]) + " | ratio | " + " | ".join(columns[2:]) + " | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.backbones.split(","):
        rates = {(setting, what): [] for setting in SETTINGS for what in ("forward", "training")}
        for _ in range(args.rounds):
            for what in ("forward", "training"):
                for setting in SETTINGS:
                    rates[setting, what].append(_in_process(args, name, what, setting))
        median = {key: float(np.median(values)) for key, values in rates.items()}
        table.append(comparison_row(name, median, "glibc defaults", "reused (tl)"))
    if args.extract_photos:
        table += ["", f"Its price: a whole `tl extract` of {args.extract_photos} photos (bench/photos.py), default "
                  "settings, each a whole process (median of the rounds); peaks sampled every 0.1 s from /proc. "
                  "Proportional set size counts the pages the decoding workers share with the main process once.",
                  "", "| backbone | wall s, glibc defaults | wall s, reused (tl) | peak RSS of tl's process GiB, "
                  "glibc defaults | reused (tl) | peak PSS with its workers GiB, glibc defaults | reused (tl) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        with tempfile.TemporaryDirectory() as scratch:
            photos = Path(scratch) / "photos"
            write_photo_set(photos, args.extract_photos)
            for name in EXTRACT_BACKBONES:
                runs = {reuse: [] for reuse in ("0", "1")}
                for _ in range(args.rounds):
                    for reuse in runs:
                        runs[reuse].append(measure_extract(name, photos, Path(scratch) / "cache", reuse))
                median = {(reuse, key): float(np.median([run[key] for run in results]))
                          for reuse, results in runs.items() for key in ("wall", "main", "tree")}
                table.append(f"| {name} | {median['0', 'wall']:.1f} | {median['1', 'wall']:.1f} "
                             f"| {median['0', 'main']:.2f} | {median['1', 'main']:.2f} "
                             f"| {median['0', 'tree']:.2f} | {median['1', 'tree']:.2f} |")
    header = (f"Random weights, channels_last, float32, forward batch {args.forward_batch}, training batch "
              f"{args.training_batch}, {args.batches} batches per measure, each measure a whole process, median of "
              f"{args.rounds} rounds alternating the settings; {where_and_when(f'glibc {platform.libc_ver()[1]}')}. "
              "Command: `python bench/host_memory.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
