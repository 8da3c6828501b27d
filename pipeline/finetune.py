"""Stage three: the backbone up to the head's tap plus the stage-two head, trained end to end with the
last N conv layers unfrozen; an atomic checkpoint every epoch, resume, early stopping, a model file.

Every epoch draws its order and augmentation from (seed, epoch) alone, so a resumed run repeats the
epochs an uninterrupted one would have run.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.allocator import reused_memory
from pipeline.code_rows import validation_score
from pipeline.errors import CheckpointOccupied, FinetuneError, TLError
from pipeline.files import (DiskFullError, check_folders, file_lock, refuse_overwriting_inputs,
                            remove_stale_temporaries)
from pipeline.ownership import refuse_foreign
from pipeline.formats import DEFAULT_CLASSES, DEFAULT_FORMAT, open_source
from pipeline.hardware import (autocast, default_workers, float32_math, grad_scaler, prepare_module, resolve_device,
                               resolve_precision, to_device)
from pipeline.image_sets import (Augmentation, SeededItems, batch_loader, epoch_batches, image_labels, image_set,
                                 pooled_image_map, refuse_training_images, score_images)
from pipeline.multiscale import PatchSamples
from pipeline.model_files import (FinetuneModel, build_model, checkpoint_paths, freeze, load_checkpoint, load_head,
                                  resumable_optimizer_state, save_checkpoint, save_model)
from pipeline.progress import progress
from pipeline.training import (TrainingOptions, best_standing, check_rates, check_schedule, decay_groups, loss_for,
                               make_optimizer, parameter_groups, step_multiplier)


@dataclass
class FinetuneConfig:
    """What `run_finetune` trains: the backbone of `head` up to its layer plus the head, on the images of
    `data` (read as `format`, split `split`), the last `unfreeze` conv layers trainable, written to `out`
    with checkpoints beside it. Each field is the `tl finetune` option of the same name.
    """

    data: Path
    head: Path
    out: Path
    format: str = DEFAULT_FORMAT
    split: str = "train"
    classes: str = DEFAULT_CLASSES
    label_key: str | None = None  # webdataset data: cls, txt, json or json:FIELD (None: cls)
    val_data: Path | None = None
    val_split: str | None = None  # None: the same split name as --split
    val_fraction: float | None = None  # or hold out this seeded, stratified fraction of the training images
    samples_per_class: int | None = None
    unfreeze: int | str = 0  # or "all": every conv layer (transformer block) before the tap
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = TrainingOptions.optimizer
    lr: float = 1e-4  # the neon recipe's; the head starts trained, so steps stay small
    momentum: float = TrainingOptions.momentum
    weight_decay: float = TrainingOptions.weight_decay
    lr_steps: tuple[int, ...] = ()
    lr_factors: tuple[float, ...] = TrainingOptions.lr_factors
    backbone_lr_scale: float = 0.1
    background_fraction: float | None = 0.1  # multiscale heads: share of background patches trained on
    early_stop: bool = False
    patience: int = TrainingOptions.patience
    crop_scale: float = 0.5  # see Augmentation
    flip: bool = True
    bn_stats: bool = False  # let trainable BatchNorm layers update their running statistics
    backbone: str | None = None  # when given, the head must come from this backbone
    weights: str | None = None  # the backbone's weights file, when the head's codes came from one
    resume: bool = False
    overwrite: bool = False
    workers: int | None = None  # None: pipeline.hardware.default_workers
    device: str = "auto"
    precision: str = "auto"  # autocast dtype; auto: float32 on the CPU, float16 (loss scaled) on CUDA
    seed: int = 0
    quiet: bool = False


@dataclass
class FinetuneResult:
    out: Path
    epochs_run: int
    history: list[dict]
    trainable: dict  # parameters, layers
    best_epoch: int | None
    resumed_from: int | None = None
    stopped_early: bool = False
    val: dict | None = None  # the final model's validation metrics
    timings: dict = field(default_factory=dict)
    precision: str = "float32"


# ---------------------------------------------------------------- training


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(2**62))


def _optimizer(model: FinetuneModel, config: FinetuneConfig):
    optimizer = make_optimizer(parameter_groups(model, config.lr, config.backbone_lr_scale), config.optimizer,
                               config.lr, config.momentum, config.weight_decay, FinetuneError)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, step_multiplier(config.lr_steps, config.lr_factors))
    return optimizer, schedule


def check_config(config: FinetuneConfig, inputs: bool = True) -> None:
    """The refusals that need no images or head, before any work; tl run makes them before any step, with
    `inputs` False: its recipe check knows the paths an earlier step makes (data that extract downloads)."""
    if config.epochs < 0 or config.batch_size < 1 or config.patience < 1:
        raise FinetuneError("--epochs must be 0 or more, --batch-size and --patience at least 1")
    check_rates(config.lr, config.momentum, config.weight_decay, FinetuneError)
    if not (config.backbone_lr_scale >= 0 and math.isfinite(config.backbone_lr_scale)):
        raise FinetuneError(f"--backbone-lr-scale must be a finite number 0 or more, got {config.backbone_lr_scale}")
    check_schedule(config.lr_steps, config.lr_factors, FinetuneError)
    default_workers(config.workers)  # refuses a negative --workers before any work
    if inputs and config.val_data is not None and "{" not in str(config.val_data) \
            and not Path(config.val_data).exists():
        raise FinetuneError(f"--val-data {config.val_data} does not exist; pass --val-data images laid out as the "
                            "training images are")  # (a tar brace pattern names no one path)
    if config.val_data is not None and config.val_fraction is not None:
        raise FinetuneError("--val-data and --val-fraction both name validation images; pass one of them "
                            "(--val-fraction 0 holds out none)")
    # --val-data photos took split train: the training images again (tl run: once both are there, before any step)
    if config.val_data is not None and (inputs or Path(config.data).exists() and Path(config.val_data).exists()):
        refuse_training_images(config.val_data, config.val_split or config.split, config.data, config.split, config.format)
    if config.early_stop and config.val_data is None and config.val_fraction is None:
        raise FinetuneError("--early-stop needs validation images; pass --val-fraction (held out of the "
                            "training images) or --val-data")
    Augmentation(config.crop_scale, config.flip).check()


def run_finetune(config: FinetuneConfig, say=print, warn=None) -> FinetuneResult:
    """Train (or with --epochs 0 only evaluate) and write the model file; see the module docstring.
    `say` gets progress lines, `warn` (`say` if not given) the data's warnings, which --quiet keeps.

    The run holds a lock on --out (a second run on it is refused), never writes over one of its
    inputs, and first clears temporaries that killed runs left beside --out."""
    check_config(config)
    out = Path(config.out)
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder; name a model file such as {out / 'model.pt'}")
    check_folders(out, "model file")  # a file as one of its folders was 'cannot create OUT.lock: File exists'
    if not config.overwrite:
        refuse_foreign(out, "model file", "choose another --out, or pass --overwrite to replace it")
    last_path, best_path = checkpoint_paths(out)
    weights = Path(config.weights) if config.weights and Path(config.weights).exists() else None
    refuse_overwriting_inputs({"--out": out, "--out's checkpoint": last_path, "--out's best checkpoint": best_path},
                              {"--head": config.head, "--data": config.data, "--val-data": config.val_data,
                               "--weights": weights},
                              protected=("--data", "--val-data") if config.format == DEFAULT_FORMAT else ())
    current = distributed.world()
    warn = say if warn is None else warn
    if not current.is_main:  # rank 0 speaks for every rank
        say = warn = lambda text: None  # noqa: E731
    device = resolve_device(config.device)
    distributed.start(current, device)
    lock = file_lock(out, f"training into {out}", FinetuneError)
    # rank 0 holds the lock for every rank; its verdict reaches them all, so a refusal stops every rank
    refusal = None
    if current.is_main:
        try:
            lock.acquire()
        except FinetuneError as exc:
            refusal = str(exc)
    refusal = distributed.broadcast(current, refusal)
    if refusal is not None:
        raise FinetuneError(refusal)
    kept = last_path.stat().st_mtime_ns if last_path.is_file() else None
    try:
        if current.is_main:
            for name in (out.name, last_path.name, best_path.name):
                remove_stale_temporaries(out.parent, name)
        # stopped in its first epoch (its best checkpoint perhaps written, its last not yet): nothing to resume
        first_epoch_again = config.resume and not last_path.is_file()
        if first_epoch_again:
            say(f"no checkpoint {last_path} yet (the run stopped before its first epoch ended): starting from the head")
            config = replace(config, resume=False)
        if not config.resume:
            earlier = next((path for path in (last_path, best_path) if path.exists()), None)
            if earlier is not None and not (config.overwrite or first_epoch_again):
                raise CheckpointOccupied(earlier, "holds an earlier run",
                                         "pass --resume to continue it or --overwrite to start over")
        with reused_memory(device):
            return _run_finetune(config, say, warn)
    except DiskFullError as exc:  # 're-run the same command' was refused: the checkpoint holds an earlier run
        ours = last_path.is_file() and (config.resume or last_path.stat().st_mtime_ns != kept)
        if not ours:  # none written, or another run's that --overwrite was replacing
            raise
        # what the resume needs is room where the checkpoint is: another file system is another --out, a start over
        raise exc.resumed(", then run the command again with --resume (tl run resumes by itself): it goes on from "
                          f"the checkpoint {last_path.name}") from None
    finally:
        lock.release()


def _run_finetune(config: FinetuneConfig, say, warn) -> FinetuneResult:
    started = time.perf_counter()
    head, head_metadata = load_head(config.head)
    if config.backbone and config.backbone != head_metadata["codes_key"]["backbone"]:
        raise FinetuneError(f"head {config.head} was trained on {head_metadata['codes_key']['backbone']} codes, "
                            f"not {config.backbone}; pass a head of the same backbone")
    current = distributed.world()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    distributed.start(current, device)
    source = open_source(config.format, config.data, config.split, samples_per_class=config.samples_per_class,
                         seed=config.seed, classes=config.classes, label_key=config.label_key, say=warn,
                         world=current)  # before the model; under torchrun each rank lists a share of the tars
    val_source = None
    if config.val_fraction is not None:  # whole images held out, so no patch of one is on both sides
        source, val_source = source.split_off(config.val_fraction, config.seed, "--val-data")
    elif config.val_data is not None:
        val_source = open_source(config.format, config.val_data, config.val_split or config.split,
                                 seed=config.seed, classes=config.classes, label_key=config.label_key, say=warn,
                                 world=current)
    model, backbone, convs = build_model(head_metadata, head, config.weights)
    trainable = freeze(model, convs, config.unfreeze, config.bn_stats)
    config = replace(config, unfreeze=len(trainable["conv_layers"]))  # all: checkpointed and written as its count
    say(("--epochs 0: not training " if not config.epochs else "training ") + f"{trainable['parameters']:,} "
        + "parameters (head" + (f" + {', '.join(trainable['backbone_layers'])}" if trainable["backbone_layers"] else " only")
        + f"); {trainable['frozen_parameters']:,} frozen")
    dataset, targets = image_set(source, backbone, head_metadata, Augmentation(config.crop_scale, config.flip),
                                    config.seed, config.background_fraction,
                                    f"data {config.data}", f"head {config.head}")
    val_dataset = val_targets = val_labels = None
    if val_source is not None:
        what = (f"validation data {config.val_data or config.data}", f"head {config.head}")
        val_dataset, val_targets = image_set(val_source, backbone, head_metadata, None, config.seed, None, *what)
        if isinstance(val_dataset, PatchSamples):  # val_image_map's labels, checked now and not after an epoch
            val_labels = image_labels(val_dataset, head_metadata["classes"], *what)
    multilabel = targets.ndim == 2
    loss_function = loss_for(multilabel)
    model = prepare_module(model, device)
    if precision != "float32":
        say(f"mixed precision: {precision} autocast" + (" with loss scaling" if precision == "float16" else ""))
    scaler = grad_scaler(device, precision)
    trainer = model
    if current.distributed:  # gradients averaged across ranks: gloo on CPU, nccl on CUDA
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, schedule = _optimizer(model, config)
    identity = _identity(config, head_metadata, source)
    last_path, best_path = checkpoint_paths(config.out)
    history: list[dict] = []
    best: tuple[float, int | None] = (math.inf, None)
    start_epoch, resumed_from = 0, None
    if not config.resume and current.is_main:
        # starting over: a later --resume (tl run's, after a stop) would take up an earlier run's checkpoint,
        # and the summary name it, as this one's. Removed only here, once every refusal that needs the head,
        # the images or the model has passed: a start refused (--unfreeze 99) keeps the earlier run resumable
        for path in (last_path, best_path):
            path.unlink(missing_ok=True)
    if config.resume:
        state = load_checkpoint(last_path, identity)
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(resumable_optimizer_state(state["optimizer"], optimizer, model,
                                                                lambda trained: _optimizer(trained, config)[0]))
        except ValueError as exc:  # another optimizer layout than this tl builds
            raise FinetuneError(f"checkpoint {last_path} holds another optimizer layout ({exc}); "
                                "pass --overwrite to start over") from None
        schedule.load_state_dict(state["schedule"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        # the learning rate given now wins over the checkpoint's, so "lower --lr and resume" works
        groups = decay_groups(parameter_groups(model, config.lr, config.backbone_lr_scale), 0.0)
        schedule.base_lrs = [group["lr"] for group in groups]
        for group, base in zip(optimizer.param_groups, schedule.base_lrs):
            group["initial_lr"], group["lr"] = base, base * schedule.lr_lambdas[0](schedule.last_epoch)
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        best = best_standing(history)  # from the history: a checkpoint of a tl that chose by loss too
        start_epoch = resumed_from = state["epoch"]
        if 0 < config.epochs < start_epoch:  # its weights trained longer than asked (--epochs 0: evaluate them)
            raise FinetuneError(f"checkpoint {last_path} has run {start_epoch} epochs, more than --epochs "
                                f"{config.epochs}; pass --epochs {start_epoch} or more, or --overwrite to start over")
        say(f"resumed from {last_path} after epoch {start_epoch}")
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if config.early_stop and best[1] is not None and epoch - 1 - best[1] >= config.patience:  # epochs since best
            stopped_early = True
            break
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)
        batches = epoch_batches(len(dataset), current, config.seed, epoch, config.batch_size)
        loader = batch_loader(SeededItems(dataset, epoch_seed), batches, config.workers, device)
        trainer.train()
        total, seen, unreadable, epoch_started = 0.0, 0, set(), time.perf_counter()
        bar = progress(loader, total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       quiet=config.quiet or not current.is_main, leave=False)
        for number, (pixels, indices, errors) in enumerate(bar, start=1):
            unreadable.update(dataset_index for dataset_index, _ in errors)
            if pixels is None:  # every image of the batch unreadable: an empty step keeps the ranks in step
                pixels = torch.zeros(0, 3, backbone.input_size, backbone.input_size)
            batch_targets = torch.from_numpy(targets[indices].astype(np.float32) if multilabel else targets[indices])
            loss = training_step(trainer, to_device(pixels, device), to_device(batch_targets, device), loss_function,
                                 optimizer, scaler, device, precision,
                                 check=lambda loss, mine: _check_loss(loss, mine, current, epoch, number, last_path))
            total += loss * len(indices)
            seen += len(indices)
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}",
                            images_per_s=f"{seen / max(time.perf_counter() - epoch_started, 1e-9):.1f}")
        bar.close()
        total, seen, skipped = distributed.all_sum(current, [total, seen, len(unreadable)])
        if not seen:
            raise FinetuneError(f"no training image of {config.data} could be read in epoch {epoch + 1}; check the data")
        point = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": total / seen}
        if skipped:  # recorded in the history (and so in checkpoints and the model file)
            point["skipped_images"] = int(skipped)
        with warnings.catch_warnings():  # the schedule counts epochs, whether or not fp16 loss scaling skipped steps
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            schedule.step()
        if val_dataset is not None:
            if current.is_main:
                try:
                    point.update(_validate(model, val_dataset, val_targets, config, device, precision, val_labels))
                except TLError as exc:  # every rank stops with rank 0's reason, none waits for it
                    point["error"] = str(exc)
            point = distributed.broadcast(current, point)
            if "error" in point:
                raise FinetuneError(point["error"])
        history.append(point)
        best = best_standing(history)
        if current.is_main:
            for path in ([best_path] if best[1] == epoch else []) + [last_path]:  # last names best: written after it
                save_checkpoint(path, model, optimizer, schedule, scaler, epoch + 1, history, best, identity)
        distributed.barrier(current, f"checkpoint of epoch {epoch + 1}")
        # said once its checkpoint is written: a stop right after the line keeps the epoch it reports
        say("epoch {epoch}: ".format(**point) + ", ".join(f"{k} {v:.4g}" for k, v in point.items()
                                                          if k != "epoch" and "skipped" not in k))
        unread = [f"{point[k]} {what}" for k, what in (("skipped_images", "training"), ("val_skipped_images",
                                                                                        "validation")) if k in point]
        if unread:
            warn(f"warning: {' and '.join(unread)} images could not be read and were skipped")  # even with --quiet
    val = None
    if current.is_main:
        if config.early_stop and best[1] is not None and best_path.is_file():
            model.load_state_dict(load_checkpoint(best_path, identity)["model"])
        if val_dataset is not None:
            val = _validate(model, val_dataset, val_targets, config, device, precision, val_labels)
        save_model(config.out, model, head_metadata, trainable, history, asdict(config))
    distributed.barrier(current, "model written")
    distributed.stop(current)
    return FinetuneResult(Path(config.out), len(history) - (resumed_from or 0), history, trainable,
                          None if best[1] is None else best[1] + 1, resumed_from, stopped_early, val,
                          {"seconds": time.perf_counter() - started}, precision)


def training_step(trainer: nn.Module, pixels: torch.Tensor, targets: torch.Tensor, loss_function, optimizer,
                  scaler: torch.amp.GradScaler, device: torch.device, precision: str, check=None) -> float:
    """One optimizer step on a batch on `device`, under autocast, loss scaled for float16 (an overflowed step is
    skipped, the scale lowered); `check(loss, images)` runs first and gives the weight of this batch's mean
    loss (see _check_loss). An empty batch still steps (DDP ranks keep step)."""
    with autocast(device, precision):
        logits = trainer(pixels)
    logits = logits.float()  # the loss in float32 whatever the forward's precision
    loss = loss_function(logits, targets) if len(targets) else logits.sum() * 0.0
    weight = check(loss, len(targets)) if check is not None else 1.0
    optimizer.zero_grad(set_to_none=True)
    with float32_math(precision):  # the backward pass in the forward's float32 too
        scaler.scale(loss * weight).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def _check_loss(loss: torch.Tensor, mine: int, current: distributed.World, epoch: int, number: int,
                last_path: Path) -> float:
    """Stop every rank, naming the epoch and batch, when any rank's loss is not finite. Else the weight of
    this rank's mean loss over its `mine` images: DDP averages the ranks' gradients, so a rank's share of
    the step's images times the ranks makes every rank train as one process on the whole batch, however
    unevenly the batch (or an unreadable image) split it; 1.0 in one process."""
    bad, images = distributed.all_sum(current, [0.0 if torch.isfinite(loss) else 1.0, float(mine)])
    if bad:
        kept = f"the last good checkpoint ({last_path}, epoch {epoch}) is kept" if epoch else "no checkpoint"
        raise FinetuneError(f"the loss became {loss.item()} in epoch {epoch + 1}, batch {number}; {kept}; "
                            "lower --lr and resume")
    return mine * current.size / images if images else 0.0


def _validate(model, dataset, targets, config, device, precision, labels=None) -> dict:
    """Validation loss and accuracy (or mAP) over the readable images (a multiscale head's: over single
    patches, and with its images' `labels` the mAP of images pooled from them); the others counted."""
    probabilities = score_images(model, dataset, config.batch_size, config.workers, device,
                                  multilabel=targets.ndim == 2, precision=precision, quiet=config.quiet,
                                  desc="validate")
    readable = ~np.isnan(probabilities).any(axis=1)
    if not readable.any():
        raise FinetuneError(f"no image of the validation data {config.val_data} could be read; check it")
    probabilities, targets = probabilities[readable], targets[readable]
    skipped = {"val_skipped_images": int((~readable).sum())} if not readable.all() else {}
    logits_targets = torch.from_numpy(targets.astype(np.float32) if targets.ndim == 2 else targets)
    if targets.ndim == 2:
        clipped = torch.from_numpy(probabilities).clamp(1e-7, 1 - 1e-7)
        loss = nn.functional.binary_cross_entropy(clipped, logits_targets.double()).item()
    else:
        loss = nn.functional.nll_loss(torch.from_numpy(np.log(np.clip(probabilities, 1e-12, None))),
                                      logits_targets).item()
    metric = "val_map" if targets.ndim == 2 else "val_accuracy"
    pooled = {} if labels is None else {
        "val_image_map": pooled_image_map(probabilities, dataset, np.flatnonzero(readable), labels)}
    return {"val_loss": loss, metric: validation_score(targets, probabilities), **pooled, **skipped}


def _identity(config: FinetuneConfig, head_metadata: dict, source) -> dict:
    """What a checkpoint must share with the run that resumes it: the model, the training images and the
    seed that orders them. --lr ("lower --lr and resume"), --epochs and --batch-size (a run out of device
    memory resumes with a smaller one, batched otherwise than the unbroken run) may change."""
    return {"head_codes_key": head_metadata["codes_key"], "layer": head_metadata["layer"],
            "classes": head_metadata["classes"], "kind": head_metadata["kind"], "unfreeze": config.unfreeze,
            "bn_stats": config.bn_stats, "optimizer": config.optimizer,
            "data": source.fingerprint(), "seed": config.seed}
