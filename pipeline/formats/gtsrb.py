"""The gtsrb format: the German Traffic Sign Recognition Benchmark (43 classes) in torchvision's
layout, downloaded by torchvision when asked.
"""

from __future__ import annotations

import csv
import http.client
import zipfile
from pathlib import Path

from pipeline.datasets import Sample, Source, file_stamp, register_format, shown
from pipeline.errors import DataError

# what torchvision's GTSRB downloads for each split
ARCHIVES = {"train": "GTSRB-Training_fixed.zip", "test": "GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip"}


@register_format
class GtsrbSource(Source):
    """German Traffic Sign benchmark in torchvision's layout under `--data` (gtsrb/GTSRB/...)."""

    format = "gtsrb"
    help = "the German Traffic Sign benchmark in torchvision's layout (tl extract --download fetches it)"
    downloads = True
    num_classes = 43

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "GtsrbSource":
        return cls(data, split, download)

    def __init__(self, root: Path, split: str, download: bool):
        from torchvision.datasets import GTSRB

        if split not in ("train", "test"):
            raise DataError(f"gtsrb has splits train and test, not '{split}'")
        # torchvision makes the split's folder only once its archives are fetched and unpacked: a failure
        # that leaves it absent is the download's (a URLError is an OSError, as a file that will not read is)
        folder = root / "gtsrb" / "GTSRB" / ("Training" if split == "train" else "Final_Test/Images")
        fetching = download and not folder.is_dir()
        try:
            dataset = GTSRB(str(root), split=split, download=download)
        except (OSError, RuntimeError, http.client.HTTPException, zipfile.BadZipFile,
                KeyError, ValueError, TypeError, IndexError, csv.Error) as exc:
            if fetching and not folder.is_dir():
                reason = getattr(exc, "reason", None) or exc  # a URLError's reason, not '<urlopen error ...>'
                raise DataError(f"cannot download GTSRB {split} into {root / 'gtsrb'} ({reason}); check the network, "
                                f"or fetch {ARCHIVES[split]} by hand (torchvision's GTSRB files) and unpack "
                                f"{'it' if split == 'train' else 'them'} there") from None
            if isinstance(exc, RuntimeError):
                raise DataError(f"GTSRB {split} images not found under {root / 'gtsrb'}; fetch it with "
                                "tl extract --download") from None
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
                where = f"folder {shown(path.parent.name)}" if split == "train" else f"class of {path.name}"
                raise DataError(f"GTSRB {split} {where} is not a class number 0..{self.num_classes - 1}; "
                                f"download the {split} set again")
            if not path.is_file():
                raise DataError(f"GTSRB lists {path.name} but the file is missing; download the {split} set again")
            samples.append(Sample(str(path.relative_to(base)), int(target), str(path), file_stamp(path)))
        if not samples:
            raise DataError(f"GTSRB {split} under {base} has no images")
        super().__init__([f"{i:02d}" for i in range(self.num_classes)], samples)
