"""The webdataset format: tar shards as img2dataset and webdataset write them (`00000.tar` holding
`KEY.jpg` or `KEY.png` with the label in `KEY.cls`, `KEY.txt` or `KEY.json`), given as one tar, a folder
of tars (DATA/SPLIT when that folder exists) or a brace pattern (`data/{00000..01023}.tar`).

Each tar is listed once from its headers (plus its small label files; under torchrun by one rank: see
tar_listings.listed_tars) and its entries held as columns (tar_samples: tens of bytes an image, not a Sample
object each); an image is read straight from its offset in the tar, so workers never unpack anything. A
sample's stamp is its tar's size and mtime: the inputs of a tar change together. Shards follow tars
(Source.shard_plan): a tar maps to its own range of output shards and is read by one torchrun rank, so a
repaired tar redoes only its shards. Entries without a label, with an unreadable label, or repeated under one
key are listed and then skipped and recorded like unreadable images; a tar cut short keeps the entries
before the cut (with a warning), and the sample the cut runs through, before or after its label, is skipped so.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import DECODE_ERRORS, Source, open_rgb, register_format, shown
from pipeline.errors import DataError, ListingProblem, listed
from pipeline.formats.tar_headers import scan_tar
from pipeline.formats.tar_listings import TarListings, listed_tars
from pipeline.formats.tar_paths import tar_paths
from pipeline.formats.tar_samples import HeldSamples, TarEntries, TarSamples, TarSummary

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_BYTES = 1 << 16  # a label file larger than this is not a label
MAX_CLASS_NUMBER = 100_000  # a .cls above this is a damaged label, not a class (ImageNet-21k has 21,841)
NOT_IN_CLASSES = "is not one of the classes given by --classes"


def _tar_names(paths: list[Path]) -> list[str]:
    """How sample ids name each tar: its file name (`00000.tar/KEY`), or, when two tars share a file name
    (a brace pattern over folders), its path from the tars' common folder (`a/00000.tar/KEY`)."""
    names = [path.name for path in paths]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(path.parent) for path in paths])
    return [os.path.relpath(os.path.abspath(path), common) for path in paths]


def _label_field(label_key: str) -> tuple[str, str | None]:
    """`cls` -> ("cls", None); `json` -> ("json", "label"); `json:FIELD` -> ("json", FIELD)."""
    suffix, colon, name = label_key.partition(":")
    suffix = suffix.strip().lower().lstrip(".")
    if not suffix or suffix in IMAGE_SUFFIXES:
        raise DataError(f"--label-key {label_key} names no label file; use cls, txt, json or json:FIELD")
    if suffix.endswith("json"):
        if colon and not name.strip():
            raise DataError(f"--label-key {label_key} names no field; write json:FIELD or json (its label field)")
        return suffix, name.strip() or "label"
    if name:
        raise DataError(f"--label-key {label_key}: only json labels take a :FIELD")
    return suffix, None


def _parse_label(data: bytes, field: str | None, numeric: bool) -> int | str:
    """A label file's value: an int (a class number) or a class name (not for .cls files, which hold
    class numbers); ValueError when it has none."""
    text = data.decode("utf-8").strip()
    if field is not None:
        try:
            document = json.loads(text)
        except RecursionError:
            raise ValueError("its json is nested too deeply") from None
        if not isinstance(document, dict) or field not in document:
            raise ValueError(f"no '{field}' in its json")
        value = document[field]
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise ValueError(f"'{field}' is not a class number or name")
        if isinstance(value, int):
            _check_class_number(value)
        return value
    if not text:
        raise ValueError("it is empty")
    if numeric and not re.fullmatch(r"\d+", text):
        raise ValueError(f"{text[:20]!r} is not a class number")
    if re.fullmatch(r"\d+", text):
        _check_class_number(int(text))
        return int(text)
    return text


def _check_class_number(value: int) -> None:
    if not 0 <= value <= MAX_CLASS_NUMBER:
        raise ValueError(f"class number {str(value)[:20]} is not in 0..{MAX_CLASS_NUMBER:,}")


