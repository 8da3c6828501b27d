"""Single centre crop against Oquab multiscale patches on the same VOC-format set: the mAP of each.

Writes a drawn-shapes VOC set (pipeline.examples; no download), extracts image-level and multiscale
caches of trainval and test, fits the same kind of head on each and evaluates both. Writes the
section "VOC single crop vs multiscale" of bench/RESULTS.md. Any VOC devkit folder can be given
with --data instead (e.g. the real VOC 2007, with --classes voc).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluate import EvaluateConfig, run_evaluate  # noqa: E402
from pipeline.examples import write_shapes_voc  # noqa: E402
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from pipeline.fit_head import FitHeadConfig, fit_head  # noqa: E402
from pipeline.training import TrainingOptions  # noqa: E402
from pipeline.multiscale import PatchSettings  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## VOC single crop vs multiscale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a VOC devkit year folder [default: drawn shapes]")
    parser.add_argument("--classes", default="auto")
    parser.add_argument("--train-images", type=int, default=60)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--scales", default="1.0,1.3,1.6,2.0")
    parser.add_argument("--head", default="logreg")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    scales = tuple(float(s) for s in args.scales.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = args.data or write_shapes_voc(scratch, {"trainval": args.train_images, "test": args.test_images})
        results = {}
        for mode in ("single crop", "single crop, --decode exact", "multiscale"):
            started = time.perf_counter()
            multiscale = mode == "multiscale"
            caches = {}
            for split in ("trainval", "test"):
                name = mode.replace(' ', '-').replace(',', '').replace('--', '')
                caches[split] = scratch / f"{name}-{split}"
                run_extract(ExtractConfig(
                    data=data, out=caches[split], format="voc", split=split, classes=args.classes,
                    backbone=args.backbone, weights=args.weights, multiscale=multiscale,
                    patches=PatchSettings(scales=scales), decode="exact" if "exact" in mode else "fast", quiet=True))
            head = scratch / f"{name}.pt"
            fit_head(FitHeadConfig(cache=caches["trainval"], out=head, head=args.head,
                                   training=TrainingOptions(max_epochs=10)))
            report = run_evaluate(EvaluateConfig(head=head, cache=caches["test"], out=scratch / f"{name}-report",
                                                 ap="voc07")).report
            rows = report.get("pooling", {}).get("patches", report["rows"])
            results[mode] = (report["mAP"], rows, time.perf_counter() - started)
            print(f"{mode}: mAP {report['mAP']:.4f} ({rows} test rows, {results[mode][2]:.0f} s)", flush=True)
    where = "drawn shapes (pipeline.examples.write_shapes_voc)" if args.data is None else str(args.data)
    header = (f"{where}: {args.train_images} trainval and {args.test_images} test images; {args.backbone} "
              f"({args.weights}) default tap, {args.head} head, VOC07 11-point AP; multiscale scales {args.scales}, "
              f"exponent 5. {platform.machine()} CPU. Command: `python bench/voc_single_vs_multiscale.py`.")
    table = ["| codes | test mAP | test rows | seconds (extract + fit + evaluate) |", "|---|---:|---:|---:|"]
    table += [f"| {mode} | {mAP:.4f} | {rows} | {seconds:.0f} |" for mode, (mAP, rows, seconds) in results.items()]
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
