"""Writing a cache's shard records (`shards.jsonl`, and `shards-rankN.jsonl` of the other torchrun
ranks; read back by cache.manifest.load_manifest): one line appended per finished shard, fsynced, the same
cost at any shard count; shards.jsonl replaced (and the ranks' files merged into it) only when a run opens
the cache; and the content digest a complete cache's manifest carries.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from cache.manifest import RECORDS, ShardEntry
from pipeline.errors import CacheError
from pipeline.files import FULL, disk_full, write_bytes


def _record_line(entry: ShardEntry, skipped: list[dict]) -> bytes:
    items = [{k: v for k, v in item.items() if k != "shard"} for item in skipped]
    return (json.dumps({**asdict(entry), "skipped": items}, allow_nan=False) + "\n").encode()


def append_record(root: Path, entry: ShardEntry, skipped: list[dict], name: str = RECORDS) -> None:
    """Record a finished shard: one line appended to shards.jsonl and fsynced, the same cost at shard
    1,000 and at shard 1,000,000. A full disk is one DiskFullError (a torn line is ignored when read)."""
    path = Path(root) / name
    line = _record_line(entry, skipped)
    try:
        created = not path.exists()
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            written = os.write(handle, line)
            if written != len(line):
                raise OSError(28, "short write")
            os.fsync(handle)
        finally:
            os.close(handle)
        if created:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link planted where the records go: never appended through
            raise CacheError(f"{path} is a symbolic link, not tl's shard records; remove it and re-run the same "
                             "command") from None
        if exc.errno in FULL:
            raise disk_full(exc.errno, path) from None
        raise CacheError(f"cannot write shard record {path}: {exc.strerror or exc}; choose another --out") from None


def write_records(root: Path, shards: list[ShardEntry], skipped: dict[int, list[dict]]) -> None:
    """Replace shards.jsonl with one record per given shard (when a run opens a cache and drops shards)."""
    data = b"".join(_record_line(entry, skipped.get(entry.index, [])) for entry in shards)
    write_bytes(Path(root) / RECORDS, data, "shard records", follow=False)


def content_digest(shards: list[ShardEntry]) -> str:
    """One digest of every shard's index and checksum: equal for caches of equal codes."""
    digest = hashlib.sha256()
    for entry in sorted(shards, key=lambda shard: shard.index):
        digest.update(f"{entry.index}:{entry.sha256}\n".encode())
    return digest.hexdigest()
