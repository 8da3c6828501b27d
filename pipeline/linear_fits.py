"""scikit-learn's exact fits of the linear heads on standardized codes held in memory: multinomial (or
one-vs-rest) logistic regression per cost, and the VOC07 protocol's linear SVMs per class and cost.
The heads (pipeline.heads) own what is kept; this module only fits.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import numpy as np

from pipeline.code_rows import CodeRows
from pipeline.errors import HeadError, listed
from pipeline.progress import progress


def _convergence_warning():
    from sklearn.exceptions import ConvergenceWarning

    return ConvergenceWarning


def logreg_fits(standardized: np.ndarray, rows: CodeRows, grid: list[float], max_iter: int, seed: int,
                quiet: bool) -> Iterator[tuple]:
    """(coef, intercept, None) per cost of `grid`, in order, on the standardized codes of `rows`."""
    from sklearn.linear_model import LogisticRegression

    for C in progress(grid, desc="logreg lbfgs", unit="C", quiet=quiet):
        model = lambda: LogisticRegression(C=C, max_iter=max_iter, random_state=seed)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=_convergence_warning())
            if rows.multilabel:
                fitted = [model().fit(standardized, rows.targets[:, c]) for c in range(rows.num_classes)]
                coef = np.vstack([m.coef_ for m in fitted])
                intercept = np.concatenate([m.intercept_ for m in fitted])
            else:
                fitted = model().fit(standardized, rows.targets)
                coef, intercept = fitted.coef_, fitted.intercept_
                if coef.shape[0] == 1:  # scikit-learn keeps one row for two classes: logit(p1) = w.x + b
                    coef = np.vstack([-coef / 2, coef / 2])
                    intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        yield coef, intercept, None


def svm_fits(standardized: np.ndarray, rows: CodeRows, val: CodeRows | None, val_standardized: np.ndarray | None,
             grid: list[float], max_iter: int, seed: int, quiet: bool) -> tuple[list, list, list, list]:
    """One-vs-rest LinearSVC per class, each keeping the cost of `grid` with the best validation AP:
    (coef rows, intercepts, costs, validation APs), one of each per class."""
    from sklearn.metrics import average_precision_score
    from sklearn.svm import LinearSVC

    coef, intercept, costs, scores = [], [], [], []
    fits = progress(total=rows.num_classes * len(grid), desc="svm", unit="fit", quiet=quiet)
    for c in range(rows.num_classes):
        positive = rows.targets[:, c] if rows.multilabel else (rows.targets == c).astype(np.int64)
        best = None
        for C in grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=_convergence_warning())
                model = LinearSVC(C=C, max_iter=max_iter, random_state=seed).fit(standardized, positive)
            score = 0.0
            if val is not None:
                val_positive = val.targets[:, c] if val.multilabel else (val.targets == c).astype(np.int64)
                margins = model.decision_function(val_standardized)
                score = float(average_precision_score(val_positive, margins)) if val_positive.any() else 0.0
            if best is None or score > best[0]:
                best = (score, C, model)
            fits.update()
        coef.append(best[2].coef_[0])
        intercept.append(best[2].intercept_[0])
        costs.append(best[1])
        scores.append(best[0])
    fits.close()
    return coef, intercept, costs, scores


def cost_grid(C, val) -> list[float]:
    """The costs to fit: one, or several to choose from on the validation split `val`."""
    grid = [float(c) for c in (C if isinstance(C, (list, tuple)) else [C])]
    if any(not 0 < c < math.inf for c in grid):  # inf: sklearn's traceback (svm), or a head JSON cannot hold (logreg)
        raise HeadError(f"--C values must be positive and finite, got {listed(grid)}")
    if len(grid) > 1 and val is None:
        raise HeadError("several C values need a validation split to choose from; pass --val-cache or --val-fraction")
    return grid


def costs_of(C: tuple[float, ...]) -> float | list[float]:
    """One cost, or the grid to choose from on the validation split."""
    return list(C) if len(C) > 1 else C[0]