@register_format
class WebDatasetSource(Source):
    """Tar shards of KEY.jpg/png + KEY.cls/txt/json (see the module docstring)."""

    format = "webdataset"
    takes_classes = True
    split_by_folder = True  # a folder's DATA/SPLIT; one tar or a brace pattern is read whatever the split
    help = 'tar shards of KEY.jpg/png + KEY.cls/txt/json (a tar, a folder of tars or {00000..00099}.tar; --label-key)'
    options = ("label_key", "listings", "world", "own_share")

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str, label_key: str = "cls",
             listings: Path | None = None, world=None, own_share: bool = False) -> "WebDatasetSource":
        return cls(data, split, classes, label_key, listings, world, own_share)

    def __init__(self, data: Path, split: str = "", classes: str = "auto", label_key: str = "cls",
                 listings: Path | None = None, world=None, own_share: bool = False):
        suffix, field = _label_field(label_key)
        self.label_key = suffix + (f":{field}" if field and field != "label" else "")  # one spelling per key
        listed, warnings = [], []
        self._dotted = ""  # the first file named like an image after a second dot (img.001.jpg), if any
        self._unpaired = [0, ""]  # labels without an image of their key (one in a format not listed): count, first
        self.listings = TarListings(listings, self.label_key) if listings is not None else None  # see tar_listings
        # own_share (tl extract under torchrun): a rank holds the samples of the tars it lists, the others' counts
        # and labels only; what needs every sample (targets, shard digests) it asks of the ranks together
        self._share = world if own_share and world is not None and world.distributed else None
        paths, warnings, each_tar = listed_tars(lambda: (tar_paths(Path(data), split, warnings), warnings),
                                                lambda path: self._list_tar(path, suffix, field), self.listings, world,
                                                lambda listing: {**listing, "entries": TarEntries(listing["entries"])},
                                                (lambda listing: {**listing, "entries": TarSummary(listing["entries"])})
                                                if self._share else None)
        for path, tar_name, (stamp, listing) in zip(paths, _tar_names(paths), each_tar):
            warnings += [f"{shown(path)} {note}" for note in listing["notes"]]
            self._dotted = self._dotted or listing["dotted"]
            if listing["unpaired"][0]:
                first = self._unpaired[1] or f"{listing['unpaired'][1]}.{suffix} in {shown(path)}"
                self._unpaired = [self._unpaired[0] + listing["unpaired"][0], first]
            listed.append((path, tar_name, stamp, listing["entries"]))
        if self._unpaired[0]:  # a tar of .tif or .avif images would otherwise give no rows without a word
            count, first = self._unpaired
            warnings.append(f"{count:,} .{suffix} label files name a key without an image (looked for "
                            f".{', .'.join(IMAGE_SUFFIXES)}), the first {first}; no sample was listed for them")
        labels = list(dict.fromkeys(label for *_, entries in listed for label in entries.label_values()))  # each value once
        counts = [len(entries) for *_, entries in listed]
        images = sum(counts)
        if images and not labels:
            raise DataError(f"none of the {images} images in the tars of {shown(data)} has a readable .{suffix} "
                            f"label; name the label files with --label-key (cls, txt, json or json:FIELD)"
                            + "".join(f"; {line}" for line in warnings[:3]))
        names = self._class_names(classes, labels)
        position = {name: i for i, name in enumerate(names)}

        def outcome(label) -> tuple[int, str | None]:
            """A label's target, and why it cannot be used (with --classes only: found classes hold every label)."""
            if isinstance(label, int) and names_given(classes):
                target = label if label < len(names) else -1
            else:
                target = position.get(str(label), -1)
            return target, f"its label {label} {NOT_IN_CLASSES}" if target == -1 else None

        found = {outcome(label)[0] for label in labels} - {-1}  # the targets of some image: each label has one
        if images and not found:
            raise DataError(f"no image in the tars of {shown(data)} has a label among --classes ({classes}); "
                            "name the classes the labels use, or leave --classes out")
        if not images and self._dotted:
            key, _, ending = self._dotted.rpartition("/")[2].partition(".")
            raise DataError(f"the tars of {shown(data)} hold no images: a key ends at the first dot, so "
                            f"{self._dotted} is key {key} with extension .{ending}; rename the files to KEY.jpg "
                            "with no dot in KEY")
        if not images:
            raise DataError(f"the tars of {shown(data)} hold no images (looked for .{', .'.join(IMAGE_SUFFIXES)})"
                            + "".join(f"; {line}" for line in warnings[:3]))
        samples = TarSamples.joined([tar for tar in listed if isinstance(tar[3], TarEntries)], outcome)
        if self._share:
            self._starts = np.cumsum([0, *counts])  # where each tar's samples begin in the whole, and end
            samples = HeldSamples(samples, [(self._starts[n], self._starts[n + 1]) for n, tar in enumerate(listed)
                                            if isinstance(tar[3], TarEntries)], images)
        super().__init__(names, samples)
        self.warnings += warnings + _empty_classes(names, found, classes, suffix,
                                                   any(isinstance(label, int) for label in labels))

    @staticmethod
    def _list_tar(path: Path, suffix: str, field: str | None) -> dict:
        """One tar's listing (JSON, to be kept): `entries`, [key, data offset, size, label, problem] per image in
        the tar's order; its warnings after its path (`notes`); its first image name with a second dot
        (`dotted`); [count, first key] of its labels without an image (`unpaired`)."""
        images: dict[str, list] = {}
        labels: dict[str, object] = {}
        repeated: set[str] = set()
        members, cut, last, dotted, notes = 0, False, None, "", []  # last: the key of the last image listed
        ending_label = None  # the key of the label file listed last, while no other file follows it

        def take(name: str, regular: bool, offset: int, size: int, read) -> None:  # read(): a label's bytes
            nonlocal last, dotted, ending_label
            if not regular:
                return
            folder, _, base = name.rpartition("/")
            stem, dot, ending = base.partition(".")
            ending_label = None
            if not dot or base.startswith("."):
                return
            key, ending = (f"{folder}/{stem}" if folder else stem), ending.lower()
            ending_label = key if ending == suffix else None
            if ending in IMAGE_SUFFIXES:
                if key in images:
                    repeated.add(key)
                else:
                    images[key] = [offset, size, name]
                last = key
            elif not dotted and ending.rpartition(".")[2] in IMAGE_SUFFIXES:
                dotted = name
            elif ending == suffix:
                if key in labels:
                    repeated.add(key)
                elif size > LABEL_BYTES:
                    labels[key] = ValueError(f"its .{suffix} file is {size} bytes")
                else:
                    try:
                        labels[key] = _parse_label(read(), field, suffix == "cls")
                    except (ValueError, UnicodeDecodeError) as exc:
                        labels[key] = exc

        try:
            length = os.path.getsize(path)
            with open(path, "rb") as handle:  # a plain ustar tar is read fast; tarfile lists any other
                scanned = scan_tar(handle.fileno(), length, lambda name, size: size <= LABEL_BYTES and  # a label
                                   name.rpartition("/")[2].partition(".")[2].lower() == suffix)
            if scanned is not None:
                for name, regular, offset, size, data in scanned[0]:
                    members += 1
                    take(name, regular, offset, size, lambda data=data: data)
                end = scanned[1]
            else:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        members += 1
                        take(member.name, member.isfile(), member.offset_data, member.size,
                             lambda member=member: tar.extractfile(member).read())
                    end = tar.offset  # a whole tar ends with two zero blocks; tarfile stops quietly where it is cut
            with open(path, "rb") as handle:
                handle.seek(end)
                tail = handle.read(1024)
            if len(tail) < 1024 or tail.strip(b"\0"):
                raise tarfile.ReadError("it ends without the end-of-archive blocks")
        except (tarfile.TarError, EOFError) as exc:
            what = "is not an uncompressed tar" if not members else f"is damaged after {members} entries"
            cut = bool(members)
            notes.append(f"{what} ({str(exc) or type(exc).__name__}); "
                         + ("it was skipped" if not members else "the entries before were listed"))
        except OSError as exc:  # the file itself cannot be read (permissions, I/O): not a damaged tar to skip
            raise DataError(f"cannot read {shown(path)}: {exc.strerror or exc}; check the file and re-run") from None
        else:
            if not members:  # a whole tar of nothing: said like a damaged one, not dropped silently
                notes.append("is an empty tar (no entries); it was skipped")
        # a tar that puts each label before its image (KEY.cls, KEY.jpg) and is cut after a label: its image was
        # cut off, which the sample says (as for an image cut off before its label), not a label without an image
        cut_off = ending_label if cut and ending_label not in images else None
        unpaired = [key for key in labels if key not in images and key != cut_off]
        entries = []
        for key, (offset, size, name) in images.items():
            label = labels.get(key)
            if key in repeated:
                problem = f"the key {key} appears more than once in {path.name}"
            elif key not in labels and cut and key == last:  # its label would have come after the cut
                where = "inside" if offset + size > length else "after"
                problem = f"{path.name} is cut short {where} {name}, before its label {key}.{suffix}"
            elif key not in labels:
                problem = f"no label ({key}.{suffix} is missing)"
            elif isinstance(label, Exception):
                problem = f"unreadable label in {key}.{suffix}: {label}"
            else:
                problem = None
            entries.append([key, offset, size, None if problem else label, problem])
        if cut_off is not None:
            entries.append([cut_off, 0, 0, None, f"{path.name} is cut short after {cut_off}.{suffix}, before its image"])
        return {"entries": entries, "notes": notes, "dotted": dotted, "unpaired": [len(unpaired), ([*unpaired, ""])[0]]}

    @staticmethod
    def _class_names(classes: str, labels: list) -> list[str]:
        if names_given(classes):
            names = [name.strip() for name in classes.split(",") if name.strip()]
            if not names:
                raise DataError(f"--classes {classes} names no class; give comma-separated names")
            if len(set(names)) != len(names):
                raise DataError(f"--classes names a class twice ({classes}); name each once")
            return names
        if labels and all(isinstance(label, int) for label in labels):
            return [str(number) for number in range(max(labels) + 1)]  # class numbers index the classes
        return sorted({str(label) for label in labels})

    def listing_problem(self, index: int) -> str | None:
        problem = self.samples.problem(index)
        if not problem:
            return None
        return f"{problem}; {'name its class in --classes' if problem.endswith(NOT_IN_CLASSES) else 'fix the tar'}"

    def input_runs(self) -> list[tuple[int, int]]:
        if self._share:  # every tar, one without samples too: a tar's unit is its number, and the lister its rank
            return list(zip(self._starts[:-1].tolist(), self._starts[1:].tolist()))
        return self.samples.runs()  # the tars: shards follow tars

    def targets(self) -> np.ndarray:
        if not self._share:
            return self.samples.targets.astype(np.int64)
        from pipeline import distributed  # here: --help imports the formats, and starts without torch

        held, targets = self.samples, np.full(len(self.samples), -2, np.int64)  # each rank sends its int32 targets
        for firsts, stops, starts, values in distributed.each_rank(self._share, lambda: (
                held.firsts, held.stops, held.starts, held.held.targets)):
            for first, stop, start in zip(firsts.tolist(), stops.tolist(), starts.tolist()):
                targets[first:stop] = values[start:start + stop - first]
        if (targets == -2).any():
            raise RuntimeError("the torchrun ranks hold no longer every sample; ask for the targets before Source.hold")
        return targets

    def shard_digests(self, ranges: list[tuple[int, int]]) -> list[str]:
        if not self._share:
            return super().shard_digests(ranges)
        from pipeline import distributed  # here: --help imports the formats, and starts without torch

        mine = [number for number, (first, last) in enumerate(ranges) if self.samples.holds(first, last)]
        digested = distributed.each_rank(self._share, lambda: dict(zip(mine, Source.shard_digests(
            self, [ranges[number] for number in mine]))))
        digests = {number: digest for part in digested for number, digest in part.items()}
        return [digests[number] for number in range(len(ranges))]

    def digest_inputs(self, digest, first: int, last: int) -> None:
        for inputs in self.samples.inputs(first, last):
            digest.update(inputs)

    def keep(self, indices) -> None:
        if self._share:  # --samples-per-class: each rank keeps those of its tars
            self.samples, self._starts = self.samples.kept(indices), np.searchsorted(indices, self._starts)
        else:
            self.samples = self.samples.take(indices)

    def hold(self, ranges: list[tuple[int, int]]) -> None:
        # after the shard plan, which digests every sample (or, of own_share, the ranks together)
        held = self.samples
        self.samples = held.hold(ranges) if isinstance(held, HeldSamples) else HeldSamples.of(held, ranges)

    def encoded(self, index: int) -> bytes:
        path, offset, size, problem = self.samples.where(index)
        if problem:
            raise ListingProblem(problem)  # the listing's reason: no label, a repeated key, ... (see listing_problem)
        data = os.pread(self._tar_handle(path), size, offset)
        if len(data) != size:
            raise OSError(f"the tar entry is cut short ({len(data)} of {size} bytes)")
        return data

    def _tar_handle(self, path: str) -> int:
        """A descriptor of the tar `path`, kept open while this process reads it: the batches of a shard
        come from one tar, so a process opens each tar once, not once per image (an open is a metadata
        operation on a shared file system: a billion of them would load its servers more than the reads).
        Keyed by process: a forked DataLoader worker opens its own, and never closes its parent's."""
        held = self.__dict__.get("_held")
        if held is not None and held[:2] == (os.getpid(), path):
            return held[2]
        self.__del__()
        self._held = (os.getpid(), path, os.open(path, os.O_RDONLY))
        return self._held[2]

    def __del__(self) -> None:
        held = self.__dict__.pop("_held", None)
        if held is not None and held[0] == os.getpid():
            os.close(held[2])

    def __getstate__(self) -> dict:  # a copy, or a spawned worker, opens tars of its own
        return {name: value for name, value in self.__dict__.items() if name not in ("_held", "listings")}

    def read_image(self, index: int, draft=None) -> Image.Image:
        buffer = io.BytesIO(self.encoded(index))
        try:
            return open_rgb(buffer, draft)
        except DECODE_ERRORS as exc:  # PIL names the buffer by its address: name the tar member instead
            raise type(exc)(str(exc).replace(repr(buffer), self.samples.sample_id(index))) from None


