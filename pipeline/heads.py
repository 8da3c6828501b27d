"""Stage two: light classifiers on cached codes, scikit-learn style (`fit`, `predict_proba`, `predict`).

Every head turns into a torch module (`to_module`) and saves to one file that loads without running
code: tensors plus JSON metadata, read back with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from abc import ABC, abstractmethod
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.errors import TLError
from pipeline.files import write_bytes
from pipeline.hardware import pinned, resolve_device, to_device

HEAD_FORMAT = "tl-head/1"
CHECKSUM = "sha256"  # the payload key of a tl file's content checksum
SOLVERS = ("lbfgs", "sgd")
OPTIMIZERS = ("sgd", "adam")


class HeadError(TLError):
    """A head file that is not one, or a head used on codes it was not trained for."""


class Standardize(nn.Module):
    """(x - mean) / scale, the scaler every head is fitted behind."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) / self.scale


# ---------------------------------------------------------------- the rows a head sees


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
        self.block_rows = 4096

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2

    def __len__(self) -> int:
        return len(self.targets)

    @staticmethod
    def from_arrays(codes: np.ndarray, targets: np.ndarray) -> "ArrayRows":
        return ArrayRows(codes, targets)

    @staticmethod
    def from_cache(reader, layer: str, rows: np.ndarray | None = None, block_rows: int = 4096,
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
        if not self.multilabel and np.count_nonzero(counts) < 2:
            raise HeadError("the training codes hold a single class; a classifier needs at least two")
        missing = [self.class_names[c] for c in np.flatnonzero(counts == 0)]
        if missing:
            raise HeadError(f"class {', '.join(missing[:5])} has no training rows; add images of it or remove it")


class ArrayRows(CodeRows):
    def __init__(self, codes: np.ndarray, targets: np.ndarray):
        codes = _checked(codes, "codes")
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
        targets = all_targets
        if targets is None:
            targets = reader.load_column("target") if reader.num_rows else np.zeros(0, np.int64)
        self.rows = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if self.rows is not None:
            targets = targets[self.rows]
        super().__init__(targets.astype(np.int64), len(reader.classes), reader.taps[layer], reader.classes)
        self.reader, self.layer, self.block_rows = reader, layer, block_rows

    def blocks(self, rng=None):
        for global_rows, codes in self.reader.iter_blocks(self.layer, self.block_rows, self.rows, rng):
            positions = global_rows if self.rows is None else np.searchsorted(self.rows, global_rows)
            yield positions, codes.astype(np.float32, copy=False)


def _as_rows(codes, targets) -> CodeRows:
    return codes if isinstance(codes, CodeRows) else CodeRows.from_arrays(codes, targets)


def _checked(codes: np.ndarray, what: str) -> np.ndarray:
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
    float64), zero deviations set to 1 as scikit-learn's StandardScaler does."""
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
    """Accuracy for one label per row; mean AP over classes (area, scikit-learn) for multi-hot rows."""
    if targets.ndim == 2:
        from sklearn.metrics import average_precision_score

        present = targets.sum(axis=0) > 0
        return float(average_precision_score(targets[:, present], probabilities[:, present], average="macro"))
    return float(np.mean(np.argmax(probabilities, axis=1) == targets))


def score_rows(head, rows: CodeRows) -> np.ndarray:
    """predict_proba over every row, streamed block by block, in the rows' order."""
    scores = np.empty((len(rows), head.num_classes_), dtype=np.float64)
    for positions, codes in rows.blocks():
        scores[positions] = head.predict_proba(codes)
    return scores


# ---------------------------------------------------------------- heads


