"""Writes what `tl evaluate` found: report.json, report.md (plots embedded), a self-contained report.html,
PNG plots (one PR panel per class), a predictions CSV, a stdout table.

Plots use matplotlib's Agg backend (files only); each is built by a `*_figure` function, then saved.
report.md and report.html render one list of blocks (`report_blocks`), so the two always say the same.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from html import escape
from pathlib import Path

import numpy as np

from pipeline.errors import TLError
from pipeline.files import write_together
from pipeline.heads import HEAD_KINDS, layout_text
from pipeline.metrics import precision_recall

CONFUSION_LABELS_UP_TO = 30  # beyond this many classes, tick labels would overlap
PR_COLUMNS = 5
PR_PANELS_UP_TO = 50  # beyond this many classes with rows, the panels show those of lowest AP
REPORT_FILES = ("report.json", "report.md", "report.html", "confusion_matrix.png", "pr_curves.png",
                "training_curve.png")
REPORT_KEYS = ("rows", "accuracy", "mAP", "classes", "source")  # in every report.json tl has written
SWEEP_FILES, SWEEP_KEYS = ("sweep.json", "sweep.md", "sweep.png"), ("metric", "on", "cache", "best", "heads")
# (heading, what the image shows) of each plot, in the order report.md shows them
PLOTS = {"pr_curves.png": ("Precision-recall curves", "precision against recall, one panel per class titled with "
                           "its AP"),
         "confusion_matrix.png": ("Confusion matrix", "confusion matrix, each true class (row) as fractions of "
                                  "its rows predicted as each class (column)"),
         "training_curve.png": ("Training curve", "loss per epoch, with the validation loss and score where a "
                                "validation split was held out")}
_STYLE = ("body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.2em .6em}"
          "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}")


def write_report(out: Path, report: dict, targets: np.ndarray, scores: np.ndarray,
                 curve: list[dict] | None, html: bool = True, predictions: tuple[Path, bytes] | None = None
                 ) -> list[Path]:
    """report.json, report.md, report.html (unless `html` is false) and the plots in `out`, and the
    `predictions` file (path, predictions_csv) where given; returns the files written, report.json and
    report.md first. They replace an earlier report as one: all are written and synced before the first
    replaces its file (a full disk keeps the earlier report with its own predictions), and a file of the
    earlier report this one has not (its training_curve.png) is removed, so the folder never holds two
    evaluations."""
    out = Path(out)
    figures = {}
    if "confusion" in report:
        figures["confusion_matrix.png"] = lambda: confusion_figure(np.array(report["confusion"]),
                                                                   [c["name"] for c in report["classes"]])
    figures["pr_curves.png"] = lambda: pr_figure(targets, scores, report)
    if curve:
        figures["training_curve.png"] = lambda: training_figure(curve)
    images = {name: _png(build()) for name, build in figures.items()}
    texts = {"report.json": json.dumps(report, indent=1), "report.md": markdown(report, tuple(images))}
    if html:
        texts["report.html"] = html_page(report, images)
    contents = {name: _text(text) for name, text in texts.items()}
    also = [] if predictions is None else [(Path(predictions[0]), predictions[1], "predictions file", True)]  # named
    write_together([(out / name, data, "report") for name, data in {**contents, **images}.items()] + also,
                   follow=False)
    for name in set(REPORT_FILES) - set(contents) - set(images):
        if (out / name).is_file() or (out / name).is_symlink():  # a folder of that name is not a report's
            try:
                (out / name).unlink()
            except OSError as exc:
                raise TLError(f"cannot remove {out / name} of an earlier report: {exc.strerror}; remove it") from None
    return [out / name for name in (*contents, *images)] + [path for path, *_ in also]


def report_set(out: Path, names: tuple[str, ...] = REPORT_FILES, keys: tuple[str, ...] = REPORT_KEYS):
    """The recogniser (ownership.foreign's `ours`) of the files of a report in the folder `out` (`names`, written as
    one; write_report removes those an earlier report had): each is tl's when the first, the JSON document, is a
    dict with tl's `keys` (not a link to one); a report.md beside no report.json of tl's is not tl's."""
    def ours(path) -> bool:
        document = Path(out) / names[0]
        found = None if document.is_symlink() else json.loads(document.read_text(encoding="utf-8"))
        return isinstance(found, dict) and set(keys) <= set(found)
    return ours


def _text(text: str) -> bytes:
    return (text + "\n").encode("utf-8", "surrogateescape")  # names not UTF-8 on disk keep their bytes


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


def class_rows(report: dict) -> list[list[str]]:
    """The per-class table: name, precision, recall, F1, AP, support."""
    return [[entry["name"], _number(entry["precision"]), _number(entry["recall"]), _number(entry["f1"]),
             _number(entry["ap"]), str(entry["support"])] for entry in report["classes"]]


