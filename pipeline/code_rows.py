"""The rows a head sees: codes and targets in memory, or one layer of a cache streamed block by block,
and what is computed over them in one pass (standardization, scores, the validation metric).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import numpy as np

from pipeline.errors import HeadError, listed
from pipeline.progress import progress
BLOCK_ROWS = 4096  # code rows read from a cache at a time (memory holds one block)


class CodeRows(ABC):
    """Rows to fit or score: arrays in memory, or one layer of a cache read block by block.

    Targets are class indices (n,) or multi-hot rows (n, classes); they are small and stay in memory.
    Codes from a cache never do: `blocks` holds one block of rows at a time.
    """

    def __init__(self, targets: np.ndarray, num_classes: int, width: int, class_names: list[str] | None = None):
        self.targets = np.asarray(targets)
        self.num_classes = num_classes
        self.width = width
        self.class_names = class_names or [str(c) for c in range(num_classes)]
        self.block_rows = BLOCK_ROWS

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2

    def __len__(self) -> int:
        return len(self.targets)

    @staticmethod
    def from_arrays(codes: np.ndarray, targets: np.ndarray) -> "ArrayRows":
        return ArrayRows(codes, targets)

    @staticmethod
    def from_cache(reader, layer: str, rows: np.ndarray | None = None, block_rows: int = BLOCK_ROWS,
                   all_targets: np.ndarray | None = None) -> "CacheRows":
        """`all_targets`: the cache's whole target column when the caller already read it."""
        return CacheRows(reader, layer, rows, block_rows, all_targets)

    @abstractmethod
    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, float32 codes) per block; positions index this object's rows. Shuffled with `rng`."""

    def load(self) -> np.ndarray:
        codes = np.empty((len(self), self.width), dtype=np.float32)
        for positions, block in self.blocks():
            codes[positions] = block
        return codes

    def check_trainable(self) -> None:
        """Refuse what no classifier can learn from: no rows, one class, a class without rows."""
        if len(self) == 0:
            raise HeadError("the training codes are empty; extract a cache with at least one image per class")
        counts = self.targets.sum(axis=0) if self.multilabel else np.bincount(self.targets, minlength=self.num_classes)
        missing = [self.class_names[c] for c in np.flatnonzero(counts == 0)]
        if not self.multilabel and np.count_nonzero(counts) < 2:
            more = f" (+{len(missing) - 5:,} more)" if len(missing) > 5 else ""
            raise HeadError(f"the training codes hold one class, {self.class_names[int(np.argmax(counts))]}; a classifier "
                            "needs at least two: " + (f"add images of {listed(missing[:5])}{more}" if missing else
                                                      "extract a cache of images of another class too"))
        if len(missing) == 1:
            raise HeadError(f"class {missing[0]} has no training rows; add images of it or remove it")
        if missing:
            more = f" (+{len(missing) - 5:,} more)" if len(missing) > 5 else ""
            raise HeadError(f"{len(missing):,} classes have no training rows: {listed(missing[:5])}{more}; add images "
                            "of them or remove them")


class ArrayRows(CodeRows):
    def __init__(self, codes: np.ndarray, targets: np.ndarray):
        codes = checked_codes(codes, "codes")
        targets = np.asarray(targets)
        if len(targets) != len(codes):
            raise HeadError(f"{len(codes)} rows of codes but {len(targets)} targets")
        classes = targets.shape[1] if targets.ndim == 2 else (int(targets.max()) + 1 if len(targets) else 0)
        super().__init__(targets.astype(np.int64), classes, codes.shape[1])
        self.codes = codes

    def blocks(self, rng=None):
        order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
        for start in range(0, len(order), self.block_rows):
            positions = order[start:start + self.block_rows]
            yield positions, self.codes[positions].astype(np.float32)

    def load(self) -> np.ndarray:
        return self.codes


