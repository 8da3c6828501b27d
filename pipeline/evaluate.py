"""Stage four: score every row of a cache with a head, compute the metrics, write the report.

A head answers only for codes like the ones it was trained on: same layer, backbone, weights and
preprocessing, and labels it knows; anything else is refused with the difference named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.reader import CacheReader
from pipeline.backbones import for_inference, get_backbone
from pipeline.code_rows import BLOCK_ROWS, CodeRows, score_rows
from pipeline.compatibility import check_head_fits_cache, check_patch_head, head_ignore, head_targets
from pipeline.errors import HeadError
from pipeline.files import OutputLock, refuse_overwriting_inputs
from pipeline.ownership import refuse_foreign
from pipeline.formats import DEFAULT_CLASSES, DEFAULT_FORMAT, open_source
from pipeline.hardware import resolve_device, resolve_precision
from pipeline.image_sets import data_images, image_labels, image_set, score_images
from pipeline.metrics import AP_METHODS, accuracy, summarize
from pipeline.model_files import load_head, load_model_file
from pipeline.multiscale import DEFAULT_EXPONENT, check_exponent, pool_image_scores, unused_exponent
from pipeline.report import REPORT_FILES, predictions_csv, report_set, tl_predictions, write_report

LOCK = ".evaluate.lock"  # held while an evaluation writes its report folder


@dataclass
class EvaluateConfig:
    """What `run_evaluate` scores: a head over a cache (`head`, `cache`), or a finetuned model over images
    (`model`, `data` read as `format`, split `split`); the report goes to the folder `out`. Each field is
    the `tl evaluate` option of the same name.
    """

    head: Path | None
    cache: Path | None
    out: Path
    model: Path | None = None  # a tl finetune model, scored over --data instead of a cache
    data: Path | None = None
    format: str = DEFAULT_FORMAT
    split: str = "test"
    classes: str = DEFAULT_CLASSES
    label_key: str | None = None  # with --model and webdataset data: cls, txt, json or json:FIELD (None: cls)
    batch_size: int = 32
    workers: int | None = None  # None: pipeline.hardware.default_workers
    device: str = "auto"
    precision: str = "auto"  # with --model: the autocast dtype (auto: float16 on CUDA, float32 on the CPU)
    ap: str = "voc07"
    top_k: int = 5
    save_predictions: Path | None = None
    block_rows: int = BLOCK_ROWS
    exponent: float = DEFAULT_EXPONENT  # patch caches: S(i, c) = sum_j P(j, c) ** exponent
    quiet: bool = False  # no progress bar while scoring
    overwrite: bool = False  # replace files of the report in `out` and at `save_predictions` that tl did not write


@dataclass
class EvaluateResult:
    out: Path
    report: dict
    files: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # --model: unreadable images, {"sample_id", "reason"}


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    if config.ap not in AP_METHODS:
        raise HeadError(f"unknown --ap {config.ap}; valid: {', '.join(AP_METHODS)}")
    if config.top_k < 1:
        raise HeadError(f"--top-k must be at least 1, got {config.top_k}")
    check_exponent(config.exponent, HeadError)
    # --data alone is no conflict: a recipe's top-level data key reaches evaluate with --head too
    if (config.model is None) == (config.head is None) or (config.head is not None and config.cache is None) \
            or (config.model is not None and config.data is None):
        raise HeadError("evaluate either --head H --cache C, or --model M --data D")
    out = Path(config.out)
    refuse_overwriting_inputs(
        {"--save-predictions": config.save_predictions, "--out": out,
         **{f"--out's {name}": out / name for name in REPORT_FILES}},
        {"--head": config.head, "--model": config.model, "--cache": config.cache, "--data": config.data},
        protected=("--cache",))
    if config.model is not None and config.format == DEFAULT_FORMAT:  # the plots would become images of the data
        refuse_overwriting_inputs({"--out": out}, {"--data": config.data}, protected=("--data",))
    if config.save_predictions is not None:
        if Path(config.save_predictions).is_dir():
            raise HeadError(f"--save-predictions {config.save_predictions} is a folder; name a CSV file such as "
                            f"{Path(config.save_predictions) / 'predictions.csv'}")
        refuse_overwriting_inputs({"--save-predictions": config.save_predictions},
                                  {f"--out's {name}": out / name for name in REPORT_FILES})
        if not config.overwrite:  # tl's own predictions are replaced: a re-run works
            refuse_foreign(config.save_predictions, "predictions file", "choose another --save-predictions, or pass "
                           "--overwrite to replace it", ours=tl_predictions)
    if out.exists() and not out.is_dir():
        raise HeadError(f"--out {out} is a file; --out names the folder of the report: choose another --out")
    # two evaluations into one folder would interleave their renames: one's report.json beside the other's plots
    with OutputLock(Path(os.path.realpath(out)) / LOCK, f"writing a report into {out}", HeadError):
        if not config.overwrite:
            refuse_foreign_report(out, "choose another --out, or pass --overwrite to replace it")
        return _evaluate_model(config) if config.model is not None else _evaluate_head(config)


def refuse_foreign_report(out: Path, remedy: str) -> None:
    """Refuse a file in `out` named as a file of the report that tl did not write, saying `remedy`; a
    report of tl's is replaced (or its plot removed)."""
    for name in REPORT_FILES:
        refuse_foreign(out / name, "report file", remedy, ours=report_set(out), follow=False)


