"""The head kinds of stage two: light classifiers on codes, scikit-learn style (`fit`, `predict_proba`,
`predict`), registered once in HEAD_KINDS; each turns into a torch module (`to_module`) for stage three."""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from pipeline.code_rows import (CodeRows, as_rows, checked_codes, score_rows, standardization, standardized_codes,
                                validation_score)
from pipeline.errors import HeadError, listed
from pipeline.linear_fits import cost_grid, costs_of, logreg_fits, svm_fits
from pipeline.training import Standardize, Trainee, TrainingOptions, output_activation, probabilities, train_networks

SOLVERS = ("lbfgs", "sgd")
HEAD_KINDS: dict[str, type["Head"]] = {}  # --head values, filled by register_head
SOLVER, MAX_ITER, HIDDEN, DROPOUT = "lbfgs", 1000, (4096,), 0.5  # defaults of the heads and of fit-head
MINI_BATCH = tuple(option.name for option in dataclasses.fields(TrainingOptions)  # how mini-batches train (mlp and
                   if option.name not in ("weight_decay", "quiet"))       # sgd; an sgd logreg's decay comes from C)


def register_head(kind: type["Head"]) -> type["Head"]:
    """Class decorator: make a head kind available under its `kind` name; a second of one name is refused."""
    if not kind.kind or kind.kind in HEAD_KINDS:
        raise HeadError(f"a head kind named '{kind.kind}' is already registered; choose another name")
    HEAD_KINDS[kind.kind] = kind
    return kind


