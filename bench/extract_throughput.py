"""Throughput of `tl extract` against the bare forward pass, and of a finetune training step.

The bare forward pass runs the same tap model on pre-made tensors already on the device (no decoding,
no copying in, no writing): the compute limit. The training step is `tl finetune`'s own step
(autocast, loss scaling for float16) with the whole backbone unfrozen. On CUDA the models run in
channels_last with cudnn autotuning, batches come pinned and are copied without blocking.
Writes a table to bench/RESULTS.md (section "extract throughput (DEVICE)") and prints it.

    python bench/extract_throughput.py                     # CPU: alexnet, efficientnet_lite0
    python bench/extract_throughput.py --device cuda --precision float32,float16,bfloat16
                                                           # GPU: alexnet, vgg16, resnet50
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
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from pipeline.finetune import FinetuneModel, training_step  # noqa: E402
from pipeline.hardware import (autocast, grad_scaler, prepare_module, resolve_device,  # noqa: E402
                               resolve_precision, to_device)
from results import publish  # noqa: E402  (bench/ is this script's folder)
SECTION = "## extract throughput"
DEFAULT_BACKBONES = {"cuda": "alexnet,vgg16,resnet50", "cpu": "alexnet,efficientnet_lite0"}


def write_images(folder: Path, count: int, size: int = 224) -> None:
    """JPEG photos-like images at the backbone's input size, spread over 4 classes."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class{i % 4}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((size, size), Image.Resampling.BILINEAR).save(path, quality=90)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_rate(name: str, weights: str, batch_size: int, batches: int, device: torch.device,
                      precision: str) -> float:
    """Images/s of the frozen tap model on a batch already on the device, codes copied back as float32."""
    backbone = get_backbone(name)
    model = prepare_module(TapModel(load_model(backbone, resolve_weights(backbone, weights)), backbone,
                                    [backbone.default_tap]), device)
    images = to_device(torch.randn(batch_size, 3, backbone.input_size, backbone.input_size), device)
    with torch.inference_mode(), autocast(device, precision):
        model(images)  # warm-up: allocator, cudnn algorithm choice
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            model(images)[backbone.default_tap].float().cpu()
        return batches * batch_size / (time.perf_counter() - started)


def train_step_rate(name: str, batch_size: int, steps: int, device: torch.device, precision: str) -> float:
    """Images/s of `tl finetune`'s training step through the whole backbone (every layer trainable) and a
    10-class linear head, SGD with momentum, on a batch already on the device."""
    backbone = get_backbone(name)
    features = TapModel(load_model(backbone, resolve_weights(backbone, "none")), backbone, [backbone.default_tap])
    model = prepare_module(FinetuneModel(features, backbone.default_tap, torch.nn.LazyLinear(10)), device)
    images = to_device(torch.randn(batch_size, 3, backbone.input_size, backbone.input_size), device)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    model.train()
    with torch.no_grad():
        model(images)  # materializes the lazy head
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler, loss_function = grad_scaler(device, precision), torch.nn.CrossEntropyLoss()
    training_step(model, images, targets, loss_function, optimizer, scaler, device, precision)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, images, targets, loss_function, optimizer, scaler, device, precision)
    return steps * batch_size / (time.perf_counter() - started)  # .item() in each step waits for the GPU


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--backbones", default=None, help="comma list [default: per device, see above]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=None, help="[default: 20 on CUDA, 2 on the CPU]")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="comma list: a row per backbone and precision")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    names = (args.backbones or DEFAULT_BACKBONES[device.type]).split(",")
    steps = args.train_steps if args.train_steps is not None else (20 if device.type == "cuda" else 2)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        write_images(folder, args.images)
        for name in names:
            weights = "imagenet" if name == "efficientnet_lite0" else "none"
            for asked in args.precision.split(","):
                precision = resolve_precision(asked, device)
                config = ExtractConfig(data=folder, out=Path(scratch) / f"cache-{name}-{precision}", backbone=name,
                                       weights=weights, batch_size=args.batch_size, workers=args.workers,
                                       device=args.device, precision=precision, shard_rows=128, quiet=True)
                result = run_extract(config)
                bare = bare_forward_rate(name, weights, args.batch_size,
                                         max(2, args.images // args.batch_size // 2), device, precision)
                train = train_step_rate(name, args.batch_size, steps, device, precision) if steps else float("nan")
                extract_rate = result.images_processed / result.loop_seconds
                rows.append((name, precision, extract_rate, bare, extract_rate / bare,
                             result.write_seconds / result.loop_seconds, train))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU")
    header = (f"{args.images} JPEG images 224x224, batch {args.batch_size}, device {where}, "
              f"{config.workers if config.workers is not None else 'default'} decoding workers, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
              f"Command: `python bench/extract_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    table = ["| backbone | precision | tl extract img/s | bare forward img/s | ratio | HDF5 writing share "
             "| finetune step img/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {p} | {e:.1f} | {b:.1f} | {r:.0%} | {w:.1%} | {t:.1f} |" for n, p, e, b, r, w, t in rows]
    publish(f"{SECTION} ({where})", header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
