"""Data sources: each lists its samples (id, target, where to read it) and decodes one image to RGB.

imagefolder, csv, cifar10 and gtsrb; a seeded stratified subset; a fingerprint for cache keys.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
FORMATS = ("imagefolder", "csv", "cifar10", "gtsrb", "voc")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# Decoding errors PIL raises for corrupt, truncated or unsupported files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


@dataclass(frozen=True)
class Sample:
    sample_id: str
    target: int | tuple[int, ...]  # a class index, or a multi-hot tuple for multi-label sources
    location: str  # a file path, or an index into an in-memory array
    stamp: str  # what changes when the sample's content changes (size, mtime), for the fingerprint


class Source:
    """A listed data set. Subclasses fill `classes` and `samples` and read one image."""

    format: str = ""
    target_kind = "class"  # or "multi-hot"

    def __init__(self, classes: list[str], samples: list[Sample]):
        self.classes = classes
        self.samples = samples
        self.warnings: list[str] = []  # counted oddities worth one line at the end (clipped boxes, ...)

    def columns(self, index: int) -> dict[str, np.ndarray]:
        """Per-sample columns beyond target and id (VOC: `ignore`, the difficult-only classes)."""
        return {}

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, index: int) -> Image.Image:
        return open_rgb(self.samples[index].location)

    def fingerprint(self) -> str:
        """A digest of the class names and every (id, target, stamp): changes when the data does."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for sample in self.samples:
            digest.update(f"{sample.sample_id}\0{sample.target}\0{sample.stamp}\n".encode())
        return digest.hexdigest()

    def subset(self, samples_per_class: int, seed: int) -> None:
        """Keep at most N samples of each class, chosen with a seeded generator, in their listed order."""
        if samples_per_class <= 0:
            raise DataError(f"--samples-per-class must be positive, got {samples_per_class}")
        if self.target_kind != "class":
            raise DataError("--samples-per-class needs one label per image; this data set is multi-label")
        rng = np.random.default_rng(seed)
        targets = np.array([s.target for s in self.samples])
        keep: list[int] = []
        for label in range(len(self.classes)):
            members = np.flatnonzero(targets == label)
            if len(members) > samples_per_class:
                members = rng.choice(members, size=samples_per_class, replace=False)
            keep.extend(int(i) for i in members)
        self.samples = [self.samples[i] for i in sorted(keep)]


class FileListSource(Source):
    """Loose image files to predict on: no classes, no targets (target -1)."""

    format = "files"

    def __init__(self, paths: list[Path]):
        files: list[Path] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                files += image_files(path)
            elif path.exists():
                files.append(path)
            else:
                raise DataError(f"{path} does not exist; pass image files or folders of images")
        if not files:
            raise DataError(f"no images under {', '.join(str(p) for p in paths)} "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([], [Sample(str(f), -1, str(f), "") for f in files])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled (not clipped), transparency over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if pixels.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if pixels.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def open_rgb(path: str) -> Image.Image:
    """Decode a file fully (so truncation shows here, not later) and return it as RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable (sorted) order; hidden files left out."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                files.append(Path(root) / name)
    return files


def _file_stamp(path: Path) -> str:
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass --data with the folder of {what}")
    if not path.is_dir():
        raise DataError(f"data path {path} is not a folder; pass --data with the folder of {what}")


class ImageFolderSource(Source):
    """One sub-folder per class; `root/split` is used when it exists, else `root` itself."""

    format = "imagefolder"

    def __init__(self, root: Path, split: str):
        _require_dir(root, "class folders")
        if split and (root / split).is_dir():
            root = root / split
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{root} has no class folders; an imagefolder holds one folder of images per class")
        samples = []
        for label, class_dir in enumerate(class_dirs):
            for path in image_files(class_dir):
                samples.append(Sample(str(path.relative_to(root)), label, str(path), _file_stamp(path)))
        if not samples:
            raise DataError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([d.name for d in class_dirs], samples)


class CsvSource(Source):
    """Rows of `path,label`; paths relative to the CSV file; an optional `path,label` header."""

    format = "csv"

    def __init__(self, csv_path: Path):
        if not csv_path.is_file():
            raise DataError(f"CSV file {csv_path} does not exist; pass --data with a file of path,label rows")
        rows = []
        with open(csv_path, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or not "".join(row).strip():
                    continue
                if number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                    continue
                if len(row) < 2:
                    raise DataError(f"{csv_path} line {number}: expected path,label, got {','.join(row)!r}")
                rows.append((row[0].strip(), row[1].strip(), number))
        if not rows:
            raise DataError(f"{csv_path} lists no images; write one path,label row per image")
        classes = sorted({label for _, label, _ in rows})
        index = {name: i for i, name in enumerate(classes)}
        samples = []
        for relative, label, number in rows:
            path = (csv_path.parent / relative).resolve()
            if not path.is_file():
                raise DataError(f"{csv_path} line {number}: image {relative} does not exist (paths are relative to the CSV)")
            samples.append(Sample(relative, index[label], str(path), _file_stamp(path)))
        super().__init__(classes, samples)


class Cifar10Source(Source):
    """The CIFAR-10 python batches, read by torchvision's loader; `--data` holds cifar-10-batches-py."""

    format = "cifar10"

    def __init__(self, root: Path, split: str, download: bool):
        from torchvision.datasets import CIFAR10

        if split not in ("train", "test"):
            raise DataError(f"cifar10 has splits train and test, not '{split}'")
        if root.name == CIFAR10.base_folder:
            root = root.parent

        class LocalCIFAR10(CIFAR10):
            # torchvision checks the md5 of the official files; a present batch is enough here, so
            # re-packed or subset batches work too (the cache key fingerprints the data itself).
            def _check_integrity(self) -> bool:
                files = self.train_list + self.test_list + [[self.meta["filename"], None]]
                return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in files)

            def _load_meta(self) -> None:
                import pickle

                with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as infile:
                    self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]

        try:
            dataset = LocalCIFAR10(str(root), train=split == "train", download=download)
        except RuntimeError:
            hint = "pass --download to fetch it" if not download else "check the network"
            raise DataError(f"CIFAR-10 python batches not found in {root / CIFAR10.base_folder}; {hint}") from None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"cannot read CIFAR-10 from {root}: {exc}; download the python version again") from None
        self._pixels = dataset.data
        samples = [
            Sample(f"{split}/{i:05d}", int(t), str(i), hashlib.sha1(self._pixels[i].tobytes()).hexdigest()[:16])
            for i, t in enumerate(dataset.targets)
        ]
        super().__init__(list(dataset.classes), samples)

    def read_image(self, index: int) -> Image.Image:
        return Image.fromarray(self._pixels[int(self.samples[index].location)])


