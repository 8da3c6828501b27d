"""Where webdataset tars are: a brace pattern's names (`data/{00000..01023}.tar`), the *.tar files of a
folder (or of DATA/SPLIT), or one tar; regular files only (reading a FIFO would wait for ever)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from pipeline.datasets import missing_split, shown
from pipeline.errors import DataError

MAX_TARS = 10_000_000
NOT_REGULAR = "not a regular file (a FIFO, a device or a folder)"


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (zero-padded like the bounds); `{x,y}` lists;
    several groups multiply (at most MAX_TARS names in all). Text without braces is itself."""
    depth = 0
    for char in pattern:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            raise DataError(f"a }} in {pattern} closes no {{; write ranges as {{00000..00099}} and lists as {{a,b}}")
    if depth:
        raise DataError(f"a {{ in {pattern} is not closed by a }}; write ranges as {{00000..00099}} and lists as {{a,b}}")
    total = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        total *= int(numbers[2]) - int(numbers[1]) + 1 if numbers else body.count(",") + 1
        if total > MAX_TARS:
            raise DataError(f"{pattern} names more than {MAX_TARS:,} tars; give fewer, or a folder of tars")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        low, high = int(numbers[1]), int(numbers[2])
        if low > high or high - low >= MAX_TARS:
            raise DataError(f"brace range {{{body}}} in {pattern} must count up (at most {MAX_TARS:,} names)")
        width = len(numbers[1]) if numbers[1].startswith("0") else 0
        options = [f"{value:0{width}d}" for value in range(low, high + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"cannot read the braces {{{body}}} in {pattern}; write {{00000..00009}} or {{a,b}}")
    return [name for option in options for name in _expand(head + option + tail)]


def tar_paths(data: Path, split: str, warnings: list[str]) -> list[Path]:
    """The input tars: a brace pattern's names (each must exist), the *.tar files of a folder (or of
    DATA/SPLIT), or one tar file. Only regular files: a FIFO would block the listing for ever, so one
    in a folder is skipped (said in `warnings`) and one named outright is refused."""
    text = str(data)
    if "{" in text:
        paths = [Path(name) for name in dict.fromkeys(expand_braces(text))]  # {a,a}: one tar, read once
        odd = [path for path in paths if not path.is_file()]
        missing = [path for path in odd if not path.exists()]
        if missing:
            raise DataError(f"{len(missing)} of the {len(paths)} tars of {text} do not exist, the first "
                            f"{shown(missing[0])}; fix the pattern or fetch the tars")
        if odd:
            raise DataError(f"{shown(odd[0])} of {text} is {NOT_REGULAR}; name only tar files")
        return paths
    if not data.exists():
        raise DataError(f"data path {data} does not exist; pass --data with a tar, a folder of tars or a "
                        "brace pattern such as data/{00000..00099}.tar")
    if data.is_dir():
        folder = data / split if split and (data / split).is_dir() else data
        found = sorted(_tars_in(folder))
        paths = [path for path in found if path.is_file()]
        odd = [path for path in found if not path.is_file()]
        if odd:  # a link to nothing is missing, not a FIFO
            what = NOT_REGULAR if odd[0].exists() else "a link to nothing"
            warnings.append(f"{shown(odd[0])} is {what}; it was skipped" if len(odd) == 1 else
                            f"{len(odd)} entries named *.tar in {shown(folder)} are not tar files and were "
                            f"skipped, the first {shown(odd[0].name)} ({what})")
        if not paths and folder == data and split:  # --split names no folder, and the others hold the tars
            splits = sorted(path.name for path in data.iterdir() if path.is_dir() and not path.name.startswith(".")
                            and any(_tars_in(path)))
            if splits:
                raise missing_split(data, split, splits)
        if not paths:
            raise DataError(f"no .tar files in {shown(folder)}; a webdataset folder holds NNNNN.tar shards"
                            + "".join(f"; {line}" for line in warnings))
        return paths
    if not data.is_file():
        raise DataError(f"data path {shown(data)} is {NOT_REGULAR}; pass --data with a tar, a folder of tars or "
                        "a brace pattern")
    return [data]


def _tars_in(folder: Path) -> list[Path]:
    """The entries named *.tar in any case (SHARD.TAR too) of `folder`, not hidden; none if it cannot be read."""
    with contextlib.suppress(OSError):
        return [path for path in folder.iterdir() if path.suffix.lower() == ".tar" and not path.name.startswith(".")]
    return []
