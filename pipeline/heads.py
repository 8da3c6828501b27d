"""Stage two: light classifiers on cached codes, scikit-learn style (`fit`, `predict_proba`, `predict`).

Every head turns into a torch module (`to_module`) and saves to one file that loads without running
code: tensors plus JSON metadata, read back with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.errors import TLError

HEAD_FORMAT = "tl-head/1"


class HeadError(TLError):
    """A head file that is not one, or a head used on codes it was not trained for."""


class Standardize(nn.Module):
    """(x - mean) / scale, the scaler every linear head is fitted behind."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) / self.scale


class LogRegHead:
    """Multinomial logistic regression on standardized codes; with several C values, the one with the
    best validation accuracy is kept (`validation_scores_` records each)."""

    kind = "logreg"

    def __init__(self, C: float | list[float] = 1.0, max_iter: int = 1000, seed: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, codes: np.ndarray, targets: np.ndarray, val_codes: np.ndarray | None = None,
            val_targets: np.ndarray | None = None) -> "LogRegHead":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        codes = _checked(codes, "training codes")
        targets = np.asarray(targets)
        if len(np.unique(targets)) < 2:
            raise HeadError("the training codes hold a single class; a classifier needs at least two")
        grid = self.C if isinstance(self.C, (list, tuple)) else [self.C]
        if len(grid) > 1 and val_codes is None:
            raise HeadError("several C values need a validation split to choose from; pass --val-cache or --val-fraction")
        scaler = StandardScaler().fit(codes)
        standardized = scaler.transform(codes)
        if val_codes is not None:
            val_standardized = scaler.transform(_checked(val_codes, "validation codes"))
        self.validation_scores_ = {}
        best = None
        for C in grid:
            model = LogisticRegression(C=float(C), max_iter=self.max_iter, random_state=self.seed)
            model.fit(standardized, targets)
            if val_codes is not None:
                score = float(np.mean(model.predict(val_standardized) == np.asarray(val_targets)))
                self.validation_scores_[float(C)] = score
            else:
                score = 0.0
            if best is None or score > best[0]:
                best = (score, float(C), model)
        _, self.C_, model = best
        self.classes_ = model.classes_
        self.mean_ = scaler.mean_
        self.scale_ = scaler.scale_
        self.coef_ = model.coef_
        self.intercept_ = model.intercept_
        if self.coef_.shape[0] == 1:  # scikit-learn keeps one row for two classes: logit(p1) = w.x + b
            self.coef_ = np.vstack([-self.coef_ / 2, self.coef_ / 2])
            self.intercept_ = np.array([-self.intercept_[0] / 2, self.intercept_[0] / 2])
        return self

    def decision_function(self, codes: np.ndarray) -> np.ndarray:
        standardized = (_checked(codes, "codes") - self.mean_) / self.scale_
        return standardized @ self.coef_.T + self.intercept_

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        logits = self.decision_function(codes)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def predict(self, codes: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(codes), axis=1)]

    def to_module(self) -> nn.Module:
        """codes -> class probabilities, the same function as `predict_proba`."""
        linear = nn.Linear(self.coef_.shape[1], self.coef_.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.coef_))
            linear.bias.copy_(torch.from_numpy(self.intercept_))
        standardize = Standardize(torch.from_numpy(self.mean_).float(), torch.from_numpy(self.scale_).float())
        return nn.Sequential(standardize, linear, nn.Softmax(dim=1)).eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.asarray(getattr(self, name)))
                for name in ("mean_", "scale_", "coef_", "intercept_", "classes_")}

    def hyperparameters(self) -> dict:
        return {"C": self.C, "max_iter": self.max_iter, "seed": self.seed, "C_": self.C_,
                "validation_scores": self.validation_scores_}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> "LogRegHead":
        head = cls(hyperparameters["C"], hyperparameters["max_iter"], hyperparameters["seed"])
        for name, tensor in tensors.items():
            setattr(head, name, tensor.numpy())
        head.C_ = hyperparameters["C_"]
        head.validation_scores_ = {float(k): v for k, v in hyperparameters["validation_scores"].items()}
        return head


HEAD_KINDS = {LogRegHead.kind: LogRegHead}


def save_head(head, path: Path, metadata: dict) -> None:
    """One file: the head's tensors and a JSON string (classes, layer, cache key, hyperparameters...)."""
    path = Path(path)
    document = {"format": HEAD_FORMAT, "kind": head.kind, "tl_version": __version__,
                "hyperparameters": head.hyperparameters(), **metadata}
    payload = {"metadata": json.dumps(document), "tensors": head.tensors()}
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, temporary)
        temporary.replace(path)
    except OSError as exc:
        raise HeadError(f"cannot write head file {path}: {exc.strerror}; choose another --out") from None


