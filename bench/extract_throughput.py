"""Throughput of `tl extract` against the bare forward pass, on this machine, in one run.

The bare forward pass runs the same tap model on pre-made tensors (no decoding, no writing): the
compute limit. Writes a table to bench/RESULTS.md (section "extract throughput") and prints it.

    python bench/extract_throughput.py [--images 384] [--backbones alexnet,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import TapModel, get_backbone, load_model, resolve_weights  # noqa: E402
from pipeline.extract import ExtractConfig, resolve_device, run_extract  # noqa: E402
from results import publish  # noqa: E402  (bench/ is this script's folder)
SECTION = "## extract throughput"


def write_images(folder: Path, count: int, size: int = 224) -> None:
    """JPEG photos-like images at the backbone's input size, spread over 4 classes."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class{i % 4}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((size, size), Image.Resampling.BILINEAR).save(path, quality=90)


def bare_forward_rate(name: str, weights: str, batch_size: int, batches: int, device: torch.device,
                      precision: str) -> float:
    backbone = get_backbone(name)
    model = TapModel(load_model(backbone, resolve_weights(backbone, weights)), backbone, [backbone.default_tap])
    model = model.to(device)
    images = torch.randn(batch_size, 3, backbone.input_size, backbone.input_size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=getattr(torch, precision), enabled=precision != "float32")
    with torch.inference_mode(), autocast:
        model(images)  # warm-up: allocator, cudnn algorithm choice
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            outputs = model(images)
            outputs[backbone.default_tap].float().cpu()
        return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--backbones", default="alexnet,efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        write_images(folder, args.images)
        for name in args.backbones.split(","):
            weights = "imagenet" if name == "efficientnet_lite0" else "none"
            config = ExtractConfig(data=folder, out=Path(scratch) / f"cache-{name}", backbone=name, weights=weights,
                                   batch_size=args.batch_size, workers=args.workers, device=args.device,
                                   precision=args.precision, shard_rows=128, quiet=True)
            result = run_extract(config)
            precision = result_precision(config.out)
            bare = bare_forward_rate(name, weights, args.batch_size, max(2, args.images // args.batch_size // 2),
                                     device, precision)
            extract_rate = result.images_processed / result.loop_seconds
            rows.append((name, extract_rate, bare, extract_rate / bare, result.write_seconds / result.loop_seconds))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    header = (f"{args.images} JPEG images 224x224, batch {args.batch_size}, device {where}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}")
    table = ["| backbone | tl extract img/s | bare forward img/s | ratio | HDF5 writing share |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {e:.1f} | {b:.1f} | {r:.0%} | {w:.1%} |" for n, e, b, r, w in rows]
    publish(f"{SECTION} ({where})", header, table, write=not args.no_write)


def result_precision(cache: Path) -> str:
    import json

    return json.loads((cache / "manifest.json").read_text())["key"]["precision"]


if __name__ == "__main__":
    main()
