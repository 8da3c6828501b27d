"""`tl sweep`: a grid of heads (layers x kinds x C x lr x hidden widths) from one cache, ranked on
validation in a leaderboard, the best saved as a normal head file.

Per layer, the validation rows are read once, into memory. Mini-batch heads (mlp, logreg --solver sgd)
of one layer train together: every block of codes is read once per epoch and feeds each of them
(pipeline.training.train_networks); lbfgs logreg and svm heads of one layer share one loaded,
standardised copy of the codes. Each finished head is written atomically under OUT/heads/ with a
record of its settings and scores, so a sweep killed midway and run again skips what it finished.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cache.reader import CacheReader
from pipeline.code_rows import CodeRows, score_rows, standardized_codes, validation_score
from pipeline.errors import HeadError, listed
from pipeline.files import DiskFullError, OutputLock, missing_folders, refuse_overwriting_inputs, write_bytes
from pipeline.ownership import refuse_foreign
from pipeline.fit_head import FitHeadConfig, cached_layer, check_counts, check_validation, save_fitted, training_rows
from pipeline.heads import HEAD_KINDS, layout_text
from pipeline.model_files import read_payload
from pipeline.report import SWEEP_FILES, SWEEP_KEYS, report_set
from pipeline.training import TrainingOptions, train_networks

LOCK = ".sweep.lock"  # held while a sweep writes its folder
KEEP = ("best", "all")
VAL_FRACTION = 0.2  # held out of the cache when no validation cache is given
RECORD_FORMAT = "tl-sweep-head/1"


@dataclass
class SweepConfig:
    """What `run_sweep` trains: every combination of `layers` (empty: every cached layer), `heads`, and
    the values each kind takes (logreg: C, and lr with --solver sgd; svm: C; mlp: hidden x lr), on
    `cache`, validated on `val_cache` or a seeded stratified `val_fraction`; results under `out`."""

    cache: Path
    out: Path
    layers: tuple[str, ...] = ()
    heads: tuple[str, ...] = ("logreg",)
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    lr: tuple[float, ...] = ()  # empty: the optimizer's default
    hidden: tuple[tuple[int, ...], ...] = ((1024,),)
    solver: str = FitHeadConfig.solver
    dropout: float = FitHeadConfig.dropout
    val_cache: Path | None = None
    val_fraction: float | None = None  # None: VAL_FRACTION, unless val_cache validates
    keep: str = "best"
    max_iter: int = FitHeadConfig.max_iter
    block_rows: int = FitHeadConfig.block_rows
    seed: int = 0
    training: TrainingOptions = field(default_factory=TrainingOptions)
    overwrite: bool = False  # replace best.pt and the leaderboard's files in `out` where tl did not write them


@dataclass
class Setting:
    """One head of the grid."""

    layer: str
    kind: str
    C: float | None = None
    lr: float | None = None
    hidden: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        parts = [self.layer, self.kind]
        if self.C is not None:
            parts.append(f"C{self.C:g}")
        if self.hidden is not None:
            parts.append("h" + layout_text(self.hidden))
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        return "-".join(parts)

    def values(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "C": self.C, "lr": self.lr,
                "hidden": None if self.hidden is None else list(self.hidden)}


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # the leaderboard, best first
    best: Path
    trained: int
    reused: int
    metric: str
    seconds: float
    files: list[Path] = field(default_factory=list)


def grid(config: SweepConfig, layers: list[str]) -> list[Setting]:
    """Every setting of the sweep, in a stable order; an empty or ill-typed grid is one HeadError."""
    if not config.heads or "" in config.heads:  # `--heads ,`, `logreg,,mlp`
        raise HeadError("--heads is empty or has an empty name; name at least one of " + ", ".join(HEAD_KINDS))
    for kind in config.heads:
        if kind not in HEAD_KINDS:
            raise HeadError(f"unknown head '{kind}' in --heads; valid: {', '.join(HEAD_KINDS)}")
    for flag, values in (("--C", config.C), ("--lr", config.lr)):  # each said alone: the C defaults are not an mlp's
        if any(not 0 < value < math.inf for value in values):
            raise HeadError(f"{flag} values must be positive and finite, got {listed(values)}")
    if any(any(width < 1 for width in hidden) for hidden in config.hidden):
        raise HeadError("--hidden takes positive widths, one setting per comma (e.g. 256,1024 or 512x256; 0 alone "
                        "for no hidden layer)")
    if config.keep not in KEEP:
        raise HeadError(f"--keep is best or all, got {config.keep}")
    check_counts(config.block_rows, config.max_iter)
    config.training.check()  # momentum, decay, schedule: before the folder is made, not at the first mlp
    costs, rates = list(dict.fromkeys(config.C)), list(dict.fromkeys(config.lr)) or [None]
    hiddens = list(dict.fromkeys(tuple(h) for h in config.hidden))
    settings = []
    for layer, kind in itertools.product(dict.fromkeys(layers), dict.fromkeys(config.heads)):
        axes = HEAD_KINDS[kind].sweep_axes(config.solver)  # the kind says which settings tell its heads apart
        if "C" in axes and not costs:
            raise HeadError(f"--C is empty; {kind} needs at least one cost")
        values = [(costs if "C" in axes else [None]), (hiddens if "hidden" in axes else [None]),
                  (rates if "lr" in axes else [None])]
        settings += [Setting(layer, kind, C, lr, hidden) for C, hidden, lr in itertools.product(*values)]
    if not settings:
        raise HeadError("the grid is empty: give --C, --hidden or --lr values for the chosen --heads")
    names: dict[str, Setting] = {}
    for setting in settings:  # a head's files are named after its setting: two may not share one
        if setting.name in names:
            raise HeadError(f"two settings of the grid are both named {setting.name} ({names[setting.name].values()} "
                            f"and {setting.values()}); give values that differ in their first 6 digits")
        names[setting.name] = setting
    return settings


def _head_config(config: SweepConfig, setting: Setting) -> FitHeadConfig:
    training = replace(config.training, lr=setting.lr) if setting.lr is not None else config.training
    return FitHeadConfig(cache=config.cache, out=config.out, layer=setting.layer, head=setting.kind,
                         C=(setting.C,) if setting.C is not None else (1.0,), solver=config.solver,
                         hidden=(1,) if setting.hidden is None else setting.hidden, dropout=config.dropout,
                         max_iter=config.max_iter,
                         seed=config.seed, training=training)


def run_sweep(config: SweepConfig, say=lambda text: None) -> SweepResult:
    started = time.perf_counter()
    reader = CacheReader(config.cache)
    layers = [cached_layer(reader, layer) for layer in config.layers] or list(reader.taps)
    missing = [layer for layer in layers if layer not in reader.taps]
    if "" in layers:  # `--layers ,` meant every layer, silently
        raise HeadError(f"--layers has an empty layer name (a comma too many?); layers of cache {config.cache}: "
                        f"{', '.join(reader.taps)}")
    if missing:
        raise HeadError(f"cache {config.cache} has no layer {', '.join(missing)}; its layers: {', '.join(reader.taps)}")
    settings = grid(config, layers)
    out = Path(config.out)
    if out.is_file():
        raise HeadError(f"--out {out} is a file; a sweep writes a folder")
    refuse_overwriting_inputs({"--out": out}, {"--cache": config.cache, "--val-cache": config.val_cache},
                              protected=("--cache", "--val-cache"))  # its heads and board among the shards
    check_validation(config.cache, config.val_cache, config.val_fraction, none_held=False)
    if not config.overwrite:  # the sweep's own are replaced: a re-run goes on
        remedy = "choose another --out, or pass --overwrite to replace it"
        refuse_foreign(out / "best.pt", "head file", remedy, follow=False)
        for name in SWEEP_FILES:
            refuse_foreign(out / name, "sweep leaderboard file", remedy, report_set(out, SWEEP_FILES, SWEEP_KEYS), False)
    if config.val_cache is not None:  # refused now, not once the heads of every layer before the one it lacks trained
        val_layers = CacheReader(config.val_cache).taps
        lacking = [layer for layer in layers if layer not in val_layers]
        if lacking:
            raise HeadError(f"--val-cache {config.val_cache} has no layer {', '.join(lacking)}; its layers: "
                            f"{', '.join(val_layers)}; extract it with these --layers too, or pass --layers")
    made = missing_folders(out / "heads")  # removed again if the sweep fails before it writes a head
    try:
        (out / "heads").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HeadError(f"cannot make the sweep folder {out}: {exc.strerror}; choose another --out") from None
    with OutputLock(out / LOCK, f"sweeping into {out}", HeadError, made):  # two sweeps would train every head twice
        try:
            return _sweep(config, reader, layers, settings, out, say, started)
        except DiskFullError as exc:  # the re-run reuses the heads finished where they are: room is needed there
            raise exc.resumed(" and re-run the same command: it reuses the heads finished") from None


def _sweep(config: SweepConfig, reader, layers: list[str], settings: list[Setting], out: Path, say,
           started: float) -> SweepResult:
    key = _identity(reader, config)
    records, trained = {}, 0
    for layer in layers:
        pending, before = [], 0
        for setting in (s for s in settings if s.layer == layer):
            record = _finished(out, setting, config, key)
            if record is not None:
                records[setting.name], before = record, before + 1
            else:
                pending.append(setting)
        if not pending:
            continue
        say(f"{layer}: training {len(pending)} heads ({before} of this layer finished before)")
        rows, val = _layer_rows(reader, layer, config)
        for setting, head, seconds in _train_layer(config, pending, rows, val):
            records[setting.name] = _save(out, setting, head, seconds, config, key, reader, rows, val)
            trained += 1
    order = {s.name: number for number, s in enumerate(settings)}
    board = sorted((records[s.name] for s in settings), key=lambda r: (bool(r.get("diverged")), -r["val_score"],
                                                                         order[r["name"]]))
    if board[0].get("diverged"):  # best.pt would be a head of NaN probabilities; the records stay for a re-run
        tried = sorted({r["setting"]["lr"] for r in board} - {None})  # None: the kind's default lr
        raise HeadError("every head of the sweep diverged (its loss stopped being finite); none is best and no best.pt "
                        "was written; lower --lr" + (f" (tried {listed(tried)})" if tried else ""))
    first = next(s for s in settings if s.name == board[0]["name"])
    if not _sound_head(out / "heads" / f"{first.name}.pt"):  # dropped by an earlier --keep best, now the best:
        rows, val = _layer_rows(reader, first.layer, config)  # trained again, as it was (seeded, alone or not)
        for setting, head, seconds in _train_layer(config, [first], rows, val):
            board[0] = _save(out, setting, head, seconds, config, key, reader, rows, val)
            trained += 1
    best = out / "best.pt"
    write_bytes(best, (out / "heads" / f"{first.name}.pt").read_bytes(), "head file", follow=False)
    if config.keep == "best":  # every record stays (a re-run reuses it); the head files of the rest go
        for record in board[1:]:
            head_file = out / "heads" / f"{record['name']}.pt"
            if head_file.exists():
                write_bytes(out / "heads" / f"{record['name']}.json",
                            json.dumps({**record, "dropped": True}, indent=1).encode(), "sweep record", follow=False)
                head_file.unlink()
    from pipeline.report import sweep_report

    metric = board[0]["metric"]
    files = sweep_report(out, board, metric, config)
    return SweepResult(out, board, best, trained, len(settings) - trained, metric, time.perf_counter() - started, files)


def _val_fraction(config: SweepConfig) -> float | None:
    """The share held out of the cache: the one given, else VAL_FRACTION without a validation cache."""
    return VAL_FRACTION if config.val_fraction is None and config.val_cache is None else config.val_fraction


def _layer_rows(reader, layer: str, config: SweepConfig):
    """The layer's training rows (streamed; their lbfgs and svm heads share one standardised copy) and
    its validation rows, read once into memory: every head is scored on them without another read."""
    rows, val = training_rows(reader, layer, config.val_cache, _val_fraction(config), config.seed, config.block_rows)
    rows.share_standardized = True
    if val is None:
        return rows, None
    memory = CodeRows.from_arrays(val.load(), val.targets)
    memory.num_classes, memory.class_names = val.num_classes, val.class_names  # a class may have no validation row
    memory.share_standardized = True
    return rows, memory


def _train_layer(config: SweepConfig, pending: list[Setting], rows, val):
    """(setting, fitted head, train seconds) of each pending setting of one layer: mini-batch heads in
    shared passes (one per batch size and epoch count, so one here), the others one by one."""
    streamed, exact = [], []
    for setting in pending:
        head = HEAD_KINDS[setting.kind].from_config(_head_config(config, setting))
        (streamed if head.streamed else exact).append((setting, head))
    if streamed:
        clock = time.perf_counter()
        trainees = [head.trainees(rows, val) for _, head in streamed]
        for (setting, _), group in zip(streamed, trainees):
            for trainee in group:
                trainee.describe = setting.name  # errors and progress name the grid point
        # a head that diverges ranks last, alone in its pass too (one mlp per layer, or the one left to a
        # resumed or widened sweep): the grid goes on, as it does when the head has company
        curves = train_networks([t for group in trainees for t in group], rows, val, config.seed, alone_stops=False)
        share = (time.perf_counter() - clock) / len(streamed)  # one pass trained them all: each its share
        position = 0
        for (setting, head), group in zip(streamed, trainees):
            head.adopt(curves[position:position + len(group)])
            position += len(group)
            yield setting, head, share
    for setting, head in exact:
        clock = time.perf_counter()
        head.fit(rows, val_codes=val)
        yield setting, head, time.perf_counter() - clock


def _record_path(out: Path, setting: Setting) -> Path:
    return out / "heads" / f"{setting.name}.json"


def _identity(reader, config: SweepConfig) -> dict:
    """What the codes are: the cache's whole key, rows and content digest, and the validation cache's, so
    that a record of other data (or of shards redone since) is never reused."""
    val = None
    if config.val_cache is not None:
        val_manifest = CacheReader(config.val_cache).manifest
        val = {"key": val_manifest.key, "rows": val_manifest.rows, "content": val_manifest.content}
    # content: the digest of every shard's checksum, which changes when changed inputs redid a shard
    return json.loads(json.dumps({"key": reader.manifest.key, "rows": reader.manifest.rows,
                                  "content": reader.manifest.content, "val": val}, default=str))


def _finished(out: Path, setting: Setting, config: SweepConfig, key: dict) -> dict | None:
    """The record of a head this sweep finished before with the same settings and codes, else None."""
    try:
        record = json.loads(_record_path(out, setting).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):  # damaged (null, a list): no field of it can be read, `dropped` included
        return None
    same = (record.get("format") == RECORD_FORMAT and _sound(record, setting.name)
            and record.get("setting") == setting.values() and record.get("shared") == _shared(config)
            and record.get("codes_key") == key)
    kept = _sound_head(out / "heads" / f"{setting.name}.pt") or record.get("dropped") and config.keep == "best"
    return record if same and kept else None


def _sound_head(path: Path) -> bool:
    """Whether a head file the sweep kept is there and whole: one cut short or with a bit flipped (its checksum)
    was reused as finished, and copied to best.pt when it ranked first; it is trained again."""
    try:
        read_payload(path, "head file", "", keys=("tensors",))
    except HeadError:
        return False
    return True


def _sound(record: dict, name: str) -> bool:
    """Whether a record holds what the leaderboard reads, under its own head's name (an edited one is trained
    again: its name had ended the sweep in a KeyError, and names the head file the sweep may remove)."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return (record.get("name") == name and isinstance(record.get("metric"), str) and isinstance(record.get("on"), str)
            and number(record.get("val_score")) and number(record.get("train_seconds"))
            and (record.get("epochs") is None or number(record["epochs"])))