def _evaluate_head(config: EvaluateConfig) -> EvaluateResult:
    """A head over a cache (pooled over every patch of each image for a patch cache)."""
    head, metadata = load_head(config.head)
    reader = CacheReader(config.cache)
    check_head_fits_cache(metadata, head.multilabel_, reader.manifest, config.head, config.cache)
    rows = CodeRows.from_cache(reader, metadata["layer"], block_rows=config.block_rows)
    targets = head_targets(rows.targets, reader.classes, metadata["classes"], f"cache {config.cache}",
                           f"head {config.head}")
    scores = score_rows(head, rows, quiet=config.quiet)
    if reader.manifest.key["patches"] is not None:
        check_patch_head(metadata["classes"], config.head)
        what, names = (f"cache {config.cache}", f"head {config.head}"), metadata["classes"][1:]
        image_targets = head_targets(reader.load_column("image_target").astype(np.int64), reader.classes[1:], names,
                                     *what)
        ignore = head_ignore(reader.load_column("image_ignore"), reader.classes[1:], names)
        ids, targets, ignore, scores, report = _pooled_report(scores, targets, reader.load_column("image_id"),
                                                              image_targets, ignore, names, config)
    else:
        ids, names = reader.load_column("sample_id"), metadata["classes"]
        ignore = head_ignore(reader.load_column("ignore") if targets.ndim == 2 and reader.has_column("ignore") else None,
                             reader.classes, names)  # in the head's class order, as the targets are
        report = summarize(targets, scores, names, config.ap, config.top_k, ignore)
    warnings = [] if reader.manifest.key["patches"] is not None else unused_exponent(config.exponent,
                                                                                      f"cache {config.cache}")
    if metadata.get("cache_content") and metadata["cache_content"] == reader.manifest.content:
        warnings.append(f"cache {config.cache} holds the codes head {config.head} was trained on: these are training "
                        "numbers, not a test; evaluate a cache of other images")
    report["source"] = {"head": str(config.head), "kind": metadata["kind"], "layer": metadata["layer"],
                        "cache": str(config.cache), "backbone": metadata["codes_key"]["backbone"],
                        "warnings": warnings}
    files = write_report(config.out, report, targets, scores, head.curve_,
                         predictions=_predictions(config, ids, targets, scores, names, ignore))
    return EvaluateResult(Path(config.out), report, files)