class GtsrbSource(Source):
    """German Traffic Sign benchmark in torchvision's layout under `--data` (gtsrb/GTSRB/...)."""

    format = "gtsrb"
    num_classes = 43

    def __init__(self, root: Path, split: str, download: bool):
        from torchvision.datasets import GTSRB

        if split not in ("train", "test"):
            raise DataError(f"gtsrb has splits train and test, not '{split}'")
        try:
            dataset = GTSRB(str(root), split=split, download=download)
        except RuntimeError:
            hint = "pass --download to fetch it" if not download else "check the network"
            raise DataError(f"GTSRB {split} images not found under {root / 'gtsrb'}; {hint}") from None
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot read GTSRB {split} from {root}: {exc}") from None
        samples = []
        base = root / "gtsrb"
        for path, target in dataset._samples:
            if split == "train":
                # The class is the folder's number, even when some class folders are absent.
                target = int(Path(path).parent.name)
            path = Path(path)
            if not path.is_file():
                raise DataError(f"GTSRB lists {path.name} but the file is missing; download the {split} set again")
            samples.append(Sample(str(path.relative_to(base)), int(target), str(path), _file_stamp(path)))
        if not samples:
            raise DataError(f"GTSRB {split} under {base} has no images")
        super().__init__([f"{i:02d}" for i in range(self.num_classes)], samples)


@dataclass(frozen=True)
class Annotation:
    """One VOC image's objects, boxes as 0-based pixel indices (x0, y0, x1, y1), clipped to the image."""

    width: int
    height: int
    boxes: np.ndarray  # (objects, 4) float64
    labels: np.ndarray  # (objects,) class index
    difficult: np.ndarray  # (objects,) bool


