"""Stage two's entry: fit one head on one layer of a cache, with an optional validation split, and save
it with the metadata later stages check (classes, layer, width, the cache's codes key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.manifest import load_manifest
from cache.reader import CacheReader
from pipeline.code_rows import BLOCK_ROWS, CodeRows, score_rows, validation_score
from pipeline.compatibility import check_codes_match, codes_key
from pipeline.datasets import validation_rows
from pipeline.errors import HeadError, TLError, listed
from pipeline.files import check_folders, file_lock, refuse_overwriting_inputs, same_file
from pipeline.ownership import refuse_foreign
from pipeline.heads import DROPOUT, HEAD_KINDS, HIDDEN, MAX_ITER, SOLVER, SOLVERS
from pipeline.linear_fits import cost_grid
from pipeline.model_files import save_head
from pipeline.training import TrainingOptions


@dataclass
class FitHeadConfig:
    """What `fit_head` trains: a head of kind `head` on one layer of `cache`, saved to `out`.

    C (logreg, svm): one cost, or several to choose from on the validation split. solver (logreg):
    lbfgs (exact, codes in memory) or sgd (streamed, uses `training`). hidden, dropout (mlp): hidden
    layer widths and dropout rate. The validation split is `val_cache`, or a seeded stratified
    `val_fraction` of the cache. `training` holds how torch heads train (optimizer, schedule, epochs).
    """

    cache: Path
    out: Path
    layer: str | None = None  # None: the cache's only layer
    head: str = "logreg"
    C: tuple[float, ...] = (1.0,)
    solver: str = SOLVER
    hidden: tuple[int, ...] = HIDDEN
    dropout: float = DROPOUT
    val_cache: Path | None = None
    val_fraction: float | None = None
    max_iter: int = MAX_ITER
    block_rows: int = BLOCK_ROWS
    seed: int = 0
    overwrite: bool = False  # replace a file at `out` that tl did not write
    training: TrainingOptions = field(default_factory=TrainingOptions)


def check_counts(block_rows: int, max_iter: int) -> None:
    """fit-head's and sweep's counts: each at least 1 (0 iterations saved an unfitted head)."""
    if block_rows < 1 or max_iter < 1:
        raise HeadError(f"--block-rows and --max-iter must be at least 1, got {block_rows} and {max_iter}")


def unread_options(kinds: tuple[str, ...], solver: str, given: dict[str, str], early_stop: bool,
                   heads_flag: str = "--head") -> list[str]:
    """A warning for each option the user gave (name -> flag) that none of these head kinds reads, such as
    `--solver sgd` for an svm head or `--C` for an mlp: it changes nothing. A warning, as scikit-learn gives,
    not a refusal: one command line may loop over the head kinds. `heads_flag` names the kinds (sweep: --heads)."""
    if not kinds or any(kind not in HEAD_KINDS or HEAD_KINDS[kind].reads(solver) is None for kind in kinds):
        return []  # an unknown kind is refused by the stage in a moment; one that does not say what it reads
    read = {name for kind in kinds for name in HEAD_KINDS[kind].reads(solver)}
    by_solver = len(kinds) == 1 and len({tuple(HEAD_KINDS[kinds[0]].reads(other)) for other in SOLVERS}) > 1
    heads = f"{heads_flag} {','.join(kinds)}" + (f" --solver {solver}" if by_solver else "")
    warnings = []
    for name, flag in given.items():
        readers = []
        for kind, head in HEAD_KINDS.items():
            solvers = [other for other in SOLVERS if name in (head.reads(other) or ())]
            if solvers:
                readers.append(kind if len(solvers) == len(SOLVERS) else f"{kind} --solver {'/'.join(solvers)}")
        if readers and name not in read:
            warnings.append(f"{flag} does nothing for {heads}; it applies to {' and '.join(readers)} heads")
        elif name == "patience" and not early_stop:
            warnings.append(f"{flag} does nothing without --early-stop")
    return warnings


@dataclass
class FitHeadResult:
    out: Path
    layer: str
    train_rows: int
    val_rows: int
    metric: str  # accuracy, or mAP for multi-label caches
    train_score: float
    val_score: float | None
    chosen: dict  # what validation chose: C (one, or one per class for svm), the kept epoch of a torch head
    epochs: int | None  # epochs run (torch heads)


def fit_head(config: FitHeadConfig) -> FitHeadResult:
    """Train one head on one layer of a cache and save it with the metadata later stages check."""
    check_config(config)
    if Path(config.out).is_dir():  # found before the training, not after it
        raise HeadError(f"--out {config.out} is a folder; name a head file such as {Path(config.out) / 'head.pt'}")
    check_folders(Path(config.out), "head file")
    if not config.overwrite:
        refuse_foreign(Path(config.out), "head file", "choose another --out, or pass --overwrite to replace it")
    check_validation(config.cache, config.val_cache, config.val_fraction)
    reader = CacheReader(config.cache)
    layer = cached_layer(reader, config.layer) if config.layer else _only_layer(reader)
    # two fits into one --out both said 'wrote OUT', the file holding the one that finished last
    with file_lock(config.out, f"training into {config.out}", HeadError):
        rows, val = training_rows(reader, layer, config.val_cache, config.val_fraction, config.seed,
                                  config.block_rows)
        head = HEAD_KINDS[config.head].from_config(config)
        head.fit(rows, val_codes=val)
        diverged = next((point["epoch"] for point in head.curve_ or [] if point.get("diverged")), None)
        if diverged is not None:  # every C of logreg --solver sgd did (one alone stops in its epoch): a head of NaN
            raise HeadError("the loss of logreg --solver sgd stopped being finite at every --C; lower --lr or check "
                            "the cache with tl info --verify")
        save_fitted(head, config.out, reader, layer, len(rows))
    chosen = {"C": head.C_} if hasattr(head, "C_") else {}
    if head.curve_:  # the epoch whose weights the head keeps: the best one under early stopping, else the last
        kept = [point["epoch"] for point in head.curve_ if point.get("kept")]
        chosen["epoch"] = kept[0] if kept else head.curve_[-1]["epoch"]
    return FitHeadResult(Path(config.out), layer, len(rows), 0 if val is None else len(val),
                         "mAP" if rows.multilabel else "accuracy",
                         validation_score(rows.targets, score_rows(head, rows)),
                         None if val is None else validation_score(val.targets, score_rows(head, val)),
                         chosen, len(head.curve_) if head.curve_ else None)


def check_config(config: FitHeadConfig) -> None:
    """The refusals that need no codes, before the cache is read; tl run makes them before any step. Only
    the settings the head kind reads: the others are warned of (unread_options)."""
    if config.head not in HEAD_KINDS:
        raise HeadError(f"unknown head '{config.head}'; valid: {', '.join(HEAD_KINDS)}")
    reads = HEAD_KINDS[config.head].reads(config.solver) or ()
    if "C" in reads:
        if not config.C:
            raise HeadError("--C needs at least one positive value, e.g. --C 1 or --C 0.1,1,10")
        cost_grid(config.C, config.val_cache or config.val_fraction or None)  # several need validation to choose
    check_counts(config.block_rows, config.max_iter)
    # as sweep refuses: a file among the shards is swept away by extract --overwrite, or read as part of the cache
    refuse_overwriting_inputs({"--out": config.out}, {"--cache": config.cache, "--val-cache": config.val_cache},
                              protected=("--cache", "--val-cache"))
    if "lr" in reads:
        config.training.check()
    HEAD_KINDS[config.head].from_config(config)  # the kind's own settings (mlp widths and dropout, logreg solver)


def check_validation(cache: Path, val_cache: Path | None, val_fraction: float | None, none_held: bool = True) -> None:
    """One line before any work (fit-head's, a sweep's): two validation sets named, or a validation cache
    that holds the training codes (the cache itself, a link to it, or a copy: the same content digest), or codes
    of training images (extracted again, whole or in part: see _training_samples_in).
    `none_held`: the command takes --val-fraction 0 (a sweep does not: it ranks on validation)."""
    if val_cache is None:
        return
    if val_fraction is not None:  # as finetune refuses the pair
        raise HeadError("--val-cache and --val-fraction both name validation rows; pass one of them"
                        + (" (--val-fraction 0 holds out none)" if none_held else ""))
    training, validation = load_manifest(cache), load_manifest(val_cache)
    if same_file(val_cache, cache) or validation.content == training.content != "":
        raise HeadError(f"--val-cache {val_cache} holds the codes of the training cache {cache}: validation would "
                        "score the rows the heads train on; pass a cache of other images, or --val-fraction")
    # before any layer is looked for: a cache of another backbone lacks the layers too; only this names the cause
    check_codes_match(codes_key(training), validation, f"--val-cache {val_cache}", f"--cache {cache}",
                      "extract the validation images with the same {} as --cache")
    # codes of the same image files extracted again (another dtype, device, --shard-rows or --samples-per-class,
    # or --split train by mistake) differ, but their rows carry the training rows' sample ids
    shared, rows, first = _training_samples_in(cache, val_cache)
    if shared:
        raise HeadError(f"--val-cache {val_cache} holds codes of the images of the training cache {cache} ({shared:,} "
                        f"of its {rows:,} rows are training samples, e.g. {first}): validation would score training "
                        "images; extract the validation images into their own cache, or pass --val-fraction")


def _training_samples_in(cache: Path, val_cache: Path, compared: int = 8) -> tuple[int, int, str]:
    """(rows of `val_cache` with a sample id of `cache`, its rows, one of them) read from the shards' ids.
    An id is a path inside the data folder or a tar's name and key, which two splits or two tar sets numbered
    alike share for other images: up to `compared` shared rows' codes, spread over them, are compared too (a
    read of a few rows), and the ids count when most are the same as their training rows' (within 2%: another
    dtype, precision or device). Codes further apart can still be of the same files: JPEGs decoded on a GPU (at
    full size) and in workers (at reduced scale) give codes some 5% apart. So whole shards whose inputs (ids,
    sizes and times) are a training shard's count too. (0, rows, "") when neither does."""
    trained, validation = CacheReader(cache, verify=False), CacheReader(val_cache, verify=False)
    ids = validation.load_column("sample_id")
    _, train_rows, val_rows = np.intersect1d(trained.load_column("sample_id"), ids, return_indices=True)
    tap = next((tap for tap in validation.taps if tap in trained.taps), None)
    if len(val_rows) and tap is not None:
        picked = np.unique(np.linspace(0, len(val_rows) - 1, min(compared, len(val_rows))).astype(int))
        codes = trained.read_rows(tap, train_rows[picked]).astype(np.float64)
        same = np.linalg.norm(codes - validation.read_rows(tap, val_rows[picked]), axis=1) <= 0.02 * np.linalg.norm(
            codes, axis=1)
        if 2 * same.sum() > len(same):
            return len(val_rows), len(ids), str(ids[val_rows[picked[same][0]]])
    inputs = {shard.inputs for shard in trained.shards if shard.inputs}
    starts = np.cumsum([0] + [shard.rows for shard in validation.shards])
    read = [k for k, shard in enumerate(validation.shards) if shard.rows and shard.inputs in inputs]
    if not read:
        return 0, len(ids), ""
    return sum(validation.shards[k].rows for k in read), len(ids), str(ids[starts[read[0]]])