class Head(ABC):
    """What every head shares: class count, single or multi-label output, prediction, saving.

    A head kind is one subclass registered with `register_head`: its `kind` names it (`--head`), `help`
    describes it in `tl fit-head --help`, `from_config` builds it from a fit-head config, `tensors` and
    `from_saved` are its head file, `from_module` rebuilds it from its module's state in a model file, and
    `options` (or `reads`) names the options it reads, so that fit-head warns of the others.
    """

    kind, help = "", ""  # its --head name and its line in tl fit-head --help
    options: tuple[str, ...] | None = None  # what `reads` returns, when the solver changes nothing
    curve_: list[dict] | None = None

    @classmethod
    def sweep_axes(cls, solver: str) -> tuple[str, ...]:
        """The `tl sweep` grid axes ("C", "lr", "hidden") whose values make different heads of this kind."""
        return ("C",)

    @classmethod
    def reads(cls, solver: str) -> tuple[str, ...] | None:
        """The options of fit-head and sweep it reads beyond every head's; None: not said (no warnings)."""
        return cls.options

    def chosen(self) -> float | None:  # the one setting validation chose while fitting (a sweep records it)
        return None

    @property
    def streamed(self) -> bool:
        """Trained by mini-batches: `trainees(rows, val)`, then `train_networks`, then `adopt(curves)`, so
        that many heads of one layer (a sweep) train in one pass over the codes."""
        return False

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> "Head":
        """An unfitted head with the hyperparameters of a `pipeline.fit_head.FitHeadConfig`."""

    @classmethod
    @abstractmethod
    def from_saved(cls, tensors: dict, hyperparameters: dict, state: dict) -> "Head":
        """The fitted head from what `tensors`, `hyperparameters` and `state` returned."""

    @classmethod
    def from_module(cls, module_state: dict, hyperparameters: dict, state: dict) -> "Head":
        """The fitted head from the state dict of its `logits_module` (how a model file keeps it)."""
        return cls.from_saved(cls._tensors_of_module(module_state), hyperparameters, state)

    @staticmethod
    @abstractmethod
    def _tensors_of_module(module_state: dict) -> dict:
        """The `tensors` of a head whose `logits_module` has this state dict."""

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
        return output_activation(self.multilabel_)

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
        standardized = (checked_codes(codes, "codes").astype(np.float64) - self.mean_) / self.scale_
        return standardized @ self.coef_.T + self.intercept_

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        return self.proba_of_logits(self.decision_function(codes))

    def proba_of_logits(self, logits: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return probabilities(torch.from_numpy(logits), self.multilabel_)

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

    @staticmethod
    def _tensors_of_module(module_state: dict) -> dict:
        # logits_module is Sequential(Standardize, Linear), kept in float32
        return {"mean_": module_state["0.mean"].double(), "scale_": module_state["0.scale"].double(),
                "coef_": module_state["1.weight"].double(), "intercept_": module_state["1.bias"].double()}


@register_head
class LogRegHead(LinearHead):
    """Logistic regression on standardized codes: multinomial, or one-vs-rest for multi-hot targets.

    `solver="lbfgs"` is scikit-learn's exact fit on codes loaded in memory; `solver="sgd"` streams the
    cache in mini-batches (the same objective, C·Σloss + ½‖w‖², as a mean loss with weight decay
    1/(C·n)). With several C values the best validation score wins (`validation_scores_`).
    """

    kind = "logreg"
    help = "logistic regression (exact L-BFGS on codes in memory, or --solver sgd streamed)"

    @classmethod
    def from_config(cls, config) -> "LogRegHead":
        return cls(costs_of(config.C), config.max_iter, config.seed, config.solver, config.training)

    def __init__(self, C: float | list[float] = 1.0, max_iter: int = MAX_ITER, seed: int = 0, solver: str = SOLVER,
                 training: "TrainingOptions | None" = None):
        if solver not in SOLVERS:  # settings are refused when the head is made: before any codes are read
            raise HeadError(f"unknown solver '{solver}'; valid: {', '.join(SOLVERS)}")
        self.C, self.max_iter, self.seed, self.solver, self.training = C, max_iter, seed, solver, training

    @classmethod
    def sweep_axes(cls, solver: str) -> tuple[str, ...]:
        return ("C", "lr") if solver == "sgd" else ("C",)  # sgd: a learning rate per cost

    @classmethod
    def reads(cls, solver: str) -> tuple[str, ...]:
        return ("C", "solver", *(MINI_BATCH if solver == "sgd" else ("max_iter",)))

    def chosen(self) -> float | None:
        return self.C_

    @property
    def streamed(self) -> bool:
        return self.solver == "sgd"

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "LogRegHead":
        rows, val = as_rows(codes, targets), None if val_codes is None else as_rows(val_codes, val_targets)
        if self.streamed:  # every C in one pass over the codes
            self.adopt(train_networks(self.trainees(rows, val), rows, val, self.seed))
            return self
        grid = self._begin(rows, val)
        quiet = self.training is None or self.training.quiet
        self._choose(rows, val, logreg_fits(standardized_codes(rows, self.mean_, self.scale_), rows, grid,
                                            self.max_iter, self.seed, quiet))
        return self

    def _begin(self, rows: CodeRows, val: CodeRows | None) -> list[float]:
        rows.check_trainable()
        grid = cost_grid(self.C, val)
        self.multilabel_, self.num_classes_ = rows.multilabel, rows.num_classes
        self.mean_, self.scale_ = standardization(rows)
        return grid

    def trainees(self, rows: CodeRows, val: CodeRows | None) -> list[Trainee]:
        """A linear network per C (weight decay 1/(C·n)), to train on the same mini-batches."""
        options, pending = self.training or TrainingOptions(), []
        for C in self._begin(rows, val):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                network = nn.Sequential(_standardize_module(self), nn.Linear(rows.width, rows.num_classes))
            decay = TrainingOptions(**{**options.__dict__, "weight_decay": 1.0 / (C * len(rows))})
            pending.append(Trainee(network, decay, f"logreg C={C:g}"))
        self._pending = (rows, val, pending)
        return pending

    def adopt(self, curves: list[list[dict]]) -> None:
        rows, val, pending = self._pending
        del self._pending
        self._choose(rows, val, ((t.network[1].weight.detach().double().cpu().numpy(),
                                  t.network[1].bias.detach().double().cpu().numpy(), curve)
                                 for t, curve in zip(pending, curves)))

    def _choose(self, rows: CodeRows, val: CodeRows | None, fits) -> None:
        """Keep the fit of the best validation score (the only one without validation); a fit that diverged
        (--solver sgd) only when every one did: its NaN probabilities may still score higher."""
        grid = cost_grid(self.C, val)
        self.validation_scores_, best = {}, None
        for C, (coef, intercept, curve) in zip(grid, fits):
            self.coef_, self.intercept_ = coef, intercept
            score = validation_score(val.targets, score_rows(self, val)) if val is not None else 0.0
            if val is not None:
                self.validation_scores_[C] = score
            rank = (not any(point.get("diverged") for point in curve or []), score)
            if best is None or rank > best[0]:
                best = (rank, C, coef, intercept, curve)
        _, self.C_, self.coef_, self.intercept_, self.curve_ = best

    def hyperparameters(self) -> dict:
        return {"C": self.C, "max_iter": self.max_iter, "seed": self.seed, "solver": self.solver,
                "training": None if self.training is None else self.training.__dict__}

    def state(self) -> dict:
        return {**self._learned(), "C_": self.C_,  # JSON keys are text
                "validation_scores": {str(C): score for C, score in self.validation_scores_.items()}}

    @classmethod
    def from_saved(cls, tensors: dict, hyperparameters: dict, state: dict) -> "LogRegHead":
        training = hyperparameters.get("training")
        head = cls(hyperparameters["C"], hyperparameters["max_iter"], hyperparameters["seed"],
                   hyperparameters["solver"], None if training is None else TrainingOptions.from_saved(training))
        head._set_tensors(tensors)
        head._restore(state)
        head.C_ = state["C_"]
        head.validation_scores_ = {float(k): v for k, v in state["validation_scores"].items()}
        return head


@register_head
class SvmHead(LinearHead):
    """Linear SVMs one-vs-rest on standardized codes (scikit-learn's LinearSVC), the VOC07 linear-SVM
    protocol: each class keeps the cost with the best validation AP. Scores are margins; predict_proba
    passes them through softmax (sigmoid for multi-label), which ranks like the margins."""

    kind = "svm"
    help = "linear SVMs one-vs-rest, a cost per class chosen on validation AP (the VOC07 protocol)"
    options = ("C", "max_iter")

    @classmethod
    def from_config(cls, config) -> "SvmHead":
        return cls(costs_of(config.C), config.max_iter, config.seed, config.training.quiet)

    def __init__(self, C: float | list[float] = 1.0, max_iter: int = MAX_ITER, seed: int = 0, quiet: bool = True):
        self.C = C
        self.max_iter = max_iter
        self.seed = seed
        self.quiet = quiet  # how it runs, not what it learns: not saved

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "SvmHead":
        rows = as_rows(codes, targets)
        rows.check_trainable()
        val = None if val_codes is None else as_rows(val_codes, val_targets)
        grid = cost_grid(self.C, val)
        self.multilabel_, self.num_classes_, self.curve_ = rows.multilabel, rows.num_classes, None
        self.mean_, self.scale_ = standardization(rows)
        coef, intercept, costs, scores = svm_fits(standardized_codes(rows, self.mean_, self.scale_), rows, val,
                                                  None if val is None else standardized_codes(val, self.mean_, self.scale_),
                                                  grid, self.max_iter, self.seed, self.quiet)
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


def layout_text(hidden) -> str:
    """An mlp's hidden widths as tl names them (--hidden 512x256; 0: no hidden layer)."""
    return "x".join(str(width) for width in hidden) or "0"


@register_head
class MlpHead(Head):
    """Softmax MLP in torch (the neon recipe's Affine(4096, ReLU) + dropout + Affine(classes)), trained
    with mini-batches streamed from the cache; sigmoid outputs and binary cross-entropy for multi-hot."""

    kind = "mlp"
    help = "softmax MLP in torch (--hidden, --dropout), mini-batches streamed from the cache"
    options = ("hidden", "dropout", "weight_decay", *MINI_BATCH)

    @classmethod
    def sweep_axes(cls, solver: str) -> tuple[str, ...]:
        return ("hidden", "lr")

    @classmethod
    def from_config(cls, config) -> "MlpHead":
        return cls(config.hidden, config.dropout, config.seed, config.training)

    def __init__(self, hidden: tuple[int, ...] = HIDDEN, dropout: float = DROPOUT, seed: int = 0,
                 training: "TrainingOptions | None" = None):
        self.hidden = tuple(int(width) for width in hidden)
        if any(width < 1 for width in self.hidden):  # refused when the head is made: before any codes are read
            raise HeadError(f"--hidden widths must be positive, got {listed(self.hidden)}; for no hidden layer "
                            "give an empty --hidden '' (sweep's --hidden 0)")
        if not 0 <= dropout < 1:
            raise HeadError(f"--dropout must be in [0, 1), got {dropout}")
        self.dropout, self.seed, self.training = dropout, seed, training or TrainingOptions()

    @property
    def streamed(self) -> bool:
        return True

    def fit(self, codes, targets=None, val_codes=None, val_targets=None) -> "MlpHead":
        rows, val = as_rows(codes, targets), None if val_codes is None else as_rows(val_codes, val_targets)
        self.adopt(train_networks(self.trainees(rows, val), rows, val, self.seed))
        return self

    def trainees(self, rows: CodeRows, val: CodeRows | None) -> list[Trainee]:
        rows.check_trainable()
        self.multilabel_, self.num_classes_ = rows.multilabel, rows.num_classes
        self.mean_, self.scale_ = standardization(rows)
        self.width_ = rows.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._pending = [Trainee(self._network(), self.training, "mlp")]
        return self._pending

    def adopt(self, curves: list[list[dict]]) -> None:
        self.curve_, self.network_ = curves[0], self._pending[0].network.cpu().eval()
        del self._pending

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
        codes = torch.from_numpy(checked_codes(codes, "codes").astype(np.float32))
        with torch.inference_mode():  # the fitted network itself: no copy per call (score_rows calls per block)
            return np.concatenate([probabilities(self.network_(batch), self.multilabel_) for batch in codes.split(4096)])

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
                   TrainingOptions.from_saved(hyperparameters["training"]))
        head._restore(state)
        head.width_ = state["width"]
        network_state = {name.removeprefix("network."): t for name, t in tensors.items()}
        head.mean_ = network_state["0.mean"].double().numpy()
        head.scale_ = network_state["0.scale"].double().numpy()
        head.network_ = head._network()
        head.network_.load_state_dict(network_state)
        head.network_.eval()
        return head

    @staticmethod
    def _tensors_of_module(module_state: dict) -> dict:
        return {f"network.{name}": tensor for name, tensor in module_state.items()}


def _standardize_module(head) -> Standardize:
    return Standardize(torch.from_numpy(head.mean_).float(), torch.from_numpy(head.scale_).float())


