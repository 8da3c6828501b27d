"""Data sources: each lists its samples (id, target, where to read it) and decodes one image to RGB.

imagefolder, csv, cifar10 and gtsrb; a seeded stratified subset; a fingerprint for cache keys.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import DATA_FORMATS as FORMATS  # one list, read by the CLI too
from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
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

    def read_image(self, index: int, draft=None) -> Image.Image:
        """The sample as RGB; `draft(width, height) -> (width, height)`: see open_rgb."""
        return open_rgb(self.samples[index].location, draft)

    def fingerprint(self) -> str:
        """A digest of the class names and every (id, target, stamp): changes when the data does."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for sample in self.samples:
            # file names that are not UTF-8 arrive surrogate-escaped; they digest as their raw bytes
            line = f"{sample.sample_id}\0{sample.target}\0{sample.stamp}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
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


def open_rgb(path: str, draft=None) -> Image.Image:
    """Decode a file fully (so truncation shows here, not later) and return it as RGB.

    `draft(width, height)` gives the smallest size the caller needs: a JPEG is then decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) still at least that large, several times faster for a photo
    larger than needed; `info["original_size"]` keeps the size before that reduction."""
    with Image.open(path) as image:
        original = image.size
        if draft is not None and image.format == "JPEG":
            image.draft(image.mode, draft(*original))
        image.load()
        rgb = to_rgb(image)
        rgb.info["original_size"] = original
        return rgb


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
            found.append(f"symlink loop at {_shown(self._loops[0])} skipped")
        elif self._loops:
            found.append(f"{len(self._loops)} symlink loops skipped, the first at {_shown(self._loops[0])}")
        if self._repeated_folders:
            found.append(f"{len(self._repeated_folders)} symlinked folders lead to a folder already listed and were "
                         f"skipped, the first at {_shown(self._repeated_folders[0])}")
        if self._repeated_files:
            found.append(f"{self._repeated_files} image files reached a second time through symlinks were listed once")
        return found


def _file_stamp(path: Path) -> str:
    try:
        status = path.stat()
    except OSError:  # a dangling link: listed, then skipped as unreadable when decoded
        return "missing"
    return f"{status.st_size}:{status.st_mtime_ns}"


def _shown(path) -> str:
    """A path as printable text: bytes of a name that is not UTF-8 are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
        found = ImageFiles(class_dirs)  # one for all classes: an image reached from two of them is listed once
        samples, empty = [], []
        for label, class_dir in enumerate(class_dirs):
            files = found.under(class_dir)
            if not files:
                empty.append(_shown(class_dir.name))
            for path in files:
                samples.append(Sample(str(path.relative_to(root)), label, str(path), _file_stamp(path)))
        if not samples:
            raise DataError(f"no images under {_shown(root)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([d.name for d in class_dirs], samples)
        self.warnings += found.warnings()
        # an empty class keeps its index, so class indices still match the other splits
        if len(empty) == 1:
            self.warnings.append(f"class folder {empty[0]} holds no images")
        elif empty:
            self.warnings.append(f"{len(empty)} class folders hold no images: {', '.join(empty[:5])}"
                                 + (", ..." if len(empty) > 5 else ""))


class CsvSource(Source):
    """Rows of `path,label`; paths relative to the CSV file; an optional `path,label` header."""

    format = "csv"

    def __init__(self, csv_path: Path):
        if not csv_path.is_file():
            raise DataError(f"CSV file {csv_path} does not exist; pass --data with a file of path,label rows")
        rows, unlabelled = [], 0
        try:
            # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first path
            with open(csv_path, newline="", encoding="utf-8-sig") as handle:
                for number, row in enumerate(csv.reader(handle), start=1):
                    if not row or not "".join(row).strip():
                        continue
                    if number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                        continue
                    if len(row) < 2:
                        raise DataError(f"{csv_path} line {number}: expected path,label, got {','.join(row)!r}")
                    if not row[1].strip():
                        unlabelled += 1
                        continue
                    rows.append((row[0].strip(), row[1].strip(), number))
        except UnicodeDecodeError:
            raise DataError(f"{csv_path} is not UTF-8 text; save it as UTF-8") from None
        except csv.Error as exc:
            raise DataError(f"cannot read {csv_path}: {exc}; write one path,label row per image") from None
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
        if unlabelled:
            self.warnings.append(f"{unlabelled} rows of {csv_path} have an empty label and were skipped")


# What the official python-version files are, besides torchvision's md5s: their sizes in bytes. A file of
# the official size must match the official md5; any other size is a re-packed or subset batch.
CIFAR10_OFFICIAL_SIZES = {"data_batch_1": 31035704, "data_batch_2": 31035320, "data_batch_3": 31035999,
                          "data_batch_4": 31035696, "data_batch_5": 31035623, "test_batch": 31035526,
                          "batches.meta": 158}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes, and for nothing else."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}, which a CIFAR batch never uses")
    return codecs.encode(text, "latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    # numpy's own array reconstruction, under its numpy 1 and numpy 2 module names; _frombuffer is what
    # protocol 5 (a re-packed batch) writes arrays with
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what the CIFAR python batches hold (dicts, lists, numbers, text, numpy arrays) and refuses
    every other global, so a batch can never run code."""

    allowed = None

    def find_class(self, module: str, name: str):
        if CifarUnpickler.allowed is None:
            CifarUnpickler.allowed = _cifar_globals()
        try:
            return CifarUnpickler.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does") from None


