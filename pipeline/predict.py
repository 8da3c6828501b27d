"""Predict labels of loose image files: stage one on the fly, then the head, top-k per image.

The backbone, its weights and its preprocessing come from the head file's metadata, never from flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

import torch

from cache.manifest import decode_of
from pipeline.allocator import reused_memory
from pipeline.backbones import as_cached, for_inference, forward_codes, get_backbone, prepare_model
from pipeline.datasets import FileListSource, shown
from pipeline.errors import DataError, HeadError
from pipeline.hardware import WorkerLoader, autocast, resolve_device, resolve_precision, to_device
from pipeline.image_sets import image_loader
from pipeline.model_files import head_backbone, load_head, load_model_file
from pipeline.multiscale import (DEFAULT_EXPONENT, PatchImages, PatchSettings, check_exponent, collate_patches,
                                 pool_image_scores, unused_exponent)
from pipeline.progress import progress
from pipeline.training import probabilities


@dataclass
class PredictConfig:
    """What `run_predict` labels: the image files and folders of `paths`, through a head (`head`, with its
    backbone rebuilt from the head's metadata) or a finetuned model (`model`); `top_k` labels per image.
    """

    head: Path | None
    paths: tuple[Path, ...]
    model: Path | None = None  # a tl finetune model instead of a head
    top_k: int = 5
    weights: str | None = None  # the state dict file, when the head's codes came from one
    batch_size: int = 32
    workers: int | None = None  # None: pipeline.hardware.default_workers
    device: str = "auto"
    precision: str = "auto"
    quiet: bool = False  # no progress bar (it goes to stderr; the CSV rows go to stdout)
    exponent: float = DEFAULT_EXPONENT  # multiscale heads: S(c) = sum over the image's patches of P(c) ** exponent


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]]  # best first
    error: str = ""  # why the file was skipped


def run_predict(config: PredictConfig, warn=lambda text: None) -> Iterator[Prediction]:
    """One Prediction per file, in listing order; unreadable files come back with `error` set. What the
    listing noticed (symlink loops, files reached twice) goes to `warn` first. Host memory is reused
    (allocator.reused_memory) from the first prediction until the last is taken or the caller closes
    the generator, so the caller's code between predictions runs with it too."""
    if config.top_k < 1:
        raise HeadError(f"--top-k must be at least 1, got {config.top_k}")
    if config.batch_size < 1:
        raise HeadError(f"--batch-size must be at least 1, got {config.batch_size}")
    check_exponent(config.exponent, HeadError)
    if (config.head is None) == (config.model is None):
        raise HeadError("predict with either --head H or --model M")
    tars = [path for path in config.paths if Path(path).suffix.lower() == ".tar" and not Path(path).is_dir()]
    if tars:  # a tar decodes as no image: say where tar shards are read instead
        raise DataError(f"{shown(tars[0])} is a tar and predict reads image files; label tar shards with tl evaluate "
                        f"--model M --data {shown(tars[0])} --format webdataset --out R --save-predictions F.csv, or for a "
                        "head tl extract --format webdataset then tl evaluate --head H --cache C --out R --save-predictions F.csv")
    device = resolve_device(config.device)
    probabilities_of, metadata = (_model_scorer if config.model else _head_scorer)(config, device)
    backbone = get_backbone(metadata["codes_key"]["backbone"])
    source = FileListSource(list(config.paths))
    for warning in source.warnings:
        warn(warning)
    classes = metadata["classes"]
    top_k = min(config.top_k, len(classes))
    batches = [list(range(start, min(start + config.batch_size, len(source))))
               for start in range(0, len(source), config.batch_size)]
    decode = decode_of(metadata["codes_key"]["preprocessing"])  # decoded as the head's codes were
    for warning in [] if metadata["codes_key"].get("patches") else unused_exponent(
            config.exponent, f"{'model' if config.model else 'head'} {config.model or config.head}"):
        warn(warning)
    if metadata["codes_key"].get("patches"):
        yield from _pooled_predictions(config, source, backbone, metadata, probabilities_of, device, decode)
        return
    loader = image_loader(source, backbone, batches, config.workers, device, decode)
    with reused_memory(device):  # until the last prediction is taken, or the caller closes the generator
        for pixels, indices, errors in progress(loader, total=len(batches), desc="predict", unit="batch",
                                                quiet=config.quiet, leave=False):
            found = {}
            if pixels is not None:
                probabilities = probabilities_of(pixels)
                for index, row in zip(indices, probabilities):
                    best = np.argsort(-row, kind="stable")[:top_k]
                    found[index] = Prediction(source.samples[index].sample_id,
                                              [(classes[c], float(row[c])) for c in best])
            for index, reason in errors:
                found[index] = Prediction(source.samples[index].sample_id, [], reason)
            for index in sorted(found):
                yield found[index]


def _pooled_predictions(config: PredictConfig, source: FileListSource, backbone, metadata: dict, probabilities_of,
                        device, decode: str) -> Iterator[Prediction]:
    """A multiscale head's labels of whole images, as `tl evaluate` scores them: every patch of the head's
    grid scored, S(c) = sum_j P(j, c) ** exponent over the object classes (background left out), each
    class given its share of the image's S (the shares sum to 1)."""
    settings = PatchSettings.of_geometry(metadata["codes_key"]["patches"])
    classes = metadata["classes"][1:]  # column 0 is the background
    top_k = min(config.top_k, len(classes))
    dataset = PatchImages(source, backbone.input_size, settings, training=False, seed=0, decode=decode)
    loader = WorkerLoader(dataset, device, config.workers, prefetch=2, pin_memory=False,
                          batch_sampler=[[index] for index in range(len(source))], collate_fn=collate_patches)
    with reused_memory(device):
        for (item,) in progress(loader, total=len(source), desc="predict", unit="image", quiet=config.quiet,
                                leave=False):
            path = source.samples[item.index].sample_id
            if item.error:
                yield Prediction(path, [], item.error)
                continue
            scores = np.concatenate([probabilities_of(item.pixels[start:start + config.batch_size])
                                     for start in range(0, len(item.pixels), config.batch_size)])
            _, pooled = pool_image_scores(scores, np.zeros(len(scores), np.int64), config.exponent)
            total = pooled[0].sum()
            shares = pooled[0] / total if total > 0 else pooled[0]
            best = np.argsort(-shares, kind="stable")[:top_k]
            yield Prediction(path, [(classes[c], float(shares[c])) for c in best])


def _head_scorer(config: PredictConfig, device):
    """pixels -> probabilities through the head's backbone (rebuilt from its metadata) and the head."""
    head, metadata = load_head(config.head)
    backbone, weights = head_backbone(metadata["codes_key"], config.weights, f"head {config.head}")
    precision = resolve_precision(config.precision, device)
    layer = metadata["layer"]
    model = prepare_model(backbone, weights, [layer], device)
    stored = metadata.get("codes_dtype")  # absent from heads of an earlier tl: the codes as computed

    def probabilities_of(pixels):
        codes = forward_codes(model, backbone, pixels, device, precision)[layer]
        # rounded as the cache stored the codes the head was fitted on: the scores evaluate --head gives the
        # same images' cached codes (float32 codes between float16's steps moved near-constant columns by
        # many of their tiny standard deviations: 41 of 50 labels differed on a random-init backbone)
        return head.predict_proba(as_cached(torch.from_numpy(codes), stored).numpy())

    return probabilities_of, metadata


def _model_scorer(config: PredictConfig, device):
    """pixels -> probabilities through a finetuned model."""
    model, metadata = load_model_file(config.model)
    model = for_inference(model, device)
    precision = resolve_precision(config.precision, device)
    multilabel = metadata["head"]["state"]["multilabel"]
    backbone = get_backbone(metadata["codes_key"]["backbone"])

    def probabilities_of(pixels):
        with torch.inference_mode():
            inputs = backbone.normalize(to_device(pixels, device))
            with autocast(device, precision):
                logits = model(inputs).float()
            return probabilities(logits, multilabel)

    return probabilities_of, metadata
