"""The folded inference graph on the CPU (or CUDA): the frozen tap model's forward pass as torchvision's
create_feature_extractor gives it (eager) and as tl extract and predict run it (backbones.prepare_model:
BatchNorm and symmetric padding folded into the convolutions, ReLUs in place; pipeline/folding.py),
both channels_last with host memory reused, alternating round after round in one process; the table
holds the medians and the largest row-wise relative difference of the codes (under --precision: both
graphs under that autocast, against the eager graph in float32). Writes the section "Folded inference
graph on the CPU" (or "... on CUDA", and " (float16)" for another precision) of bench/RESULTS.md.

    python bench/folded_graph.py
    python bench/folded_graph.py --backbones timm:efficientnet_b0,timm:resnet50    # timm's (the timm extra)
    python bench/folded_graph.py --device cuda --precision float16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.allocator import reused_memory  # noqa: E402
from pipeline.backbones import for_inference, get_backbone, load_model, resolve_weights, tap_model  # noqa: E402
from pipeline.hardware import autocast, prepare_module, resolve_device, resolve_precision  # noqa: E402
from results import backbone_arguments, publish, row_differences, where_and_when  # noqa: E402

SECTION = "## Folded inference graph on "


def graphs(name: str, device: torch.device) -> dict:
    """{"eager": the tap model as create_feature_extractor gives it, "folded": the same run through
    backbones.for_inference, as prepare_model runs it}, both channels_last. Random weights get BatchNorm
    statistics far from the identity, so that the codes' difference means something."""
    backbone = get_backbone(name)
    pretrained = name == "efficientnet_lite0"
    full = load_model(backbone, resolve_weights(backbone, "imagenet" if pretrained else "none"))
    generator = torch.Generator().manual_seed(0)
    for layer in full.modules():
        if isinstance(layer, torch.nn.BatchNorm2d) and not pretrained:
            layer.running_mean.normal_(0, 0.5, generator=generator)
            layer.running_var.uniform_(0.5, 2, generator=generator)
    eager = tap_model(full, backbone, [backbone.default_tap])
    return {"eager": prepare_module(copy.deepcopy(eager), device), "folded": for_inference(eager, device)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(model: torch.nn.Module, images: torch.Tensor, batches: int, precision: str = "float32") -> float:
    with torch.inference_mode(), autocast(images.device, precision):
        model(images)  # warm-up: oneDNN primitives (cuDNN algorithms) for this shape, the reused heap
        _synchronize(images.device)
        started = time.perf_counter()
        for _ in range(batches):
            model(images)
        _synchronize(images.device)
    return batches * len(images) / (time.perf_counter() - started)


def arguments() -> argparse.ArgumentParser:
    parser = backbone_arguments(__doc__.splitlines()[0], 32, 3, "forward batches per measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", help="autocast of both graphs: float32, float16, bfloat16")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    batches = args.batches if device.type == "cpu" else 10 * args.batches
    table = ["| backbone | layers folded (BatchNorm / pad / ReLU in place) | forward eager img/s "
             "| forward folded (tl) img/s | ratio | codes: max row-wise relative difference from eager float32 |",
             "|---|---|---:|---:|---:|---:|"]
    with reused_memory(device):
        for name in args.backbones.split(","):
            backbone = get_backbone(name)
            models = graphs(name, device)
            counts = getattr(models["folded"].extractor, "meta", {}).get("folded_for_inference")  # None: runs eager
            images = torch.randn(args.batch_size, 3, backbone.input_size, backbone.input_size,
                                 generator=torch.Generator().manual_seed(0)).to(device).contiguous(
                                     memory_format=torch.channels_last)
            with torch.inference_mode():
                with autocast(device, "float32"):  # IEEE float32: on CUDA, not cuDNN's default TF32 convolutions
                    eager = models["eager"](images)[backbone.default_tap].double()
                with autocast(device, precision):
                    folded = models["folded"](images)[backbone.default_tap].double()
            difference = float(row_differences(folded.cpu().numpy(), eager.cpu().numpy()).max())
            rates = {graph: [] for graph in models}
            for _ in range(args.rounds):
                for graph, model in models.items():
                    rates[graph].append(forward_rate(model, images, batches, precision))
            eager_rate, folded_rate = (float(np.median(rates[graph])) for graph in ("eager", "folded"))
            folded_layers = ("none: runs eager" if counts is None else
                             f"{counts['batch_norm']} / {counts['zero_pad']} / {counts['relu_in_place']}")
            table.append(f"| {name} | {folded_layers} "
                         f"| {eager_rate:.1f} | {folded_rate:.1f} | {folded_rate / eager_rate:.2f}x | {difference:.1e} |")
    where = where_and_when(device=device)
    default = arguments().get_default("backbones")
    command = ("python bench/folded_graph.py" + ("" if args.backbones == default else f" --backbones {args.backbones}")
               + ("" if device.type == "cpu" else " --device cuda")
               + ("" if precision == "float32" else f" --precision {precision}"))
    header = (f"Random weights, BatchNorm statistics drawn away from the identity (efficientnet_lite0: its ImageNet "
              f"weights), batch {args.batch_size}, {precision}, channels_last, host memory reused, {batches} batches "
              f"per measure, median of {args.rounds} rounds alternating the graphs in one process; {where}. "
              f"Command: `{command}`")
    section = (SECTION + ("the CPU" if device.type == "cpu" else "CUDA")
               + ("" if precision == "float32" else f" ({precision})"))
    publish(section, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