def load_head(path: Path):
    """(head, metadata) from a file written by `save_head`; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file {path} does not exist; train one with tl fit-head")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        metadata = json.loads(payload["metadata"])
        tensors = payload["tensors"]
    except Exception:  # any unpickling or JSON failure means the same thing to the user
        raise HeadError(f"{path} is not a tl head file; train one with tl fit-head") from None
    if metadata.get("format") != HEAD_FORMAT or metadata.get("kind") not in HEAD_KINDS:
        raise HeadError(f"{path} is not a {HEAD_FORMAT} head file; train one with tl fit-head")
    head = HEAD_KINDS[metadata["kind"]].from_saved(tensors, metadata["hyperparameters"])
    return head, metadata


def _checked(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or len(codes) == 0:
        raise HeadError(f"{what} are empty; extract a cache with at least one image per class")
    if not np.isfinite(codes).all():
        row = int(np.argmax(~np.isfinite(codes).all(axis=1)))
        raise HeadError(f"{what} hold NaN or Inf (row {row}); re-extract the cache")
    return codes


# ---------------------------------------------------------------- fitting on a cache


@dataclass
class FitHeadConfig:
    cache: Path
    out: Path
    layer: str | None = None  # None: the cache's only layer
    head: str = "logreg"
    C: tuple[float, ...] = (1.0,)
    val_cache: Path | None = None
    val_fraction: float | None = None
    max_iter: int = 1000
    seed: int = 0


@dataclass
class FitHeadResult:
    out: Path
    layer: str
    train_rows: int
    val_rows: int
    train_accuracy: float
    val_accuracy: float | None
    chosen: dict


def fit_head(config: FitHeadConfig) -> FitHeadResult:
    """Train one head on one layer of a cache and save it with the metadata later stages check."""
    from cache.manifest import key_differences
    from cache.reader import CacheReader

    if config.head not in HEAD_KINDS:
        raise HeadError(f"unknown head '{config.head}'; available now: {', '.join(HEAD_KINDS)}")
    reader = CacheReader(config.cache)
    if reader.num_rows == 0:
        raise HeadError(f"cache {config.cache} has no rows; extract images into it first")
    layer = config.layer or _only_layer(reader)
    codes, targets = reader.load(layer), reader.load_column("target")
    val_codes = val_targets = None
    if config.val_cache is not None:
        val_reader = CacheReader(config.val_cache)
        if val_reader.manifest["classes"] != reader.manifest["classes"]:
            raise HeadError(f"{config.val_cache} has other classes than {config.cache}; use caches of one data set")
        if codes_key(val_reader.manifest) != codes_key(reader.manifest):
            differences = "; ".join(key_differences(codes_key(reader.manifest), codes_key(val_reader.manifest)))
            raise HeadError(f"{config.val_cache} holds other codes than {config.cache} ({differences}); "
                            "extract both with the same backbone, weights and preprocessing")
        val_codes, val_targets = val_reader.load(layer), val_reader.load_column("target")
    elif config.val_fraction is not None:
        if not 0 < config.val_fraction < 1:
            raise HeadError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
        from sklearn.model_selection import train_test_split

        try:
            train_rows, val_rows = train_test_split(np.arange(len(targets)), test_size=config.val_fraction,
                                                    random_state=config.seed, stratify=targets)
        except ValueError as exc:
            raise HeadError(f"cannot split off a stratified validation set: {exc}") from None
        val_codes, val_targets = codes[val_rows], targets[val_rows]
        codes, targets = codes[train_rows], targets[train_rows]
    head = LogRegHead(list(config.C) if len(config.C) > 1 else config.C[0], config.max_iter, config.seed)
    head.fit(codes, targets, val_codes, val_targets)
    save_head(head, config.out, {
        "classes": reader.manifest["classes"],
        "layer": layer,
        "width": reader.taps[layer],
        "codes_key": codes_key(reader.manifest),
        "cache": str(config.cache),
        "train_rows": int(len(targets)),
    })
    val_accuracy = None if val_codes is None else float(np.mean(head.predict(val_codes) == val_targets))
    return FitHeadResult(Path(config.out), layer, len(targets), 0 if val_codes is None else len(val_targets),
                         float(np.mean(head.predict(codes) == targets)), val_accuracy, {"C": head.C_})


def codes_key(manifest: dict) -> dict:
    """What decides the meaning of a code; caches that differ here cannot share a head."""
    return {name: manifest["key"][name] for name in ("backbone", "weights", "preprocessing", "patches")}


def _only_layer(reader) -> str:
    layers = list(reader.taps)
    if len(layers) != 1:
        raise HeadError(f"cache {reader.root} has several layers ({', '.join(layers)}); choose one with --layer")
    return layers[0]
