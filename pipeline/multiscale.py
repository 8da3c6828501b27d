"""Oquab et al. (CVPR 2014) patches: a square grid at many scales, labels from the boxes a patch
covers, background down-sampled for training, and patch scores pooled back into image scores.

Coordinates are 0-based pixel indices: a W-pixel-wide image spans x in [0, W - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.datasets import DECODE_ERRORS, Annotation
from pipeline.decoding import decoding_mode
from pipeline.errors import DataError, unreadable

if TYPE_CHECKING:
    from pipeline.backbone_spec import Backbone

DEFAULT_SCALES = (1.0, 1.3, 1.6, 2.0, 2.3, 2.6, 3.0, 3.3, 3.6, 4.0, 4.3, 4.6, 5.0)
DEFAULT_EXPONENT = 5.0  # the paper's k in S(i, c) = sum_j P(j, c) ** k
BACKGROUND = "background"
MAX_SCALE = 64.0
TRAINING_SPLITS = ("train", "trainval")


@dataclass(frozen=True)
class PatchSettings:
    """What decides the patches and their labels (the geometry part enters the codes key)."""

    scales: tuple[float, ...] = DEFAULT_SCALES
    patch_overlap: float = 0.2  # the box must cover at least this much of the patch...
    box_overlap: float = 0.6  # ...and the patch at least this much of the box
    background_fraction: float | None = 0.1  # kept share of background patches in training; None keeps all

    @classmethod
    def of_options(cls, scales: str, patch_overlap: float, box_overlap: float,
                   background_fraction: float | None) -> "PatchSettings":
        """The settings `tl extract`'s options give (`scales` as comma-separated text, already read as
        numbers by the command line); `tl run` builds a step's the same way to check it before any step."""
        return cls(scales=tuple(float(scale) for scale in scales.split(",") if scale.strip()),
                   patch_overlap=patch_overlap, box_overlap=box_overlap, background_fraction=background_fraction)

    def check(self) -> None:
        # finite and bounded: inf gave one empty patch per image; 64 already means ~4,000 patches per image
        if not self.scales or any(not (math.isfinite(scale) and 1.0 <= scale <= MAX_SCALE) for scale in self.scales):
            raise DataError(f"--scales must be numbers from 1.0 (the largest square) to {MAX_SCALE:g}, "
                            f"got {', '.join(f'{scale:g}' for scale in self.scales)}")
        if len(set(self.scales)) != len(self.scales):
            raise DataError(f"--scales lists a scale twice ({', '.join(f'{s:g}' for s in self.scales)}); "
                            "each scale's patches would be written again")
        for name in ("patch_overlap", "box_overlap"):
            if not 0 < getattr(self, name) <= 1:
                raise DataError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if self.background_fraction is not None and not 0 <= self.background_fraction <= 1:
            raise DataError(f"--background-fraction must be in [0, 1], got {self.background_fraction}")

    def geometry(self) -> dict:
        return {"scales": list(self.scales), "patch_overlap": self.patch_overlap, "box_overlap": self.box_overlap}

    @classmethod
    def of_geometry(cls, geometry: dict, background_fraction: float | None = None) -> "PatchSettings":
        """The settings whose geometry() a codes key recorded (background thinning is not in it)."""
        return cls(tuple(geometry["scales"]), geometry["patch_overlap"], geometry["box_overlap"], background_fraction)


def axis_starts(length: int, side: float) -> np.ndarray:
    """Starts of ceil((length - 1) / side) patches spread evenly from 0 to the far border."""
    span = length - 1
    if side <= 0 or span <= side:
        return np.zeros(1)
    count = math.ceil(span / side - 1e-9)  # 3.0000000001 must not become four patches
    return np.linspace(0.0, span - side, count)


