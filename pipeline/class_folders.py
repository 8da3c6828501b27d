"""Where an imagefolder's class folders lie (DATA, or DATA/SPLIT where that folder exists), as the checks of
outputs see them, with nothing of the formats imported: the names a split folder goes by, and which class
folders are links to images kept elsewhere (an output there lands among the images the walk reads).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SPLIT_NAMES = {"train", "trainval", "val", "valid", "validation", "test", "testing", "training"}


def linked_classes(root: Path, split: str = ""):
    """(name, path) of each class folder that is a link (hidden ones are no class), in `root` and in each split
    folder of it (train/a)."""
    with contextlib.suppress(OSError), os.scandir(root) as listing:
        for entry in sorted((e for e in listing if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name):
            if entry.is_symlink():
                yield split + entry.name, entry.path
            if not split and entry.name.lower() in SPLIT_NAMES:  # root/SPLIT holds the classes
                yield from linked_classes(Path(entry.path), entry.name + "/")
