"""Whether a file at an output path is tl's to replace: a head, model or checkpoint (`tl_archive`), an
export, a contract, a predictions file or a report's files (each kind's recogniser, `ours`); a file tl did
not write is refused before any work, not replaced without a word.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

from pipeline.errors import ForeignFile


def foreign(path: Path, ours=None, follow: bool = True) -> bool:
    """Whether `path` holds a file that tl did not write as the kind `ours(path)` recognises (True for one of
    tl's own), by default a tl head, model or checkpoint (`tl_archive`). No file, or an empty one: False. One
    that cannot be read: True (the rename of an atomic write would replace it unread). `follow=False`: a file
    tl names in an output folder, where a link is replaced, not written through (_prepared), and loses nothing."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0 or not follow and os.path.islink(path):
        return False
    try:
        return not (ours or tl_archive)(path)
    except (OSError, zipfile.BadZipFile, ValueError):  # unreadable, or not as tl writes its files
        return True


def tl_archive(path: Path) -> bool:
    """A tl head, model or checkpoint: torch's zip archive whose pickle (`data.pkl`, a few KB: the tensors lie
    beside it) holds the JSON metadata with its format (`"format": "tl-head/1"`); a user's torch.save state
    dict or a TorchScript export has none."""
    return zip_member_holds(path, "data.pkl", b'"format": "tl-')


def zip_member_holds(path: Path, name: str, mark) -> bool:
    """Whether `path` is a zip archive with one member called `name` (in whatever folder) and `mark` in it: bytes
    anywhere, or a compiled pattern (of bytes) that matches at the member's start."""
    with zipfile.ZipFile(path) as archive:
        members = [member for member in archive.namelist() if member.rpartition("/")[2] == name]
        found = archive.read(members[0]) if len(members) == 1 else b""
        return bool(mark.match(found)) if isinstance(mark, re.Pattern) else bool(found) and mark in found


ONNX_METADATA = 14  # ModelProto.metadata_props: repeated StringStringEntryProto (key = 1, value = 2)


def onnx_metadata(path: Path, fields: int = 4096) -> dict[str, str] | None:
    """The metadata_props of an ONNX file, read without the onnx package and without reading the model: the
    protocol buffer's top-level fields are walked by their keys and lengths, the graph (the weights: hundreds of
    MB) skipped by a seek. None when the file is not a protocol buffer as far as the walk goes (more than
    `fields` top-level fields: a text or video file is given up on after a few KB)."""
    props = {}
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        for field, value in _fields(file, size, fields, wanted=ONNX_METADATA):
            if field == ONNX_METADATA and value is not None:
                entry = dict(_fields(io.BytesIO(value), len(value), 2))
                if not {1, 2} >= entry.keys() or not all(isinstance(v, bytes) for v in entry.values()):
                    return None
                props[entry.get(1, b"").decode("utf-8", "replace")] = entry.get(2, b"").decode("utf-8", "replace")
            elif field is None:
                return None
    return props


def _fields(file, size: int, most: int, kept: int = 1 << 20, wanted: int | None = None):
    """(field number, value) of a protocol buffer message's fields in `file` (`size` bytes); a length-delimited
    value up to `kept` bytes of field `wanted` (of any field: None) is read (bytes), any other skipped (None),
    as are numbers; (None, None) where the bytes are no message: a bad key or wire type, a length past the
    end, more than `most` fields."""
    for _ in range(most):
        if file.tell() >= size:
            return
        key = _varint(file)
        field, wire = (key >> 3, key & 7) if key is not None else (0, 0)
        if field == 0 or wire not in (0, 1, 2, 5):
            break
        value = None
        if wire == 0:
            if _varint(file) is None:
                break
        elif wire == 2:
            length = _varint(file)
            if length is None or file.tell() + length > size:
                break
            if length <= kept and wanted in (None, field):
                value = file.read(length)
            else:
                file.seek(length, os.SEEK_CUR)
        else:
            file.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        if file.tell() > size:
            break
        yield field, value
    else:
        if file.tell() >= size:
            return
    yield None, None


def _varint(file) -> int | None:
    value = 0
    for shift in range(0, 70, 7):
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    return None


def refuse_foreign(path: Path, what: str, remedy: str, ours=None, follow: bool = True) -> None:
    """Refuse, before any work, to replace a file at `path` that tl did not write as a `what` (`foreign`, with
    `ours`): `--out notes.txt` by mistake replaced the notes without a word. `remedy` says how to anyway."""
    if foreign(path, ours, follow):
        raise ForeignFile(path, foreign_state(what), remedy)


def foreign_state(what: str) -> str:
    """How a refusal, and tl run --dry-run, say what a foreign output holds."""
    return f"holds a file that tl did not write as a {what}"
