"""Writes a cache: takes the lock, checks the key, writes each shard under a temporary name, renames
it when complete and only then records it in the manifest, so a killed run loses at most one shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from cache.manifest import (MANIFEST, ForeignManifest, Manifest, ShardEntry, key_differences, load_manifest,
                            save_manifest, shard_name)
from pipeline.files import DiskFullError, OutputLock, file_digest, write_bytes
from pipeline.errors import CacheError

LOCK = ".lock"
CHUNK_BYTES = 1 << 20
COMPRESSIONS = ("none", "lzf", "gzip")
DTYPES = ("float16", "float32")


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"cannot write to output {root}: {exc.strerror}; choose another --out") from None


def cache_lock(root: Path) -> OutputLock:
    """The writer's lock of a cache folder (see OutputLock: never inherited by DataLoader workers)."""
    return OutputLock(Path(root) / LOCK, f"writing to {root}", CacheError)


class CacheWriter:
    """Opens (or resumes) a cache for one key and publishes shards. Use as a context manager."""

    def __init__(self, root: Path, key: dict, classes: list[str], taps: dict[str, int], dtype: str,
                 shard_rows: int, num_samples: int, compression: str = "none", overwrite: bool = False,
                 target_kind: str = "class", follower: bool = False):
        if dtype not in DTYPES:
            raise CacheError(f"unknown --dtype {dtype}; valid: {', '.join(DTYPES)}")
        if compression not in COMPRESSIONS:
            raise CacheError(f"unknown --compression {compression}; valid: {', '.join(COMPRESSIONS)}")
        if shard_rows < 1:
            raise CacheError(f"--shard-rows must be at least 1, got {shard_rows}")
        self.root = Path(root)
        self.dtype = dtype
        self.compression = compression
        self.taps = taps
        self.lock = cache_lock(self.root)
        self._fresh = Manifest.new(key, classes, taps, dtype, shard_rows, num_samples, target_kind)
        self.overwrite = overwrite
        # A follower (a torchrun rank other than 0) writes shard files only; rank 0 holds the lock, owns
        # the manifest and adopts the followers' shards once every rank is done.
        self.follower = follower
        self.manifest: Manifest | None = None

    # -- opening

    def __enter__(self) -> "CacheWriter":
        _check_writable(self.root)
        if self.follower:
            self.manifest = load_manifest(self.root)
            if self.manifest.key_digest != self._fresh.key_digest:
                raise CacheError(f"{self.root} was opened by rank 0 with other settings; start every rank alike")
            return self
        self.lock.acquire()
        try:
            self._open_manifest()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self.follower:
            self.lock.release()

    def _open_manifest(self) -> None:
        existing = None
        if (self.root / MANIFEST).exists():
            try:
                existing = load_manifest(self.root)
            except ForeignManifest as exc:
                raise ForeignManifest(f"{exc}: choose another --out") from None
            except CacheError:
                if not self.overwrite:
                    raise
        elif any(self.root.glob("shard-*.h5")) and not self.overwrite:
            raise CacheError(f"{self.root} holds shard files but no manifest; pass --overwrite to replace them")
        # A cache without a finished shard holds nothing to lose: a corrected command may take it over.
        if existing is not None and existing.key_digest != self._fresh.key_digest and existing.shards \
                and not self.overwrite:
            differences = "; ".join(key_differences(existing.key, self._fresh.key)) or "format"
            raise CacheError(
                f"{self.root} holds a cache made with other settings ({differences}); "
                "choose another --out, or pass --overwrite to replace it"
            )
        if existing is None or existing.key_digest != self._fresh.key_digest:
            self._clear()
            self.manifest = self._fresh
            save_manifest(self.root, self.manifest)
            return
        self.manifest = existing
        dropped = self._drop_missing_shards()
        self._remove_temporaries()
        self.adopt_shards(distrusted=dropped)

    def adopt_shards(self, distrusted: set[int] = frozenset()) -> list[int]:
        """Record complete shard files the manifest does not list yet: written by other ranks, or by a
        run killed between renaming a shard and saving the manifest. A shard names its cache key.
        `distrusted` shards (recorded once, then found changed) are rewritten, never adopted."""
        adopted = []
        for path in sorted(self.root.glob("shard-*.h5")):
            found = _shard_entry(path, self.manifest)
            if found is not None and found[0].index not in self.finished and found[0].index not in distrusted:
                entry, skipped = found
                self.manifest.skipped += [dict(item, shard=entry.index) for item in skipped]
                self._set_shards(self.manifest.shards + [entry])
                adopted.append(entry.index)
        if adopted:
            save_manifest(self.root, self.manifest)
        return adopted

    def _clear(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith("shard-") or path.name.startswith(".shard-") or path.name == MANIFEST:
                path.unlink() if not path.is_dir() else shutil.rmtree(path)

    def _drop_missing_shards(self) -> set[int]:
        """A shard recorded in the manifest whose file is gone, resized or changed (its sha256 is read
        again) is redone, not trusted."""
        kept = []
        for shard in self.manifest.shards:
            path = self.root / shard.file
            if path.is_file() and path.stat().st_size == shard.bytes and file_digest(path) == shard.sha256:
                kept.append(shard)
        dropped = {shard.index for shard in self.manifest.shards} - {shard.index for shard in kept}
        if dropped:
            self._set_shards(kept)
            self.manifest.complete = False
            save_manifest(self.root, self.manifest)
        return dropped

    def _set_shards(self, shards: list[ShardEntry]) -> None:
        indices = {s.index for s in shards}
        self.manifest.shards = sorted(shards, key=lambda s: s.index)
        self.manifest.skipped = [s for s in self.manifest.skipped if s["shard"] in indices]

    def _remove_temporaries(self) -> None:
        """Half-written files of a killed run (we hold the lock: no live writer owns them)."""
        for path in self.root.glob(".*.tmp-*"):
            path.unlink()

    # -- writing

    @property
    def finished(self) -> set[int]:
        return {shard.index for shard in self.manifest.shards}

    def write_shard(self, index: int, codes: dict[str, np.ndarray], targets: np.ndarray,
                    sample_ids: list[str], skipped: list[dict],
                    extra: dict[str, np.ndarray] | None = None) -> ShardEntry:
        """Write one complete shard atomically and record it (with its skipped samples) in the manifest.

        The shard is built in memory and written with plain file I/O, so a full disk is one clean
        OSError (HDF5 writing to a full disk crashed the process) and no half shard is left."""
        rows = len(sample_ids)
        name = shard_name(index)
        options = {} if self.compression == "none" else {"compression": self.compression}
        image = io.BytesIO()
        with h5py.File(image, "w") as shard:
            for tap, array in codes.items():
                self._dataset(shard, tap, np.asarray(array, dtype=self.dtype), options)
            self._dataset(shard, "target", np.asarray(targets), options)
            shard.create_dataset("sample_id", data=_text(sample_ids), dtype=h5py.string_dtype("utf-8"))
            for column, array in (extra or {}).items():
                self._dataset(shard, column, np.asarray(array), options)
            shard.attrs["index"] = index
            shard.attrs["rows"] = rows
            shard.attrs["key_digest"] = self._fresh.key_digest
            shard.attrs["skipped"] = json.dumps(skipped)
        data = image.getbuffer()
        entry = ShardEntry(index, name, rows, data.nbytes, hashlib.sha256(data).hexdigest())
        try:
            write_bytes(self.root / name, data, "shard")
            if self.follower:
                return entry
            shards = [s for s in self.manifest.shards if s.index != index] + [entry]
            self.manifest.skipped = [s for s in self.manifest.skipped if s["shard"] != index]
            self.manifest.skipped += [dict(item, shard=index) for item in skipped]
            self._set_shards(shards)
            save_manifest(self.root, self.manifest)
        except DiskFullError:
            kept = len(self.manifest.shards) - (index in self.finished)
            raise DiskFullError(f"no space left on the device of {self.root} ({kept} shards kept; free space "
                                "and re-run the same command to resume)") from None
        return entry

    @staticmethod
    def _dataset(shard: h5py.File, name: str, array: np.ndarray, options: dict) -> None:
        if array.dtype.kind in "UO":  # text columns (image ids) as UTF-8 strings
            shard.create_dataset(name, data=_text(array), dtype=h5py.string_dtype("utf-8"))
            return
        if len(array) == 0:
            shard.create_dataset(name, data=array)
            return
        row_bytes = max(1, array[0].nbytes)
        chunk_rows = int(max(1, min(len(array), CHUNK_BYTES // row_bytes)))
        shard.create_dataset(name, data=array, chunks=(chunk_rows,) + array.shape[1:], **options)

    def finish(self) -> Manifest:
        done = len(self.manifest.shards) == self.manifest.num_shards
        self.manifest.complete = done
        save_manifest(self.root, self.manifest)
        return self.manifest


def _text(values) -> np.ndarray:
    """Text as UTF-8 bytes for HDF5; names that are not UTF-8 on disk (surrogate-escaped by Python)
    keep their bytes, and `text_column` reads them back as the same str."""
    return np.array([str(v).encode("utf-8", "surrogateescape") for v in values], dtype=object)


def _shard_entry(path: Path, manifest: Manifest) -> tuple[ShardEntry, list[dict]] | None:
    """(manifest entry, skipped samples) of a complete shard file of this cache, else None."""
    try:
        with h5py.File(path, "r") as shard:
            if shard.attrs.get("key_digest") != manifest.key_digest:
                return None
            index, rows = int(shard.attrs["index"]), int(shard.attrs["rows"])
            skipped = json.loads(shard.attrs.get("skipped", "[]"))
    except (OSError, KeyError, ValueError):
        return None  # unreadable or foreign: it will be rewritten
    if path.name != shard_name(index) or not 0 <= index < manifest.num_shards:
        return None
    return ShardEntry(index, path.name, rows, path.stat().st_size, file_digest(path)), skipped
