"""Data sources: what every data format shares. A Source lists samples (id, target, where to read it)
and decodes one image to RGB; a seeded stratified subset; a fingerprint for cache keys; the registry
of formats (the formats themselves live in pipeline.formats, one module each).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cache.manifest import PlannedShard
from pipeline.errors import DataError, listed
from pipeline.rgb import DECODE_ERRORS, open_regular, open_rgb, to_rgb  # noqa: F401 (the formats import them here)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

FORMATS: dict[str, type["Source"]] = {}  # --format values, filled by register_format (see pipeline.formats)


def register_format(source: type["Source"]) -> type["Source"]:
    """Class decorator: make a data format available under its `format` name; a second of one name is refused."""
    if not source.format or source.format in FORMATS:
        raise DataError(f"a data format named '{source.format}' is already registered; choose another name")
    FORMATS[source.format] = source
    return source


@dataclass(frozen=True)
class Sample:
    sample_id: str
    target: int | tuple[int, ...]  # a class index, or a multi-hot tuple for multi-label sources
    location: str  # a file path, or an index into an in-memory array
    stamp: str  # what changes when the sample's content changes (size, mtime), for the fingerprint


class Source:
    """A listed data set. Subclasses fill `classes` and `samples` and read one image.

    A data format is a subclass registered with `register_format`: `format` names it (`--format`),
    `help` describes it, and the classmethod `open(data, split, download, classes)` lists its samples.
    """

    format: str = ""
    help: str = ""
    target_kind = "class"  # or "multi-hot"
    options: tuple[str, ...] = ()  # keyword options of `open` beyond the common ones (webdataset: label_key)
    downloads = False  # whether `open(..., download=True)` fetches missing data (--download)
    takes_classes = False  # whether `open` reads `classes` (--classes: voc, webdataset); others refuse one given
    boxes = False  # whether its samples carry object boxes (`annotations`), which --multiscale labels patches by
    # whether --split picks images only as the folder DATA/SPLIT, when there is one (imagefolder, webdataset; a CSV
    # has none): otherwise DATA is read, the same images whatever the split (validation must not take them)
    split_by_folder = False
    listings = None  # what listing found, kept for the next run: `listings.save(share)` (webdataset's tars)

    def __init__(self, classes: list[str], samples: list[Sample]):
        self.classes = classes
        self.samples = samples
        self.warnings: list[str] = []  # counted oddities worth one line at the end (clipped boxes, ...)

    def columns(self, index: int) -> dict[str, np.ndarray]:
        """Per-sample columns beyond target and id (VOC: `ignore`, the difficult-only classes)."""
        return {}

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, index: int, draft=None) -> Image.Image:
        """The sample as RGB; `draft(width, height) -> (width, height)`: see open_rgb."""
        return open_rgb(self.samples[index].location, draft)

    def encoded(self, index: int) -> bytes | None:
        """The sample's encoded bytes as stored (a file's content), for decoders that take bytes (JPEGs
        decoded on the GPU); None for sources that keep decoded pixels (CIFAR's rows). OSError when
        the bytes cannot be read."""
        if type(self).read_image is not Source.read_image:
            return None
        with open_regular(self.samples[index].location) as handle:
            return handle.read()

    def fingerprint(self) -> str:
        """A digest of the class names and every sample's inputs: changes when the data does."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        self.digest_inputs(digest, 0, len(self.samples))
        return digest.hexdigest()

    def digest_inputs(self, digest, first: int, last: int) -> None:
        """Feed `digest` the inputs of samples first..last-1 (formats whose samples are columns: all at once)."""
        for index in range(first, last):
            digest.update(self.sample_inputs(index))

    def sample_inputs(self, index: int) -> bytes:
        """What decides a sample's rows: its id, target and file stamp (formats with more, such as VOC's
        boxes, add theirs). File names that are not UTF-8 arrive surrogate-escaped: digested as raw bytes."""
        sample = self.samples[index]
        return f"{sample.sample_id}\0{sample.target}\0{sample.stamp}\n".encode("utf-8", "surrogateescape")

    def listing_problem(self, index: int) -> str | None:
        """Why the listing found a sample unusable, and the fix (a tar entry without a label: "no label
        (KEY.cls is missing); fix the tar"); None for a sample only decoding can judge."""
        return None

    def input_runs(self) -> list[tuple[int, int]] | None:
        """(first, stop) of each run of samples read from one input when shards follow inputs (tars); else None."""
        return None

    def targets(self) -> np.ndarray:
        """Every sample's target: one row each (a class index, or multi-hot)."""
        return np.array([sample.target for sample in self.samples])

    def shard_plan(self, shard_rows: int) -> list[PlannedShard]:
        """Which samples each shard holds, with the digest of their inputs: `shard_rows` samples per shard
        in listing order; a source of input units (tars) starts a new shard at each unit, so a unit maps
        to a fixed range of shards and is read by one torchrun rank."""
        runs = self.input_runs()
        bounds = [(first, min(stop, first + shard_rows), unit)
                  for unit, (start, stop) in enumerate(runs if runs is not None else [(0, len(self.samples))])
                  for first in range(start, stop, shard_rows)]
        digests = self.shard_digests([(first, last) for first, last, _ in bounds])
        return [PlannedShard(first, last - first, digest, index if runs is None else unit)
                for index, ((first, last, unit), digest) in enumerate(zip(bounds, digests))]

    def shard_digests(self, ranges: list[tuple[int, int]]) -> list[str]:
        """The digest of the inputs of the samples of each (first, stop) range (a shard's)."""
        digests = []
        for first, last in ranges:
            digest = hashlib.sha256()
            self.digest_inputs(digest, first, last)
            digests.append(digest.hexdigest())
        return digests

    def subset(self, samples_per_class: int, seed: int) -> None:
        """Keep at most N samples of each class, chosen with a seeded generator, in their listed order."""
        if samples_per_class <= 0:
            raise DataError(f"--samples-per-class must be positive, got {samples_per_class}")
        if self.target_kind != "class":
            raise DataError("--samples-per-class needs one label per image; this data set is multi-label")
        rng = np.random.default_rng(seed)
        targets = self.targets()
        keep: list[int] = []
        for label in range(len(self.classes)):
            members = np.flatnonzero(targets == label)
            if len(members) > samples_per_class:
                members = rng.choice(members, size=samples_per_class, replace=False)
            keep.extend(int(i) for i in members)
        self.keep(sorted(keep))
        counts = np.bincount(targets[targets >= 0], minlength=len(self.classes))  # an empty class is said elsewhere
        short = sorted((int(n), name) for name, n in zip(self.classes, counts) if 0 < n < samples_per_class)
        self.warnings += [f"--samples-per-class {samples_per_class}: {len(short)} of {len(self.classes)} classes "
                          f"have fewer images ({short[0][1]} has the fewest, {short[0][0]}); all were kept"] if short else []

    def keep(self, indices) -> None:
        """Keep only the samples at `indices` (in that order); formats with per-sample lists of their own
        (VOC's annotations) keep theirs in step."""
        self.samples = [self.samples[i] for i in indices]

    def hold(self, ranges: list[tuple[int, int]]) -> None:
        """Keep only the samples of `ranges` ((first, stop) pairs: the shards a torchrun rank extracts), still
        numbered as before; asking for another is an error. Formats held as columns (webdataset's tars, up to
        billions of images) drop the others; a list of files or of decoded arrays is kept whole."""

    def split_off(self, fraction: float, seed: int, other: str) -> tuple["Source", "Source"]:
        """(training part, validation part): a seeded split of `fraction` of the images, stratified by class
        for single-label data; `other` names the option of a validation set of its own, for errors."""
        train_rows, val_rows = validation_rows(self.targets(), fraction, seed, other, self.classes)
        parts = []
        for rows in (train_rows, val_rows):
            part = copy.copy(self)
            part.keep([int(i) for i in rows])
            parts.append(part)
        return parts[0], parts[1]


def validation_rows(targets: np.ndarray, fraction: float, seed: int, other: str,
                    names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (training, validation) of a seeded split: stratified by class for single-label targets
    (one row per item; multi-hot rows are split unstratified). The one split of fit-head and finetune;
    `other` (--val-cache, --val-data) and `names` (of the targets) are for errors."""
    from sklearn.model_selection import train_test_split

    remedy = f"raise --val-fraction or pass {other}"

    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    if targets.ndim == 1 and len(targets):  # what a stratified split needs, said in the options' words
        classes = len(np.unique(targets))
        val = math.ceil(fraction * len(targets))
        if len(targets) - val < classes:
            raise DataError(f"--val-fraction {fraction:g} leaves {len(targets) - val} training rows for {classes} "
                            "classes; lower --val-fraction")
        if val < classes:
            raise DataError(f"--val-fraction {fraction:g} gives {val} validation rows for {classes} classes; {remedy}")
        alone = np.flatnonzero(np.bincount(targets[targets >= 0]) == 1)  # -1: a tar sample without a usable label
        if len(alone):  # no share helps: one row cannot be on both sides
            raise DataError(f"{listed(names[i] for i in alone[:5])}{' ...' if len(alone) > 5 else ''}: one example "
                            f"only, and a stratified validation share needs two of each class; "
                            f"pass {other}, or add images of {'it' if len(alone) == 1 else 'them'}")
    try:
        train_rows, val_rows = train_test_split(np.arange(len(targets)), test_size=fraction, random_state=seed,
                                                stratify=None if targets.ndim == 2 else targets)
    except ValueError as exc:
        raise DataError(f"cannot split off a stratified validation set: {exc}; {remedy}") from None
    return np.sort(train_rows), np.sort(val_rows)


class FileListSource(Source):
    """Loose image files to predict on: no classes, no targets (target -1)."""

    format = "files"

    def __init__(self, paths: list[Path]):
        paths = [Path(path) for path in paths]
        found = ImageFiles([path for path in paths if path.is_dir()])
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                files += found.under(path)
            elif path.exists():
                files.append(path)
            else:
                raise DataError(f"{path} does not exist; pass image files or folders of images")
        if not files:
            raise DataError(f"no images under {', '.join(str(p) for p in paths)} "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([], [Sample(str(f), -1, str(f), "") for f in files])
        self.warnings += found.warnings()


class ImageFiles:
    """Image files under the given folders, recursively, in a stable (sorted) order; hidden files left out.

    Symlinks are followed, but no folder is entered twice and no file is listed twice (by real path, the
    first in listing order wins), so a link to an ancestor cannot multiply (and mislabel) the images. All
    the folders are named up front so that a link into one of them does not claim its images for another.
    What was skipped comes back from `warnings()`, one line per kind.
    """

    def __init__(self, folders: list[Path]):
        self._owners: dict[str, Path] = {}  # real path of each given folder -> the first folder naming it
        for folder in folders:  # a real folder owns its images, not a link to it that sorts first
            real = os.path.realpath(folder)
            if real not in self._owners or (os.path.islink(self._owners[real]) and not os.path.islink(folder)):
                self._owners[real] = Path(folder)
        self._folders: set[str] = set(self._owners)  # real paths of folders entered or reserved
        self._files: set[str] = set()  # real paths of files listed
        self._loops: list[str] = []  # links to a folder that holds them
        self._repeated_folders: list[str] = []  # links (or given folders) leading to a folder listed elsewhere
        self._repeated_files = 0

    def under(self, folder: Path) -> list[Path]:
        """The files under `folder`, one of the folders given to the constructor."""
        if self._owners.get(os.path.realpath(folder)) != Path(folder):
            self._repeated_folders.append(str(folder))
            return []
        files = []
        for root, dirs, names in os.walk(folder, followlinks=True):
            root_real = os.path.realpath(root)
            entered = []
            for name in sorted(dirs):
                path = os.path.join(root, name)
                real = os.path.realpath(path)
                if name.startswith("."):  # .thumbnails, .@__thumb (NAS), .git: copies and tools' files, not photos
                    continue
                if os.path.commonpath([real, root_real]) == real:
                    self._loops.append(path)
                elif real in self._folders:
                    if os.path.islink(path):  # a plain sub-folder that is also given is walked on its own
                        self._repeated_folders.append(path)
                else:
                    self._folders.add(real)
                    entered.append(name)
            dirs[:] = entered
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    # a dangling or self-referencing link is listed too: decoding reports it as unreadable
                    path = os.path.join(root, name)
                    real = os.path.realpath(path) if os.path.islink(path) else os.path.join(root_real, name)
                    if real in self._files:
                        self._repeated_files += 1
                        continue
                    self._files.add(real)
                    files.append(Path(root) / name)
        return files

    def warnings(self) -> list[str]:
        found = []
        if len(self._loops) == 1:
            found.append(f"symlink loop at {shown(self._loops[0])} skipped")
        elif self._loops:
            found.append(f"{len(self._loops)} symlink loops skipped, the first at {shown(self._loops[0])}")
        if self._repeated_folders:
            found.append(f"{len(self._repeated_folders)} symlinked folders lead to a folder already listed and were "
                         f"skipped, the first at {shown(self._repeated_folders[0])}")
        if self._repeated_files:
            found.append(f"{self._repeated_files} image files reached a second time through symlinks were listed once")
        return found


def file_stamp(path: Path) -> str:
    try:
        status = path.stat()
    except OSError:  # a dangling link: listed, then skipped as unreadable when decoded
        return "missing"
    return f"{status.st_size}:{status.st_mtime_ns}"


def shown(path) -> str:
    """A path as printable text: bytes of a name that is not UTF-8 are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def missing_split(root: Path, split: str, splits: list[str]) -> DataError:
    """The refusal of a --split that names no folder of `root` when other split folders hold the data:
    `root` itself would be read instead, mixing the splits (or finding nothing)."""
    return DataError(f"{shown(root)} has no split folder '{split}', but has {', '.join(splits)}; pass --split "
                     "with one of them")


def require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass --data with the folder of {what}")
    if not path.is_dir():  # a CSV or a tar given without its --format said only to pass a folder
        hint = {".csv": "; or --format csv for its path,label rows", ".tar": "; or --format webdataset for tar shards"}
        raise DataError(f"data path {path} is not a folder; pass --data with the folder of {what}"
                        + hint.get(path.suffix.lower(), ""))


@dataclass(frozen=True)
class Annotation:
    """One VOC image's objects, boxes as 0-based pixel indices (x0, y0, x1, y1), clipped to the image."""

    width: int
    height: int
    boxes: np.ndarray  # (objects, 4) float64
    labels: np.ndarray  # (objects,) class index
    difficult: np.ndarray  # (objects,) bool
