"""Each tar's listing, made once (under torchrun by one rank for all: listed_tars) and kept in the cache folder
(`OUT/listings/`) for the next run over the same tars, so a resume, or a second extraction, reads no tar headers.

One file per tar, named by a digest of its absolute path: a head line (this format's version, the tar's
path, its stamp `size:mtime_ns` as the fingerprint takes it, its inode and ctime, the label key, the digest of
the listing) and the listing itself as JSON. A file whose head names another stamp or ctime (the tar changed), another label key or
version, or whose listing does not match its digest, or that cannot be read, is ignored: the tar is
listed again and its file replaced. Files are written with pipeline.files.atomic_write once the cache is
opened and locked (a run refused, or one that fails before, writes none).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import zlib
from pathlib import Path

from pipeline.datasets import file_stamp
from pipeline.errors import TLError
from pipeline.files import atomic_write, remove_stale_temporaries

VERSION = 2  # raise when what a listing holds, or how a tar is listed, changes: older files are ignored
# ... but those of the tars the change left as they were: relisting every tar of a large data set reads all their
# headers again. Version 1 listed a tar cut short (webdataset's note 'is damaged after N entries') otherwise
EARLIER_STILL_GOOD = {1: lambda listing: not any("is damaged after" in str(note) for note in listing.get("notes", ()))}


_LISTING_NAME = re.compile(r"[0-9a-f]{32}\.json")  # listing_file's names: other files in the folder are not ours


def listing_file(folder: Path, tar: Path) -> Path:
    return Path(folder) / (hashlib.sha256(os.fsencode(os.path.abspath(tar))).hexdigest()[:32] + ".json")


def _changed(tar: Path) -> str:
    """The tar's inode and status-change time. A tar replaced by one of its size with its mtime set back (touch -d,
    cp -p, rsync -t) keeps its stamp; the fingerprint still sees the new ids and labels when the tar is listed,
    but a kept listing would pin the old ones (and their offsets into the new tar). Nothing sets a ctime back."""
    try:
        status = os.stat(tar)
    except OSError:
        return "missing"
    return f"{status.st_ino}:{status.st_ctime_ns}"


class TarListings:
    """The listings of one run: `load` the kept listing of a tar if it still answers, `add` a new one,
    `save` the new ones (some of them: a torchrun rank saves its share)."""

    def __init__(self, folder: Path, label_key: str):
        self.folder, self.label_key = Path(folder), label_key
        # (tar number, file, content compressed): listed in this run, held until the cache is ours to write in; a
        # listing's JSON takes some 40 bytes an image, compressed (zlib's fastest level, 1 µs an image) 12
        self.pending: list[tuple[int, Path, bytes]] = []
        self.reused = 0
        self.notes: list[str] = []  # why listings were not kept (a warning of this run, not of the cache)
        self.tars: list[Path] | None = None  # the tars of the data, once listed_tars found them

    def _head(self, tar: Path, stamp: str) -> dict:
        return {"version": VERSION, "tar": os.fsdecode(os.path.abspath(tar)), "stamp": stamp,
                "label_key": self.label_key, "changed": _changed(tar)}

    def load(self, tar: Path, stamp: str) -> dict | None:
        """The listing kept for `tar` as it is now (its stamp), or None."""
        if stamp == "missing":
            return None
        try:
            # a file tl names itself: a link planted there is not followed (ELOOP, ignored), and a FIFO or device is
            # not read (a FIFO would block the run, /dev/zero fill its memory); the listing is redone and replaces it
            handle = os.open(listing_file(self.folder, tar), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(handle, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    return None
                head, body = handle.readline(), handle.read()
            head = json.loads(head)
            if not isinstance(head, dict) or head.pop("sha256", None) != hashlib.sha256(body).hexdigest() \
                    or {**head, "version": VERSION} != self._head(tar, stamp):
                return None
            listing = json.loads(body)
            version = head.get("version")
            if version != VERSION:
                still_good = EARLIER_STILL_GOOD.get(version) if type(version) is int else None
                if still_good is None or not isinstance(listing, dict) or not still_good(listing):
                    return None
        except (OSError, ValueError):
            return None
        self.reused += 1
        return listing

    def add(self, number: int, tar: Path, stamp: str, listing: dict) -> None:
        """Keep `listing` (JSON: lists, strings, numbers) of the tar `number` of this run, to save later."""
        if stamp == "missing":
            return
        body = json.dumps(listing, separators=(",", ":")).encode("ascii")  # other names as \u escapes
        head = {**self._head(tar, stamp), "sha256": hashlib.sha256(body).hexdigest()}
        self.pending.append((number, listing_file(self.folder, tar),
                             zlib.compress(json.dumps(head).encode("ascii") + b"\n" + body, 1)))

    def save(self, share=lambda number: True) -> int:
        """Write the pending listings of the tars `share(number)` picks; the count written. Those that cannot be
        written (a full disk, a folder not writable) are said in `notes`, and the run goes on without them."""
        mine = [(path, content) for number, path, content in self.pending if share(number)]
        self.pending, saved = [], 0
        try:
            if mine:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(self.folder)  # once: each write below skips the look
            for path, content in mine:
                with atomic_write(path, "tar listing", sweep=False, follow=False) as temporary:
                    temporary.write_bytes(zlib.decompress(content))
                saved += 1
        except (OSError, TLError) as exc:  # a speed-up only: a full disk or a folder not ours must not stop the run
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).partition(";")[0]  # not its remedy
            if isinstance(exc, FileExistsError):  # mkdir's "File exists": a file or a dangling link holds the name
                reason, then = "it is not a folder", "remove it, or the next run lists those tars again too"
            else:
                then = "the next run lists those tars again"
            lost = len(mine) - saved
            self.notes.append(f"{lost:,} tar listing{'s were' if lost > 1 else ' was'} not kept in {self.folder} "
                              f"({reason}); {then}")
        return saved


    def remove_others(self) -> int:
        """Delete the kept listings of tars that are no longer part of the data (removed from --data, or of the
        data of a cache this one replaced); the count removed. For the process holding the cache's lock (rank
        0), once the listings are saved: another rank of the run writes listings of these tars only, and
        under temporary names until they are complete, which are left alone here."""
        if self.tars is None:  # no tars found yet: every listing would look like another's
            return 0
        ours = {listing_file(self.folder, tar).name for tar in self.tars}
        try:
            others = [path for path in self.folder.iterdir() if _LISTING_NAME.fullmatch(path.name)
                      and path.name not in ours]
        except OSError:  # no folder (nothing was ever kept), or not one: nothing of ours to remove
            return 0
        removed = 0
        for path in others:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed


def listed_tars(find, list_tar, listings: TarListings | None, current=None, held=lambda listing: listing,
                summary=None) -> tuple[list[Path], list[str], list]:
    """The tars and warnings `find()` gives, and (stamp, held(listing)) of each tar: its kept listing if it still
    answers, else `list_tar(path)` (kept in `listings`, to save); `held` makes it what a rank keeps (and sends to
    the others: webdataset's entries as columns). Under torchrun (`current`, the
    pipeline.distributed.World of a started process group) rank 0 finds the tars, each rank lists those whose
    number % size is its rank (as it saves them), and the ranks exchange the listings: a rank reads the
    headers of 1/size of the tars, and a rank that cannot read one stops them all (distributed.each_rank).
    With `summary`, a rank keeps its own tars' listings only and sends the others summary(held(listing)) (tl
    extract, whose rank reads the tars it lists: a billion images' columns are not sent to every rank)."""
    from pipeline import distributed  # here, not above: --help imports the formats, and starts without torch

    current = current or distributed.World()
    paths, warnings = distributed.each_rank(current, lambda: find() if current.is_main else None)[0]
    if listings:
        listings.tars = paths
    mine = []

    def share() -> list[tuple[str, dict]]:
        for number in range(current.rank, len(paths), current.size):
            stamp = file_stamp(paths[number])
            listing = listings.load(paths[number], stamp) if listings else None
            if listing is None:
                listing = list_tar(paths[number])
                if listings:
                    listings.add(number, paths[number], stamp, listing)
            mine.append((stamp, held(listing)))
        return mine if summary is None or not current.distributed else [(stamp, summary(kept)) for stamp, kept in mine]

    shares = distributed.each_rank(current, share)
    if summary is not None:
        shares[current.rank] = mine
    return paths, warnings, [shares[number % current.size][number // current.size] for number in range(len(paths))]
