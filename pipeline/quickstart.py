"""The offline tour: scikit-learn's digits as an ImageFolder, extract with efficientnet_lite0's real
ImageNet weights, fit a logistic-regression head, evaluate it. Nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError
from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.examples import write_digits
from pipeline.extract import ExtractConfig, ExtractResult, run_extract
from pipeline.fit_head import FitHeadConfig, FitHeadResult, fit_head


MIN_PER_CLASS = 8  # leaves >= 2 validation rows per digit in the stratified fifth


@dataclass
class QuickstartConfig:
    """The offline tour: digits written under `out`, `per_class` images of each, through `backbone`."""

    out: Path = Path("tl-quickstart")
    per_class: int | None = 50  # images per digit before the train/test split; None: all 1,797
    backbone: str = "efficientnet_lite0"
    seed: int = 0
    quiet: bool = False


@dataclass
class QuickstartResult:
    accuracy: float
    mAP: float
    report: Path
    head: Path
    extracts: dict[str, ExtractResult]
    fit: FitHeadResult
    seconds: float


def run_quickstart(config: QuickstartConfig, say=print) -> QuickstartResult:
    """Each step is the stage a user would run by hand; re-running resumes the caches it finds."""
    started = time.perf_counter()
    if config.per_class is not None and config.per_class < MIN_PER_CLASS:
        raise DataError(f"--per-class must be 0 (all) or at least {MIN_PER_CLASS}: a quarter of each digit is the "
                        f"test set and a fifth of the rest chooses C, so fewer leave a class out; got "
                        f"{config.per_class}")
    out = Path(config.out)
    counts = write_digits(out / "data", seed=config.seed, per_class=config.per_class)
    say(f"1/4 data: {counts['train']} train and {counts['test']} test digit images in {out / 'data'}")
    extracts = {}
    for split in ("train", "test"):
        extracts[split] = run_extract(ExtractConfig(
            data=out / "data", split=split, out=out / "caches" / f"digits-{split}", backbone=config.backbone,
            weights="imagenet", seed=config.seed, quiet=config.quiet))
        result = extracts[split]
        state = "reused" if not result.shards_written else f"{result.images_processed} images"
        say(f"2/4 extract {split}: {result.rows} rows of {', '.join(result.taps)} codes ({state}) in {result.out}")
    head_path = out / "heads" / "digits-logreg.pt"
    fit = fit_head(FitHeadConfig(cache=out / "caches" / "digits-train", out=head_path, head="logreg",
                                 C=(0.01, 0.1, 1.0), val_fraction=0.2, seed=config.seed))
    say(f"3/4 fit-head logreg: C {fit.chosen['C']:g} chosen on {fit.val_rows} validation rows "
        f"(validation accuracy {fit.val_score:.3f}), head in {head_path}")
    evaluation = run_evaluate(EvaluateConfig(head=head_path, cache=out / "caches" / "digits-test",
                                             out=out / "report"))
    report = evaluation.report
    say(f"4/4 evaluate: test accuracy {report['accuracy']:.3f}, mAP {report['mAP']:.3f} on {report['rows']} images")
    return QuickstartResult(report["accuracy"], report["mAP"], out / "report" / "report.md", head_path, extracts, fit,
                            time.perf_counter() - started)
