"""Reads a finished cache: streaming batches across shards with one shard open at a time, random
access by row, or one tap loaded whole. Every shard's checksum is checked the first time it is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from cache.manifest import load_manifest
from pipeline.errors import CacheError
from pipeline.files import file_digest


class CacheReader:
    """A complete cache. `verify=False` skips checksums (for callers that just verified)."""

    def __init__(self, root: Path, verify: bool = True, allow_partial: bool = False):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if not self.manifest.complete and not allow_partial:
            done, total = len(self.manifest.shards), self.manifest.num_shards
            raise CacheError(
                f"cache {self.root} is incomplete ({done} of {total} shards); re-run the same tl extract command to finish it"
            )
        self.verify = verify
        self._verified: set[int] = set()
        self.shards = self.manifest.shards
        self._offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self.shards_opened = 0  # how many times a shard file was opened; lets tests bound memory use
        self.open_now = 0  # shard files open at this moment, and the most ever open at once
        self.most_open = 0
        self.largest_read = 0  # the most code rows one read brought into memory

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def taps(self) -> dict[str, int]:
        return self.manifest.widths

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def _check_tap(self, tap: str) -> None:
        if tap not in self.manifest.taps:
            raise CacheError(f"cache {self.root} has no layer '{tap}'; it has: {', '.join(self.manifest.taps)}")

    def check_shard(self, position: int) -> None:
        """Raise CacheError unless the shard file exists and matches its recorded checksum."""
        shard = self.shards[position]
        path = self.root / shard.file
        if not path.is_file():
            raise CacheError(f"shard {shard.file} of {self.root} is missing; re-run tl extract to rewrite it")
        if file_digest(path) != shard.sha256:
            raise CacheError(
                f"shard {shard.file} of {self.root} is corrupt (checksum mismatch); "
                "re-run the tl extract that made it: it writes that shard again"
            )

    def open_shard(self, position: int) -> h5py.File:
        if self.verify and position not in self._verified:
            self.check_shard(position)
            self._verified.add(position)
        self.shards_opened += 1
        try:
            handle = _CountedFile(self.root / self.shards[position].file, "r")
        except OSError as exc:
            raise CacheError(f"cannot open shard {self.shards[position].file} of {self.root}: {exc}") from None
        handle.reader = self
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        self._check_rows(handle, position)
        return handle

    def _check_rows(self, handle: h5py.File, position: int) -> None:
        """The manifest's row count and classes must describe the shard: an edited manifest that says
        fewer rows would silently train on part of the data, fewer classes would mislabel it."""
        shard = self.shards[position]
        found = handle["target"].shape[0] if "target" in handle else None
        if found != shard.rows:
            handle.close()
            raise CacheError(f"manifest of {self.root} says {shard.file} has {shard.rows} rows but it holds "
                             f"{found}; re-run tl extract with --overwrite")
        for name, width in (("target", None), *self.taps.items()):  # the types tl writes: a crafted shard is
            data = handle.get(name)                                    # one line, not a numpy traceback
            kind = "iub" if width is None else "f"
            if not isinstance(data, h5py.Dataset) or data.dtype.kind not in kind or width is not None \
                    and data.shape != (shard.rows, width):
                what = "missing" if data is None else "a group" if not isinstance(data, h5py.Dataset) else \
                    f"{data.dtype} {data.shape}"
                handle.close()
                raise CacheError(f"{shard.file} of {self.root} holds {name} as {what}, not what tl writes "
                                 f"({'integers' if width is None else f'({shard.rows}, {width}) floats'}); re-run "
                                 "tl extract with --overwrite")
        if self.manifest.target == "class" and found:
            targets = handle["target"][()]
            top, bottom = int(targets.max()), int(targets.min())
            if top >= len(self.classes) or bottom < 0:
                handle.close()
                said = f"class {bottom} is negative" if bottom < 0 else \
                    f"has class {top} but the manifest names {len(self.classes)} classes"
                raise CacheError(f"{shard.file} of {self.root}: {said}; re-run tl extract with --overwrite")
        elif found and handle["target"].shape[1:] != (len(self.classes),):
            width = handle["target"].shape[1:]
            handle.close()
            raise CacheError(f"{shard.file} of {self.root} has targets of {width} classes "
                             f"but the manifest names {len(self.classes)}; re-run tl extract with --overwrite")

    def _note_read(self, rows: int) -> None:
        self.largest_read = max(self.largest_read, rows)

    def iter_batches(self, tap: str, batch_size: int = 1024, columns: tuple[str, ...] = ("target", "sample_id")
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of at most `batch_size` rows, in cache order; memory holds one batch, not one shard."""
        self._check_tap(tap)
        for position, shard in enumerate(self.shards):
            if shard.rows == 0:
                continue
            with self.open_shard(position) as handle:
                for start in range(0, shard.rows, batch_size):
                    stop = min(start + batch_size, shard.rows)
                    batch = {tap: handle[tap][start:stop]}
                    for column in columns:
                        batch[column] = _column(handle, column, start, stop)
                    yield batch

    def iter_blocks(self, tap: str, block_rows: int, rows: np.ndarray | None = None,
                    rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global row numbers, codes) for blocks of at most `block_rows` contiguous rows of one shard.

        `rows` (sorted global row numbers) keeps only those rows. With `rng`, shards, blocks and the rows
        inside a block come in a shuffled order: enough mixing for SGD while memory holds one block and
        one shard file is open. NaN or Inf is refused with the shard named.
        """
        self._check_tap(tap)
        if block_rows < 1:
            raise CacheError(f"block size must be at least 1 row, got {block_rows}")
        positions = np.arange(len(self.shards))
        if rng is not None:
            positions = rng.permutation(positions)
        for position in positions:
            shard, offset = self.shards[position], int(self._offsets[position])
            starts = np.arange(0, shard.rows, block_rows)
            if rng is not None:
                starts = rng.permutation(starts)
            if not len(starts):
                continue
            with self.open_shard(int(position)) as handle:
                for start in starts:
                    stop = min(int(start) + block_rows, shard.rows)
                    if rows is None:
                        global_rows = np.arange(offset + start, offset + stop)
                    else:
                        global_rows = rows[np.searchsorted(rows, offset + start):np.searchsorted(rows, offset + stop)]
                        if not len(global_rows):
                            continue
                    if rng is not None:
                        global_rows = global_rows[rng.permutation(len(global_rows))]
                    codes = handle[tap][start:stop]
                    self._note_read(len(codes))
                    if rng is not None or rows is not None:  # one gather for the subset and the shuffle
                        codes = codes[global_rows - offset - start]
                    _refuse_non_finite(codes, tap, shard.file, self.root, global_rows - offset)
                    yield global_rows, codes

    def load(self, tap: str) -> np.ndarray:
        """One tap of every row, as one (rows, width) array."""
        self._check_tap(tap)
        width = self.taps[tap]
        out = np.empty((self.num_rows, width), dtype=self.manifest.taps[tap].dtype)
        for position, shard in enumerate(self.shards):
            if shard.rows:
                with self.open_shard(position) as handle:
                    part = np.s_[self._offsets[position]:self._offsets[position + 1]]
                    handle[tap].read_direct(out, dest_sel=part)
                self._note_read(shard.rows)
                _refuse_non_finite(out[part], tap, shard.file, self.root)
        return out

    def has_column(self, column: str) -> bool:
        """Whether the shards carry this column (ignore, image_id, ... exist only in some caches)."""
        for position, shard in enumerate(self.shards):
            if shard.rows:
                with self.open_shard(position) as handle:
                    return column in handle
        return False

    def load_column(self, column: str) -> np.ndarray:
        """A non-code column (target, sample_id, ...) of every row."""
        parts = []
        for position, shard in enumerate(self.shards):
            if shard.rows:
                with self.open_shard(position) as handle:
                    parts.append(_column(handle, column, 0, shard.rows))
        return np.concatenate(parts) if parts else np.empty(0)

    def read_rows(self, tap: str, rows: np.ndarray) -> np.ndarray:
        """Codes of the given global row numbers, in the order given."""
        self._check_tap(tap)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise CacheError(f"row numbers out of range 0..{self.num_rows - 1}")
        out = np.empty((len(rows), self.taps[tap]), dtype=self.manifest.taps[tap].dtype)
        positions = np.searchsorted(self._offsets, rows, side="right") - 1
        for position in np.unique(positions):
            wanted = np.flatnonzero(positions == position)
            local = rows[wanted] - self._offsets[position]
            order = np.argsort(local)
            with self.open_shard(int(position)) as handle:
                # h5py fancy indexing needs increasing indices
                unique_local, inverse = np.unique(local[order], return_inverse=True)
                block = handle[tap][unique_local]
            out[wanted[order]] = block[inverse]
        return out

    def verify_all(self, block_rows: int = 8192) -> list[str]:
        """Every problem found (missing file, checksum, row count, codes that are NaN or Inf: a shard
        written with them has a checksum of its own); empty when the cache is sound."""
        problems = []
        for position, shard in enumerate(self.shards):
            try:
                self.check_shard(position)
                with self.open_shard(position) as handle:  # opening checks rows and classes against the manifest
                    for name in list(self.manifest.taps) + ["target", "sample_id"]:
                        if name not in handle or handle[name].shape[0] != shard.rows:
                            problems.append(f"{shard.file}: column {name} missing or of the wrong length")
                        elif name in self.manifest.taps:
                            for start in range(0, shard.rows, block_rows):  # a block at a time: bounded memory
                                rows = np.arange(start, min(start + block_rows, shard.rows))
                                _refuse_non_finite(handle[name][start:start + block_rows], name, shard.file,
                                                   self.root, rows)
            except (CacheError, OSError) as exc:
                problems.append(str(exc))
        return problems


def _refuse_non_finite(codes: np.ndarray, tap: str, shard_file: str, root: Path,
                       shard_rows: np.ndarray | None = None) -> None:
    bad = ~np.isfinite(codes).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        row = first if shard_rows is None else int(shard_rows[first])
        raise CacheError(f"shard {shard_file} of {root} holds NaN or Inf in {tap} ({int(bad.sum()):,} row{'s' * (int(bad.sum()) > 1)}, "
                         f"first at row {row} of the shard); re-extract the cache with tl extract --overwrite")


class _CountedFile(h5py.File):
    """An h5py file that tells its reader when it closes, so tests can see how many are open at once."""

    def close(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None and self.id.valid:
            reader.open_now -= 1
        super().close()


def _column(handle: h5py.File, column: str, start: int, stop: int) -> np.ndarray:
    if column not in handle:
        raise CacheError(f"shard {Path(handle.filename).name} has no column '{column}'")
    data = handle[column]
    if h5py.check_string_dtype(data.dtype) is not None:
        return data.asstr(errors="surrogateescape")[start:stop]  # names that are not UTF-8 on disk
    return data[start:stop]