class VocSource(Source):
    """The PASCAL VOC devkit layout: Annotations/ID.xml, JPEGImages/ID.jpg, ImageSets/Main/SPLIT.txt.

    One sample per image with a multi-hot target of the classes it shows (not counting objects marked
    difficult); `ignore` marks classes it shows only as difficult objects, left out of their AP.
    `classes`: "voc" (the 20 VOC classes), "auto" (the names found in the split's annotations), or a
    comma-separated list.
    """

    format = "voc"
    target_kind = "multi-hot"

    def __init__(self, root: Path, split: str, classes: str = "voc"):
        _require_dir(root, "a VOC devkit year (VOCdevkit/VOC2007)")
        if (root / "VOC2007").is_dir() and not (root / "Annotations").is_dir():
            root = root / "VOC2007"
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            raise DataError(f"no split file {split_file}; splits here: {', '.join(found) or 'none'}")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split file {split_file} lists no images")
        parsed = [self._parse(root, image_id) for image_id in ids]
        names = self._class_names(classes, parsed, split_file)
        index = {name: i for i, name in enumerate(names)}
        self.annotations: list[Annotation] = []
        self._ignore: list[np.ndarray] = []
        samples, clipped = [], 0
        for image_id, (path, width, height, objects) in zip(ids, parsed):
            boxes, labels, difficult = [], [], []
            for name, box, is_difficult in objects:
                if name not in index:
                    raise DataError(f"{root / 'Annotations' / (image_id + '.xml')} has class '{name}', not among "
                                    f"the {len(names)} classes; pass --classes auto to take the annotations' names")
                x0, y0, x1, y1 = box
                clipped_box = (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
                               min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))
                clipped += clipped_box != box
                boxes.append(clipped_box)
                labels.append(index[name])
                difficult.append(is_difficult)
            annotation = Annotation(width, height, np.array(boxes, np.float64).reshape(-1, 4),
                                    np.array(labels, np.int64), np.array(difficult, bool))
            present = np.zeros(len(names), np.int64)
            present[annotation.labels[~annotation.difficult]] = 1
            shown = np.zeros(len(names), np.int64)
            shown[annotation.labels] = 1
            self.annotations.append(annotation)
            self._ignore.append((shown & (1 - present)).astype(np.int8))
            samples.append(Sample(image_id, tuple(int(v) for v in present), str(path), _file_stamp(path)))
        super().__init__(names, samples)
        if clipped:
            self.warnings.append(f"{clipped} boxes reached outside their image and were clipped to it")

    def columns(self, index: int) -> dict[str, np.ndarray]:
        return {"ignore": self._ignore[index]}

    @staticmethod
    def _parse(root: Path, image_id: str):
        """(jpeg path, width, height, [(name, (x0, y0, x1, y1), difficult)]) of one annotation file."""
        import xml.etree.ElementTree as ElementTree

        xml_path = root / "Annotations" / f"{image_id}.xml"
        jpeg = root / "JPEGImages" / f"{image_id}.jpg"
        if not jpeg.is_file():
            raise DataError(f"the split file names {image_id} but {jpeg} is missing; restore it or remove the line")
        if not xml_path.is_file():
            raise DataError(f"the split file names {image_id} but {xml_path} is missing; restore it or remove the line")
        try:
            tree = ElementTree.parse(xml_path).getroot()
            objects = []
            for element in tree.iter("object"):
                bndbox = element.find("bndbox")
                # VOC boxes are 1-based inclusive pixel indices
                box = tuple(float(bndbox.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
                difficult = element.findtext("difficult", "0").strip() == "1"
                objects.append((element.findtext("name").strip(), box, difficult))
            size = tree.find("size")
            width = int(float(size.findtext("width"))) if size is not None and size.findtext("width") else 0
            height = int(float(size.findtext("height"))) if size is not None and size.findtext("height") else 0
        except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"cannot read {xml_path}: {exc}; fix the annotation file") from None
        if width <= 0 or height <= 0:  # no usable <size>: the image itself knows
            try:
                with Image.open(jpeg) as image:
                    width, height = image.size
            except DECODE_ERRORS as exc:
                raise DataError(f"{xml_path} has no size and {jpeg} cannot be read: {exc}") from None
        return jpeg, width, height, objects

    @staticmethod
    def _class_names(classes: str, parsed: list, split_file: Path) -> list[str]:
        if classes == "voc":
            return list(VOC_CLASSES)
        if classes == "auto":
            names = sorted({name for _, _, _, objects in parsed for name, _, _ in objects})
            if not names:
                raise DataError(f"the annotations of {split_file} name no objects; nothing to learn classes from")
            return names
        names = [name.strip() for name in classes.split(",") if name.strip()]
        if len(set(names)) != len(names) or not names:
            raise DataError(f"--classes must be voc, auto, or distinct comma-separated names, got '{classes}'")
        return names


def open_source(
    format: str,
    data: Path,
    split: str = "train",
    download: bool = False,
    samples_per_class: int | None = None,
    seed: int = 0,
    classes: str = "voc",
) -> Source:
    data = Path(data)
    if format == "imagefolder":
        source: Source = ImageFolderSource(data, split)
    elif format == "csv":
        source = CsvSource(data)
    elif format == "cifar10":
        source = Cifar10Source(data, split, download)
    elif format == "gtsrb":
        source = GtsrbSource(data, split, download)
    elif format == "voc":
        source = VocSource(data, split, classes)
    else:
        raise DataError(f"unknown data format '{format}'; valid formats: {', '.join(FORMATS)}")
    if samples_per_class is not None:
        source.subset(samples_per_class, seed)
    if not source.samples:
        raise DataError(f"the {format} data at {data} has no samples")
    return source
