"""The data formats `--format` names: one module per format in this package, each registering its
Source class (pipeline.datasets.register_format); `open_source` opens data of any of them by name.

Adding a format is adding a module here: it is found without being listed anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pipeline.datasets import FORMATS, Source
from pipeline.errors import DataError

DEFAULT_FORMAT = "imagefolder"
DEFAULT_CLASSES = "voc"  # --classes: VOC's 20 (other formats find theirs, or take a comma list)


def registered_formats() -> dict[str, type[Source]]:
    """{name: Source class} of every format module in this package (imported on first use)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return FORMATS


def format_names() -> list[str]:
    """--format values, the default first."""
    names = list(registered_formats())
    return sorted(names, key=lambda name: (name != DEFAULT_FORMAT, names.index(name)))


def downloading_formats() -> list[str]:
    """The formats whose data `--download` fetches when it is missing."""
    return [name for name in format_names() if registered_formats()[name].downloads]


def formats_help() -> str:
    """One line per format for --help: `name: what DATA holds`."""
    known = registered_formats()
    return "; ".join(f"{name}: {known[name].help}" for name in format_names())


def open_source(
    format: str,
    data: Path,
    split: str = "train",
    download: bool = False,
    samples_per_class: int | None = None,
    seed: int = 0,
    classes: str = DEFAULT_CLASSES,
    label_key: str | None = None,
    say=None,
    listings: Path | None = None,
    world=None,
    own_share: bool = False,
) -> Source:
    """The samples of `data` read as `format`, optionally a seeded subset of N per class (0 or None: all).
    `label_key` goes to formats that list it in their `options` (webdataset) and is refused by others.
    `say` (if given) gets the source's warnings as lines (a damaged tar, an empty class folder), for the
    stages that record none (extract keeps them in its manifest, evaluate in its report). `listings`: a
    folder where formats that list slowly (webdataset's tars) keep their listings for the next run. `world`: the
    pipeline.distributed.World of a torchrun whose ranks all open this source, its process group started; such
    formats list a share on each rank and exchange the listings (others ignore it and list everything); with
    `own_share` (tl extract, whose ranks read only their share) they exchange summaries, and a rank holds the
    samples of its share only (--samples-per-class gathers every sample's target, 4 bytes an image)."""
    known = registered_formats()
    if format not in known:
        raise DataError(f"unknown data format '{format}'; valid formats: {', '.join(format_names())}")
    data = Path(data)
    options = {}
    if label_key is not None:
        if "label_key" not in known[format].options:
            takers = ", ".join(name for name in format_names() if "label_key" in known[name].options)
            raise DataError(f"--label-key is for {takers} data, not {format}; leave it out")
        options["label_key"] = label_key
    if classes != DEFAULT_CLASSES and not known[format].takes_classes:  # read as all the classes, unsaid
        takers = ", ".join(name for name in format_names() if known[name].takes_classes)
        raise DataError(f"--classes is for {takers} data, not {format}, whose classes are found in the data; "
                        "leave it out")
    if listings is not None and "listings" in known[format].options:
        options["listings"] = listings
    if world is not None and "world" in known[format].options:
        options["world"] = world
        if own_share and "own_share" in known[format].options:
            options["own_share"] = True
    source = known[format].open(data, split, download, classes, **options)
    if samples_per_class:
        source.subset(samples_per_class, seed)
    if not source.samples:
        raise DataError(f"the {format} data at {data} has no samples")
    for warning in source.warnings if say is not None else ():
        say(f"warning: {warning}")
    return source
