"""Metrics against scikit-learn and against independent, loop-by-loop VOC devkit implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    top_k_accuracy_score,
)

from pipeline.errors import TLError
from pipeline.metrics import (
    accuracy,
    average_precision,
    confusion,
    mean_ap,
    per_class_ap,
    precision_recall,
    top_k_accuracy,
)

TOLERANCE = 1e-12  # float64 throughout


def voc07_by_loops(relevant, scores):
    """The VOC2007 devkit's 11-point AP, written as plain loops over ranks."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    total = sum(relevant)
    points = []  # (recall, precision) after each rank
    hits = 0
    for rank, i in enumerate(ranked, start=1):
        hits += relevant[i]
        points.append((hits / total, hits / rank))
    ap = 0.0
    for step in range(11):
        threshold = step / 10
        ap += max([p for r, p in points if r >= threshold - 1e-15], default=0.0) / 11
    return ap


def voc_area_by_loops(relevant, scores):
    """VOC 2010+ devkit: mrec=[0,rec,1], mpre=[0,prec,0], envelope from the right, sum over recall changes."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    total, hits = sum(relevant), 0
    mrec, mpre = [0.0], [0.0]
    for rank, i in enumerate(ranked, start=1):
        hits += relevant[i]
        mrec.append(hits / total)
        mpre.append(hits / rank)
    mrec.append(1.0)
    mpre.append(0.0)
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def _random_relevance(rng, most: int) -> np.ndarray:
    """5 to `most` rows, a random share of them relevant, at least one."""
    n = int(rng.integers(5, most))
    relevant = rng.random(n) < rng.uniform(0.1, 0.6)
    relevant[rng.integers(n)] = True
    return relevant


@pytest.mark.parametrize("seed", range(20))
def test_ap_matches_devkit_loops_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    relevant = _random_relevance(rng, 60)
    n = len(relevant)
    scores = rng.random(n)  # continuous: no ties
    assert abs(average_precision(relevant, scores, "voc07") - voc07_by_loops(list(relevant), list(scores))) < TOLERANCE
    assert abs(average_precision(relevant, scores, "area") - voc_area_by_loops(list(relevant), list(scores))) < TOLERANCE


def voc_aps_of_scikit_learn_curve(relevant, scores):
    """(voc07, area) by the devkit's loops over scikit-learn's precision-recall points, where tied scores
    are one threshold: an independent reference for scores with ties."""
    precision, recall, _ = precision_recall_curve(relevant, scores)
    points = list(zip(recall[:-1], precision[:-1]))  # the last is scikit-learn's (recall 0, precision 1) start
    voc07 = sum(max([p for r, p in points if r >= step / 10 - 1e-15], default=0.0) for step in range(11)) / 11
    points.sort()
    mrec, mpre = [0.0] + [r for r, _ in points] + [1.0], [0.0] + [p for _, p in points] + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    area = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
    return voc07, area


def test_tied_scores_are_one_threshold_whatever_the_row_order():
    # an imagefolder cache lists a class's rows together: ranked in input order, a tie put them first (AP 1)
    relevant, scores = np.array([True] * 10 + [False] * 30), np.ones(40)
    for method in ("voc07", "area"):
        assert average_precision(relevant, scores, method) == 0.25  # precision 10/40 at every recall
        assert average_precision(relevant[::-1], scores, method) == 0.25
    # saturated softmax: 10 relevant and 11 other rows at exactly 1.0, the rest below
    relevant = np.array([True] * 10 + [False] * 30)
    scores = np.concatenate([np.ones(21), np.linspace(0.9, 0.1, 19)])
    assert abs(average_precision(relevant, scores, "area") - 10 / 21) < TOLERANCE
    assert abs(average_precision(relevant, scores, "area") - average_precision_score(relevant, scores)) < TOLERANCE
    precision, recall = precision_recall(relevant, scores)
    assert (precision[0], recall[0]) == (10 / 21, 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_ap_with_ties_matches_scikit_learn_thresholds_in_any_row_order(seed):
    rng = np.random.default_rng(seed)
    relevant = _random_relevance(rng, 80)
    n = len(relevant)
    scores = rng.integers(0, int(rng.integers(2, 8)), n) / 4  # a few levels: many ties
    voc07, area = voc_aps_of_scikit_learn_curve(relevant, scores)
    by_class = np.argsort(~relevant, kind="stable")  # relevant rows first, as a class-sorted cache lists them
    for order in (np.arange(n), by_class, by_class[::-1], rng.permutation(n)):
        assert abs(average_precision(relevant[order], scores[order], "voc07") - voc07) < TOLERANCE
        assert abs(average_precision(relevant[order], scores[order], "area") - area) < TOLERANCE
        np.testing.assert_array_equal(precision_recall(relevant[order], scores[order]),
                                      precision_recall(relevant, scores))


def test_area_equals_scikit_learn_when_precision_never_rises():
    # ranks: H H M H M M H M M M H -> precision at hits 1, 1, .75, .57, .45 (never rising): no envelope effect
    relevant = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1], dtype=bool)
    scores = np.linspace(1, 0, len(relevant))
    assert abs(average_precision(relevant, scores, "area") - average_precision_score(relevant, scores)) < TOLERANCE


def test_perfect_and_worst_rankings():
    relevant = np.array([1, 1, 0, 0], dtype=bool)
    assert average_precision(relevant, np.array([4.0, 3, 2, 1]), "voc07") == pytest.approx(1.0)
    assert average_precision(relevant, np.array([4.0, 3, 2, 1]), "area") == pytest.approx(1.0)
    # ranked M M H H: precision 1/3 then 2/4 at the hits; the envelope lifts the first to 1/2
    assert average_precision(relevant, np.array([1.0, 2, 3, 4]), "area") == pytest.approx(0.5)


def test_ignored_rows_are_left_out():
    relevant = np.array([0, 1, 1], dtype=bool)
    scores = np.array([0.9, 0.8, 0.1])
    assert average_precision(relevant, scores, "area", ignore=np.array([True, False, False])) == pytest.approx(1.0)


def test_no_relevant_row_gives_nan_and_mean_ap_skips_it():
    assert math.isnan(average_precision(np.zeros(3, bool), np.ones(3)))
    assert mean_ap(np.array([0.5, np.nan, 1.0])) == pytest.approx(0.75)


def test_unknown_ap_method():
    with pytest.raises(TLError, match="unknown AP method 'voc12'"):
        average_precision(np.ones(2, bool), np.ones(2), "voc12")


def test_accuracy_topk_confusion_match_scikit_learn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 7, 200)
    scores = rng.random((200, 7))
    assert accuracy(targets, scores) == accuracy_score(targets, scores.argmax(1))
    assert top_k_accuracy(targets, scores, 5) == top_k_accuracy_score(targets, scores, k=5)
    np.testing.assert_array_equal(confusion(targets, scores), confusion_matrix(targets, scores.argmax(1)))


def test_per_class_ap_of_class_indices_and_multi_hot_agree():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 4, 50)
    scores = rng.random((50, 4))
    multi_hot = np.eye(4, dtype=bool)[targets]
    np.testing.assert_allclose(per_class_ap(targets, scores), per_class_ap(multi_hot, scores))
    expected = [voc07_by_loops(list(multi_hot[:, c]), list(scores[:, c])) for c in range(4)]
    np.testing.assert_allclose(per_class_ap(targets, scores), expected, atol=TOLERANCE)