def _empty_classes(names: list[str], held: set[int], classes: str, suffix: str, numbered: bool) -> list[str]:
    """The warning for classes no listed image holds: class numbers that skip some (labels from 1, a gap,
    one stray large number), or names of --classes the labels never use (`held`: the targets of some image). They
    keep their index, so the classes match those of another split, but fit-head refuses a class without rows."""
    empty = [name for index, name in enumerate(names) if index not in held]
    if not empty:
        return []
    counted = f"class {empty[0]} holds no images" if len(empty) == 1 else (
        f"{len(empty):,} of the {len(names):,} classes hold no images: {listed(empty[:5])}"
        + (f" (+{len(empty) - 5:,} more)" if len(empty) > 5 else ""))
    if not numbered:
        return [f"{counted}; fit-head needs images of every class of --classes (a test split may lack some)"]
    which = "numbers index the classes of --classes" if names_given(classes) else \
        f"numbers 0..{len(names) - 1} index the classes"
    return [f"{counted}; the .{suffix} {which} from 0, and fit-head needs images of every class; renumber the "
            "labels from 0 without gaps (a test split may lack some)"]


def names_given(classes: str | None) -> bool:
    """Whether --classes names the classes (a comma list) rather than asking for them to be found."""
    return bool(classes) and classes not in ("auto", "voc")
