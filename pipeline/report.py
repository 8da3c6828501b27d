"""Writes what `tl evaluate` found: report.json, report.md, PNG plots, a predictions CSV, a stdout table.

Plots use matplotlib's Agg backend (files only, no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from pipeline.errors import TLError
from pipeline.files import DiskFullError, atomic_write, write_bytes
from pipeline.metrics import precision_recall

CONFUSION_LABELS_UP_TO = 30  # beyond this many classes, tick labels would overlap
LEGEND_UP_TO = 20
REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png", "pr_curves.png", "training_curve.png")


def write_report(out: Path, report: dict, targets: np.ndarray, scores: np.ndarray,
                 curve: list[dict] | None) -> list[Path]:
    """report.json, report.md and the plots in `out`; returns the files written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [_write_text(out / "report.json", json.dumps(report, indent=1)),
                   _write_text(out / "report.md", markdown(report))]
        if "confusion" in report:
            written.append(plot_confusion(out / "confusion_matrix.png", np.array(report["confusion"]),
                                          [c["name"] for c in report["classes"]]))
        written.append(plot_pr_curves(out / "pr_curves.png", targets, scores, report))
        if curve:
            written.append(plot_training_curve(out / "training_curve.png", curve))
    except DiskFullError:
        raise
    except OSError as exc:
        raise TLError(f"cannot write the report to {out}: {exc.strerror}; choose another --out") from None
    return written


def _write_text(path: Path, text: str) -> Path:
    write_bytes(path, (text + "\n").encode("utf-8", "surrogateescape"), "report")
    return path


def _number(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def headline(report: dict) -> list[tuple[str, str]]:
    """The few numbers a reader looks at first, as (name, value) rows."""
    rows = []
    if "pooling" in report:
        pooling = report["pooling"]
        rows += [("patches pooled into images", f"{pooling['patches']} -> {pooling['images']} (exponent "
                                                f"{pooling['exponent']:g})"),
                 ("patch accuracy", _number(report["patch_accuracy"]))]
    rows += [("rows", str(report["rows"])),
            ("accuracy" if not report["multilabel"] else "exact-match accuracy", _number(report["accuracy"]))]
    rows += [(key.replace("_", " "), _number(report[key])) for key in report if key.startswith("top")]
    rows += [(f"mAP ({report['ap_method']})", _number(report["mAP"]))]
    for average in ("macro", "micro"):
        rows.append((f"{average} F1 / precision / recall",
                     " / ".join(_number(report[average][name]) for name in ("f1", "precision", "recall"))))
    return rows


def markdown(report: dict) -> str:
    source = report.get("source", {})
    lines = ["# tl evaluation report", ""]
    if source:
        lines += [f"- {'model' if 'model' in source else 'head'}: `{source.get('model') or source.get('head')}` "
                  f"({source.get('kind')} on {source.get('layer')})",
                  f"- {'data' if 'model' in source else 'cache'}: `{source.get('cache')}`", ""]
    lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in headline(report)]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | AP | support |", "|---|---|---|---|---|---|"]
    for entry in report["classes"]:
        lines.append(f"| {entry['name']} | {_number(entry['precision'])} | {_number(entry['recall'])} | "
                     f"{_number(entry['f1'])} | {_number(entry['ap'])} | {entry['support']} |")
    if report["classes_without_rows"]:
        lines += ["", f"Classes without rows here (left out of mAP): {', '.join(report['classes_without_rows'])}."]
    if "confusion" in report:
        lines += ["", "## Confusion matrix", "", "Rows are true classes, columns predicted classes; "
                  "see confusion_matrix.png.", ""]
        names = [entry["name"] for entry in report["classes"]]
        lines += ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
                  for name, row in zip(names, report["confusion"])]
    return "\n".join(lines)