def patch_grid(width: int, height: int, scales=DEFAULT_SCALES) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (P, 4) as x0, y0, x1, y1; scale of each patch (P,)). At scale s the side is
    (min(H, W) - 1) / s; every patch lies inside the image and each scale's patches cover it."""
    boxes, patch_scales = [], []
    for scale in scales:
        side = (min(width, height) - 1) / scale
        for y in axis_starts(height, side):
            for x in axis_starts(width, side):
                boxes.append((x, y, x + side, y + side))
                patch_scales.append(scale)
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(patch_scales, dtype=np.float32)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def label_patches(patches: np.ndarray, boxes: np.ndarray, labels: np.ndarray, patch_overlap: float = 0.2,
                  box_overlap: float = 0.6) -> np.ndarray:
    """Patch targets over C + 1 classes: 1 + the class of the one box that covers ≥ patch_overlap of
    the patch while the patch covers ≥ box_overlap of the box; 0 (background) if none or several do."""
    if len(boxes) == 0:
        return np.zeros(len(patches), dtype=np.int64)
    left = np.maximum(patches[:, None, 0], boxes[None, :, 0])
    top = np.maximum(patches[:, None, 1], boxes[None, :, 1])
    right = np.minimum(patches[:, None, 2], boxes[None, :, 2])
    bottom = np.minimum(patches[:, None, 3], boxes[None, :, 3])
    overlap = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    box_areas = _areas(boxes)
    qualifies = (overlap >= patch_overlap * _areas(patches)[:, None]) & (overlap >= box_overlap * box_areas[None, :]) \
        & (box_areas[None, :] > 0)
    single = qualifies.sum(axis=1) == 1
    targets = np.zeros(len(patches), dtype=np.int64)
    targets[single] = labels[np.argmax(qualifies[single], axis=1)] + 1
    return targets


def keep_background(targets: np.ndarray, fraction: float | None, rng: np.random.Generator) -> np.ndarray:
    """Which patches to keep: every object patch, and each background patch with probability `fraction`."""
    if fraction is None:
        return np.ones(len(targets), dtype=bool)
    return (targets != 0) | (rng.random(len(targets)) < fraction)


def check_patches(multiscale: bool, patches: PatchSettings, backbone: Backbone, format: str) -> None:
    """extract's refusals that need only its options: patch settings out of range or given without
    --multiscale, a backbone that does not resize bilinearly, data without boxes. `tl run` makes them
    for each extract step before any step runs."""
    if not multiscale:
        if patches != PatchSettings():
            given = next(f.name for f in fields(PatchSettings) if getattr(patches, f.name) != f.default)
            raise DataError(f"--{given.replace('_', '-')} sets --multiscale patches; add --multiscale, or leave it out")
        return
    patches.check()
    if backbone.interpolation != "bilinear":  # patches are resized bilinearly
        raise DataError(f"{backbone.name} resizes by {backbone.interpolation}: --multiscale takes bilinear backbones")
    from pipeline.formats import registered_formats  # the format modules, only when patches are asked for

    known = registered_formats()  # an unknown format is refused where its data is opened
    if format in known and not known[format].boxes:
        raise DataError(f"--multiscale labels patches by their boxes: {format} data has none; use voc data "
                        "(Annotations/*.xml), or leave --multiscale out for one crop per image")


def check_exponent(exponent: float, error: type[Exception] = DataError) -> None:
    """The pooling exponent k: positive and finite (k = inf or nan scores every image 0 or nan)."""
    if not (math.isfinite(exponent) and exponent > 0):
        raise error(f"--exponent must be a positive finite number (the paper's range is 1 to 10), got {exponent}")


def unused_exponent(exponent: float, what: str) -> list[str]:
    """The warning for an --exponent given where nothing is pooled (`what` scores one crop per image)."""
    if exponent == DEFAULT_EXPONENT:
        return []
    return [f"--exponent {exponent:g} pools the patch scores of multiscale caches and heads; {what} scores one "
            "crop per image, so it changes nothing here (leave it out)"]