class Head(ABC):
    """What every head shares: class count, single or multi-label output, prediction, saving."""

    kind = ""
    curve_: list[dict] | None = None

    @abstractmethod
    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        """(rows, classes) probabilities: softmax rows, or independent sigmoids for multi-label."""

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Class indices, or multi-hot rows (probability ≥ 0.5) for a multi-label head."""
        probabilities = self.predict_proba(codes)
        if self.multilabel_:
            return (probabilities >= 0.5).astype(np.int64)
        return np.argmax(probabilities, axis=1)

    def _activation(self) -> nn.Module:
        return nn.Sigmoid() if self.multilabel_ else nn.Softmax(dim=1)

    @abstractmethod
    def logits_module(self) -> nn.Module:
        """codes -> logits (before softmax or sigmoid): what stage three trains on."""

    def to_module(self) -> nn.Module:
        """codes -> class probabilities, the same function as `predict_proba`."""
        return nn.Sequential(*self.logits_module(), self._activation()).eval()

    def _learned(self) -> dict:
        return {"multilabel": self.multilabel_, "num_classes": self.num_classes_, "curve": self.curve_}

    def _restore(self, learned: dict) -> None:
        self.multilabel_ = learned["multilabel"]
        self.num_classes_ = learned["num_classes"]
        self.curve_ = learned["curve"]


class LinearHead(Head):
    """Standardize, one affine map, softmax (or sigmoid per class for multi-label)."""

    def decision_function(self, codes: np.ndarray) -> np.ndarray:
        standardized = (_checked(codes, "codes").astype(np.float64) - self.mean_) / self.scale_
        return standardized @ self.coef_.T + self.intercept_

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        logits = self.decision_function(codes)
        if self.multilabel_:
            return 1.0 / (1.0 + np.exp(-logits))
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def logits_module(self) -> nn.Module:
        linear = nn.Linear(self.coef_.shape[1], self.coef_.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.coef_))
            linear.bias.copy_(torch.from_numpy(self.intercept_))
        return nn.Sequential(_standardize_module(self), linear).eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.asarray(getattr(self, name)))
                for name in ("mean_", "scale_", "coef_", "intercept_")}

    def _set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in ("mean_", "scale_", "coef_", "intercept_"):
            setattr(self, name, tensors[name].numpy())


class LogRegHead(LinearHead):
    """Logistic regression on standardized codes: multinomial, or one-vs-rest for multi-hot targets.

    `solver="lbfgs"` is scikit-learn's exact fit on codes loaded in memory; `solver="sgd"` streams the
    cache in mini-batches (the same objective, C·Σloss + ½‖w‖², as a mean loss with weight decay
    1/(C·n)). With several C values the best validation score wins (`validation_scores_`).
    """

    kind = "logreg"

    def __init__(self, C: float | list[float] = 1.0, max_iter: int = 1000, seed: int = 0, solver: str = "lbfgs",
                 training: "TrainingOptions | None" = None):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed
        self.solver = solver
        self.training = training

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "LogRegHead":
        if self.solver not in SOLVERS:
            raise HeadError(f"unknown solver '{self.solver}'; valid: {', '.join(SOLVERS)}")
        rows = _as_rows(codes, targets)
        rows.check_trainable()
        val = None if val_codes is None else _as_rows(val_codes, val_targets)
        grid = _grid(self.C, val)
        self.multilabel_, self.num_classes_ = rows.multilabel, rows.num_classes
        self.mean_, self.scale_ = standardization(rows)
        fits = self._fit_lbfgs(rows, grid) if self.solver == "lbfgs" else self._fit_sgd(rows, val, grid)
        self.validation_scores_, best = {}, None
        for C, (coef, intercept, curve) in zip(grid, fits):
            self.coef_, self.intercept_ = coef, intercept
            score = validation_score(val.targets, score_rows(self, val)) if val is not None else 0.0
            if val is not None:
                self.validation_scores_[C] = score
            if best is None or score > best[0]:
                best = (score, C, coef, intercept, curve)
        _, self.C_, self.coef_, self.intercept_, self.curve_ = best
        return self

    def _fit_lbfgs(self, rows: CodeRows, grid: list[float]) -> Iterator[tuple]:
        from sklearn.linear_model import LogisticRegression

        standardized = (rows.load().astype(np.float64) - self.mean_) / self.scale_
        for C in grid:
            model = lambda: LogisticRegression(C=C, max_iter=self.max_iter, random_state=self.seed)  # noqa: E731
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

    def _fit_sgd(self, rows: CodeRows, val: CodeRows | None, grid: list[float]) -> Iterator[tuple]:
        options = self.training or TrainingOptions()
        for C in grid:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                network = nn.Sequential(_standardize_module(self), nn.Linear(rows.width, rows.num_classes))
                options_for_c = TrainingOptions(**{**options.__dict__, "weight_decay": 1.0 / (C * len(rows))})
                curve = train_network(network, rows, val, options_for_c, self.seed, f"logreg C={C:g}")
            linear = network[1]
            yield (linear.weight.detach().double().cpu().numpy(), linear.bias.detach().double().cpu().numpy(), curve)

    def hyperparameters(self) -> dict:
        return {"C": self.C, "max_iter": self.max_iter, "seed": self.seed, "solver": self.solver,
                "training": None if self.training is None else self.training.__dict__}

    def state(self) -> dict:
        return {**self._learned(), "C_": self.C_, "validation_scores": _keyed(self.validation_scores_)}

    @classmethod
    def from_saved(cls, tensors: dict, hyperparameters: dict, state: dict) -> "LogRegHead":
        training = hyperparameters.get("training")
        head = cls(hyperparameters["C"], hyperparameters["max_iter"], hyperparameters["seed"],
                   hyperparameters["solver"], None if training is None else TrainingOptions(**training))
        head._set_tensors(tensors)
        head._restore(state)
        head.C_ = state["C_"]
        head.validation_scores_ = {float(k): v for k, v in state["validation_scores"].items()}
        return head


class SvmHead(LinearHead):
    """Linear SVMs one-vs-rest on standardized codes (scikit-learn's LinearSVC), the VOC07 linear-SVM
    protocol: each class keeps the cost with the best validation AP. Scores are margins; predict_proba
    passes them through softmax (sigmoid for multi-label), which ranks like the margins."""

    kind = "svm"

    def __init__(self, C: float | list[float] = 1.0, max_iter: int = 1000, seed: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "SvmHead":
        from sklearn.metrics import average_precision_score
        from sklearn.svm import LinearSVC

        rows = _as_rows(codes, targets)
        rows.check_trainable()
        val = None if val_codes is None else _as_rows(val_codes, val_targets)
        grid = _grid(self.C, val)
        self.multilabel_, self.num_classes_, self.curve_ = rows.multilabel, rows.num_classes, None
        self.mean_, self.scale_ = standardization(rows)
        standardized = (rows.load().astype(np.float64) - self.mean_) / self.scale_
        val_standardized = None if val is None else (val.load().astype(np.float64) - self.mean_) / self.scale_
        coef, intercept, costs, scores = [], [], [], []
        for c in range(rows.num_classes):
            positive = rows.targets[:, c] if rows.multilabel else (rows.targets == c).astype(np.int64)
            best = None
            for C in grid:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=_convergence_warning())
                    model = LinearSVC(C=C, max_iter=self.max_iter, random_state=self.seed).fit(standardized, positive)
                score = 0.0
                if val is not None:
                    val_positive = val.targets[:, c] if val.multilabel else (val.targets == c).astype(np.int64)
                    margins = model.decision_function(val_standardized)
                    score = float(average_precision_score(val_positive, margins)) if val_positive.any() else 0.0
                if best is None or score > best[0]:
                    best = (score, C, model)
            coef.append(best[2].coef_[0])
            intercept.append(best[2].intercept_[0])
            costs.append(best[1])
            scores.append(best[0])
        self.coef_, self.intercept_ = np.vstack(coef), np.array(intercept)
        self.C_ = costs
        self.validation_scores_ = scores if val is not None else []
        return self

    def hyperparameters(self) -> dict:
        return {"C": self.C, "max_iter": self.max_iter, "seed": self.seed}

    def state(self) -> dict:
        return {**self._learned(), "C_": self.C_, "validation_scores": self.validation_scores_}

    @classmethod
    def from_saved(cls, tensors: dict, hyperparameters: dict, state: dict) -> "SvmHead":
        head = cls(hyperparameters["C"], hyperparameters["max_iter"], hyperparameters["seed"])
        head._set_tensors(tensors)
        head._restore(state)
        head.C_, head.validation_scores_ = state["C_"], state["validation_scores"]
        return head


class MlpHead(Head):
    """Softmax MLP in torch (the neon recipe's Affine(4096, ReLU) + dropout + Affine(classes)), trained
    with mini-batches streamed from the cache; sigmoid outputs and binary cross-entropy for multi-hot."""

    kind = "mlp"

    def __init__(self, hidden: tuple[int, ...] = (4096,), dropout: float = 0.5, seed: int = 0,
                 training: "TrainingOptions | None" = None):
        self.hidden = tuple(int(width) for width in hidden)
        self.dropout = dropout
        self.seed = seed
        self.training = training or TrainingOptions()

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "MlpHead":
        if any(width < 1 for width in self.hidden):
            raise HeadError(f"--hidden widths must be positive, got {list(self.hidden)}")
        if not 0 <= self.dropout < 1:
            raise HeadError(f"--dropout must be in [0, 1), got {self.dropout}")
        rows = _as_rows(codes, targets)
        rows.check_trainable()
        val = None if val_codes is None else _as_rows(val_codes, val_targets)
        self.multilabel_, self.num_classes_ = rows.multilabel, rows.num_classes
        self.mean_, self.scale_ = standardization(rows)
        self.width_ = rows.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = self._network()
            self.curve_ = train_network(network, rows, val, self.training, self.seed, "mlp")
        self.network_ = network.cpu().eval()
        return self

    def _network(self) -> nn.Sequential:
        layers: list[nn.Module] = [_standardize_module(self)]
        width = self.width_
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = hidden
        layers.append(nn.Linear(width, self.num_classes_))
        return nn.Sequential(*layers)

    def logits_module(self) -> nn.Module:
        return copy.deepcopy(self.network_).eval()

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.from_numpy(_checked(codes, "codes").astype(np.float32))
        activation = self._activation()
        with torch.inference_mode():  # the fitted network itself: no copy per call (score_rows calls per block)
            return torch.cat([activation(self.network_(batch)) for batch in codes.split(4096)]).double().numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"network.{name}": tensor for name, tensor in self.network_.state_dict().items()}

    def hyperparameters(self) -> dict:
        return {"hidden": list(self.hidden), "dropout": self.dropout, "seed": self.seed,
                "training": self.training.__dict__}

    def state(self) -> dict:
        return {**self._learned(), "width": self.width_}

    @classmethod
    def from_saved(cls, tensors: dict, hyperparameters: dict, state: dict) -> "MlpHead":
        head = cls(hyperparameters["hidden"], hyperparameters["dropout"], hyperparameters["seed"],
                   TrainingOptions(**hyperparameters["training"]))
        head._restore(state)
        head.width_ = state["width"]
        network_state = {name.removeprefix("network."): t for name, t in tensors.items()}
        head.mean_ = network_state["0.mean"].double().numpy()
        head.scale_ = network_state["0.scale"].double().numpy()
        head.network_ = head._network()
        head.network_.load_state_dict(network_state)
        head.network_.eval()
        return head


HEAD_KINDS = {LogRegHead.kind: LogRegHead, MlpHead.kind: MlpHead, SvmHead.kind: SvmHead}


def _grid(C, val) -> list[float]:
    grid = [float(c) for c in (C if isinstance(C, (list, tuple)) else [C])]
    if any(not c > 0 for c in grid):
        raise HeadError(f"--C values must be positive, got {grid}")
    if len(grid) > 1 and val is None:
        raise HeadError("several C values need a validation split to choose from; pass --val-cache or --val-fraction")
    return grid


def _keyed(scores: dict) -> dict:
    return {str(key): value for key, value in scores.items()}


def _convergence_warning():
    from sklearn.exceptions import ConvergenceWarning

    return ConvergenceWarning


def _standardize_module(head) -> Standardize:
    return Standardize(torch.from_numpy(head.mean_).float(), torch.from_numpy(head.scale_).float())


# ---------------------------------------------------------------- mini-batch training


@dataclass
class TrainingOptions:
    """How a torch head trains: optimizer, learning-rate schedule, epochs, early stopping."""

    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.05 for SGD, 0.001 for Adam
    lr_steps: tuple[int, ...] = ()  # epochs after which lr is multiplied by lr_factor; empty: cosine to zero
    lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    max_epochs: int = 20
    early_stop: bool = False
    patience: int = 3
    device: str = "cpu"
    quiet: bool = True

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise HeadError(f"unknown --optimizer {self.optimizer}; valid: {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not self.lr > 0:
            raise HeadError(f"--lr must be positive, got {self.lr}")
        if any(step < 1 for step in self.lr_steps) or not 0 < self.lr_factor <= 1:
            raise HeadError(f"--lr-steps must be epochs ≥ 1 and --lr-factor in (0, 1], got {list(self.lr_steps)} "
                            f"and {self.lr_factor}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise HeadError("--batch-size, --max-epochs and --patience must be at least 1")


def train_network(network: nn.Module, rows: CodeRows, val: CodeRows | None, options: TrainingOptions,
                  seed: int, describe: str) -> list[dict]:
    """Train `network` (codes -> logits) in place; returns the per-epoch curve.

    Each epoch streams the rows in a seeded shuffled block order. With `early_stop`, training stops
    after `patience` epochs without a lower validation loss, and the best epoch's weights are kept.
    """
    from tqdm import tqdm

    options.check()
    if options.early_stop and val is None:
        raise HeadError("--early-stop needs a validation split; pass --val-cache or --val-fraction")
    device = resolve_device(options.device)
    network.to(device)
    decayed = [p for p in network.parameters() if p.ndim > 1]
    others = [p for p in network.parameters() if p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": options.weight_decay}, {"params": others, "weight_decay": 0.0}]
    if options.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=options.lr or 0.05, momentum=options.momentum)
    else:
        optimizer = torch.optim.Adam(groups, lr=options.lr or 0.001)
    if options.lr_steps:  # the neon recipe's step drops
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(options.lr_steps), options.lr_factor)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.max_epochs)
    loss_function = nn.BCEWithLogitsLoss() if rows.multilabel else nn.CrossEntropyLoss()
    curve, best = [], (math.inf, None, 0)
    progress = tqdm(range(options.max_epochs), desc=describe, unit="epoch", disable=options.quiet, dynamic_ncols=True)
    for epoch in progress:
        network.train()
        rng = np.random.default_rng([seed, epoch])
        total_loss, seen = 0.0, 0
        for codes, targets in _mini_batches(rows, rng, options.batch_size, device):
            loss = loss_function(network(codes), targets)
            if not torch.isfinite(loss):
                raise HeadError(f"the training loss became {loss.item()} in epoch {epoch + 1}; "
                                "lower --lr or check the cache with tl info --verify")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(codes)
            seen += len(codes)
        point = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": total_loss / seen}
        schedule.step()
        if val is not None:
            point.update(_evaluate_network(network, val, loss_function, device))
            if point["val_loss"] < best[0]:
                best = (point["val_loss"], copy.deepcopy(network.state_dict()), epoch)
        curve.append(point)
        progress.set_postfix({k: f"{v:.4f}" for k, v in point.items() if k not in ("epoch", "lr")})
        if options.early_stop and epoch - best[2] >= options.patience:
            break
    if options.early_stop and best[1] is not None:
        network.load_state_dict(best[1])
        for point in curve:
            point["kept"] = point["epoch"] == best[2] + 1
    network.cpu().eval()
    return curve


def _mini_batches(rows: CodeRows, rng, batch_size: int, device: torch.device):
    """(codes, targets) mini-batches on `device`, block by block in the seeded order; for CUDA each block
    is read into pinned memory and its batches copied without blocking."""
    for positions, codes in rows.blocks(rng):
        targets = rows.targets[positions]
        codes_tensor = pinned(torch.from_numpy(codes), device)
        targets_tensor = pinned(torch.from_numpy(targets.astype(np.float32) if rows.multilabel else targets), device)
        for start in range(0, len(positions), batch_size):
            yield (to_device(codes_tensor[start:start + batch_size], device),
                   to_device(targets_tensor[start:start + batch_size], device))


def _evaluate_network(network: nn.Module, val: CodeRows, loss_function, device) -> dict:
    network.eval()
    probabilities = np.empty((len(val), network[-1].out_features))
    total_loss = 0.0
    with torch.inference_mode():
        for positions, codes in val.blocks():
            logits = network(torch.from_numpy(codes).to(device))
            targets = torch.from_numpy(val.targets[positions].astype(np.float32) if val.multilabel
                                       else val.targets[positions]).to(device)
            total_loss += loss_function(logits, targets).item() * len(positions)
            activation = torch.sigmoid(logits) if val.multilabel else torch.softmax(logits, dim=1)
            probabilities[positions] = activation.double().cpu().numpy()
    metric = "val_map" if val.multilabel else "val_accuracy"
    return {"val_loss": total_loss / len(val), metric: validation_score(val.targets, probabilities)}


# ---------------------------------------------------------------- head files


def save_head(head: Head, path: Path, metadata: dict) -> None:
    """One file: the head's tensors and a JSON string (classes, layer, cache key, hyperparameters...)."""
    document = {"format": HEAD_FORMAT, "kind": head.kind, "tl_version": __version__,
                "hyperparameters": head.hyperparameters(), "state": head.state(), **metadata}
    write_payload({"metadata": json.dumps(document, allow_nan=False), "tensors": head.tensors()}, Path(path),
                  "head file")


def payload_digest(payload) -> str:
    """SHA-256 over a payload's structure, tensors (dtype, shape, bytes) and plain values, in key order:
    a bit flipped anywhere in the file's content changes it."""
    digest = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                visit(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    visit(payload)
    return digest.hexdigest()


def write_payload(payload: dict, path: Path, what: str) -> None:
    """A tl file (head, model, checkpoint) written atomically with its content checksum; a full disk
    or a folder as `path` is one line, and no temporary file stays behind."""
    buffer = io.BytesIO()
    # serialised in memory, written with plain file I/O: torch.save reports a full disk as an opaque
    # RuntimeError ("unexpected pos"), a plain write as ENOSPC/EFBIG
    torch.save({**payload, CHECKSUM: payload_digest(payload)}, buffer)
    write_bytes(path, buffer.getbuffer(), what)


def read_payload(path: Path, kind: str, remedy: str, error=HeadError, keys: tuple[str, ...] = (),
                 require_checksum: bool = False) -> tuple[dict, dict]:
    """(payload, its JSON metadata) of a tl file (head, model, checkpoint): tensors and plain data only,
    loaded with weights_only, so nothing in the file is executed. A missing or foreign file, or one
    without `keys`, is a one-line `error` naming the `kind` of file and the `remedy`; so is a file whose
    content checksum does not match (files from before checksums load unless `require_checksum`)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{kind} {path} is a folder; pass the file inside it")
    if not path.is_file():
        raise error(f"{kind} {path} does not exist; {remedy}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        metadata = json.loads(payload["metadata"])
        for key in keys:
            payload[key]
    except Exception:  # any unpickling, JSON or missing-key failure means the same thing to the user
        raise error(f"{path} is not a tl {kind}; {remedy}") from None
    recorded = payload.pop(CHECKSUM, None)
    if recorded is None and require_checksum:
        raise error(f"{kind} {path} was written by a tl without content checksums; {remedy}")
    if recorded is not None and recorded != payload_digest(payload):
        raise error(f"{kind} {path} is damaged (its checksum does not match its content); {remedy}")
    return payload, metadata


def load_head(path: Path):
    """(head, metadata) from a file written by `save_head`; nothing in the file is executed."""
    payload, metadata = read_payload(path, "head file", "train one with tl fit-head", keys=("tensors",))
    return head_from_payload(metadata, payload["tensors"], path)


def head_from_payload(metadata, tensors: dict, path) -> tuple[Head, dict]:
    """(head, metadata) from a head file's two parts, wherever they were stored."""
    if not isinstance(metadata, dict) or metadata.get("format") != HEAD_FORMAT \
            or metadata.get("kind") not in HEAD_KINDS:
        raise HeadError(f"{path} is not a {HEAD_FORMAT} head file; train one with tl fit-head")
    try:
        head = HEAD_KINDS[metadata["kind"]].from_saved(tensors, metadata["hyperparameters"], metadata["state"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise HeadError(f"{path} is a damaged head file ({type(exc).__name__}: {exc}); train it again") from None
    return head, metadata


# ---------------------------------------------------------------- fitting on a cache


@dataclass
class FitHeadConfig:
    cache: Path
    out: Path
    layer: str | None = None  # None: the cache's only layer
    head: str = "logreg"
    C: tuple[float, ...] = (1.0,)
    solver: str = "lbfgs"
    hidden: tuple[int, ...] = (4096,)
    dropout: float = 0.5
    val_cache: Path | None = None
    val_fraction: float | None = None
    max_iter: int = 1000
    block_rows: int = 4096
    seed: int = 0
    training: TrainingOptions = field(default_factory=TrainingOptions)


@dataclass
class FitHeadResult:
    out: Path
    layer: str
    train_rows: int
    val_rows: int
    metric: str  # accuracy, or mAP for multi-label caches
    train_score: float
    val_score: float | None
    chosen: dict
    epochs: int | None


def fit_head(config: FitHeadConfig) -> FitHeadResult:
    """Train one head on one layer of a cache and save it with the metadata later stages check."""
    from cache.reader import CacheReader

    if config.head not in HEAD_KINDS:
        raise HeadError(f"unknown head '{config.head}'; valid: {', '.join(HEAD_KINDS)}")
    if config.block_rows < 1:
        raise HeadError(f"--block-rows must be at least 1, got {config.block_rows}")
    if Path(config.out).is_dir():  # found before the training, not after it
        raise HeadError(f"--out {config.out} is a folder; name a head file such as {Path(config.out) / 'head.pt'}")
    reader = CacheReader(config.cache)
    if reader.num_rows == 0:
        raise HeadError(f"cache {config.cache} has no rows; extract images into it first")
    layer = config.layer or _only_layer(reader)
    rows = CodeRows.from_cache(reader, layer, block_rows=config.block_rows)
    val = None
    if config.val_cache is not None:
        val_reader = CacheReader(config.val_cache)
        if val_reader.classes != reader.classes:
            raise HeadError(f"{config.val_cache} has other classes than {config.cache}; use caches of one data set")
        check_codes_match(codes_key(reader.manifest), val_reader.manifest, f"{config.val_cache}",
                          f"{config.cache}")
        val = CodeRows.from_cache(val_reader, layer, block_rows=config.block_rows)
    elif config.val_fraction is not None:
        train_rows, val_rows = _validation_split(rows.targets, config.val_fraction, config.seed)
        all_targets = rows.targets
        rows = CodeRows.from_cache(reader, layer, train_rows, config.block_rows, all_targets)
        val = CodeRows.from_cache(reader, layer, val_rows, config.block_rows, all_targets)
    head = _new_head(config)
    head.fit(rows, val_codes=val)
    save_head(head, config.out, {
        "classes": reader.classes,
        "layer": layer,
        "width": reader.taps[layer],
        "codes_key": codes_key(reader.manifest),
        "cache": str(config.cache),
        "train_rows": len(rows),
    })
    chosen = {"C": head.C_} if hasattr(head, "C_") else {}
    if head.curve_:
        chosen["epochs"] = len(head.curve_)
    return FitHeadResult(Path(config.out), layer, len(rows), 0 if val is None else len(val),
                         "mAP" if rows.multilabel else "accuracy",
                         validation_score(rows.targets, score_rows(head, rows)),
                         None if val is None else validation_score(val.targets, score_rows(head, val)),
                         chosen, len(head.curve_) if head.curve_ else None)


def _new_head(config: FitHeadConfig) -> Head:
    C = list(config.C) if len(config.C) > 1 else config.C[0]
    if config.head == "mlp":
        return MlpHead(config.hidden, config.dropout, config.seed, config.training)
    if config.head == "svm":
        return SvmHead(C, config.max_iter, config.seed)
    return LogRegHead(C, config.max_iter, config.seed, config.solver, config.training)


def _validation_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of a seeded split: stratified by class for single-label targets."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise HeadError(f"--val-fraction must be between 0 and 1, got {fraction}")
    try:
        train_rows, val_rows = train_test_split(np.arange(len(targets)), test_size=fraction, random_state=seed,
                                                stratify=None if targets.ndim == 2 else targets)
    except ValueError as exc:
        raise HeadError(f"cannot split off a stratified validation set: {exc}; "
                        "raise --val-fraction or pass --val-cache") from None
    return np.sort(train_rows), np.sort(val_rows)


def codes_key(manifest: dict) -> dict:
    """What decides the meaning of a code; caches that differ here cannot share a head."""
    return {name: manifest["key"][name] for name in ("backbone", "weights", "preprocessing", "patches")}


def check_codes_match(expected: dict, manifest: dict, what: str, reference: str) -> None:
    """Refuse a cache whose codes mean something else than `expected`, naming every difference."""
    from cache.manifest import key_differences

    found = codes_key(manifest)
    if found != expected:
        differences = "; ".join(key_differences(expected, found))
        raise HeadError(f"{what} holds other codes than {reference} ({differences}); "
                        "extract both with the same backbone, weights and preprocessing")


def _only_layer(reader) -> str:
    layers = list(reader.taps)
    if len(layers) != 1:
        raise HeadError(f"cache {reader.root} has several layers ({', '.join(layers)}); choose one with --layer")
    return layers[0]
