"""channels_last on the CPU: the frozen tap model's forward pass and a training step of every layer, in the
NCHW layout torchvision gives and in the channels_last layout tl runs in (hardware.prepare_module),
for each backbone; the two layouts alternate round after round in one process, and the table holds
the medians. The ratio is the figure. Writes the section "channels_last on the CPU" of bench/RESULTS.md.

    python bench/channels_last.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backbones import TapModel, get_backbone, load_model, resolve_weights  # noqa: E402
from pipeline.finetune import training_step  # noqa: E402
from pipeline.hardware import grad_scaler  # noqa: E402
from pipeline.model_files import FinetuneModel  # noqa: E402
from results import backbone_arguments, publish, where_and_when  # noqa: E402

SECTION = "## channels_last on the CPU"
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def _model(name: str, layout) -> FinetuneModel:
    backbone = get_backbone(name)
    torch.manual_seed(0)
    features = TapModel(load_model(backbone, resolve_weights(backbone, "none")), backbone, [backbone.default_tap])
    head = torch.nn.Linear(backbone.taps[backbone.default_tap].width, 10)
    return FinetuneModel(features, backbone.default_tap, head).to(memory_format=layout)


def forward_rate(model: FinetuneModel, images: torch.Tensor, batches: int) -> float:
    model.eval()
    with torch.inference_mode():
        model.features(images)  # warm-up: oneDNN primitives for this shape
        started = time.perf_counter()
        for _ in range(batches):
            model.features(images)
    return batches * len(images) / (time.perf_counter() - started)


def training_rate(model: FinetuneModel, images: torch.Tensor, steps: int) -> float:
    model.train()
    targets = torch.randint(0, 10, (len(images),))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    cpu = torch.device("cpu")
    scaler, loss_function = grad_scaler(cpu, "float32"), torch.nn.CrossEntropyLoss()
    training_step(model, images, targets, loss_function, optimizer, scaler, cpu, "float32")  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, images, targets, loss_function, optimizer, scaler, cpu, "float32")
    return steps * len(images) / (time.perf_counter() - started)


def comparison_row(name: str, median: dict, before: str, after: str) -> str:
    """A table row of one backbone: forward and training rates under `before` and `after`, each with
    their ratio, from {(setting, "forward" | "training"): img/s}."""
    cells = []
    for what in ("forward", "training"):
        old, new = median[before, what], median[after, what]
        cells += [f"{old:.1f}", f"{new:.1f}", f"{new / old:.2f}x"]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    args = backbone_arguments(__doc__.splitlines()[0], 16, 2, "forward batches (and training steps) per measure"
                              ).parse_args(argv)
    table = ["| backbone | forward NCHW img/s | forward channels_last img/s | ratio | training step (every layer) NCHW img/s "
             "| training step (every layer) channels_last img/s | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.backbones.split(","):
        size = get_backbone(name).input_size
        images = torch.randn(args.batch_size, 3, size, size)
        rates = {(layout, what): [] for layout in LAYOUTS for what in ("forward", "training")}
        for _ in range(args.rounds):
            for layout, memory_format in LAYOUTS.items():
                batch = images.contiguous(memory_format=memory_format)
                rates[layout, "forward"].append(forward_rate(_model(name, memory_format), batch, args.batches))
                rates[layout, "training"].append(training_rate(_model(name, memory_format), batch, args.batches))
        median = {key: float(np.median(values)) for key, values in rates.items()}
        table.append(comparison_row(name, median, "NCHW", "channels_last"))
    header = (f"Random weights, batch {args.batch_size}, float32, {args.batches} batches per measure, median of "
              f"{args.rounds} rounds alternating the layouts in one process; {where_and_when()}. "
              "Command: `python bench/channels_last.py`")
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
