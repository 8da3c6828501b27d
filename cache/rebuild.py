"""What a cache's shard files say of themselves: each names the cache key and the samples it was written
for, so shard records, and a damaged manifest.json, are rebuilt from them without losing a finished shard.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py

from cache.manifest import Manifest, PlannedShard, ShardEntry
from cache.shard_names import shard_index
from pipeline.errors import CacheOccupied
from pipeline.files import file_digest


def rebuilt_header(root: Path, fresh: Manifest, overwrite: bool) -> Manifest | None:
    """The header of this run (`fresh`: its key, no shards yet) for a cache whose manifest.json is damaged,
    when no shard file there was written for another key; else None under --overwrite (the cache is
    replaced), or CacheOccupied (tl cannot tell what that cache was). As a sound header of this key, under
    --overwrite or not, the cache is resumed. Unreadable shard files hold nothing to keep: rewritten."""
    others = sorted(path.name for path in Path(root).glob("shard-*.h5") if _key_of(path) not in (None, fresh.key_digest))
    if others and overwrite:
        return None
    if others:
        named = f"{len(others)} shard files ({others[0]}, ...)" if len(others) > 1 else f"shard file {others[0]}"
        raise CacheOccupied(Path(root), f"has a damaged manifest.json and {named} made with other settings, which "
                            "tl cannot name without it", "choose another --out, or pass --overwrite to replace them")
    return dataclasses.replace(fresh, shards=[], skipped=[])


def _key_of(path: Path) -> str | None:
    """The key digest a shard file was written for ('' when it names none); None when it cannot be read."""
    try:
        with h5py.File(path, "r") as shard:
            return str(shard.attrs.get("key_digest", ""))
    except (OSError, ValueError):
        return None


def shard_entry(path: Path, manifest: Manifest, plan: list[PlannedShard], taken, answering
                ) -> tuple[ShardEntry, list[dict]] | None:
    """(record, skipped samples) of a complete shard file of this cache, at the planned index not in `taken`
    it answers for (`answering`: CacheWriter._answering); else None."""
    try:
        with h5py.File(path, "r") as shard:
            if shard.attrs.get("key_digest") != manifest.key_digest:
                return None
            index, rows = int(shard.attrs["index"]), int(shard.attrs["rows"])
            skipped = json.loads(shard.attrs.get("skipped", "[]"))
            first, samples, inputs = int(shard.attrs["first"]), int(shard.attrs["samples"]), str(shard.attrs["inputs"])
    except (OSError, KeyError, ValueError):
        return None  # unreadable or foreign: it will be rewritten
    place = answering(index, first, samples, inputs, taken) if shard_index(path.name) == index else None
    if place is None:
        return None
    return ShardEntry(place, path.name, rows, path.stat().st_size, file_digest(path), plan[place].first, samples,
                      inputs), skipped
