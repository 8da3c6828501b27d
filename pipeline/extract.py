"""Stage one: decode images in DataLoader workers, run the frozen backbone to its taps, write shards.

Shard k always holds samples [k * shard_rows, (k + 1) * shard_rows), so a re-run skips finished shards.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.manifest import MANIFEST
from cache.writer import CacheWriter
from pipeline.backbones import Backbone, forward_codes, get_backbone, prepare_model, resolve_weights
from pipeline.datasets import Source
from pipeline.decoding import (DEFAULT_DECODE, EncodedImages, collate_encoded, crop_decoder, decodes_on_device,
                               device_crops)
from pipeline import distributed
from pipeline.errors import TLError
from pipeline.files import refuse_overwriting_inputs
from pipeline.formats import open_source
from pipeline.hardware import WorkerLoader, pinned, resolve_device, resolve_precision
from pipeline.image_sets import image_loader
from pipeline.multiscale import BACKGROUND, TRAINING_SPLITS, PatchImages, PatchSettings, collate_patches
from pipeline.progress import progress

ON_ERROR = ("skip", "fail")


@dataclass
class ExtractConfig:
    """What `run_extract` reads and writes: the images of `data` (read as `format`, split `split`) through
    `backbone` with `weights`, codes of `layers` (empty: the backbone's default tap) stored as `dtype` in
    shards of `shard_rows` images under `out`. Each field is the `tl extract` option of the same name;
    `patches` gathers the --multiscale settings.
    """

    data: Path
    out: Path
    format: str = "imagefolder"
    split: str = "train"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    layers: tuple[str, ...] = ()  # empty: the backbone's default tap
    dtype: str = "float16"
    shard_rows: int | None = None  # images per shard; None: 4096, or 32 with --multiscale
    compression: str = "none"
    batch_size: int = 64
    workers: int | None = None  # None: pipeline.hardware.default_workers
    device: str = "auto"
    precision: str = "auto"
    samples_per_class: int | None = None
    seed: int = 0
    on_error: str = "skip"
    decode: str = DEFAULT_DECODE  # how images become centre crops: fast (reduced-scale JPEG decoding) or exact
    device_decode: str = "auto"  # JPEGs decoded on the device: auto (on CUDA), on, off
    overwrite: bool = False
    download: bool = False
    quiet: bool = False
    classes: str = "voc"  # voc sources: voc (the 20), auto (from the annotations) or comma-separated names
    multiscale: bool = False  # Oquab patches of every image instead of one centre crop
    patches: PatchSettings = field(default_factory=PatchSettings)


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
    finally:
        writer.__exit__(None, None, None)


def shard_size(config: ExtractConfig) -> int:
    """Images per shard: a multiscale image yields hundreds of rows, so its shards hold fewer images."""
    return config.shard_rows if config.shard_rows is not None else (32 if config.multiscale else 4096)


def cache_key(config: ExtractConfig, backbone: Backbone, taps: list[str], weights_digest: str,
              precision: str, source: Source) -> dict:
    """Everything that decides the rows of a cache; a cache answers only for the same key.

    `patches` holds the patch geometry (it changes what a code means, so heads check it); how
    background patches were sampled only changes which rows exist, so it sits with the data set.
    """
    training = config.split in TRAINING_SPLITS
    return {
        "backbone": backbone.name,
        "weights": weights_digest,
        "taps": sorted(taps),
        # patches are cut from the full decode whatever --decode says (small patches need every pixel)
        "preprocessing": backbone.preprocessing("exact" if config.multiscale else config.decode),
        "precision": precision,
        "dataset": {
            "format": source.format,
            "split": config.split,
            "fingerprint": source.fingerprint(),
            "samples_per_class": config.samples_per_class or None,  # 0 and None: every image
            "subset_seed": config.seed if config.samples_per_class else None,
            "background_fraction": config.patches.background_fraction if config.multiscale and training else None,
            "background_seed": config.seed if config.multiscale and training else None,
        },
        "layout": {"dtype": config.dtype, "shard_rows": shard_size(config)},
        "patches": config.patches.geometry() if config.multiscale else None,
    }


def _shard_batches(pending: list[int], shard_rows: int, num_samples: int, batch_size: int) -> list[list[int]]:
    """Batches never straddle shards, so a resumed shard sees exactly the batches of an unbroken run."""
    batches = []
    for shard in pending:
        start, stop = shard * shard_rows, min(num_samples, (shard + 1) * shard_rows)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


def _check_codes(codes: dict[str, np.ndarray], dtype: str, ids: list[str]) -> None:
    for tap, array in codes.items():
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise TLError(
                f"the backbone produced NaN or Inf in {tap} for {ids[int(np.argmax(bad))]} "
                f"({int(bad.sum())} rows); check the weights file"
            )
        if dtype == "float16" and np.abs(array).max(initial=0) > np.finfo(np.float16).max:
            raise TLError(f"codes of {tap} exceed the float16 range; pass --dtype float32")


def run_extract(config: ExtractConfig) -> ExtractResult:
    started = time.perf_counter()
    if config.on_error not in ON_ERROR:
        raise TLError(f"unknown --on-error {config.on_error}; valid: {', '.join(ON_ERROR)}")
    if config.batch_size < 1:
        raise TLError(f"--batch-size must be at least 1, got {config.batch_size}")
    crop_decoder(config.decode, 1, 1)  # an unknown mode is refused before any work
    if config.multiscale:
        config.patches.check()
    # a folder inside an imagefolder would become a class of it; other layouts only read their own files
    refuse_overwriting_inputs({"--out": Path(config.out)}, {"--data": Path(config.data)},
                              protected=("--data",) if config.format == "imagefolder" else ())
    if Path(config.out).is_file():
        raise TLError(f"--out {config.out} is a file; a cache is a folder: choose another --out")
    backbone = get_backbone(config.backbone)
    if config.multiscale and backbone.interpolation != "bilinear":  # patches are resized bilinearly
        raise TLError(f"{backbone.name} resizes by {backbone.interpolation}: --multiscale takes bilinear backbones")
    taps = backbone.resolve_taps(list(config.layers) or [backbone.default_tap])
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    source = open_source(config.format, config.data, config.split, config.download, config.samples_per_class,
                         config.seed, config.classes)
    weights = resolve_weights(backbone, config.weights, config.seed)
    key = cache_key(config, backbone, taps, weights.digest, precision, source)
    widths = {tap: backbone.taps[tap].width for tap in taps}
    classes, target_kind = source.classes, source.target_kind
    if config.multiscale:  # one label per patch: background or one object class
        classes, target_kind = [BACKGROUND] + list(source.classes), "class"

    current = distributed.world()
    distributed.start(current, device)
    writer = CacheWriter(Path(config.out), key, classes, widths, config.dtype, shard_size(config), len(source),
                         config.compression, config.overwrite, target_kind, follower=not current.is_main)
    with _opened(writer, current):
        if current.is_main:  # what discovery noticed (loops, empty classes, bad boxes) stays on record
            writer.manifest.warnings = list(source.warnings)
        num_shards = writer.manifest.num_shards
        # static assignment: shard k belongs to rank k mod world size, whatever ran before
        pending = [k for k in range(num_shards) if k not in writer.finished and k % current.size == current.rank]
        reused = len(writer.finished)
        timing = {"processed": 0, "loop": 0.0, "write": 0.0, "patches": 0, "wait": 0.0, "forward": 0.0}
        if pending:
            extract_shards = _extract_patch_shards if config.multiscale else _extract_shards
            timing = extract_shards(config, backbone, taps, weights, device, precision, source, writer, pending)
        distributed.barrier(current, "every shard written")
        if current.is_main:
            writer.adopt_shards()
            manifest = writer.finish()
        else:
            manifest = writer.manifest

    distributed.stop(current)
    out = Path(config.out)
    size = sum(s.bytes for s in manifest.shards) + (out / MANIFEST).stat().st_size
    written = len(manifest.shards) - reused if current.is_main else len(pending)  # rank 0 counts every rank's
    return ExtractResult(out, manifest.rows, widths, size,
                         time.perf_counter() - started, written, reused, timing["processed"],
                         timing["loop"], timing["write"], timing["wait"], timing["forward"], manifest.skipped,
                         timing.get("patches", 0), list(source.warnings))


class Stopwatch:
    """Seconds spent in named parts of a loop (waiting for batches, the forward pass, writing)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def waited(self, iterable, name: str = "wait"):
        """`iterable`'s items, timing how long each took to arrive."""
        iterator = iter(iterable)
        while True:
            with self.part(name):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item


class ShardRows:
    """The rows of the shard being built: codes per tap, targets, ids, other columns, skipped images."""

    def __init__(self, taps: list[str], dtype: str):
        self.dtype = dtype
        self.codes: dict[str, list[np.ndarray]] = {tap: [] for tap in taps}
        self.targets: list = []
        self.ids: list[str] = []
        self.columns: dict[str, list] = {}
        self.skipped: list[dict] = []

    def add(self, codes: dict[str, np.ndarray], targets: list, ids: list[str], columns: dict[str, list]) -> None:
        _check_codes(codes, self.dtype, ids)
        for tap, array in codes.items():
            self.codes[tap].append(array.astype(self.dtype, copy=False))
        self.targets += list(targets)
        self.ids += ids
        for name, values in columns.items():
            self.columns.setdefault(name, []).extend(values)

    def publish(self, writer: CacheWriter, shard: int) -> None:
        codes = {tap: np.concatenate(parts) if parts else np.zeros((0, writer.taps[tap]), np.float32)
                 for tap, parts in self.codes.items()}
        columns = {name: np.asarray(values) for name, values in self.columns.items()}
        writer.write_shard(shard, codes, np.asarray(self.targets, dtype=np.int64), self.ids, self.skipped, columns)


def _note_error(config: ExtractConfig, rows: ShardRows, sample_id: str, reason: str) -> None:
    if config.on_error == "fail":
        raise TLError(f"cannot decode {sample_id}: {reason}; fix or remove it, or pass --on-error skip")
    rows.skipped.append({"sample_id": sample_id, "reason": reason})


def _shard_end(shard: int, shard_rows: int, num_samples: int) -> int:
    return min(num_samples, (shard + 1) * shard_rows) - 1


def _progress(config: ExtractConfig, backbone: Backbone, pending: list[int], shard_rows: int, num_samples: int):
    total = sum(_shard_end(k, shard_rows, num_samples) + 1 - k * shard_rows for k in pending)
    return progress(total=total, unit="img", quiet=config.quiet or not distributed.world().is_main,
                    desc=f"extract {backbone.name}")


def _extract_shards(config, backbone, taps, weights, device, precision, source, writer, pending) -> dict:
    model = prepare_model(backbone, weights, taps, device)
    shard_rows, num_samples = shard_size(config), len(source)
    batches = _shard_batches(pending, shard_rows, num_samples, config.batch_size)
    # nvjpeg's crops are resized bilinearly: a backbone that wants another resize decodes in the workers
    on_device = decodes_on_device(device) if config.device_decode == "auto" else config.device_decode == "on"
    on_device = on_device and backbone.interpolation == "bilinear"
    if on_device:
        loader = _device_decoded(source, backbone, batches, config, device)
    else:
        loader = image_loader(source, backbone, batches, config.workers, device, config.decode)
    current, rows = None, ShardRows(taps, config.dtype)
    processed, clock = 0, Stopwatch()
    loop_started = time.perf_counter()
    with _progress(config, backbone, pending, shard_rows, num_samples) as progress:
        for pixels, indices, errors in clock.waited(loader):
            shard = (indices[0] if indices else errors[0][0]) // shard_rows
            if shard != current:
                current, rows = shard, ShardRows(taps, config.dtype)
            for index, reason in errors:
                _note_error(config, rows, source.samples[index].sample_id, reason)
            if pixels is not None:
                columns: dict[str, list] = {}
                for index in indices:
                    for name, value in source.columns(index).items():
                        columns.setdefault(name, []).append(value)
                with clock.part("forward"):
                    codes = forward_codes(model, backbone, pixels, device, precision)
                rows.add(codes, [source.samples[i].target for i in indices],
                         [source.samples[i].sample_id for i in indices], columns)
            batch_size = len(indices) + len(errors)
            processed += batch_size
            progress.update(batch_size)
            if max(indices + [i for i, _ in errors]) == _shard_end(shard, shard_rows, num_samples):
                with clock.part("write"):
                    rows.publish(writer, shard)
                progress.set_postfix(shards=f"{len(writer.finished)}/{writer.manifest.num_shards}")
    return {"processed": processed, "loop": time.perf_counter() - loop_started, **_parts(clock)}


def _device_decoded(source: Source, backbone: Backbone, batches: list[list[int]], config: ExtractConfig,
                    device: torch.device):
    """Batches of (uint8 crops on the device, indices, errors) like image_loader's, with JPEGs decoded on
    the device (workers only read their bytes) and everything else, or what the device refuses,
    decoded by the CPU path."""
    crop = backbone.crop_decoder(config.decode)
    loader = WorkerLoader(EncodedImages(source, crop), device, config.workers, pin_memory=False,
                          batch_sampler=batches, collate_fn=collate_encoded)
    fallback = lambda index: crop(source.read_image(index, crop.draft))  # noqa: E731
    for items in loader:
        yield device_crops(items, device, backbone.resize_size, backbone.input_size, fallback)


def _parts(clock: Stopwatch) -> dict:
    return {name: clock.seconds.get(name, 0.0) for name in ("wait", "forward", "write")}


def _extract_patch_shards(config, backbone, taps, weights, device, precision, source, writer, pending) -> dict:
    """Every kept patch of every image: images are decoded once (in workers), their patches pooled into
    forward batches of --batch-size that run across image boundaries within a shard."""
    model = prepare_model(backbone, weights, taps, device)
    shard_rows, num_samples = shard_size(config), len(source)
    dataset = PatchImages(source, backbone.input_size, config.patches, config.split in TRAINING_SPLITS, config.seed)
    # items are whole images of uint8 patches: 2 in flight per worker, pinned per forward batch below
    loader = WorkerLoader(dataset, device, config.workers, prefetch=2, pin_memory=False,
                          batch_sampler=_shard_batches(pending, shard_rows, num_samples, 1), collate_fn=collate_patches)
    current, rows, waiting = None, ShardRows(taps, config.dtype), []
    processed, patches, clock = 0, 0, Stopwatch()
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

    with _progress(config, backbone, pending, shard_rows, num_samples) as progress:
        for (item,) in clock.waited(loader):
            shard = item.index // shard_rows
            if shard != current:
                current, rows, waiting = shard, ShardRows(taps, config.dtype), []
            if item.error:
                _note_error(config, rows, source.samples[item.index].sample_id, item.error)
            elif len(item.targets):
                waiting.append((item, 0, len(item.targets)))
                patches += len(item.targets)
                while sum(stop - start for _, start, stop in waiting) >= config.batch_size:
                    forward(_take(waiting, config.batch_size))
            processed += 1
            progress.update(1)
            progress.set_postfix(patches=patches)
            if item.index == _shard_end(shard, shard_rows, num_samples):
                if waiting:
                    forward(_take(waiting, sum(stop - start for _, start, stop in waiting)))
                with clock.part("write"):
                    rows.publish(writer, shard)
    return {"processed": processed, "loop": time.perf_counter() - loop_started, "patches": patches, **_parts(clock)}


def _take(waiting: list, count: int) -> list:
    """Remove the first `count` patches from the waiting (item, start, stop) segments and return them."""
    taken = []
    while count:
        item, start, stop = waiting[0]
        step = min(count, stop - start)
        taken.append((item, start, start + step))
        if start + step == stop:
            waiting.pop(0)
        else:
            waiting[0] = (item, start + step, stop)
        count -= step
    return taken
