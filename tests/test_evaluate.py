"""Stage four: metrics equal scikit-learn's on fixed predictions, reports and plots are written, and a
head is refused on codes it was not trained for."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.errors import HeadError
from pipeline.training import TrainingOptions
from pipeline.metrics import average_precision, mean_ap, per_class_ap, summarize
from tests.conftest import blobs, multi_label_blobs, write_code_cache

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def fixed_predictions(seed=0, n=300, classes=6):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    scores = rng.random((n, classes)) + 0.8 * np.eye(classes)[targets]
    return targets, scores / scores.sum(axis=1, keepdims=True)


def test_summary_matches_scikit_learn_single_label():
    targets, scores = fixed_predictions()
    report = summarize(targets, scores, CLASSES, ap_method="area")
    predicted = scores.argmax(axis=1)
    assert report["accuracy"] == pytest.approx(accuracy_score(targets, predicted), abs=1e-12)
    assert report["top5_accuracy"] == pytest.approx(top_k_accuracy_score(targets, scores, k=5), abs=1e-12)
    assert report["confusion"] == confusion_matrix(targets, predicted).tolist()
    for average in ("macro", "micro", "weighted"):
        assert report[average]["f1"] == pytest.approx(f1_score(targets, predicted, average=average), abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted)
    for c, entry in enumerate(report["classes"]):
        assert (entry["precision"], entry["recall"], entry["f1"], entry["support"]) == pytest.approx(
            (precision[c], recall[c], f1[c], support[c]), abs=1e-12)
        # VOC's area AP is scikit-learn's after precision is made non-increasing in recall: never lower
        assert entry["ap"] == pytest.approx(average_precision(targets == c, scores[:, c], "area"), abs=1e-12)
        assert average_precision_score(targets == c, scores[:, c]) - 1e-12 <= entry["ap"]
    assert report["mAP"] == pytest.approx(np.mean([e["ap"] for e in report["classes"]]), abs=1e-12)
    assert "top5_accuracy" not in summarize(targets % 5, scores[:, :5], CLASSES[:5])  # 5 classes: top-5 is 1


def test_a_class_with_neither_rows_nor_predictions_is_left_out_of_the_macro_average():
    """scikit-learn leaves out of its macro average the labels absent from both targets and predictions;
    a test split without a class must not drag macro F1 down for a class nobody asked about."""
    targets, scores = fixed_predictions()
    kept = targets != 5
    targets, scores = targets[kept], scores[kept]
    scores[:, 5] = 0.0  # never predicted either
    predicted = scores.argmax(axis=1)
    report = summarize(targets, scores, CLASSES)
    for average in ("macro", "micro", "weighted"):
        assert report[average]["f1"] == pytest.approx(f1_score(targets, predicted, average=average), abs=1e-12)
    assert [report["classes"][5][m] for m in ("precision", "recall", "f1")] == [None, None, None]
    scores[0, 5] = 2.0  # predicted once, with no rows: a false positive, and a class the macro average counts
    report = summarize(targets, scores, CLASSES)
    assert report["classes"][5]["precision"] == 0.0
    assert report["macro"]["f1"] == pytest.approx(
        f1_score(targets, scores.argmax(axis=1), average="macro", labels=range(6), zero_division=0), abs=1e-12)
    multi = np.eye(6, dtype=np.int64)[targets]  # multi-label: scikit-learn averages over every column
    report = summarize(multi, np.eye(6)[targets] * 0.9, CLASSES)
    assert report["macro"]["f1"] == pytest.approx(f1_score(multi, multi, average="macro", zero_division=0))
    assert report["classes"][5]["f1"] == 0.0


def test_summary_matches_scikit_learn_multi_label():
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 4)) < 0.3).astype(np.int64)
    scores = np.clip(rng.random((200, 4)) * 0.8 + 0.3 * targets, 0, 1)
    report = summarize(targets, scores, CLASSES[:4], ap_method="area")
    predicted = (scores >= 0.5).astype(np.int64)
    assert report["multilabel"] and "confusion" not in report
    assert report["accuracy"] == pytest.approx(accuracy_score(targets, predicted), abs=1e-12)
    assert report["micro"]["f1"] == pytest.approx(f1_score(targets, predicted, average="micro"), abs=1e-12)
    ap = [average_precision(targets[:, c], scores[:, c], "area") for c in range(4)]
    assert report["mAP"] == pytest.approx(np.mean(ap), abs=1e-12)
    assert report["mAP"] >= average_precision_score(targets, scores, average="macro") - 1e-12


@pytest.fixture
def caches(tmp_path):
    codes, targets = blobs(20, n=300, classes=6)
    test_codes, test_targets = blobs(20, n=120, classes=6, draw=1)
    write_code_cache(tmp_path / "train", codes, targets, CLASSES, shard_rows=100)
    write_code_cache(tmp_path / "test", test_codes, test_targets, CLASSES, shard_rows=50)
    return tmp_path


def is_png(path):
    return path.is_file() and path.stat().st_size > 2000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_report_plots_and_predictions(caches):
    options = TrainingOptions(max_epochs=4)
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "mlp.pt", head="mlp", hidden=(32,),
                           val_fraction=0.2, training=options))
    result = run_evaluate(EvaluateConfig(head=caches / "mlp.pt", cache=caches / "test", out=caches / "report",
                                         save_predictions=caches / "predictions.csv"))
    report = result.report
    assert report["ap_method"] == "voc07" and "top5_accuracy" in report
    assert [entry["name"] for entry in report["classes"]] == CLASSES
    assert result.files[:2] == [caches / "report" / "report.json", caches / "report" / "report.md"]
    assert report == json.loads((caches / "report" / "report.json").read_text())
    assert report["rows"] == 120 and report["accuracy"] > 0.6  # chance is 1/6
    for name in ("confusion_matrix.png", "pr_curves.png", "training_curve.png"):
        assert is_png(caches / "report" / name), name
    assert "| fox |" in (caches / "report" / "report.md").read_text()
    with open(caches / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 120 and rows[0]["sample_id"] == "row00000"
    scores = np.array([[float(row[f"score:{name}"]) for name in CLASSES] for row in rows])
    truth = np.array([CLASSES.index(row["target"]) for row in rows])
    assert accuracy_score(truth, scores.argmax(axis=1)) == report["accuracy"]
    # the mlp's probabilities (float64, from float32 logits) read back exactly: the file's AP is the report's,
    # to the last bit
    assert [entry["ap"] for entry in report["classes"]] == per_class_ap(truth, scores).tolist()
    assert mean_ap(per_class_ap(truth, scores)) == report["mAP"]


def test_a_head_without_a_curve_has_no_training_plot(caches):
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "svm.pt", head="svm"))
    result = run_evaluate(EvaluateConfig(head=caches / "svm.pt", cache=caches / "test", out=caches / "r",
                                         ap="area"))
    assert not (caches / "r" / "training_curve.png").exists() and is_png(caches / "r" / "pr_curves.png")
    assert result.report["ap_method"] == "area" and result.report["accuracy"] > 0.6


def test_test_classes_are_matched_by_name(caches):
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    codes, targets = blobs(20, n=120, classes=6, draw=2)
    keep = np.isin(targets, [1, 4])  # bee and eel only, listed in another order
    write_code_cache(caches / "two", codes[keep], np.where(targets[keep] == 4, 0, 1), ["eel", "bee", "yak"])
    report = run_evaluate(EvaluateConfig(head=caches / "h.pt", cache=caches / "two", out=caches / "r")).report
    supports = {entry["name"]: entry["support"] for entry in report["classes"]}
    assert supports["bee"] == int(np.sum(targets == 1)) and supports["eel"] == int(np.sum(targets == 4))
    assert report["accuracy"] > 0.6 and set(report["classes_without_rows"]) == {"ant", "cat", "dog", "fox"}


def test_multi_label_evaluation(tmp_path):
    codes, targets = multi_label_blobs(5)
    test_codes, test_targets = multi_label_blobs(5, draw=1)
    write_code_cache(tmp_path / "train", codes, targets, ["x", "y", "z"])
    write_code_cache(tmp_path / "test", test_codes, test_targets, ["x", "y", "z"])
    fit_head(FitHeadConfig(cache=tmp_path / "train", out=tmp_path / "h.pt"))
    result = run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "test", out=tmp_path / "r",
                                         save_predictions=tmp_path / "p.csv"))
    assert result.report["multilabel"] and result.report["mAP"] > 0.85
    assert not (tmp_path / "r" / "confusion_matrix.png").exists() and is_png(tmp_path / "r" / "pr_curves.png")
    first = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    assert first[1] == ";".join(n for n, hot in zip("xyz", test_targets[0]) if hot)
    write_code_cache(tmp_path / "single", test_codes, test_targets.argmax(axis=1), ["x", "y", "z"])
    with pytest.raises(HeadError, match="is multi-label but cache .* is single-label"):
        run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "single", out=tmp_path / "r"))


# ------------------------------------------------------------------ the CLI: the summary table, errors


def test_a_score_on_the_heads_own_training_codes_is_said_to_be_one(caches, run_tl, tmp_path):
    """Evaluating on the training cache scored 1.000 and looked like a test; a copy of it is the same codes."""
    fit_head(FitHeadConfig(cache=caches / "train", out=tmp_path / "h.pt"))
    shutil.copytree(caches / "train", tmp_path / "copy")
    for cache in (caches / "train", tmp_path / "copy"):
        result = run_tl("evaluate", "--head", tmp_path / "h.pt", "--cache", cache, "--out", tmp_path / "r")
        assert result.code == 0 and result.err == (
            f"warning: cache {cache} holds the codes head {tmp_path / 'h.pt'} was trained on: these are training "
            "numbers, not a test; evaluate a cache of other images\n"), result
        assert "training numbers" in json.loads((tmp_path / "r" / "report.json").read_text())["source"]["warnings"][0]
    other = run_tl("evaluate", "--head", tmp_path / "h.pt", "--cache", caches / "test", "--out", tmp_path / "r")
    assert other.code == 0 and other.err == "", other


def test_cli_prints_the_summary_table_and_where_the_report_is(caches, run_tl):
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    result = run_tl("evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", caches / "report",
                    "--top-k", "3", "--ap", "area")
    assert result.code == 0 and result.err == "", result
    for text in ("rows                             120", "accuracy", "top3 accuracy", "mAP (area)", "fox"):
        assert text in result.out, text
    assert result.out.rstrip().splitlines()[-1] == (
        f"report: {caches / 'report' / 'report.md'} (+ report.html, confusion_matrix.png, pr_curves.png)")


def test_bad_inputs_to_evaluate(caches, run_tl):
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    codes, targets = blobs(20, n=60, classes=6, draw=3)

    def refused(cache, *more):
        result = run_tl("evaluate", "--head", caches / "h.pt", "--cache", cache, "--out", caches / "r", *more)
        assert result.code == 2 and result.err.count("\n") == 1, result
        return result.err

    write_code_cache(caches / "other", codes, targets, CLASSES, backbone="vgg16")
    assert "was made by another backbone than" in refused(caches / "other")
    assert "backbone: synthetic -> vgg16" in refused(caches / "other")
    write_code_cache(caches / "layer", codes, targets, CLASSES, layer="fc7")
    assert "has no layer 'feat', which head" in refused(caches / "layer")
    write_code_cache(caches / "unknown", codes, targets, CLASSES[:5] + ["gnu"])
    assert "labels head" in refused(caches / "unknown") and "does not know: gnu" in refused(caches / "unknown")
    write_code_cache(caches / "empty", codes[:0], targets[:0], CLASSES)
    assert "has no rows" in refused(caches / "empty")
    assert "is not a tl cache" in refused(caches / "missing")
    (caches / "junk.pt").write_bytes(b"\x00" * 100)
    junk = run_tl("evaluate", "--head", caches / "junk.pt", "--cache", caches / "test", "--out", caches / "r")
    assert junk.code == 2 and "is not a tl head file" in junk.err
    nan_codes = codes.copy()
    nan_codes[5, 0] = np.nan
    write_code_cache(caches / "nan", nan_codes, targets, CLASSES)
    assert "shard-00000.h5" in refused(caches / "nan") and "NaN or Inf" in refused(caches / "nan")
    assert not (caches / "r" / "report.json").exists()


def test_save_predictions_replaces_only_tls_own_file_unless_told(caches, run_tl):
    """`--save-predictions notes.csv` replaced the user's file with predictions without a word: a file there
    that tl did not write as predictions is refused in one line before any work, and kept (the report is not
    written either); tl's own predictions are replaced, so a re-run works; --overwrite replaces any file."""
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    notes = caches / "notes.csv"
    notes.write_text("sample_id,my label\nrow00000,fox\n")
    evaluate = ["evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", caches / "r"]
    refused = run_tl(*evaluate, "--save-predictions", notes)
    assert refused.code == 2 and refused.err == (f"error: {notes} holds a file that tl did not write as a predictions "
                                                 "file; choose another --save-predictions, or pass --overwrite to "
                                                 "replace it\n"), refused
    assert notes.read_text() == "sample_id,my label\nrow00000,fox\n" and not (caches / "r").exists()
    ours = caches / "predictions.csv"
    assert run_tl(*evaluate, "--save-predictions", ours).code == 0
    again = run_tl(*evaluate, "--save-predictions", ours, "--top-k", "2")
    assert again.code == 0 and "top2 accuracy" in again.out, again
    told = run_tl(*evaluate, "--save-predictions", notes, "--overwrite")
    assert told.code == 0 and notes.read_text() == ours.read_text(), told