def read_cifar_file(path: Path, required: tuple[str, ...]) -> dict:
    """One CIFAR python file as a dict with str keys, read with CifarUnpickler; a file of the official size
    must also have the official md5. Anything else is a one-line DataError naming the file."""
    from torchvision.datasets import CIFAR10

    official_md5 = dict(CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])
    try:
        if path.stat().st_size == CIFAR10_OFFICIAL_SIZES.get(path.name):
            with open(path, "rb") as handle:
                md5 = hashlib.md5(usedforsecurity=False)
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    md5.update(chunk)
            if md5.hexdigest() != official_md5[path.name]:
                raise DataError(f"{path} is not the official CIFAR-10 file (md5 mismatch); download it again")
        with open(path, "rb") as handle:
            content = CifarUnpickler(handle, encoding="latin1").load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to decode untrusted bytes is a bad file, not a bug
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable CIFAR-10 python file ({reason}); "
                        "download the python version again") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not a CIFAR-10 dict; "
                        "download the python version again")
    # batches pickled by python 2 and read back as bytes (then re-pickled) have bytes keys
    content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    missing = [key for key in required if key not in content]
    if missing:
        raise DataError(f"{path} has no '{missing[0]}' entry, so it is not a CIFAR-10 python file; "
                        "download the python version again")
    return content


