"""bench/RESULTS.md: each benchmark script owns one section and replaces only that section."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(section: str, text: str) -> None:
    """Replace (or append) this section of RESULTS.md, leaving the other sections alone."""
    content = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    blocks = content.split("\n## ")
    kept = [blocks[0]] + [b for b in blocks[1:] if ("## " + b).split("\n", 1)[0].rstrip() != section]
    RESULTS.write_text("\n## ".join(kept).rstrip() + f"\n\n{section}\n\n{text}\n")


def publish(section: str, header: str, table: list[str], write: bool = True) -> None:
    """Print a benchmark's header and table, and record them as its section unless `write` is off."""
    text = "\n".join([header, "", *table])
    print(text)
    if write:
        record(section, text)


def where_and_when(*extra: str, device=None) -> str:
    """Where and when a benchmark ran: "x86_64 CPU, 2 torch threads, [extra, ]torch 2.x, 2026-01-01", or on
    a CUDA `device` its name instead of the CPU's and threads."""
    import torch

    where = ([torch.cuda.get_device_name(device)] if device is not None and device.type == "cuda"
             else [f"{platform.machine()} CPU", f"{torch.get_num_threads()} torch threads"])
    return ", ".join([*where, *extra, f"torch {torch.__version__}", time.strftime("%Y-%m-%d")])


def row_differences(codes, reference):
    """Each row's relative difference ||codes - reference|| / ||reference|| (numpy arrays, one row per
    image), the measure of how far two ways of computing codes are apart."""
    import numpy as np

    return np.linalg.norm(codes - reference, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)


def backbone_arguments(description: str, batch_size: int, batches: int, batches_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark that times each registered backbone in alternating rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backbones", default="alexnet,vgg16,resnet50,efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--batches", type=int, default=batches, help=batches_help)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    return parser