def test_a_report_folder_replaces_only_tls_own_report_unless_told(caches, run_tl):
    """`tl evaluate --out DIR` wrote report.json, report.md, report.html and the plots over whatever files of
    those names DIR held (and removed a training_curve.png), without a word. The report's files are tl's where
    its report.json is a report of tl's (they are written as one): a re-run replaces them. Else any of them
    there is refused in one line before any work, and kept; --overwrite replaces them. An empty file holds
    nothing to lose."""
    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    folder = caches / "mine"
    folder.mkdir()
    (folder / "report.md").write_text("# my notes\n")
    evaluate = ["evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", folder]
    refused = run_tl(*evaluate)
    assert refused.code == 2 and refused.err == (f"error: {folder / 'report.md'} holds a file that tl did not write "
                                                 "as a report file; choose another --out, or pass --overwrite to "
                                                 "replace it\n"), refused
    assert sorted(path.name for path in folder.iterdir()) == ["report.md"]
    (folder / "report.json").write_text('{"rows": "my own"}\n')  # not tl's keys: the report.md is not vouched for
    (folder / "training_curve.png").write_bytes(b"my plot")  # a file write_report would remove
    json_refused = run_tl(*evaluate)
    assert json_refused.code == 2 and f"{folder / 'report.json'} holds a file that tl did not write" in \
        json_refused.err, json_refused
    assert (folder / "report.json").read_text() == '{"rows": "my own"}\n'
    assert (folder / "training_curve.png").read_bytes() == b"my plot" and (folder / "report.md").exists()

    empty = caches / "empty"
    empty.mkdir()
    (empty / "report.md").write_bytes(b"")
    assert run_tl("evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", empty).code == 0
    again = run_tl("evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", empty, "--top-k", "2")
    assert again.code == 0 and "top2 accuracy" in again.out, again  # tl's own report: replaced
    assert "top2_accuracy" in json.loads((empty / "report.json").read_text())
    told = run_tl(*evaluate, "--overwrite")
    assert told.code == 0, told
    assert "training_curve.png" not in {path.name for path in folder.iterdir()}  # a head's report has none
    assert json.loads((folder / "report.json").read_text())["rows"] > 0 and (folder / "report.md").read_text() != \
        "# my notes\n"