class Cifar10Source(Source):
    """The CIFAR-10 python batches, read with a restricted unpickler; `--data` holds cifar-10-batches-py."""

    format = "cifar10"

    def __init__(self, root: Path, split: str, download: bool):
        from torchvision.datasets import CIFAR10

        if split not in ("train", "test"):
            raise DataError(f"cifar10 has splits train and test, not '{split}'")
        if root.name == CIFAR10.base_folder:
            root = root.parent
        folder = root / CIFAR10.base_folder
        batch_names = [name for name, _ in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]
        needed = [folder / name for name in batch_names + [CIFAR10.meta["filename"]]]
        if not all(path.is_file() for path in needed):
            if not download:
                raise DataError(f"CIFAR-10 python batches not found in {folder}; pass --download to fetch it")
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
            except (OSError, RuntimeError) as exc:
                raise DataError(f"cannot download CIFAR-10 into {root}: {exc}; check the network") from None
            if not all(path.is_file() for path in needed):
                raise DataError(f"CIFAR-10 python batches not found in {folder} after downloading; check the network")

        meta_path = folder / CIFAR10.meta["filename"]
        names = read_cifar_file(meta_path, (CIFAR10.meta["key"],))[CIFAR10.meta["key"]]
        if not isinstance(names, list) or not names or not all(isinstance(n, (str, bytes)) for n in names):
            raise DataError(f"{meta_path} has no list of class names; download the python version again")
        classes = [n.decode("utf-8", "surrogateescape") if isinstance(n, bytes) else n for n in names]
        pixels, targets = [], []
        for path in needed[:-1]:
            batch = read_cifar_file(path, ("data", "labels"))
            data = batch["data"]
            try:
                labels = np.asarray(batch["labels"])
            except (ValueError, TypeError):  # ragged or mixed lists
                labels = np.zeros(0, object)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise DataError(f"{path}: 'data' is {shape}, not rows of 3072 uint8 (3x32x32); "
                                "download the python version again")
            if labels.shape != (len(data),) or (len(data) and labels.dtype.kind not in "iu"):
                raise DataError(f"{path}: 'labels' is not one integer per row of 'data'; "
                                "download the python version again")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
                raise DataError(f"{path}: labels outside 0..{len(classes) - 1} (the classes of {meta_path.name}); "
                                "download the python version again")
            pixels.append(data)
            targets += [int(t) for t in labels]
        self._pixels = np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows to HWC
        samples = [
            Sample(f"{split}/{i:05d}", t, str(i), hashlib.sha1(self._pixels[i].tobytes()).hexdigest()[:16])
            for i, t in enumerate(targets)
        ]
        super().__init__(classes, samples)

    def read_image(self, index: int, draft=None) -> Image.Image:
        return Image.fromarray(self._pixels[int(self.samples[index].location)])  # 32x32: nothing to reduce


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
        except (OSError, KeyError, ValueError, TypeError, IndexError, csv.Error) as exc:
            # a test list with missing columns or non-numeric class ids, or a file that is not text
            raise DataError(f"cannot read GTSRB {split} from {root}: {exc}; download the {split} set again") from None
        samples = []
        base = root / "gtsrb"
        for path, target in dataset._samples:
            path = Path(path)
            if split == "train":
                # The class is the folder's number, even when some class folders are absent.
                target = int(path.parent.name) if path.parent.name.isdecimal() else -1
            if not 0 <= target < self.num_classes:
                where = f"folder {_shown(path.parent.name)}" if split == "train" else f"class of {path.name}"
                raise DataError(f"GTSRB {split} {where} is not a class number 0..{self.num_classes - 1}; "
                                f"download the {split} set again")
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
        try:
            ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise DataError(f"split file {split_file} is not UTF-8 text; save it as UTF-8") from None
        if not ids:
            raise DataError(f"split file {split_file} lists no images")
        parsed = [self._parse(root, image_id) for image_id in ids]
        unusable = sum(skipped for *_, skipped in parsed)
        parsed = [fields[:4] for fields in parsed]
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
        if unusable:
            self.warnings.append(f"{unusable} boxes were reversed, not finite or outside their image and were skipped")

    def columns(self, index: int) -> dict[str, np.ndarray]:
        return {"ignore": self._ignore[index]}

    @staticmethod
    def _parse(root: Path, image_id: str):
        """(jpeg path, width, height, [(name, (x0, y0, x1, y1), difficult)], boxes skipped) of one annotation
        file; boxes that are reversed, not finite or wholly outside the image are skipped with their object."""
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
            for number, element in enumerate(tree.iter("object"), start=1):
                name = (element.findtext("name") or "").strip()
                bndbox = element.find("bndbox")
                missing = ("<name>" if not name else "<bndbox>" if bndbox is None else
                           next((f"<{k}>" for k in ("xmin", "ymin", "xmax", "ymax")
                                 if not (bndbox.findtext(k) or "").strip()), None))
                if missing:
                    raise DataError(f"{xml_path}: <object> {number} has no {missing}; fix the annotation file")
                # VOC boxes are 1-based inclusive pixel indices
                box = tuple(float(bndbox.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
                difficult = (element.findtext("difficult") or "0").strip() == "1"
                objects.append((name, box, difficult))
            size = tree.find("size")
            width = int(float(size.findtext("width"))) if size is not None and size.findtext("width") else 0
            height = int(float(size.findtext("height"))) if size is not None and size.findtext("height") else 0
        except (ElementTree.ParseError, TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"cannot read {xml_path}: {exc}; fix the annotation file") from None
        if width <= 0 or height <= 0:  # no usable <size>: the image itself knows
            try:
                with Image.open(jpeg) as image:
                    width, height = image.size
            except DECODE_ERRORS as exc:
                raise DataError(f"{xml_path} has no size and {jpeg} cannot be read: {exc}") from None
        usable = [(name, (x0, y0, x1, y1), difficult) for name, (x0, y0, x1, y1), difficult in objects
                  if all(math.isfinite(v) for v in (x0, y0, x1, y1)) and x0 <= x1 and y0 <= y1
                  and x1 >= 0 and y1 >= 0 and x0 <= width - 1 and y0 <= height - 1]
        return jpeg, width, height, usable, len(objects) - len(usable)

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
