"""The csv format: rows of path,label (an optional header, a byte-order mark and empty labels
tolerated), image paths relative to the CSV file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pipeline.datasets import Sample, Source, file_stamp, register_format
from pipeline.errors import DataError, counted


@register_format
class CsvSource(Source):
    """Rows of `path,label`; paths relative to the CSV file; an optional `path,label` header."""

    format = "csv"
    split_by_folder = True  # a CSV has no split folder: any --split reads its rows
    help = 'a CSV file of path,label rows, paths relative to it'

    @classmethod
    def open(cls, data: Path, split: str, download: bool, classes: str) -> "CsvSource":
        return cls(data)

    def __init__(self, csv_path: Path):
        if csv_path.is_dir():  # it said the folder did not exist
            raise DataError(f"CSV file {csv_path} is a folder; pass --data with a file of path,label rows, or "
                            "--format imagefolder for a folder of class folders")
        if not csv_path.is_file():  # a FIFO was said not to exist too (and reading it would wait for a writer)
            what = "is not a regular file (a FIFO or a device)" if csv_path.exists() else "does not exist"
            raise DataError(f"CSV file {csv_path} {what}; pass --data with a file of path,label rows")
        rows, unlabelled, first = [], 0, 0
        try:
            # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first path
            with open(csv_path, newline="", encoding="utf-8-sig") as handle:
                # skipinitialspace: `a.jpg, "dog, big"` quotes its label as `a.jpg,"dog, big"` does (else: '"dog')
                for number, row in enumerate(csv.reader(handle, skipinitialspace=True), start=1):
                    if not row or not "".join(row).strip():
                        continue
                    if "\0" in "".join(row):  # Python's csv reads NUL since 3.11: a binary file, or no path at all
                        raise DataError(f"{csv_path} line {number} holds a NUL byte; save it as UTF-8 text of "
                                        "path,label rows")
                    if "\n" in "".join(row) or "\r" in "".join(row):  # a quote left open: the rows after, one field
                        raise DataError(f"{csv_path} line {number}: a quoted field runs on over several lines; close "
                                        "its quote (\") and write each row on one line")
                    first = first or number  # the first row that is not blank: a header may follow blank lines
                    if number == first and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                        continue
                    if len(row) < 2:
                        raise DataError(f"{csv_path} line {number}: expected path,label, got {','.join(row)!r}")
                    if not row[0].strip():  # it named the CSV's own folder: ' is a folder, not an image file'
                        raise DataError(f"{csv_path} line {number}: no image path before the label; write path,label")
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
        rows, warnings = _one_row_per_image(csv_path, rows)
        if not rows:
            raise DataError(f"{csv_path} gives every image two labels; give each image one label")
        classes = sorted({label for _, _, label, _ in rows})
        index = {name: i for i, name in enumerate(classes)}
        samples = []
        for relative, path, label, number in rows:
            if path.is_dir():  # "does not exist" sent the user looking for a file that is there, as a folder
                raise DataError(f"{csv_path} line {number}: {relative} is a folder, not an image file; name one image "
                                "per row (paths are relative to the CSV)")
            if not path.exists():  # a FIFO or a device is listed, then skipped and recorded when read, as in a folder
                raise DataError(f"{csv_path} line {number}: image {relative} does not exist (paths are relative to the CSV)")
            samples.append(Sample(relative, index[label], str(path), file_stamp(path)))
        super().__init__(classes, samples)
        if unlabelled:
            self.warnings.append(f"skipped {counted(unlabelled, 'row')} of {csv_path} with an empty label")
        self.warnings += warnings


def _one_row_per_image(csv_path: Path, rows: list[tuple[str, str, int]]) -> tuple[list, list[str]]:
    """(relative, path, label, line) once per image, and what was left out: a row repeating an image
    with its label is dropped; an image given two labels is skipped altogether (a single-label format
    cannot say which is right, and keeping both would train on both)."""
    first: dict[Path, tuple[str, Path, str, int]] = {}
    conflicts: dict[Path, tuple[int, int]] = {}
    repeats = 0
    for relative, label, number in rows:
        # ./a.png and a.png are one image; realpath, as Path.resolve raises on a symlink loop (before Python 3.13)
        path = Path(os.path.realpath(csv_path.parent / relative))
        if path not in first:
            first[path] = (relative, path, label, number)
        elif first[path][2] == label:
            repeats += 1
        else:
            conflicts.setdefault(path, (first[path][3], number))
    warnings = []
    if repeats:
        warnings.append(f"left out {counted(repeats, 'row')} of {csv_path} repeating an image with its label")
    if conflicts:
        path, (line, other) = next(iter(conflicts.items()))
        warnings.append(f"skipped {counted(len(conflicts), 'image')} of {csv_path} given two labels, e.g. "
                        f"{first[path][0]} (lines {line} and {other}); give each image one label")
    return [row for path, row in first.items() if path not in conflicts], warnings