class CacheRows(CodeRows):
    def __init__(self, reader, layer: str, rows: np.ndarray | None, block_rows: int,
                 all_targets: np.ndarray | None = None):
        reader._check_tap(layer)
        if reader.num_rows == 0:
            raise HeadError(f"cache {reader.root} has no rows; extract images into it first")
        targets = all_targets
        if targets is None:
            targets = reader.load_column("target")
        self.rows = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if self.rows is not None:
            targets = targets[self.rows]
        super().__init__(targets.astype(np.int64), len(reader.classes), reader.taps[layer], reader.classes)
        self.reader, self.layer, self.block_rows = reader, layer, block_rows

    def blocks(self, rng=None):
        for global_rows, codes in self.reader.iter_blocks(self.layer, self.block_rows, self.rows, rng):
            positions = global_rows if self.rows is None else np.searchsorted(self.rows, global_rows)
            yield positions, codes.astype(np.float32, copy=False)


def as_rows(codes, targets) -> CodeRows:
    return codes if isinstance(codes, CodeRows) else CodeRows.from_arrays(codes, targets)


def checked_codes(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype.kind != "f":
        codes = codes.astype(np.float64)
    if codes.ndim != 2 or len(codes) == 0:
        raise HeadError(f"{what} are empty; extract a cache with at least one image per class")
    if not np.isfinite(codes).all():
        row = int(np.argmax(~np.isfinite(codes).all(axis=1)))
        raise HeadError(f"{what} hold NaN or Inf (row {row}); re-extract the cache")
    return codes


def standardization(rows: CodeRows) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every column in one streamed pass (Chan et al.'s pairwise update,
    float64), zero deviations set to 1 as scikit-learn's StandardScaler does. Kept on `rows`: the heads
    of a sweep that share rows pay for one pass."""
    if getattr(rows, "_standardization", None) is None:
        rows._standardization = _standardization(rows)
    mean, scale = rows._standardization
    return mean.copy(), scale.copy()


def standardized_codes(rows: CodeRows, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(codes - mean) / scale of every row, float64, in memory. Rows marked `share_standardized` (a
    sweep's, whose lbfgs and svm heads of one layer share one copy) keep it for the next head that asks
    with the same mean and scale; others leave it to the caller, so one head holds it only while it fits."""
    kept = getattr(rows, "_standardized", None)
    if kept is not None and np.array_equal(kept[0], mean) and np.array_equal(kept[1], scale):
        return kept[2]
    rows._standardized = None  # the previous copy goes before the next is made
    standardized = (rows.load().astype(np.float64) - mean) / scale
    if getattr(rows, "share_standardized", False):
        rows._standardized = (mean.copy(), scale.copy(), standardized)
    return standardized


def _standardization(rows: CodeRows) -> tuple[np.ndarray, np.ndarray]:
    count, mean, m2 = 0, np.zeros(rows.width), np.zeros(rows.width)
    for _, block in rows.blocks():
        block = block.astype(np.float64)
        n = len(block)
        block_mean = block.mean(axis=0)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + ((block - block_mean) ** 2).sum(axis=0) + delta ** 2 * count * n / total
        count = total
    scale = np.sqrt(m2 / max(count, 1))
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return mean, scale


def validation_score(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """Accuracy for one label per row; mean AP over classes (area, scikit-learn) for multi-hot rows. A NaN
    probability (a diverged head's overflowed logits) ranks below every other: scikit-learn refused it in
    a traceback, and ranking a diverged head needs its score. A row of NaN alone predicts class 0, so such
    a score is no measure of the head: rankings put diverged heads last by their flag, not by it."""
    probabilities = np.nan_to_num(probabilities, nan=-1.0)  # probabilities lie in [0, 1]
    if targets.ndim == 2:
        from sklearn.metrics import average_precision_score

        present = targets.sum(axis=0) > 0
        return float(average_precision_score(targets[:, present], probabilities[:, present], average="macro"))
    return float(np.mean(np.argmax(probabilities, axis=1) == targets))


def score_rows(head, rows: CodeRows, quiet: bool = True) -> np.ndarray:
    """predict_proba over every row, streamed block by block, in the rows' order (a bar unless `quiet`)."""
    scores = np.empty((len(rows), head.num_classes_), dtype=np.float64)
    blocks = progress(total=len(rows), desc="score", unit="row", quiet=quiet, leave=False)
    for positions, codes in rows.blocks():
        scores[positions] = head.predict_proba(codes)
        blocks.update(len(positions))
    blocks.close()
    return scores