def _shared(config: SweepConfig) -> dict:
    """What every head of the sweep shares and its record must match to be reused."""
    training = {k: v for k, v in config.training.__dict__.items() if k not in ("quiet", "device")}
    return json.loads(json.dumps({"solver": config.solver, "dropout": config.dropout,
                                  "val_fraction": _val_fraction(config), "max_iter": config.max_iter, "seed": config.seed,
                                  "block_rows": config.block_rows, "training": training}, default=list))


def _save(out: Path, setting: Setting, head, seconds: float, config, key, reader, rows, val) -> dict:
    """The head file, then its record (the record last: a record always has its head)."""
    save_fitted(head, out / "heads" / f"{setting.name}.pt", reader, setting.layer, len(rows), follow=False)
    scored = val if val is not None else rows
    metric, score = _score(head, scored, reader)
    diverged = next((point["epoch"] for point in head.curve_ or [] if point.get("diverged")), None)
    record = {"format": RECORD_FORMAT, "name": setting.name, "setting": setting.values(), "shared": _shared(config),
              "codes_key": key, "metric": metric, "on": "validation" if val is not None else "training",
              "val_score": score, "train_seconds": seconds, "diverged": diverged,
              "epochs": len([p for p in head.curve_ if not p.get("diverged")]) if head.curve_ else None,
              "chosen": head.chosen()}
    write_bytes(_record_path(out, setting), json.dumps(record, indent=1).encode(), "sweep record", follow=False)
    return record


def _score(head, scored, reader) -> tuple[str, float]:
    """(metric, value) of the head on the rows it is ranked by, in float64: accuracy, or mAP for multi-label
    caches and for patch caches (over the object classes: most patches are background)."""
    if hasattr(head, "coef_"):  # a linear head: on the layer's one standardised copy of these rows
        standardized = standardized_codes(scored, head.mean_, head.scale_)
        probabilities = head.proba_of_logits(standardized @ head.coef_.T + head.intercept_)
    else:
        probabilities = score_rows(head, scored)
    if scored.multilabel:
        return "mAP", validation_score(scored.targets, probabilities)
    if reader.manifest.key.get("patches") is None:
        return "accuracy", validation_score(scored.targets, probabilities)
    objects = [c for c in range(1, scored.num_classes) if (scored.targets == c).any()]  # class 0 is background
    if not objects:
        return "mAP", 0.0
    # the mean AP of the object classes, each against every other patch: validation_score's, which also ranks
    # a diverged head's NaN probabilities (scikit-learn refused them in a traceback)
    present = scored.targets[:, None] == np.array(objects)
    return "mAP", validation_score(present.astype(np.int64), probabilities[:, objects])