def _evaluate_model(config: EvaluateConfig) -> EvaluateResult:
    """A finetuned model over a data set: the same metrics and report as a head over a cache (pooled
    over every patch of each image for a multiscale model)."""
    model, metadata = load_model_file(config.model)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    source = open_source(config.format, config.data, config.split, classes=config.classes,
                         label_key=config.label_key)
    names = metadata["classes"]
    what = (f"data {config.data}", f"model {config.model}")
    backbone = get_backbone(metadata["codes_key"]["backbone"])
    dataset, targets = image_set(source, backbone, metadata, None, 0, None, *what)
    multilabel = metadata["head"]["state"]["multilabel"]
    errors: list = []
    scores = score_images(for_inference(model, device), dataset, config.batch_size, config.workers, device,
                          multilabel, precision, quiet=config.quiet, desc="evaluate", errors=errors)
    readable = ~np.isnan(scores).any(axis=1)
    if not readable.any():
        raise HeadError(f"no image of {config.data} could be read; check the data")
    image_of = getattr(dataset, "images", np.arange(len(source)))  # the image of every row (a patch's, or its own)
    samples = image_of[readable]
    reasons = {int(image_of[item]): reason for item, reason in errors}
    skipped = [{"sample_id": source.samples[image].sample_id, "reason": reasons.get(image, "scores are not numbers")}
               for image in sorted(set(range(len(source))) - set(samples.tolist()))]
    ids = np.array([source.samples[i].sample_id for i in samples])
    targets, scores = targets[readable], scores[readable]
    if metadata["codes_key"]["patches"]:
        check_patch_head(names, config.model)
        image_targets, ignore = image_labels(dataset, names, *what)  # every image's, in the head's object classes
        names = names[1:]
        ids, targets, ignore, scores, report = _pooled_report(scores, targets, ids, image_targets[samples],
                                                              ignore[samples], names, config)
    else:
        ignore = head_ignore(np.array([source.columns(i)["ignore"] for i in samples]) if "ignore" in source.columns(0)
                             else None, source.classes, names)
        report = summarize(targets, scores, names, config.ap, config.top_k, ignore)
    report["source"] = {"model": str(config.model), "kind": f"finetuned {metadata['head']['kind']}",
                        "layer": metadata["layer"], "cache": f"{config.data} ({config.format}, {config.split})",
                        "backbone": backbone.name, "unreadable": len(skipped), "skipped": skipped,
                        "warnings": list(source.warnings)  # a damaged tar, an empty class folder, ...
                        + ([] if metadata["codes_key"]["patches"] else unused_exponent(config.exponent,
                                                                                       f"model {config.model}"))
                        + _training_images(config, metadata["settings"])}
    files = write_report(config.out, report, targets, scores, metadata["history"] or None,
                         predictions=_predictions(config, ids, targets, scores, names, ignore))
    return EvaluateResult(Path(config.out), report, files, skipped)


def _predictions(config: EvaluateConfig, *columns) -> tuple[Path, bytes] | None:
    """--save-predictions' file, written with the report as one (see write_report)."""
    return None if config.save_predictions is None else (Path(config.save_predictions), predictions_csv(*columns))


def _training_images(config: EvaluateConfig, trained: dict) -> list[str]:
    """The warning for --data that names the images the model was finetuned on (its file records their
    folder, format and split): a score on them is not a test."""
    if trained.get("data") is None or data_images(config.data, config.format, config.split) != data_images(
            trained["data"], trained.get("format", DEFAULT_FORMAT), trained.get("split", "train")) \
            or config.format != trained.get("format", DEFAULT_FORMAT):
        return []
    return [f"data {config.data} holds the images model {config.model} was finetuned on: these are training "
            "numbers, not a test; evaluate images held out of training"]


def _pooled_report(patch_scores: np.ndarray, patch_targets: np.ndarray, image_ids: np.ndarray,
                   image_targets: np.ndarray, ignore: np.ndarray, names: list[str], config: EvaluateConfig):
    """Image-level view of patch scores: (ids, image targets, pooled scores, report). Pooled scores rank
    images for AP; a class counts as predicted when one of the image's patches gives it ≥ 0.5."""
    ids, pooled = pool_image_scores(patch_scores, image_ids, config.exponent)
    _, first = np.unique(image_ids, return_index=True)
    first = np.sort(first)  # one row per image, in the order pooling returns them
    rank = {image_id: position for position, image_id in enumerate(ids)}
    predicted = np.zeros_like(pooled, dtype=np.int64)
    np.maximum.at(predicted, np.array([rank[i] for i in image_ids]), (patch_scores[:, 1:] >= 0.5).astype(np.int64))
    report = summarize(image_targets[first], pooled, names, config.ap, config.top_k, ignore[first], predicted)
    report["pooling"] = {"exponent": config.exponent, "patches": int(len(patch_targets)), "images": int(len(ids))}
    report["patch_accuracy"] = accuracy(patch_targets, patch_scores)
    return ids, image_targets[first], ignore[first], pooled, report
