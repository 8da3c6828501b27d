"""Classification metrics: accuracy, top-k, confusion, per-class AP (VOC07 11-point or area) and mAP.

scikit-learn computes what it has; AP follows the PASCAL VOC devkit, which scikit-learn does not.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import TLError

AP_METHODS = ("voc07", "area")


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of rows whose highest score is the target class."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(targets, np.argmax(scores, axis=1)))


def top_k_accuracy(targets: np.ndarray, scores: np.ndarray, k: int = 5) -> float:
    from sklearn.metrics import top_k_accuracy_score

    return float(top_k_accuracy_score(targets, scores, k=k, labels=np.arange(scores.shape[1])))


def confusion(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(targets, np.argmax(scores, axis=1), labels=np.arange(scores.shape[1]))


def precision_recall(relevant: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score, high to low: rows of equal score pass one threshold
    together (as scikit-learn's precision_recall_curve), so the order of the rows never changes them."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    hits = np.asarray(relevant)[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    # a tie ranked in input order let whichever rows came first (a cache sorted by class: the relevant
    # ones) take the top ranks; only the last rank of each tied block is a point a threshold can reach
    block_ends = np.flatnonzero(np.append(np.diff(scores[order]) != 0, True)[:len(hits)])
    precision = true_positives[block_ends] / (block_ends + 1)
    recall = true_positives[block_ends] / max(hits.sum(), 1.0)
    return precision, recall


def average_precision(relevant: np.ndarray, scores: np.ndarray, method: str = "voc07",
                      ignore: np.ndarray | None = None) -> float:
    """AP of one class as the VOC devkit defines it.

    voc07: mean over recall thresholds 0, 0.1, ..., 1 of the best precision at that recall or beyond.
    area: area under the precision envelope (precision made non-increasing in recall), VOC 2010 on.
    `ignore` marks rows left out entirely (VOC's `difficult`-only images). NaN when no row is relevant.
    """
    if method not in AP_METHODS:
        raise TLError(f"unknown AP method '{method}'; valid: {', '.join(AP_METHODS)}")
    relevant = np.asarray(relevant).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        relevant, scores = relevant[keep], scores[keep]
    if not relevant.any():
        return float("nan")
    precision, recall = precision_recall(relevant, scores)
    if method == "voc07":
        # Thresholds k/10 with a tolerance: 0.1 * 6 rounds above 3/5 in floating point, which would
        # drop an exact recall of 0.6 (np.arange-based ports of the devkit have that slip).
        thresholds = np.arange(11) / 10 - 1e-12
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in thresholds]))
    envelope = np.maximum.accumulate(np.concatenate([precision, [0.0]])[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope[:-1]))


def per_class_ap(targets: np.ndarray, scores: np.ndarray, method: str = "voc07",
                 ignore: np.ndarray | None = None) -> np.ndarray:
    """AP of every class. `targets` is class indices (n,) or multi-hot rows (n, classes)."""
    relevant = _multi_hot(targets, scores.shape[1])
    return np.array([
        average_precision(relevant[:, c], scores[:, c], method, None if ignore is None else ignore[:, c])
        for c in range(scores.shape[1])
    ])


def mean_ap(ap: np.ndarray) -> float:
    """Mean over the classes that have at least one relevant row."""
    defined = ap[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else float("nan")


def _multi_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(bool)
    relevant = np.zeros((len(targets), num_classes), dtype=bool)
    relevant[np.arange(len(targets)), targets] = True
    return relevant


def summarize(targets: np.ndarray, scores: np.ndarray, class_names: list[str], ap_method: str = "voc07",
              top_k: int = 5, ignore: np.ndarray | None = None, predicted: np.ndarray | None = None) -> dict:
    """Every number of a report, as plain JSON-ready values.

    `targets`: class indices (n,) or multi-hot rows (n, classes); `scores`: (n, classes). A multi-label
    row predicts every class scoring ≥ 0.5. Precision, recall, F1 and the confusion matrix come from
    scikit-learn; AP follows the VOC devkit (`average_precision`). `ignore` marks (row, class) pairs left
    out of that class's AP. `predicted` (multi-hot) replaces the 0.5 threshold when scores are not
    probabilities (pooled patch scores).
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    multilabel = targets.ndim == 2
    num_classes = scores.shape[1]
    if multilabel:
        predicted = (scores >= 0.5).astype(np.int64) if predicted is None else np.asarray(predicted, np.int64)
        support = targets.sum(axis=0)
    else:
        predicted = np.argmax(scores, axis=1)
        support = np.bincount(targets, minlength=num_classes)
    labels = None if multilabel else np.arange(num_classes)
    per_class = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    # single-label: a class with neither rows nor predictions here has no precision or recall: shown as
    # "–" and left out of the averages, as scikit-learn leaves out labels absent from both when given no
    # list. Multi-label: scikit-learn averages over every column, as here.
    present = np.arange(num_classes)
    if not multilabel:
        present = np.flatnonzero((support > 0) | (np.bincount(predicted, minlength=num_classes) > 0))
    ap = per_class_ap(targets, scores, ap_method, ignore)
    summary = {
        "rows": int(len(targets)),
        "multilabel": multilabel,
        "ap_method": ap_method,
        # subset accuracy for multi-label rows: every class right
        "accuracy": float(accuracy_score(targets, predicted)),
        "mAP": mean_ap(ap),
        "classes": [
            {"name": name, **{measure: float(per_class[m][c]) if c in present else None
                              for m, measure in enumerate(("precision", "recall", "f1"))},
             "support": int(support[c]),
             "ap": None if np.isnan(ap[c]) else float(ap[c])}
            for c, name in enumerate(class_names)
        ],
    }
    for average in ("macro", "micro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, average=average, zero_division=0,
                                                                   labels=None if multilabel else present)
        summary[average] = {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
    if not multilabel:
        if num_classes > top_k:
            summary[f"top{top_k}_accuracy"] = top_k_accuracy(targets, scores, top_k)
        summary["confusion"] = confusion(targets, scores).tolist()
    summary["classes_without_rows"] = [name for name, count in zip(class_names, support) if count == 0]
    return summary
