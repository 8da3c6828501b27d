"""The folded inference graph on the CPU: the frozen tap model's forward pass as torchvision's
create_feature_extractor gives it (eager) and as tl extract and predict run it (backbones.prepare_model:
BatchNorm and symmetric padding folded into the convolutions, ReLUs in place; pipeline/folding.py),
both channels_last with host memory reused, alternating round after round in one process; the table
holds the medians and the largest row-wise relative difference of the codes. Writes the section
"Folded inference graph on the CPU" of bench/RESULTS.md.

    python bench/folded_graph.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.allocator import reused_memory  # noqa: E402
from pipeline.backbones import TapModel, for_inference, get_backbone, load_model, resolve_weights  # noqa: E402
from pipeline.hardware import prepare_module  # noqa: E402
from results import backbone_arguments, publish, where_and_when  # noqa: E402

SECTION = "## Folded inference graph on the CPU"
CPU = torch.device("cpu")


def graphs(name: str) -> dict:
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
    eager = TapModel(full, backbone, [backbone.default_tap])
    return {"eager": prepare_module(copy.deepcopy(eager), CPU), "folded": for_inference(eager, CPU)}


def forward_rate(model: torch.nn.Module, images: torch.Tensor, batches: int) -> float:
    with torch.inference_mode():
        model(images)  # warm-up: oneDNN primitives for this shape, the reused heap
        started = time.perf_counter()
        for _ in range(batches):
            model(images)
    return batches * len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    args = backbone_arguments(__doc__.splitlines()[0], 32, 3, "forward batches per measure").parse_args(argv)
    table = ["| backbone | layers folded (BatchNorm / pad / ReLU in place) | forward eager img/s "
             "| forward folded (tl) img/s | ratio | codes: max row-wise relative difference |",
             "|---|---|---:|---:|---:|---:|"]
    with reused_memory(CPU):
        for name in args.backbones.split(","):
            backbone = get_backbone(name)
            models = graphs(name)
            counts = models["folded"].extractor.meta["folded_for_inference"]
            images = torch.randn(args.batch_size, 3, backbone.input_size, backbone.input_size,
                                 generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                eager, folded = (models[graph](images)[backbone.default_tap].double() for graph in ("eager", "folded"))
            difference = float(((folded - eager).norm(dim=1) / eager.norm(dim=1).clamp_min(1e-12)).max())
            rates = {graph: [] for graph in models}
            for _ in range(args.rounds):
                for graph, model in models.items():
                    rates[graph].append(forward_rate(model, images, args.batches))
            eager_rate, folded_rate = (float(np.median(rates[graph])) for graph in ("eager", "folded"))
            table.append(f"| {name} | {counts['batch_norm']} / {counts['zero_pad']} / {counts['relu_in_place']} "
                         f"| {eager_rate:.1f} | {folded_rate:.1f} | {folded_rate / eager_rate:.2f}x | {difference:.1e} |")
    header = (f"Random weights, BatchNorm statistics drawn away from the identity (efficientnet_lite0: its ImageNet "
              f"weights), batch {args.batch_size}, float32, channels_last, host memory reused, {args.batches} batches "
              f"per measure, median of {args.rounds} rounds alternating the graphs in one process; {where_and_when()}. "
              "Command: `python bench/folded_graph.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