def summary_table(report: dict, max_classes: int = 50) -> str:
    """Plain text for the terminal: the headline, then one line per class."""
    lines = [f"{name:<32} {value}" for name, value in headline(report)]
    lines.append("")
    width = max([5] + [len(entry["name"]) for entry in report["classes"]])
    lines.append(f"{'class':<{width}}  precision  recall  F1      AP      support")
    for entry in report["classes"][:max_classes]:
        lines.append(f"{entry['name']:<{width}}  {_number(entry['precision']):<9}  {_number(entry['recall']):<6}  "
                     f"{_number(entry['f1']):<6}  {_number(entry['ap']):<6}  {entry['support']}")
    if len(report["classes"]) > max_classes:
        lines.append(f"... {len(report['classes']) - max_classes} more classes in report.md")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, counts: np.ndarray, names: list[str]) -> Path:
    """Row-normalized confusion matrix (each true class sums to 1), counts written in small sets."""
    plt = _pyplot()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(names), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class")
    if len(names) <= CONFUSION_LABELS_UP_TO:
        axes.set_xticks(range(len(names)), names, rotation=90)
        axes.set_yticks(range(len(names)), names)
        if len(names) <= 12:
            for (row, column), count in np.ndenumerate(counts):
                axes.text(column, row, str(count), ha="center", va="center",
                          color="white" if rates[row, column] > 0.5 else "black", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix")
    return _save(figure, path)


def plot_pr_curves(path: Path, targets: np.ndarray, scores: np.ndarray, report: dict) -> Path:
    """One precision-recall curve per class, labelled with its AP."""
    plt = _pyplot()
    num_classes = scores.shape[1]
    relevant = targets.astype(bool) if targets.ndim == 2 else np.eye(num_classes, dtype=bool)[targets]
    figure, axes = plt.subplots(figsize=(7, 6))
    for c, entry in enumerate(report["classes"]):
        if not relevant[:, c].any():
            continue
        precision, recall = precision_recall(relevant[:, c], scores[:, c])
        last = int(np.argmax(recall)) + 1  # past full recall only precision falls; scikit-learn stops there too
        precision, recall = precision[:last], recall[:last]
        axes.plot(np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision]), linewidth=1,
                  label=f"{entry['name']} (AP {_number(entry['ap'])})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(f"precision-recall per class, mAP {_number(report['mAP'])} ({report['ap_method']})")
    if num_classes <= LEGEND_UP_TO:
        axes.legend(fontsize=7, loc="lower left")
    return _save(figure, path)


def plot_training_curve(path: Path, curve: list[dict]) -> Path:
    """Training and validation loss per epoch, and the validation score on a second axis."""
    plt = _pyplot()
    epochs = [point["epoch"] for point in curve]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(epochs, [point["train_loss"] for point in curve], marker="o", label="train loss")
    if "val_loss" in curve[0]:
        axes.plot(epochs, [point["val_loss"] for point in curve], marker="o", label="validation loss")
        kept = [point["epoch"] for point in curve if point.get("kept")]
        if kept:
            axes.axvline(kept[0], color="grey", linestyle="--", linewidth=1, label=f"kept epoch {kept[0]}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    handles = axes.get_legend_handles_labels()[0]
    metric = next((key for key in ("val_accuracy", "val_map") if key in curve[0]), None)
    if metric:
        score_axes = axes.twinx()
        handles += score_axes.plot(epochs, [point[metric] for point in curve], color="green", marker="s",
                                   label=metric.replace("_", " "))
        score_axes.set_ylabel(metric.replace("_", " "))
    # one legend for both axes, under the plot where no curve runs
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(handles), fontsize=8)
    axes.set_title("training curve")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    try:
        with atomic_write(path, "plot") as temporary:
            figure.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(figure)
    return path


def write_predictions(path: Path, sample_ids: np.ndarray, targets: np.ndarray, scores: np.ndarray,
                      class_names: list[str]) -> Path:
    """One row per sample: its id, its true class name(s) (';'-joined for multi-label) and every score."""
    path = Path(path)
    # names that are not UTF-8 on disk keep their bytes (surrogateescape), as in the cache
    with atomic_write(path, "predictions file") as temporary, \
            open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "target"] + [f"score:{name}" for name in class_names])
        for sample_id, target, row in zip(sample_ids, targets, scores):
            truth = (";".join(class_names[c] for c in np.flatnonzero(target)) if np.ndim(target)
                     else class_names[int(target)])
            writer.writerow([sample_id, truth] + [f"{value:.6g}" for value in row])
    return path
