"""The report of tl evaluate: report.md embeds its plots by relative links, report.html is one escaped,
self-contained page with the same tables, PR curves are one panel per class, one-epoch curves are points."""

from __future__ import annotations

import base64
import csv
import html
import re

import matplotlib
import numpy as np
import pytest

from pipeline import report as report_module
from pipeline.metrics import summarize
from pipeline.report import (
    PR_PANELS_UP_TO,
    REPORT_FILES,
    markdown,
    pr_figure,
    predictions_csv,
    training_figure,
    write_report,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]*)\)")
CELL_BORDER = re.compile(r"(?<!\\)\|")  # a table cell border: a | that no backslash escapes


def predictions(classes: int, n: int = 240, seed: int = 0):
    """Single-label targets over every class and scores that favour the true class."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % classes
    scores = rng.random((n, classes)) + 0.7 * np.eye(classes)[targets]
    return targets, scores / scores.sum(axis=1, keepdims=True)


def one_epoch(kept=True):
    return [{"epoch": 1, "lr": 0.1, "train_loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.7, "kept": kept}]


def per_class_rows(text: str) -> list[list[str]]:
    """The cells of report.md's per-class table, Markdown escapes undone."""
    lines = text.splitlines()
    start = lines.index("## Per class") + 2  # the heading, a blank line, then the table
    rows = []
    for line in lines[start + 2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([re.sub(r"\\(.)", r"\1", cell.strip()) for cell in CELL_BORDER.split(line)[1:-1]])
    return rows


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_report_md_embeds_every_plot_by_a_relative_link_under_a_heading(tmp_path):
    names = ["ant", "bee", "cat"]
    targets, scores = predictions(3)
    report = summarize(targets, scores, names)
    files = write_report(tmp_path / "r", report, targets, scores, one_epoch())
    assert [path.name for path in files] == ["report.json", "report.md", "report.html", "confusion_matrix.png",
                                             "pr_curves.png", "training_curve.png"]
    assert {path.name for path in files} <= set(REPORT_FILES)  # evaluate refuses an input named like any of them
    text = (tmp_path / "r" / "report.md").read_text()
    lines = text.splitlines()
    linked = [(number, target) for number, line in enumerate(lines) for _, target in IMAGE.findall(line)]
    assert sorted(target for _, target in linked) == ["confusion_matrix.png", "pr_curves.png", "training_curve.png"]
    for number, target in linked:
        assert (tmp_path / "r" / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert lines[number] == f"[![{IMAGE.search(lines[number]).group(1)}]({target})]({target})"  # click: full size
        assert lines[number - 1] == "" and lines[number - 2].startswith("## ")
    assert str(tmp_path) not in text and "](/" not in text
    assert "| ant | " in text and "| true \\\\ predicted | ant | bee | cat |" in text


def test_without_a_confusion_or_a_curve_only_the_pr_curves_are_embedded(tmp_path):
    rng = np.random.default_rng(3)
    targets = (rng.random((150, 3)) < 0.4).astype(np.int64)
    scores = np.clip(rng.random((150, 3)) * 0.7 + 0.3 * targets, 0, 1)
    report = summarize(targets, scores, ["x", "y", "z"])
    files = write_report(tmp_path, report, targets, scores, None)
    assert [path.name for path in files] == ["report.json", "report.md", "report.html", "pr_curves.png"]
    text = (tmp_path / "report.md").read_text()
    assert [target for _, target in IMAGE.findall(text)] == ["pr_curves.png"]
    assert "## Confusion matrix" not in text and "## Training curve" not in text
    assert "## Confusion matrix" in markdown(summarize(*predictions(3), ["a", "b", "c"]))  # its table, no plot


def test_report_html_is_optional(tmp_path):
    targets, scores = predictions(2)
    files = write_report(tmp_path, summarize(targets, scores, ["a", "b"]), targets, scores, None, html=False)
    assert [path.name for path in files] == ["report.json", "report.md", "confusion_matrix.png", "pr_curves.png"]
    assert not (tmp_path / "report.html").exists()


def test_report_html_is_self_contained_escaped_and_holds_every_per_class_row(tmp_path):
    names = ["a<b&c", "dog", "eel"]
    targets, scores = predictions(3, seed=1)
    files = write_report(tmp_path, summarize(targets, scores, names), targets, scores, one_epoch())
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    sources = re.findall(r'src="([^"]*)"', page)
    prefix = "data:image/png;base64,"
    assert sources and all(source.startswith(prefix) for source in sources)
    assert len(re.findall(r"src=", page)) == len(sources)  # no unquoted or single-quoted src either
    plots = sorted(path.read_bytes() for path in files if path.suffix == ".png")
    assert sorted(base64.b64decode(source[len(prefix):]) for source in sources) == plots
    for external in ("href=", "<script", "<link", "url(", "@import"):
        assert external not in page
    assert "a&lt;b&amp;c" in page and "a<b&c" not in page
    rows = per_class_rows((tmp_path / "report.md").read_text())
    assert [row[0] for row in rows] == names
    for row in rows:
        assert "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" in page
    for heading in ("Per class", "Precision-recall curves", "Confusion matrix", "Training curve"):
        assert f"<h2>{heading}</h2>" in page


def test_report_md_shows_class_names_as_written():
    names = ["x|y", "<b>bold</b>", "a*b*", "c&amp;d"]
    targets, scores = predictions(4, seed=2)
    text = markdown(summarize(targets, scores, names))
    rows = per_class_rows(text)
    assert [row[0] for row in rows] == names and all(len(row) == 6 for row in rows)
    assert not re.search(r"(?<!\\)<", text)  # no tag a Markdown viewer would render as HTML
    assert "\\<b>bold\\</b>" in text and "\\&amp;" in text


def test_class_names_with_dollar_signs_are_plotted_as_written(tmp_path):
    names = ["$\\bad$", "b", "c"]  # matplotlib's math mode would fail to parse this one
    targets, scores = predictions(3, seed=4)
    report = summarize(targets, scores, names)
    files = write_report(tmp_path, report, targets, scores, None)
    assert (tmp_path / "confusion_matrix.png").is_file() and (tmp_path / "pr_curves.png") in files
    assert pr_figure(targets, scores, report).axes[0].get_title().startswith("$\\bad$\n")


@pytest.mark.parametrize("classes", [2, 20])
def test_pr_curves_are_one_panel_per_class_with_name_and_ap(classes):
    names = [f"class {c}" for c in range(classes)]
    targets, scores = predictions(classes, n=20 * classes)
    scores[:, 1] = (targets == 1) + 0.5 * scores[:, 1]  # class 1 is ranked perfectly: AP 1, curve on the top edge
    report = summarize(targets, scores, names)
    figure = pr_figure(targets, scores, report)
    assert len(figure.axes) == classes
    for panel, entry in zip(figure.axes, report["classes"]):
        assert panel.get_title() == f"{entry['name']}\nAP {entry['ap']:.4f}"
        assert panel.get_xlim() == pytest.approx((-0.02, 1.02)) and panel.get_ylim() == pytest.approx((-0.02, 1.02))
    assert report["classes"][1]["ap"] == 1.0
    perfect = figure.axes[1].lines[0]
    assert set(perfect.get_ydata()) == {1.0} and perfect.get_xdata()[-1] == 1.0
    columns = {round(panel.get_position().x0, 3) for panel in figure.axes}
    assert len(columns) == min(classes, report_module.PR_COLUMNS)
    width, height = figure.get_size_inches()
    assert width >= 2.4 * len(columns) and height >= 2.2 * -(-classes // len(columns))  # room per panel


def test_pr_curves_of_tied_scores_do_not_depend_on_the_row_order():
    # class 0 saturated: its 10 rows and 11 of the others score exactly 1.0, listed class by class
    targets = np.repeat([0, 1], [10, 30])
    scores = np.column_stack([np.concatenate([np.ones(21), np.linspace(0.9, 0.1, 19)]), np.linspace(0, 1, 40)])
    shuffled = np.random.default_rng(0).permutation(40)
    curves = []
    for order in (np.arange(40), shuffled, np.argsort(-targets, kind="stable")):
        figure = pr_figure(targets[order], scores[order], summarize(targets[order], scores[order], ["a", "b"]))
        curves.append([np.column_stack(panel.lines[0].get_data()) for panel in figure.axes])
    for curve in curves[1:]:
        for panel, first in zip(curve, curves[0]):
            np.testing.assert_array_equal(panel, first)
    # from the start point straight to precision 10/21 at full recall: no flat run at precision 1
    np.testing.assert_allclose(curves[0][0], [[0.0, 1.0], [1.0, 10 / 21]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ap_method", ["voc07", "area"])
def test_the_predictions_file_gives_the_reports_numbers_exactly(tmp_path, dtype, ap_method):
    # near-ties past the 6th digit: float32 probabilities a few ulps below 1 (a saturating softmax),
    # and float64 ones 1e-10 apart; rows class by class, as an imagefolder cache lists them
    rng = np.random.default_rng(3)
    names = ["a", "b", "c"]
    targets = np.repeat([0, 1, 2], [12, 14, 14])
    steps = np.where(np.eye(3, dtype=bool)[targets], rng.integers(1, 30, (40, 3)), rng.integers(10, 40, (40, 3)))
    if dtype == np.float32:
        scores = 1 - steps.astype(np.float32) * np.float32(2 ** -24)
    else:
        scores = 0.3 - steps * 1e-10
    report = summarize(targets, scores, names, ap_method)
    path = tmp_path / "p.csv"
    path.write_bytes(predictions_csv(np.array([f"r{i}" for i in range(40)]), targets, scores, names))
    header, *lines = csv.reader(path.open())
    assert header == ["sample_id", "target", "score:a", "score:b", "score:c"]
    read = np.array([[float(value) for value in line[2:]] for line in lines])
    again = summarize(np.array([names.index(line[1]) for line in lines]), read, names, ap_method)
    assert again["mAP"] == report["mAP"] and again == report  # every number of the report, exactly
    np.testing.assert_array_equal(read, scores.astype(np.float64))


def test_pr_figure_grows_with_the_class_count():
    small = pr_figure(*predictions(2), summarize(*predictions(2), ["a", "b"]))
    names = [f"c{c}" for c in range(20)]
    large = pr_figure(*predictions(20, n=400), summarize(*predictions(20, n=400), names))
    assert (large.get_size_inches() > small.get_size_inches()).all()


def test_pr_curves_leave_out_classes_without_rows():
    targets, scores = predictions(4)
    keep = np.isin(targets, [0, 2])
    report = summarize(targets[keep], scores[keep], ["ant", "bee", "cat", "dog"])
    figure = pr_figure(targets[keep], scores[keep], report)
    assert [panel.get_title().split("\n")[0] for panel in figure.axes] == ["ant", "cat"]
    empty = pr_figure(np.zeros((5, 2), np.int64), np.full((5, 2), 0.5),
                      {"mAP": float("nan"), "ap_method": "voc07", "classes": []})
    assert not empty.axes and "no class has rows here" in [text.get_text() for text in empty.texts]


def test_past_the_panel_limit_the_classes_of_lowest_ap_are_shown(monkeypatch):
    monkeypatch.setattr(report_module, "PR_PANELS_UP_TO", 4)
    names = [f"c{c}" for c in range(7)]
    targets, scores = predictions(7, n=350, seed=5)
    report = summarize(targets, scores, names)
    figure = pr_figure(targets, scores, report)
    lowest = sorted(report["classes"], key=lambda entry: entry["ap"])[:4]
    assert [panel.get_title().split("\n")[0] for panel in figure.axes] == [entry["name"] for entry in lowest]
    assert "the 4 classes of lowest AP of 7" in figure._suptitle.get_text()
    assert PR_PANELS_UP_TO >= 20  # VOC's 20 classes all get a panel


def test_a_one_epoch_curve_is_points_on_a_sensible_axis():
    figure = training_figure(one_epoch())
    loss_axes, score_axes = figure.axes
    lines = {line.get_label(): line for line in loss_axes.lines}
    for label in ("train loss", "validation loss"):
        assert lines[label].get_marker() == "o" and lines[label].get_markersize() > 0
        assert list(lines[label].get_xdata()) == [1]
    assert list(lines["kept epoch 1"].get_xdata()) == [1, 1]
    # matplotlib alone would span 0.96..1.04 around the one epoch and ±4% around the loss
    assert loss_axes.get_xlim() == (0, 2) and list(loss_axes.get_xticks()) == [1]
    assert loss_axes.get_ylim() == pytest.approx((0, 1.25 * 0.9))
    assert score_axes.get_ylim() == pytest.approx((0, 1.05))
    assert score_axes.lines[0].get_marker() == "s"
    no_loss = training_figure([{"epoch": 3, "train_loss": 0.0}])
    assert no_loss.axes[0].get_ylim() == (0, 1) and no_loss.axes[0].get_xlim() == (2, 4)


def test_several_epochs_keep_lines_and_the_kept_epoch():
    curve = [{"epoch": e, "train_loss": 2.0 - 0.2 * e, "val_loss": 2.1 - 0.2 * e + 0.1 * (e == 4),
              "val_map": 0.5 + 0.05 * e, "kept": e == 3} for e in range(1, 5)]
    figure = training_figure(curve)
    loss_axes = figure.axes[0]
    lines = {line.get_label(): line for line in loss_axes.lines}
    assert lines["train loss"].get_linestyle() == "-" and len(lines["train loss"].get_xdata()) == 4
    assert list(lines["kept epoch 3"].get_xdata()) == [3, 3]
    assert loss_axes.get_ylim()[0] > 1.0  # several points: the axis follows the data
    low, high = loss_axes.get_xlim()
    assert all(tick == int(tick) for tick in loss_axes.get_xticks() if low <= tick <= high)  # epochs are whole
    assert figure.axes[1].get_ylabel() == "val map"


def test_a_report_replaces_the_earlier_one_whole_or_not_at_all(tmp_path, monkeypatch):
    """report.json was written first and the plots and pages after it: a stop in between (a full disk, a
    kill) left the new numbers beside the old pages, and a model's training_curve.png stayed beside a
    head's report."""
    from pipeline.errors import TLError
    from tests.conftest import disk_full_at

    targets, scores = predictions(3)
    write_report(tmp_path, summarize(targets, scores, ["a", "b", "c"]), targets, scores, one_epoch())
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert "training_curve.png" in earlier
    other_targets, other_scores = predictions(3, seed=1)
    other = summarize(other_targets, other_scores, ["a", "b", "c"])
    disk_full_at(monkeypatch, 3)  # while the third file is written
    with pytest.raises(TLError, match="no space left on the device"):
        write_report(tmp_path, other, other_targets, other_scores, None)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == earlier  # whole, no temporaries
    monkeypatch.undo()
    files = write_report(tmp_path, other, other_targets, other_scores, None)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in files)
    assert "training_curve.png" not in {path.name for path in files}
    (tmp_path / "training_curve.png").mkdir()  # not a report's file: left alone, and no error
    write_report(tmp_path, other, other_targets, other_scores, None)
    assert (tmp_path / "training_curve.png").is_dir()


def test_predictions_are_written_with_their_report_as_one(tmp_path, monkeypatch):
    """--save-predictions was written after the report: a full disk between the two left the new report
    beside the earlier evaluation's predictions. The file is a path the user names: a link is written
    through, as before (tl's own report files replace a link planted among them)."""
    from pipeline.errors import TLError
    from tests.conftest import disk_full_at

    names, ids = ["a", "b", "c"], np.array([f"r{i}" for i in range(60)])
    targets, scores = predictions(3)
    (tmp_path / "kept.csv").write_text("")
    (tmp_path / "p.csv").symlink_to(tmp_path / "kept.csv")
    files = write_report(tmp_path / "r", summarize(targets, scores, names), targets, scores, None,
                         predictions=(tmp_path / "p.csv", predictions_csv(ids[:len(targets)], targets, scores, names)))
    assert files[-1] == tmp_path / "p.csv" and (tmp_path / "p.csv").is_symlink()
    earlier = {path.name: path.read_bytes() for path in (*(tmp_path / "r").iterdir(), tmp_path / "kept.csv")}
    assert earlier["kept.csv"].startswith(b"sample_id,target,score:a")
    other_targets, other_scores = predictions(3, seed=1)
    disk_full_at(monkeypatch, len(files))  # while the last file is written: the predictions, after the report's
    with pytest.raises(TLError, match="no space left on the device"):
        write_report(tmp_path / "r", summarize(other_targets, other_scores, names), other_targets, other_scores, None,
                     predictions=(tmp_path / "p.csv", predictions_csv(ids[:len(other_targets)], other_targets,
                                                                       other_scores, names)))
    assert {path.name: path.read_bytes() for path in (*(tmp_path / "r").iterdir(), tmp_path / "kept.csv")} == earlier


def test_a_sweep_leaderboard_replaces_the_earlier_one_whole(tmp_path, monkeypatch):
    from pipeline.errors import TLError
    from pipeline.report import sweep_report
    from pipeline.sweep import SweepConfig
    from tests.conftest import disk_full_at

    def board(score):
        return [{"name": "feat-logreg-C1", "on": "validation", "val_score": score, "epochs": None,
                 "train_seconds": 0.1, "setting": {"layer": "feat", "kind": "logreg", "C": 1.0, "hidden": None,
                                                   "lr": None}}]

    config = SweepConfig(cache="c", out=tmp_path)  # the report reads its solver and training: the rate of lr None
    sweep_report(tmp_path, board(0.5), "accuracy", config)
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    disk_full_at(monkeypatch, 2)  # while the leaderboard's second file is written
    with pytest.raises(TLError, match="no space left on the device"):
        sweep_report(tmp_path, board(0.9), "accuracy", config)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == earlier