def test_a_top_k_below_one_is_refused_by_the_stage_too(tmp_path):
    """The CLI refuses it when it parses the command; a caller of the stage gets the stage's own line."""
    with pytest.raises(HeadError, match="--top-k must be at least 1, got 0"):
        run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "c", out=tmp_path / "r", top_k=0))
    assert not (tmp_path / "r").exists()


def test_a_second_evaluation_into_one_report_folder_is_refused(caches, run_tl):
    """Two tl evaluate runs on one --out took no lock: with different heads their renames could interleave,
    leaving one run's report.json beside the other's plots. The second is refused in one line now."""
    from pipeline.evaluate import LOCK
    from pipeline.files import OutputLock

    fit_head(FitHeadConfig(cache=caches / "train", out=caches / "h.pt"))
    out = caches / "report"
    args = ("evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", out)
    with OutputLock(out / LOCK, "writing a report"):  # another evaluation at work there
        refused = run_tl(*args)
    assert refused.code == 2 and "is writing a report" in refused.err and refused.err.count("\n") == 1, refused
    assert not (out / "report.json").exists()
    assert run_tl(*args).code == 0 and (out / "report.json").is_file() and not (out / LOCK).exists()
    (caches / "file").write_text("mine")
    as_file = run_tl("evaluate", "--head", caches / "h.pt", "--cache", caches / "test", "--out", caches / "file")
    assert as_file.code == 2 and "is a file" in as_file.err and (caches / "file").read_text() == "mine", as_file