def report_blocks(report: dict, plots: tuple[str, ...] = ()) -> list[tuple]:
    """The report's content once, for report.md and report.html alike: ("heading", level, text),
    ("source", [(label, path, note)]), ("table", header, rows), ("text", text), ("image", file, what it
    shows). `plots` names the PNGs written beside the report; each gets a heading and its image."""
    source = report.get("source", {})
    blocks: list[tuple] = [("heading", 1, "tl evaluation report")]
    if source:
        model = "model" in source
        blocks.append(("source", [("model" if model else "head", str(source.get("model") or source.get("head")),
                                   f"{source.get('kind')} on {source.get('layer')}"),
                                  ("data" if model else "cache", str(source.get("cache")),
                                   f"{source['unreadable']} image{'s' * (source['unreadable'] != 1)} left out "
                                   "(unreadable or unlabelled)" if source.get("unreadable") else "")]))
    blocks += [("table", ["metric", "value"], [list(row) for row in headline(report)]),
               ("heading", 2, "Per class"),
               ("table", ["class", "precision", "recall", "F1", "AP", "support"], class_rows(report))]
    if report["classes_without_rows"]:
        blocks.append(("text", "Classes without rows here (left out of mAP): "
                               f"{', '.join(report['classes_without_rows'])}."))
    for name, (heading, what) in PLOTS.items():
        confusion = name == "confusion_matrix.png" and "confusion" in report  # its table stands without the plot
        if name not in plots and not confusion:
            continue
        blocks.append(("heading", 2, heading))
        if name in plots:
            blocks.append(("image", name, what))
        if confusion:
            names = [entry["name"] for entry in report["classes"]]
            blocks += [("text", "Rows are true classes, columns predicted classes; the counts:"),
                       ("table", ["true \\ predicted"] + names,
                        [[n] + [str(v) for v in row] for n, row in zip(names, report["confusion"])])]
    return blocks


def _markdown_text(text: str) -> str:
    """Text that Markdown shows as written: no table cell break (|), HTML tag, entity, emphasis or link."""
    for character in "\\|<&*`[]":
        text = text.replace(character, "\\" + character)
    return text.replace("\n", " ")


def markdown(report: dict, plots: tuple[str, ...] = ()) -> str:
    """report.md: the blocks as Markdown; plots as images with relative links, shown inline by viewers."""
    lines = []
    for kind, *parts in report_blocks(report, plots):
        if kind == "heading":
            lines += ["#" * parts[0] + " " + _markdown_text(parts[1]), ""]
        elif kind == "source":
            lines += [f"- {label}: `{path}`" + (f" ({_markdown_text(note)})" if note else "")
                      for label, path, note in parts[0]] + [""]
        elif kind == "table":
            header, rows = parts
            lines += ["| " + " | ".join(_markdown_text(cell) for cell in row) + " |" for row in [header]]
            lines += ["|---" * len(header) + "|"]
            lines += ["| " + " | ".join(_markdown_text(cell) for cell in row) + " |" for row in rows] + [""]
        elif kind == "text":
            lines += [_markdown_text(parts[0]), ""]
        else:  # the image links to itself: a click opens it at full size where a viewer shrinks it
            lines += [f"[![{_markdown_text(parts[1])}]({parts[0]})]({parts[0]})", ""]
    return "\n".join(lines).rstrip("\n")


