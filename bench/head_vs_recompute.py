"""One epoch of head training on cached codes against one epoch of the same head trained with the
frozen backbone recomputed every epoch (what the Keras recipe does): the reason stage one exists.

Data: scikit-learn's digits as images (offline); backbone efficientnet_lite0 with its real weights.
Writes the section "head epoch: cache vs recomputed backbone" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.examples import write_digits  # noqa: E402
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from pipeline.finetune import FinetuneConfig, run_finetune  # noqa: E402
from pipeline.fit_head import FitHeadConfig, fit_head  # noqa: E402
from pipeline.training import TrainingOptions  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## head epoch: cache vs recomputed backbone"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40, help="digit images per class")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        counts = write_digits(scratch / "digits", per_class=args.per_class)
        started = time.perf_counter()
        run_extract(ExtractConfig(data=scratch / "digits", out=scratch / "cache", backbone=args.backbone, quiet=True,
                                  dtype="float32"))
        extract_seconds = time.perf_counter() - started
        fit = FitHeadConfig(cache=scratch / "cache", out=scratch / "head.pt", head="mlp", hidden=(args.hidden,),
                            training=TrainingOptions(max_epochs=1))
        fit_head(fit)  # warm: first use of torch's kernels
        started = time.perf_counter()
        fit_head(fit)
        cached_seconds = time.perf_counter() - started
        started = time.perf_counter()
        run_finetune(FinetuneConfig(data=scratch / "digits", head=scratch / "head.pt", out=scratch / "model.pt",
                                    unfreeze=0, epochs=1, batch_size=32, quiet=True), say=lambda text: None)
        recomputed_seconds = time.perf_counter() - started
    ratio = recomputed_seconds / cached_seconds
    header = (f"{counts['train']} digit images (224x224 input), {args.backbone} with real weights, mlp head "
              f"(hidden {args.hidden}), one epoch each, {platform.machine()} CPU, {torch.get_num_threads()} "
              f"torch threads. The one-off extraction took {extract_seconds:.1f} s. "
              f"Command: `python bench/head_vs_recompute.py`.")
    table = ["| one epoch of the head | seconds |", "|---|---:|",
             f"| on cached codes (`tl fit-head --head mlp`) | {cached_seconds:.2f} |",
             f"| backbone recomputed (`tl finetune --unfreeze 0`, the Keras recipe) | {recomputed_seconds:.2f} |",
             f"| ratio | {ratio:.0f}x |"]
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
