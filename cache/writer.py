"""Writes a cache: takes the lock, checks the key, keeps the shards whose inputs are unchanged, writes
each new shard under a temporary name, renames it when complete and only then appends its record, so a
killed run loses at most the shards in flight, and recording a shard costs the same at any count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from cache.manifest import (FORMAT, LEGACY_FORMAT, MANIFEST, RANK_RECORDS, RECORDS, ForeignManifest, HeaderDamage,
                            Manifest, PlannedShard, RecordDamage, ShardEntry, decode_of, iter_records, key_differences,
                            load_manifest, record_files, save_manifest, shard_index, uniform_plan)
from cache.rebuild import rebuilt_header, shard_entry
from cache.shard_names import free_shard_name, holds_shards
from cache.records import append_record, content_digest, write_records
from pipeline.files import DiskFullError, OutputLock, file_digest, missing_folders, write_bytes
from pipeline.errors import CacheError, CacheOccupied, counted, listed

LOCK = ".lock"
LISTINGS = "listings"  # the input listings kept for the next run (webdataset tars: pipeline.formats.tar_listings)
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
    """Opens (or resumes) a cache for one key and publishes shards. Use as a context manager.

    `plan` says which samples each shard holds and digests their inputs (default: `shard_rows` samples
    per shard, no digests). On opening a cache of the same key, a finished shard is kept only when its
    record covers the same samples with the same input digest and its file still has its checksum,
    wherever the plan now puts those samples (a tar removed before it); `kept`, `changed` and `damaged`
    count what happened to the shards found.
    """

    def __init__(self, root: Path, key: dict, classes: list[str], taps: dict[str, int], dtype: str,
                 shard_rows: int, num_samples: int, compression: str = "none", overwrite: bool = False,
                 target_kind: str = "class", follower: bool = False, plan: list[PlannedShard] | None = None,
                 rank: int = 0, position_matters: bool = False):
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
        self.plan = uniform_plan(num_samples, shard_rows) if plan is None else list(plan)
        self._fresh = Manifest.new(key, classes, taps, dtype, shard_rows, num_samples, target_kind, len(self.plan))
        self.overwrite = overwrite
        # A follower (a torchrun rank other than 0) writes shard files only; rank 0 holds the lock, owns
        # the manifest and adopts the followers' shards once every rank is done.
        self.follower = follower
        # where this process records its shards: rank 0 in shards.jsonl, rank N (a follower) in its own
        # file, so no two processes append to one file and rank 0 never re-reads another rank's shards
        self.records = RANK_RECORDS.format(rank) if follower else RECORDS
        self.manifest: Manifest | None = None
        self._entries: dict[int, ShardEntry] = {}  # finished shards by index: recording one is O(1)
        self._skipped: dict[int, list[dict]] = {}
        self.kept = self.changed = self.damaged = self.gone = 0
        self._started_fresh = False  # this run began the cache (no finished shard of an earlier run kept)
        self.notes: list[str] = []  # what opening the cache did that a user should hear of
        self.position_matters = position_matters
        # the planned shards by what they hold: a finished shard is matched to its place in O(1), at any count
        self._by_content: dict[tuple, list[int]] = {}
        for index, planned in enumerate(self.plan):
            if planned.inputs:  # an empty digest proves nothing: such shards answer for their own index only
                content = self._content(planned.first, planned.samples, planned.inputs)
                self._by_content.setdefault(content, []).append(index)
        self._held: dict[str, int] = {}  # files of the shards found on opening -> their index (free_shard_name)

    # -- opening

    def __enter__(self) -> "CacheWriter":
        self.lock.made = missing_folders(self.root)  # a run that fails before its first file leaves none
        _check_writable(self.root)
        if self.follower:
            self.manifest = load_manifest(self.root)
            if self.manifest.key_digest != self._fresh.key_digest:
                raise CacheError(f"{self.root} was opened by rank 0 with other settings; start every rank alike")
            self._take(self.manifest)
        else:
            self.lock.acquire()
            try:
                self._open_manifest()
            except BaseException:
                self.lock.release()
                raise
        self._held = {entry.file: index for index, entry in self._entries.items()}
        return self

    def __exit__(self, kind, *exc) -> None:
        if not self.follower:
            if kind is not None and self._started_fresh and not self._entries:
                self._withdraw()
            self.lock.release()

    def _withdraw(self) -> None:
        """A run that stopped before its first shard, on a cache it started: its manifest names nothing
        worth resuming, and `tl info` would call it an incomplete cache. Removed (and the folder with it,
        when the run made it), unless a shard file of another rank is there."""
        if holds_shards(self.root) or any(self.root.glob(".shard-*")):
            return
        for name in (MANIFEST, RECORDS):
            with contextlib.suppress(OSError):
                (self.root / name).unlink()
        if self.lock.made:  # a folder this run made goes, its listings with it
            shutil.rmtree(self.root / LISTINGS, ignore_errors=True)

    def _take(self, manifest: Manifest) -> None:
        self._entries = {shard.index: shard for shard in manifest.shards}
        self._skipped = {}
        for item in manifest.skipped:
            self._skipped.setdefault(item["shard"], []).append({k: v for k, v in item.items() if k != "shard"})

    def _open_manifest(self) -> None:
        existing, rebuilt = None, False
        if (self.root / MANIFEST).exists():
            try:
                existing = load_manifest(self.root)
            except ForeignManifest as exc:
                raise ForeignManifest(f"{exc}: choose another --out") from None
            except RecordDamage:  # the header is sound: the shards are adopted again from their own files
                existing = load_manifest(self.root, records=False)
            except HeaderDamage:  # this run knows the key: its shards are adopted from their files (cache.rebuild)
                existing = rebuilt_header(self.root, self._fresh, self.overwrite)
                rebuilt = existing is not None
            except CacheError:
                if not self.overwrite:
                    raise
        elif holds_shards(self.root) and not self.overwrite:
            raise CacheOccupied(self.root, "holds shard files but no manifest", "pass --overwrite to replace them")
        if existing is not None and existing.format == LEGACY_FORMAT and existing.shards and not self.overwrite:
            raise CacheOccupied(self.root, f"was written by an earlier tl ({LEGACY_FORMAT}) whose shards carry no "
                                "input digests",
                                "it can still be read as it is, or pass --overwrite to extract it again")
        # A cache without a finished shard holds nothing to lose: a corrected command may take it over. A shard file
        # is a finished shard, though its record be damaged or cut short (the header alone read: no shard in it)
        if existing is not None and existing.key_digest != self._fresh.key_digest and not self.overwrite \
                and (existing.shards or holds_shards(self.root)):
            lines = key_differences(existing.key, self._fresh.key)
            shown = [f"classes: {_few(existing.classes)} -> {_few(self._fresh.classes)}"  # the key holds a digest
                     if line.startswith("dataset.classes:") else line for line in lines]
            hint = ""
            if lines and all(line.startswith("preprocessing.decode:") for line in lines):
                hint = f", or pass --decode {decode_of(existing.key['preprocessing'])} to add to it"
            raise CacheOccupied(self.root, other_settings(shown),
                                f"choose another --out, or pass --overwrite to replace it{hint}")
        if existing is None or existing.key_digest != self._fresh.key_digest or existing.format != FORMAT:
            self._clear()
            self._started_fresh = True
            self.manifest = self._fresh
            save_manifest(self.root, self.manifest)
            return
        self.manifest = self._fresh
        self.manifest.created = existing.created
        self._take(existing)
        self._remove_temporaries()
        distrusted = self._reconcile(existing)
        adopted = self.adopt_shards(distrusted=distrusted)
        if rebuilt:
            self.notes.append(f"{self.root / MANIFEST} was damaged: rebuilt from its "
                              f"{len(adopted)} shard file{'s' * (len(adopted) != 1)}")
        named = {entry.file for entry in self._entries.values()}
        for path in self.root.glob("shard-*.h5"):  # no record names it and it answers for no planned shard
            if path.name not in named:
                path.unlink()

    def _reconcile(self, existing: Manifest) -> set[str]:
        """Keep the recorded shards that still answer for a planned shard, at its index; drop the others
        (their files are deleted and returned). Shards whose inputs changed, and shards whose file is gone
        or changed, are redone. A shard whose samples moved in the listing (a tar before it gained an image
        or was removed) keeps its file at its new index, unless its rows depend on the position
        (`position_matters`: seeded per image index, as multiscale training)."""
        kept: dict[int, ShardEntry] = {}
        skipped: dict[int, list[dict]] = {}
        unanswered, dropped = set(), set()
        for shard in sorted(self._entries.values(), key=lambda entry: entry.index):
            index = self._answering(shard.index, shard.first, shard.samples, shard.inputs, kept)
            path = self.root / shard.file
            if index is None:
                unanswered.add(shard.index)
                dropped.add(shard.file)
            elif path.is_file() and path.stat().st_size == shard.bytes and file_digest(path) == shard.sha256:
                self.kept += 1
                kept[index] = dataclasses.replace(shard, index=index, first=self.plan[index].first)
                skipped[index] = self._skipped.get(shard.index, [])
            else:  # deleted now: after a kill past the records below it would be adopted, damage and all
                self.damaged += 1
                dropped.add(shard.file)
                path.unlink(missing_ok=True)
        # redone: a recorded shard whose samples no planned shard holds any more, written again in as far as
        # the plan has shards to write for other reasons than damage (by count, not index: shards may swap);
        # the others (gone) went with their data
        to_write = max(0, len(self.plan) - len(kept) - self.damaged)
        self.changed = min(len(unanswered), to_write)
        self.gone = len(unanswered) - self.changed
        # in an order a kill cannot turn into a lie: first a header marked incomplete that admits the old
        # records and the new (the larger of both listings), then the records of the kept shards, then
        # the files of the dropped ones, then the new header
        save_manifest(self.root, dataclasses.replace(
            self.manifest, complete=False, content="", num_samples=max(existing.num_samples, self.manifest.num_samples),
            num_shards=max(existing.num_shards, self.manifest.num_shards)))
        self._entries, self._skipped = kept, skipped
        self._sync()
        write_records(self.root, self.manifest.shards, self._skipped)
        for path in record_files(self.root)[1:]:  # the other ranks' records are in shards.jsonl now
            path.unlink()
        dropped -= {entry.file for entry in kept.values()}
        for name in dropped:
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
        save_manifest(self.root, self.manifest)
        return dropped

    def _content(self, first: int, samples: int, inputs: str) -> tuple:
        return (samples, inputs, first if self.position_matters else None)

    def _answers(self, first: int, samples: int, inputs: str, planned: PlannedShard) -> bool:
        """Whether a shard written for samples [first, first + samples) with input digest `inputs` holds
        the rows `planned` asks for: the same samples and inputs, at any position unless rows depend on it."""
        return self._content(first, samples, inputs) == self._content(planned.first, planned.samples, planned.inputs)

    def _answering(self, index: int, first: int, samples: int, inputs: str, taken) -> int | None:
        """The planned shard, not in `taken`, that a shard written as shard `index` (`first`, `samples`,
        `inputs`: see _answers) answers for: its own index when it still does, else any index that does
        (a tar before it shrank or went); None when none. One rule for records and for shard files: a
        kept shard that moved still names its old index and first sample in its file. A shard without an
        input digest answers for its own index only."""
        if index < len(self.plan) and index not in taken and self._answers(first, samples, inputs, self.plan[index]):
            return index
        if not inputs:
            return None
        candidates = self._by_content.get(self._content(first, samples, inputs), ())
        return next((k for k in candidates if k not in taken), None)

    def _sync(self) -> None:
        """The manifest's shard list and skipped samples from the finished shards (O(shards): on open and
        at the end, never per shard)."""
        self.manifest.shards = [self._entries[index] for index in sorted(self._entries)]
        self.manifest.skipped = [dict(item, shard=index) for index in sorted(self._skipped)
                                 for item in self._skipped[index]]

    def adopt_shards(self, distrusted: set[str] = frozenset()) -> list[int]:
        """Record complete shard files the manifest does not list yet: written by other ranks, or by a
        run killed between renaming a shard and recording it, for the planned shard they answer for
        (_answering). A shard names its cache key and the input digest it was written for; `distrusted`
        files (recorded once, then found changed) are rewritten."""
        named = {entry.file for entry in self._entries.values()}
        for path in record_files(self.root)[1:]:  # what the other ranks recorded (cheap: no shard is read)
            for entry, skipped in iter_records(self.root, self.manifest, only=path):
                # a rank that listed other data wrote for another plan: its shards answer for nothing here
                index = self._answering(entry.index, entry.first, entry.samples, entry.inputs, self._entries)
                if index is not None and entry.file not in named and entry.file not in distrusted:
                    self._entries[index] = dataclasses.replace(entry, index=index, first=self.plan[index].first)
                    self._skipped[index] = skipped
                    named.add(entry.file)
        adopted = []
        for path in sorted(self.root.glob("shard-*.h5")):
            if path.name in named or path.name in distrusted or shard_index(path.name) is None:
                continue
            found = shard_entry(path, self.manifest, self.plan, self._entries, self._answering)
            if found is not None:
                entry, skipped = found
                self._record(entry, skipped)
                adopted.append(entry.index)
        self._sync()
        return adopted

    def _clear(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(("shard-", ".shard-", "shards")) or path.name == MANIFEST:
                path.unlink() if not path.is_dir() else shutil.rmtree(path)

    def _remove_temporaries(self) -> None:
        """Half-written files of a killed run (we hold the lock: no live writer owns them)."""
        for path in self.root.glob(".*.tmp-*"):
            path.unlink()

    def _record(self, entry: ShardEntry, skipped: list[dict]) -> None:
        append_record(self.root, entry, skipped, self.records)
        old = self._entries.get(entry.index)
        if old is not None and old.file != entry.file:  # the same shard under a name of another width
            with contextlib.suppress(OSError):
                (self.root / old.file).unlink()
        self._entries[entry.index] = entry
        self._skipped[entry.index] = [{k: v for k, v in item.items() if k != "shard"} for item in skipped]

    # -- writing

    @property
    def finished(self):
        """Indices of the finished shards (a live view: `in` and `len` cost O(1))."""
        return self._entries.keys()

    def write_shard(self, index: int, codes: dict[str, np.ndarray], targets: np.ndarray,
                    sample_ids: list[str], skipped: list[dict],
                    extra: dict[str, np.ndarray] | None = None) -> ShardEntry:
        """Write one complete shard atomically and record it (with its skipped samples): one line
        appended to the shard records, whatever the shard count.

        The shard is built in memory and written with plain file I/O, so a full disk is one clean
        OSError (HDF5 writing to a full disk crashed the process) and no half shard is left."""
        rows = len(sample_ids)
        planned = self.plan[index]
        name = free_shard_name(index, len(self.plan), self._held)
        options = {} if self.compression == "none" else {"compression": self.compression}
        image = io.BytesIO()
        with h5py.File(image, "w") as shard:
            for tap, array in codes.items():
                self._dataset(shard, tap, np.asarray(array, dtype=self.dtype), options)
            self._dataset(shard, "target", _whole(np.asarray(targets)), options)
            shard.create_dataset("sample_id", data=_text(sample_ids), dtype=h5py.string_dtype("utf-8"))
            for column, array in (extra or {}).items():
                self._dataset(shard, column, np.asarray(array), options)
            shard.attrs["index"] = index
            shard.attrs["rows"] = rows
            shard.attrs["key_digest"] = self._fresh.key_digest
            shard.attrs["skipped"] = json.dumps(skipped)
            shard.attrs["first"], shard.attrs["samples"] = planned.first, planned.samples
            shard.attrs["inputs"] = planned.inputs
        data = image.getbuffer()
        entry = ShardEntry(index, name, rows, data.nbytes, hashlib.sha256(data).hexdigest(), planned.first,
                           planned.samples, planned.inputs)
        try:
            # no sweep of the folder for stale temporaries per shard: opening the cache removed them
            write_bytes(self.root / name, data, "shard", sweep=False, follow=False)
            self._record(entry, skipped)
        except DiskFullError as exc:
            kept = len(self._entries) - (index in self._entries)
            raise exc.resumed(" and re-run the same command to resume", f" ({counted(kept, 'shard')} kept)") from None
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
        """Mark the cache complete when every planned shard is recorded; the manifest names its content."""
        self._sync()
        done = len(self._entries) == self.manifest.num_shards
        if done and len(record_files(self.root)) > 1:  # a complete cache is manifest.json, shards.jsonl and its
            write_records(self.root, self.manifest.shards, self._skipped)  # shards: the ranks' records join in
            for path in record_files(self.root)[1:]:
                path.unlink()
        self.manifest.complete = done
        self.manifest.content = content_digest(self.manifest.shards) if done else ""
        save_manifest(self.root, self.manifest)
        return self.manifest


def other_settings(differences: list[str]) -> str:
    """How a cache whose key differs is said, from its key_differences lines: the writer's refusal, and tl run's
    before any step (pipeline.extract_settings.settings_stop)."""
    return f"holds a cache made with other settings ({'; '.join(differences) or 'format'})"


def _few(names: list[str], most: int = 6) -> str:
    """Class names for a message: the first few, and how many more."""
    return listed(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _text(values) -> np.ndarray:
    """Text as UTF-8 bytes for HDF5; names that are not UTF-8 on disk (surrogate-escaped by Python)
    keep their bytes, and `text_column` reads them back as the same str."""
    return np.array([str(v).encode("utf-8", "surrogateescape") for v in values], dtype=object)


def _whole(targets: np.ndarray) -> np.ndarray:
    """Targets as integers, the type readers check: whole numbers given as floats become int64."""
    if targets.dtype.kind in "iub":
        return targets
    if targets.size and not np.array_equal(targets, np.round(targets)):
        raise CacheError("targets must be whole numbers (class indices, or 0/1 per class)")
    return targets.astype(np.int64)
