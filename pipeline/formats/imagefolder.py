"""The imagefolder format: one sub-folder of images per class, the layout torchvision's ImageFolder
reads; empty class folders keep their index so class numbers match across splits.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.class_folders import SPLIT_NAMES
from pipeline.datasets import (IMAGE_EXTENSIONS, ImageFiles, Sample, Source, file_stamp, missing_split,
                               register_format, require_dir, shown)
from pipeline.errors import DataError


@register_format
class ImageFolderSource(Source):
    """One sub-folder per class; `root/split` is used when it exists, else `root` itself (refused when
    `root` holds other split folders: a misspelt --split would make them the classes)."""

    format = "imagefolder"
    split_by_folder = True
    help = 'one folder of images per class (DATA/SPLIT when that folder exists)'

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "ImageFolderSource":
        return cls(data, split)

    def __init__(self, root: Path, split: str):
        require_dir(root, "class folders")
        if split and (root / split).is_dir():
            root = root / split
        elif split:  # root itself, unless it holds split folders (of class folders): they would become the
            # classes, the splits mixed. A class named like a split holds images, not folders.
            splits = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES
                            and any(child.is_dir() and not child.name.startswith(".") for child in p.iterdir()))
            if splits:
                raise missing_split(root, split, splits)
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{root} has no class folders; an imagefolder holds one folder of images per class")
        found = ImageFiles(class_dirs)  # one for all classes: an image reached from two of them is listed once
        samples, empty = [], []
        for label, class_dir in enumerate(class_dirs):
            files = found.under(class_dir)
            if not files:
                empty.append(shown(class_dir.name))
            for path in files:
                samples.append(Sample(str(path.relative_to(root)), label, str(path), file_stamp(path)))
        if not samples:
            raise DataError(f"no images under {shown(root)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__([d.name for d in class_dirs], samples)
        self.warnings += found.warnings()
        # an empty class keeps its index, so class indices still match the other splits
        if len(empty) == 1:
            self.warnings.append(f"class folder {empty[0]} holds no images")
        elif empty:
            self.warnings.append(f"{len(empty)} class folders hold no images: {', '.join(empty[:5])}"
                                 + (", ..." if len(empty) > 5 else ""))
