"""Whether a file at an output path is tl's to replace: a head, model or checkpoint (`tl_archive`), an
export, a contract, a predictions file or a report's files (each kind's recogniser, `ours`); a file tl did
not write is refused before any work, not replaced without a word.
"""

from __future__ import annotations

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


def refuse_foreign(path: Path, what: str, remedy: str, ours=None, follow: bool = True) -> None:
    """Refuse, before any work, to replace a file at `path` that tl did not write as a `what` (`foreign`, with
    `ours`): `--out notes.txt` by mistake replaced the notes without a word. `remedy` says how to anyway."""
    if foreign(path, ours, follow):
        raise ForeignFile(path, foreign_state(what), remedy)


def foreign_state(what: str) -> str:
    """How a refusal, and tl run --dry-run, say what a foreign output holds."""
    return f"holds a file that tl did not write as a {what}"
