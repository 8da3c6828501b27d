"""Stage one: decode images in DataLoader workers, run the frozen backbone to its taps, write shards.

The source's shard plan says which samples shard k holds (`shard_rows` in listing order, a fresh shard at
each input tar) with a digest of their inputs, so a re-run keeps every finished shard whose inputs are
unchanged and redoes only the others.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.manifest import MANIFEST, PlannedShard, class_digest, record_files
from cache.writer import LISTINGS, CacheWriter
from pipeline.allocator import reused_memory
from pipeline.backbones import Backbone, forward_codes, get_backbone, prepare_model, resolve_weights
from pipeline.datasets import Source
from pipeline.decoding import (EncodedImages, collate_encoded, crop_decoder, decodes_on_device,
                               device_crops)
from pipeline import distributed
from pipeline.errors import TLError
from pipeline.extract_settings import ON_ERROR, ExtractConfig, settings_key, shard_size
from pipeline.files import refuse_overwriting_inputs
from pipeline.formats import DEFAULT_FORMAT, open_source
from pipeline.hardware import WorkerLoader, default_workers, pinned, resolve_device, resolve_precision
from pipeline.image_sets import image_loader
from pipeline.multiscale import BACKGROUND, TRAINING_SPLITS, PatchImages, check_patches, collate_patches
from pipeline.progress import progress
from pipeline.shard_building import ShardOf, ShardRows, Stopwatch, shard_batches, take_patches


@dataclass
class ExtractResult:
    out: Path
    rows: int
    taps: dict[str, int]
    bytes_on_disk: int
    seconds: float
    shards_written: int
    shards_reused: int
    images_processed: int
    loop_seconds: float = 0.0  # decoding + forward + writing, without startup
    write_seconds: float = 0.0  # of which writing shards (HDF5, checksum, manifest)
    wait_seconds: float = 0.0  # of which waiting for decoded batches (decoding was the bottleneck)
    forward_seconds: float = 0.0  # of which the backbone's forward pass
    skipped: list[dict] = field(default_factory=list)
    patches: int = 0  # rows written from patches in this run (multiscale)
    warnings: list[str] = field(default_factory=list)
    shards_dropped: int = 0  # finished shards whose inputs changed or went since: their files deleted (the
    # records cannot tell a changed tar from one removed beside a new one, so no count says which)
    device_refused: int = 0  # JPEGs the device's decoder refused: decoded (or skipped) by the CPU path instead
    background_dropped: int = 0  # of the training split's background patches, left out by --background-fraction


@contextlib.contextmanager
def _opened(writer: CacheWriter, current: distributed.World):
    """Rank 0 opens (locks, checks, clears or resumes) the cache before any other rank reads it; its
    verdict reaches every rank, so a refused cache stops them all with the same message."""
    error = None
    if current.is_main:
        try:
            writer.__enter__()
        except TLError as exc:
            error = exc
    refusal = distributed.broadcast(current, None if error is None else str(error))
    if error is not None:
        raise error
    if refusal is not None:
        raise TLError(refusal)
    if not current.is_main:
        writer.__enter__()
    try:
        yield writer
    except BaseException as exc:  # the writer withdraws a cache this run began and stopped before a shard of,
        # in one process only: under torchrun another rank may be writing a shard that rank 0 cannot see yet
        writer.__exit__(*((None,) * 3 if current.distributed else (type(exc), exc, exc.__traceback__)))
        raise
    writer.__exit__(None, None, None)


def cache_key(config: ExtractConfig, backbone: Backbone, taps: list[str], weights_digest: str,
              precision: str, source: Source) -> dict:
    """Everything that decides the rows of a cache; a cache answers only for the same key.

    `patches` holds the patch geometry (it changes what a code means, so heads check it); how
    background patches were sampled only changes which rows exist, so it sits with the data set.
    """
    key = settings_key(config, backbone, taps)
    key["dataset"].update({
        "format": source.format,
        # the class list, not every file: a shard records the digest of its own inputs, so changed
        # files redo their shards only (cache.writer); a changed class list refuses the cache
        "classes": class_digest(source.classes),
        "label_key": getattr(source, "label_key", None),
    })
    return {**key, "weights": weights_digest, "precision": precision}


def run_extract(config: ExtractConfig) -> ExtractResult:
    started = time.perf_counter()
    if config.on_error not in ON_ERROR:
        raise TLError(f"unknown --on-error {config.on_error}; valid: {', '.join(ON_ERROR)}")
    if config.batch_size < 1:
        raise TLError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.shard_rows is not None and config.shard_rows < 1:
        raise TLError(f"--shard-rows must be at least 1, got {config.shard_rows}")
    default_workers(config.workers)  # a bad count is refused before the cache folder exists
    crop_decoder(config.decode, 1, 1)  # an unknown mode is refused before any work
    backbone = get_backbone(config.backbone)
    check_patches(config.multiscale, config.patches, backbone, config.format)
    # a folder inside an imagefolder would become a class of it; other layouts only read their own files
    refuse_overwriting_inputs({"--out": Path(config.out)}, {"--data": Path(config.data)},
                              protected=("--data",) if config.format == DEFAULT_FORMAT else ())
    if Path(config.out).is_file():
        raise TLError(f"--out {config.out} is a file; a cache is a folder: choose another --out")
    taps = backbone.resolve_taps(list(config.layers) or [backbone.default_tap])
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    current = distributed.world()
    distributed.start(current, device)  # before the listing: the ranks list a share of the tars each, and exchange
    source = open_source(config.format, config.data, config.split, config.download, config.samples_per_class,
                         config.seed, config.classes, config.label_key, listings=Path(config.out) / LISTINGS,
                         world=current, own_share=True)  # a rank holds the samples of the tars it extracts only
    weights = resolve_weights(backbone, config.weights, config.seed)
    key = cache_key(config, backbone, taps, weights.digest, precision, source)
    widths = {tap: backbone.taps[tap].width for tap in taps}
    classes, target_kind = source.classes, source.target_kind
    if config.multiscale:  # one label per patch: background or one object class
        classes, target_kind = [BACKGROUND] + list(source.classes), "class"

    plan = source.shard_plan(shard_size(config))
    writer = CacheWriter(Path(config.out), key, classes, widths, config.dtype, shard_size(config), len(source),
                         config.compression, config.overwrite, target_kind, follower=not current.is_main, plan=plan,
                         rank=current.rank, position_matters=bool(key["dataset"]["background_seed"] is not None))
    with _opened(writer, current):
        if source.listings is not None:  # tar listings, for the next run: saved once the cache is ours; each rank
            source.listings.save(lambda number: number % current.size == current.rank)  # saves its share
            if current.is_main:  # then the listings of tars gone from the data go (rank 0 holds the lock)
                source.listings.remove_others()
        if current.is_main:  # what discovery noticed (loops, empty classes, bad boxes) stays on record
            writer.manifest.warnings = list(source.warnings)
        # static assignment: a shard belongs to rank (its input unit) mod world size, whatever ran before;
        # the unit is the shard itself for folders, its tar for tar inputs
        pending = [k for k, shard in enumerate(plan)
                   if k not in writer.finished and shard.unit % current.size == current.rank]
        if current.distributed:  # the other ranks' samples are theirs to hold (a billion images' columns)
            source.hold([(plan[k].first, plan[k].first + plan[k].samples) for k in pending])
        reused = len(writer.finished)
        timing = {"processed": 0, "loop": 0.0, "write": 0.0, "patches": 0, "wait": 0.0, "forward": 0.0}
        if pending:
            extract_shards = _extract_patch_shards if config.multiscale else _extract_shards
            with reused_memory(device):
                timing = extract_shards(config, backbone, taps, weights, device, precision, source, writer, pending, plan)
        distributed.barrier(current, "every shard written")
        if current.is_main:
            writer.adopt_shards()
            manifest = writer.finish()
        else:
            manifest = writer.manifest

    distributed.stop(current)
    out = Path(config.out)
    size = sum(s.bytes for s in manifest.shards) + sum(
        path.stat().st_size for path in [out / MANIFEST, *record_files(out)] if path.exists())
    written = len(manifest.shards) - reused if current.is_main else len(pending)  # rank 0 counts every rank's
    return ExtractResult(out, manifest.rows, widths, size,
                         time.perf_counter() - started, written, reused, timing["processed"],
                         timing["loop"], timing["write"], timing["wait"], timing["forward"], manifest.skipped,
                         timing.get("patches", 0), [*writer.notes, *source.warnings, *getattr(source.listings, "notes", ())],
                         writer.changed + writer.gone, timing.get("device_refused", 0), timing.get("dropped", 0))


def _note_error(config: ExtractConfig, rows: ShardRows, source: Source, index: int, reason: str) -> None:
    sample_id = source.samples[index].sample_id
    if config.on_error == "fail":
        problem = source.listing_problem(index)  # a tar entry without a label is not an image to decode
        raise TLError(f"cannot use {sample_id}: {problem}, or pass --on-error skip" if problem else
                      f"cannot decode {sample_id}: {reason}; fix or remove it, or pass --on-error skip")
    rows.skipped.append({"sample_id": sample_id, "reason": reason})


def _progress(config: ExtractConfig, backbone: Backbone, pending: list[int], plan: list[PlannedShard]):
    total = sum(plan[k].samples for k in pending)
    return progress(total=total, unit="img", quiet=config.quiet or not distributed.world().is_main,
                    desc=f"extract {backbone.name}")


def _extract_shards(config, backbone, taps, weights, device, precision, source, writer, pending, plan) -> dict:
    model = prepare_model(backbone, weights, taps, device)
    shard_of = ShardOf(plan)
    batches = shard_batches(pending, plan, config.batch_size)
    on_device = decodes_on_device(device, config.decode, config.device_decode)
    refused = [0]
    if on_device:
        loader = _device_decoded(source, backbone, batches, config, device, refused)
    else:
        loader = image_loader(source, backbone, batches, config.workers, device, config.decode)
    current, rows = None, ShardRows(taps, config.dtype)
    processed, clock = 0, Stopwatch()
    loop_started = time.perf_counter()
    with _progress(config, backbone, pending, plan) as progress:
        for pixels, indices, errors in clock.waited(loader):
            shard = shard_of(indices[0] if indices else errors[0][0])
            if shard != current:
                current, rows = shard, ShardRows(taps, config.dtype)
            for index, reason in errors:
                _note_error(config, rows, source, index, reason)
            if pixels is not None:
                columns: dict[str, list] = {}
                for index in indices:
                    for name, value in source.columns(index).items():
                        columns.setdefault(name, []).append(value)
                with clock.part("forward"):
                    codes = forward_codes(model, backbone, pixels, device, precision)
                samples = [source.samples[i] for i in indices]  # made on request (webdataset's): once each
                rows.add(codes, [sample.target for sample in samples], [sample.sample_id for sample in samples],
                         columns)
            batch_size = len(indices) + len(errors)
            processed += batch_size
            progress.update(batch_size)
            if max(indices + [i for i, _ in errors]) == shard_of.last(shard):
                with clock.part("write"):
                    rows.publish(writer, shard)
                progress.set_postfix(shards=f"{len(writer.finished)}/{writer.manifest.num_shards}")
    return {"processed": processed, "loop": time.perf_counter() - loop_started, **_parts(clock),
            "device_refused": refused[0]}


def _device_decoded(source: Source, backbone: Backbone, batches: list[list[int]], config: ExtractConfig,
                    device: torch.device, refused: list[int]):
    """Batches of (uint8 crops on the device, indices, errors) like image_loader's, with JPEGs decoded on
    the device (workers only read their bytes) and everything else, or what the device refuses,
    decoded by the CPU path; refused[0] counts the JPEGs the device refused."""
    crop = backbone.crop_decoder(config.decode)
    loader = WorkerLoader(EncodedImages(source, crop), device, config.workers, pin_memory=False,
                          batch_sampler=batches, collate_fn=collate_encoded)
    fallback = lambda index: crop(source.read_image(index, crop.draft))  # noqa: E731
    for items in loader:
        pixels, indices, errors, refusals = device_crops(items, device, backbone.resize_size, backbone.input_size,
                                                         fallback, backbone.interpolation)
        refused[0] += refusals
        yield pixels, indices, errors


def _parts(clock: Stopwatch) -> dict:
    return {name: clock.seconds.get(name, 0.0) for name in ("wait", "forward", "write")}


def _extract_patch_shards(config, backbone, taps, weights, device, precision, source, writer, pending, plan) -> dict:
    """Every kept patch of every image: images are decoded once (in workers), their patches pooled into
    forward batches of --batch-size that run across image boundaries within a shard."""
    model = prepare_model(backbone, weights, taps, device)
    shard_of = ShardOf(plan)
    dataset = PatchImages(source, backbone.input_size, config.patches, config.split in TRAINING_SPLITS, config.seed,
                          config.decode)
    # items are whole images of uint8 patches: 2 in flight per worker, pinned per forward batch below
    loader = WorkerLoader(dataset, device, config.workers, prefetch=2, pin_memory=False,
                          batch_sampler=shard_batches(pending, plan, 1), collate_fn=collate_patches)
    current, rows, waiting = None, ShardRows(taps, config.dtype), []
    processed, patches, dropped, clock = 0, 0, 0, Stopwatch()
    loop_started = time.perf_counter()

    def forward(segments: list) -> None:
        """Run one batch of patches (from one or several images) through the backbone; file their rows."""
        pixels = pinned(torch.cat([item.pixels[start:stop] for item, start, stop in segments]), device)
        with clock.part("forward"):
            codes = forward_codes(model, backbone, pixels, device, precision)
        targets, ids, columns = [], [], {"image_id": [], "box": [], "scale": [], "image_target": [], "image_ignore": []}
        for item, start, stop in segments:
            sample = source.samples[item.index]
            ignore = source.columns(item.index).get("ignore", np.zeros(len(sample.target), np.int8))
            for row in range(start, stop):
                targets.append(int(item.targets[row]))
                ids.append(f"{sample.sample_id}/{row}")
                columns["image_id"].append(sample.sample_id)
                columns["box"].append(item.boxes[row].astype(np.float32))
                columns["scale"].append(item.scales[row])
                columns["image_target"].append(np.asarray(sample.target, np.int8))
                columns["image_ignore"].append(ignore)
        rows.add(codes, targets, ids, columns)

    with _progress(config, backbone, pending, plan) as progress:
        for (item,) in clock.waited(loader):
            shard = shard_of(item.index)
            if shard != current:
                current, rows, waiting = shard, ShardRows(taps, config.dtype), []
            dropped += item.dropped
            if item.error:
                _note_error(config, rows, source, item.index, item.error)
            elif len(item.targets):
                waiting.append((item, 0, len(item.targets)))
                patches += len(item.targets)
                while sum(stop - start for _, start, stop in waiting) >= config.batch_size:
                    forward(take_patches(waiting, config.batch_size))
            processed += 1
            progress.update(1)
            progress.set_postfix(patches=patches)
            if item.index == shard_of.last(shard):
                if waiting:
                    forward(take_patches(waiting, sum(stop - start for _, start, stop in waiting)))
                with clock.part("write"):
                    rows.publish(writer, shard)
    return {"processed": processed, "loop": time.perf_counter() - loop_started, "patches": patches, "dropped": dropped,
            **_parts(clock)}