def pool_image_scores(patch_scores: np.ndarray, image_ids: np.ndarray, exponent: float = DEFAULT_EXPONENT
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(image ids in order of first appearance, S (images, C) with S(i, c) = sum_j P(j, c) ** k over
    the patches j of image i). The background column 0 of the patch scores is dropped."""
    check_exponent(exponent)
    unique, first, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    pooled = np.zeros((len(unique), patch_scores.shape[1] - 1))
    np.add.at(pooled, rank[inverse.ravel()], np.asarray(patch_scores, np.float64)[:, 1:] ** exponent)
    return unique[order], pooled


@dataclass
class ImagePatches:
    """Every kept patch of one image, as uint8 pixels at the backbone's input size, with their facts."""

    index: int
    pixels: torch.Tensor | None  # (P, 3, S, S) uint8
    boxes: np.ndarray
    scales: np.ndarray
    targets: np.ndarray
    error: str = ""
    dropped: int = 0  # background patches left out by the training split's thinning


class PatchDraft:
    """`draft(width, height) -> (width, height)` for Source.read_image: the smallest size at which the
    smallest patch of the grid (side (min(W, H) - 1) / largest scale) still spans `size` pixels. A
    class, not a closure, so that datasets holding it pickle into spawned DataLoader workers."""

    def __init__(self, largest_scale: float, size: int):
        self.largest_scale, self.size = largest_scale, size

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        factor = self.size / max((min(width, height) - 1) / self.largest_scale, 1.0)
        return math.ceil(width * factor), math.ceil(height * factor)


def patch_draft(scales, size: int, decode: str) -> PatchDraft | None:
    """How small a JPEG may be decoded for its patches: under a reducing decoding mode (fast), so that
    every patch is still resampled down from at least its input size, as from the full decode; None
    (full size) for the exact mode."""
    return None if decoding_mode(decode).draft is None else PatchDraft(max(scales), size)


class PatchImages(Dataset):
    """Decodes each image once (at reduced scale where `decode` allows, see patch_draft) and cuts all
    its patches; labels need the source's annotations."""

    def __init__(self, source, input_size: int, settings: PatchSettings, training: bool, seed: int,
                 decode: str = "exact"):
        self.source = source
        self.input_size = input_size
        self.settings = settings
        self.draft = patch_draft(settings.scales, input_size, decode)
        self.training = training
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def patches_of(self, index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(boxes, scales, targets, background patches left out) of the patches kept for image `index`
        (seeded per image)."""
        boxes, scales = patch_grid(width, height, self.settings.scales)
        annotation: Annotation | None = getattr(self.source, "annotations", [None] * len(self.source))[index]
        if annotation is None:
            targets = np.zeros(len(boxes), dtype=np.int64)
        else:
            targets = label_patches(boxes, annotation.boxes, annotation.labels, self.settings.patch_overlap,
                                    self.settings.box_overlap)
        if self.training:
            keep = keep_background(targets, self.settings.background_fraction,
                                   np.random.default_rng([self.seed, index]))
            return boxes[keep], scales[keep], targets[keep], int(len(keep) - keep.sum())
        return boxes, scales, targets, 0

    def __getitem__(self, index: int) -> ImagePatches:
        try:
            image = self.source.read_image(index, self.draft)
        except DECODE_ERRORS as exc:
            reason = unreadable(exc)
            return ImagePatches(index, None, np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64), reason)
        boxes, scales, targets, dropped = self.patches_of(index, *image.info.get("original_size", image.size))
        pixels = np.empty((len(boxes), self.input_size, self.input_size, 3), dtype=np.uint8)
        for row, box in enumerate(boxes):
            pixels[row] = np.asarray(crop_patch(image, box, self.input_size))
        return ImagePatches(index, torch.from_numpy(pixels).permute(0, 3, 1, 2), boxes, scales, targets, dropped=dropped)


def crop_patch(image: Image.Image, box: np.ndarray, size: int) -> Image.Image:
    """The patch spanning pixel indices x0..x1, y0..y1 (edges x0 .. x1 + 1) of the image as it was
    before any reduced-scale decoding (info["original_size"]; a JPEG decoded at 1/f has pixels f
    originals wide), resized to size x size."""
    factor = max(1, round(image.info.get("original_size", image.size)[0] / image.size[0]))
    x0, y0, x1, y1 = (float(v) / factor for v in box)
    edge = 1.0 / factor
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x1 + edge, y1 + edge))


class PatchSamples(Dataset):
    """Single patches of a source, one item each, for stage three: (pixels, position, error) like
    extract's DecodedImages. Rows come from the same grid, labels and seeded background sampling as
    stage one, computed from the annotation sizes without decoding; the last decoded image is kept."""

    def __init__(self, source, input_size: int, settings: PatchSettings, training: bool, seed: int, transform,
                 decode: str = "exact"):
        grid = PatchImages(source, input_size, settings, training, seed, decode)
        images, boxes, targets = [], [], []
        for index, annotation in enumerate(source.annotations):
            image_boxes, _, image_targets, _ = grid.patches_of(index, annotation.width, annotation.height)
            images.append(np.full(len(image_boxes), index))
            boxes.append(image_boxes)
            targets.append(image_targets)
        self.source, self.input_size, self.transform, self.draft = source, input_size, transform, grid.draft
        self.images = np.concatenate(images) if images else np.zeros(0, np.int64)
        self.boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        self.targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        self._decoded: tuple[int, Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, position: int):
        index = int(self.images[position])
        try:
            if self._decoded is None or self._decoded[0] != index:
                self._decoded = (index, self.source.read_image(index, self.draft))
            patch = crop_patch(self._decoded[1], self.boxes[position], self.input_size)
            return self.transform(patch), position, ""
        except DECODE_ERRORS as exc:
            return None, position, unreadable(exc)


def collate_patches(items: list[ImagePatches]) -> list[ImagePatches]:
    return items
