"""Reused host memory on the CPU: the frozen tap model's forward pass (batch 64, extract's default) and a
training step of every layer (batch 32, finetune's default), with glibc's default allocator settings
and inside hardware.reused_memory, as tl's stages run them. Both run in channels_last. Each measure is
a whole process (glibc adapts its thresholds to what a process freed before, so one process cannot
show both settings as a fresh `tl` meets them); the settings alternate round after round, and the
table holds the medians. The ratio is the figure.
Writes the section "reused host memory on the CPU" of bench/RESULTS.md.

    python bench/host_memory.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from channels_last import _model, forward_rate, training_rate  # noqa: E402
from pipeline.backbones import get_backbone  # noqa: E402
from pipeline.hardware import memory_kept, reused_memory  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## reused host memory on the CPU"
SETTINGS = {"glibc defaults": contextlib.nullcontext, "reused (tl)": reused_memory}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="alexnet,vgg16,resnet50,efficientnet_lite0")
    parser.add_argument("--forward-batch", type=int, default=64)
    parser.add_argument("--training-batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="forward batches (and training steps) per measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--measure", choices=("forward", "training"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=tuple(SETTINGS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        return _measure_main(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be 1 or more, got {args.rounds}")
    with reused_memory():
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
        cells = []
        for what in ("forward", "training"):
            default, reused = median["glibc defaults", what], median["reused (tl)", what]
            cells += [f"{default:.1f}", f"{reused:.1f}", f"{reused / default:.2f}x"]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    header = (f"Random weights, channels_last, float32, forward batch {args.forward_batch}, training batch "
              f"{args.training_batch}, {args.batches} batches per measure, each measure a whole process, median of "
              f"{args.rounds} rounds alternating the settings; {platform.machine()} CPU, {torch.get_num_threads()} "
              f"torch threads, glibc {platform.libc_ver()[1]}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
              "Command: `python bench/host_memory.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
