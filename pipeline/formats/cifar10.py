"""The cifar10 format: CIFAR-10's python batches, read with a restricted unpickler that can build
only what the batches hold, and checked against the official sizes and md5s.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import Sample, Source, register_format
from pipeline.errors import DataError


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


@register_format
class Cifar10Source(Source):
    """The CIFAR-10 python batches, read with a restricted unpickler; `--data` holds cifar-10-batches-py."""

    format = "cifar10"
    help = 'the CIFAR-10 python batches (tl extract --download fetches them)'
    downloads = True

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "Cifar10Source":
        return cls(data, split, download)

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
                raise DataError(f"CIFAR-10 python batches not found in {folder}; fetch them with tl extract --download")
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