def html_page(report: dict, images: dict[str, bytes]) -> str:
    """report.html: the blocks as one self-contained page (every image a data URI, no external file)."""
    body = []
    for kind, *parts in report_blocks(report, tuple(images)):
        if kind == "heading":
            body.append(f"<h{parts[0]}>{escape(parts[1])}</h{parts[0]}>")
        elif kind == "source":
            body.append("<ul>" + "".join(f"<li>{escape(label)}: <code>{escape(path)}</code>"
                                         + (f" ({escape(note)})" if note else "") + "</li>"
                                         for label, path, note in parts[0]) + "</ul>")
        elif kind == "table":
            header, rows = parts
            body.append("<table><thead><tr>" + "".join(f"<th>{escape(cell)}</th>" for cell in header)
                        + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
                        + "</tbody></table>")
        elif kind == "text":
            body.append(f"<p>{escape(parts[0])}</p>")
        else:
            data = base64.b64encode(images[parts[0]]).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(parts[1])}">'
                        f"<figcaption>{escape(parts[1])} ({escape(parts[0])})</figcaption></figure>")
    return ('<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>tl evaluation report</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>")


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


def confusion_figure(counts: np.ndarray, names: list[str]):
    """Row-normalized confusion matrix (each true class sums to 1), counts written in small sets."""
    plt = _pyplot()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(names), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class")
    if len(names) <= CONFUSION_LABELS_UP_TO:
        # class names are shown as written: a `$` in one must not start matplotlib's math mode
        axes.set_xticks(range(len(names)), names, rotation=90, parse_math=False)
        axes.set_yticks(range(len(names)), names, parse_math=False)
        if len(names) <= 12:
            for (row, column), count in np.ndenumerate(counts):
                axes.text(column, row, str(count), ha="center", va="center",
                          color="white" if rates[row, column] > 0.5 else "black", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix")
    return figure


def pr_figure(targets: np.ndarray, scores: np.ndarray, report: dict):
    """One small precision-recall panel per class with rows, titled with its name and AP, in a grid of up
    to PR_COLUMNS columns; past PR_PANELS_UP_TO classes, the panels of lowest AP, lowest first."""
    plt = _pyplot()
    num_classes = scores.shape[1]
    relevant = targets.astype(bool) if targets.ndim == 2 else np.eye(num_classes, dtype=bool)[targets]
    shown = [c for c in range(num_classes) if relevant[:, c].any()]
    title = f"precision-recall per class, mAP {_number(report['mAP'])} ({report['ap_method']})"
    if len(shown) > PR_PANELS_UP_TO:
        ap = {c: report["classes"][c]["ap"] for c in shown}
        shown = sorted(shown, key=lambda c: (-1.0 if ap[c] is None or math.isnan(ap[c]) else ap[c], c))
        title += f"; the {PR_PANELS_UP_TO} classes of lowest AP of {len(shown)}"
        shown = shown[:PR_PANELS_UP_TO]
    columns = max(1, min(PR_COLUMNS, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(2.5 * columns + 0.6, 2.3 * rows + 0.9), squeeze=False)
    for panel, c in zip(grid.flat, shown):
        precision, recall = precision_recall(relevant[:, c], scores[:, c])
        last = int(np.argmax(recall)) + 1  # past full recall only precision falls; scikit-learn stops there too
        recall, precision = np.concatenate([[0.0], recall[:last]]), np.concatenate([[1.0], precision[:last]])
        panel.plot(recall, precision, linewidth=1.2, color="C0")
        panel.fill_between(recall, precision, color="C0", alpha=0.15)
        # the margin keeps a perfect curve (precision 1 up to recall 1) off the frame, where it would hide
        panel.set_xlim(-0.02, 1.02)
        panel.set_ylim(-0.02, 1.02)
        panel.set_xticks([0, 0.5, 1])
        panel.set_yticks([0, 0.5, 1])
        panel.tick_params(labelsize=7)
        panel.grid(alpha=0.3)
        name = report["classes"][c]["name"]
        name = name if len(name) <= 24 else name[:23] + "…"
        panel.set_title(f"{name}\nAP {_number(report['classes'][c]['ap'])}", fontsize=8, parse_math=False)
    for panel in grid.flat[len(shown):]:
        figure.delaxes(panel)
    if not shown:
        figure.text(0.5, 0.5, "no class has rows here", ha="center", va="center")
    else:
        figure.supxlabel("recall", fontsize=9)
        figure.supylabel("precision", fontsize=9)
    figure.suptitle(title, fontsize=10)
    return figure


def training_figure(curve: list[dict]):
    """Training and validation loss per epoch, and the validation score on a second axis. A one-epoch
    curve is drawn as points on axes around it (loss from 0), not on matplotlib's ±4% of one value."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [point["epoch"] for point in curve]
    losses = [point["train_loss"] for point in curve]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(epochs, losses, marker="o", label="train loss")
    if "val_loss" in curve[0]:
        losses += [point["val_loss"] for point in curve]
        axes.plot(epochs, [point["val_loss"] for point in curve], marker="o", label="validation loss")
        kept = [point["epoch"] for point in curve if point.get("kept")]
        if kept:
            axes.axvline(kept[0], color="grey", linestyle="--", linewidth=1, label=f"kept epoch {kept[0]}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = axes.get_legend_handles_labels()[0]
    metric = next((key for key in ("val_accuracy", "val_map") if key in curve[0]), None)
    if metric:
        score_axes = axes.twinx()
        handles += score_axes.plot(epochs, [point[metric] for point in curve], color="green", marker="s",
                                   label=metric.replace("_", " "))
        score_axes.set_ylabel(metric.replace("_", " "))
        if len(curve) == 1:
            score_axes.set_ylim(0, 1.05)  # accuracy and mAP lie in [0, 1]
    if len(curve) == 1:
        axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
        axes.set_xticks([epochs[0]])
        top = max(losses)
        axes.set_ylim(0, 1.25 * top if top > 0 else 1)
    # one legend for both axes, under the plot where no curve runs
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(handles), fontsize=8)
    axes.set_title("training curve")
    return figure


def _png(figure) -> bytes:
    """The figure as PNG bytes (for its file and for report.html)."""
    plt = _pyplot()
    try:
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=110, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


PREDICTIONS_HEADER = ("sample_id", "target")  # then ignore (VOC), then score:CLASS for every class


def predictions_csv(sample_ids: np.ndarray, targets: np.ndarray, scores: np.ndarray, class_names: list[str],
                    ignore: np.ndarray | None = None) -> bytes:
    """The --save-predictions file, one row per sample: its id, its true class name(s) (';'-joined for
    multi-label), with `ignore` (VOC) the classes its AP leaves out (shown only by difficult objects), and
    every score: what the report's numbers are recomputed from. Scores are written as the shortest text
    that reads back as the same float64 (float32 scores convert to float64 exactly): fewer digits would
    tie or reorder near-equal scores (a saturating softmax's 0.99999994 and 0.9999999) and change the AP
    recomputed from the file."""
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(list(PREDICTIONS_HEADER) + ["ignore"] * (ignore is not None)
                    + [f"score:{name}" for name in class_names])
    for number, (sample_id, target, row) in enumerate(zip(sample_ids, targets, scores)):
        truth = (";".join(class_names[c] for c in np.flatnonzero(target)) if np.ndim(target)
                 else class_names[int(target)])
        left_out = [] if ignore is None else [";".join(class_names[c] for c in np.flatnonzero(ignore[number]))]
        writer.writerow([sample_id, truth] + left_out + [repr(float(value)) for value in row])
    # names that are not UTF-8 on disk keep their bytes (surrogateescape), as in the cache
    return handle.getvalue().encode("utf-8", "surrogateescape")


def tl_predictions(path: Path) -> bool:
    """Whether `path` holds a --save-predictions file of tl's: its header is predictions_csv's."""
    with open(path, "rb") as handle:
        header = handle.readline(1 << 20)
    return header.startswith(",".join(PREDICTIONS_HEADER).encode() + b",") and b"score:" in header


def sweep_report(out: Path, board: list[dict], metric: str, config) -> list[Path]:
    """sweep.json (the leaderboard, best first), sweep.md (its table) and sweep.png (the validation
    metric of each setting, one line per layer and head kind)."""
    on = board[0]["on"]
    document = {"metric": metric, "on": on, "cache": str(config.cache), "best": board[0]["name"], "heads": board}
    lines = [f"# Sweep of {len(board)} head{'s' * (len(board) != 1)} on {config.cache}", "",
             f"Ranked by {on} {metric}; the best, `{board[0]['name']}`, is `best.pt`.", "", "![sweep](sweep.png)", "",
             f"| rank | head | layer | kind | C | hidden | lr | {on} {metric} | epochs | train s |",
             "|---:|---|---|---|---:|---|---:|---:|---:|---:|"]
    for rank, row in enumerate(board, 1):
        setting = row["setting"]  # lr None: the head trained at its optimizer's default, shown as such
        trains_at_a_rate = "lr" in HEAD_KINDS[setting["kind"]].sweep_axes(config.solver)
        lr = setting["lr"] or (config.training.rate if trains_at_a_rate else None)
        cells = [str(rank), f"`{row['name']}`", setting["layer"], setting["kind"],
                 "–" if setting["C"] is None else f"{setting['C']:g}",
                 "–" if setting["hidden"] is None else layout_text(setting["hidden"]),
                 "–" if lr is None else f"{lr:g}",
                 f"diverged (epoch {row['diverged']})" if row.get("diverged") else _number(row["val_score"]),
                 "–" if row["epochs"] is None else str(row["epochs"]), f"{row['train_seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    lines_of: dict[tuple, list] = {}
    for row in board:
        lines_of.setdefault((row["setting"]["layer"], row["setting"]["kind"]), []).append(row)
    for (layer, kind), rows in sorted(lines_of.items()):
        rows = sorted(rows, key=lambda r: (r["setting"]["C"] or 0, r["setting"]["hidden"] or [], r["setting"]["lr"] or 0))
        labels = [r["name"].removeprefix(f"{layer}-{kind}").lstrip("-") or kind for r in rows]
        axes.plot(range(len(rows)), [r["val_score"] for r in rows], marker="o", label=f"{layer} {kind}")
        for x, (label, r) in enumerate(zip(labels, rows)):
            axes.annotate(label, (x, r["val_score"]), fontsize=7, textcoords="offset points", xytext=(0, 4),
                          ha="center")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("setting (C, hidden widths, lr), labelled at each point")
    axes.set_ylabel(f"{on} {metric}")
    axes.set_title(f"Sweep: {on} {metric} per setting")
    axes.legend(fontsize=8)
    files = dict(zip(SWEEP_FILES, (_text(json.dumps(document, indent=1)), _text("\n".join(lines)), _png(figure))))
    write_together([(out / name, data, "sweep report") for name, data in files.items()], follow=False)  # one leaderboard
    return [out / name for name in files]