def _image_split(reader: CacheReader, fraction: float, seed: int, targets: np.ndarray):
    """(training rows, validation rows) of a patch cache: a seeded split of its images in cache order
    (unstratified: their targets are multi-hot), every patch on its image's side. A patch class left
    with no training rows is one line (a rare class's every image held out)."""
    image_ids = reader.load_column("image_id")
    _, first, image_of = np.unique(image_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # images in the order the cache holds them, as finetune's split takes them
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    image_targets = reader.load_column("image_target")[first[order]]
    _, val_images = validation_rows(image_targets, fraction, seed, "--val-cache", reader.classes[1:])
    held = np.isin(position[image_of], val_images)
    lost = sorted(set(np.unique(targets).tolist()) - set(np.unique(targets[~held]).tolist()))
    if lost:
        raise HeadError(f"--val-fraction {fraction:g} holds out every image of {listed(reader.classes[c] for c in lost)}; "
                        "lower --val-fraction, change --seed, or pass --val-cache")
    return np.flatnonzero(~held), np.flatnonzero(held)


def training_rows(reader: CacheReader, layer: str, val_cache: Path | None, val_fraction: float | None, seed: int,
                  block_rows: int) -> tuple[CodeRows, CodeRows | None]:
    """(training rows, validation rows or None) of one layer: the validation cache's (of the same codes:
    check_validation), or a seeded stratified fraction held out of the cache."""
    rows = CodeRows.from_cache(reader, layer, block_rows=block_rows)
    if val_cache is not None:
        val_reader = CacheReader(val_cache)
        if val_reader.classes != reader.classes:
            raise HeadError(f"{val_cache} has other classes than {reader.root}; use caches of one data set")
        if val_reader.manifest.target != reader.manifest.target:
            raise HeadError(f"{val_cache} has {val_reader.manifest.target} targets and {reader.root} "
                            f"{reader.manifest.target} targets; use caches of one data set")
        return rows, CodeRows.from_cache(val_reader, layer, block_rows=block_rows)
    if val_fraction is None:
        return rows, None
    if reader.manifest.key.get("patches") is not None:  # whole images, as finetune holds them out: a patch
        train_rows, val_rows = _image_split(reader, val_fraction, seed, rows.targets)  # of one on both sides flatters
    else:
        train_rows, val_rows = validation_rows(rows.targets, val_fraction, seed, "--val-cache", reader.classes)
    all_targets = rows.targets
    return (CodeRows.from_cache(reader, layer, train_rows, block_rows, all_targets),
            CodeRows.from_cache(reader, layer, val_rows, block_rows, all_targets))


def save_fitted(head, out: Path, reader: CacheReader, layer: str, train_rows: int, follow: bool = True) -> None:
    """The head file with what later stages check: classes, layer, width, the cache's codes key, and the
    digest of its codes (evaluate tells a score on the training codes from a test)."""
    save_head(head, out, {"classes": reader.classes, "layer": layer, "width": reader.taps[layer],
                          "codes_key": codes_key(reader.manifest), "cache": str(reader.root), "train_rows": train_rows,
                          "cache_content": reader.manifest.content,
                          "codes_dtype": reader.manifest.key["layout"]["dtype"]}, follow=follow)


def cached_layer(reader: CacheReader, name: str) -> str:
    """The cached layer `name` means: itself, or the layer it is an alias of for the cache's backbone
    (relu6 is alexnet's and vgg16's fc6), as extract's --layers takes it; unknown names pass through, for
    the reader to say what the cache holds."""
    if name in reader.taps:
        return name
    from pipeline.backbones import get_backbone

    try:
        canonical = get_backbone(reader.manifest.key["backbone"]).aliases.get(name, name)
    except TLError:  # a backbone this tl does not know: the name as given
        return name
    return canonical if canonical in reader.taps else name


def _only_layer(reader) -> str:
    layers = list(reader.taps)
    if len(layers) != 1:
        raise HeadError(f"cache {reader.root} has several layers ({', '.join(layers)}); choose one with --layer")
    return layers[0]
