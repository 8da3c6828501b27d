"""The offline tour: scikit-learn's digits as an ImageFolder, extract efficientnet_lite0's block12 codes
with its real ImageNet weights, fit a logistic-regression head, evaluate it beside a baseline (the same
head on the raw 8x8 pixels of the same split). Nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, TLError
from pipeline.evaluate import EvaluateConfig, refuse_foreign_report, run_evaluate
from pipeline.examples import digits_split, write_digits
from pipeline.extract import ExtractConfig, ExtractResult, run_extract
from pipeline.fit_head import FitHeadConfig, FitHeadResult, fit_head
from pipeline.heads import LogRegHead
from pipeline.ownership import refuse_foreign


MIN_PER_CLASS = 8  # leaves >= 2 validation rows per digit in the stratified fifth
LAYER = "block12"  # spatial mid-level codes: 0.987 on digits where the pooled codes reach 0.929 (bench/RESULTS.md)
COSTS = (0.01, 0.1, 1.0)  # the C grid of the head, and of the baseline
VAL_FRACTION = 0.2


@dataclass
class QuickstartConfig:
    """The offline tour: digits written under `out`, `per_class` images of each, through `backbone`."""

    out: Path = Path("tl-quickstart")
    per_class: int | None = 120  # images per digit before the 75/25 train/test split (300 test); None: all 1,797
    backbone: str = "efficientnet_lite0"
    seed: int = 0
    quiet: bool = False


@dataclass
class QuickstartResult:
    accuracy: float
    baseline: float  # the same head on the raw 8x8 pixels of the same split
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
    head_path, report_folder = out / "heads" / "digits-logreg.pt", out / "report"
    # a stage's own remedy names its flags (--overwrite), which quickstart has not; and said before the extracts
    remedy = "choose another --out, or move it away: tl quickstart replaces only the files it wrote"
    for path, folder, what in ((out, True, "folder"), (out / "heads", True, "heads folder"),
                               (head_path, False, "head file"), (report_folder, True, "report folder")):
        # the wrong kind: stopped after the work, and --out a file in a folder --out never named
        if path.exists() and path.is_dir() != folder:
            raise TLError(f"{path} is a {'folder' if path.is_dir() else 'file'}, where tl quickstart writes its "
                          f"{what}; choose another --out, or move it away")
    refuse_foreign(head_path, "head file", remedy)
    refuse_foreign_report(report_folder, remedy)
    # one folder per choice of digits (and caches per tap): a run with other settings never meets the
    # files or caches of an earlier one, and a repeated run reuses its own
    chosen = f"digits-{config.per_class or 'all'}-seed{config.seed}"
    data = out / "data" / chosen
    counts = write_digits(data, seed=config.seed, per_class=config.per_class)
    say(f"1/4 data: {counts['train']} train and {counts['test']} test digit images in {data}")
    extracts, caches = {}, {}
    for split in ("train", "test"):
        caches[split] = out / "caches" / f"{chosen}-{split}-{config.backbone}-{LAYER}"
        extracts[split] = run_extract(ExtractConfig(
            data=data, split=split, out=caches[split], backbone=config.backbone,
            weights="imagenet", layers=(LAYER,), seed=config.seed, quiet=config.quiet))
        result = extracts[split]
        state = "reused" if not result.shards_written else f"{result.images_processed} images"
        say(f"2/4 extract {split}: {result.rows} rows of {', '.join(result.taps)} codes ({state}) in {result.out}")
    fit = fit_head(FitHeadConfig(cache=caches["train"], out=head_path, head="logreg", C=COSTS,
                                 val_fraction=VAL_FRACTION, seed=config.seed))
    say(f"3/4 fit-head logreg: C {fit.chosen['C']:g} chosen on {fit.val_rows} validation rows "
        f"(validation accuracy {fit.val_score:.3f}), head in {head_path}")
    evaluation = run_evaluate(EvaluateConfig(head=head_path, cache=caches["test"], out=report_folder,
                                             quiet=config.quiet))
    report = evaluation.report
    baseline = raw_pixel_baseline(config.seed, config.per_class)
    say(f"4/4 evaluate: test accuracy {report['accuracy']:.3f} on {report['rows']} images, against "
        f"{baseline:.3f} for the same head on the raw 8x8 pixels; mAP {report['mAP']:.3f}")
    return QuickstartResult(report["accuracy"], baseline, report["mAP"], report_folder / "report.md", head_path,
                            extracts, fit, time.perf_counter() - started)


def raw_pixel_baseline(seed: int, per_class: int | None) -> float:
    """Test accuracy of the quickstart's head (logreg, the same C grid chosen on a stratified fifth of
    the training rows) on scikit-learn's 64 raw pixels of the same train/test split: what the backbone adds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    split = digits_split(seed=seed, per_class=per_class)
    train, test = np.array(split["train"]), np.array(split["test"])
    fit_rows, val_rows = train_test_split(train, test_size=VAL_FRACTION, random_state=seed,
                                          stratify=digits.target[train])
    head = LogRegHead(C=list(COSTS), seed=seed).fit(digits.data[fit_rows], digits.target[fit_rows],
                                                     digits.data[val_rows], digits.target[val_rows])
    return float(np.mean(head.predict(digits.data[test]) == digits.target[test]))
