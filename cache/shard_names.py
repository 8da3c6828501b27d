"""The names of a cache's shard files: `shard-00007.h5`, zero-padded to the plan's widest index; a shard's
index in the cache is in its record, the name only says the index it was first written at.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME_DIGITS = 5
_SHARD_FILE = re.compile(r"shard-(\d+)\.h5")


def shard_name(index: int, num_shards: int = 0, wider: int = 0) -> str:
    """`shard-00007.h5`: zero-padded to the plan's widest index (5 digits at least), so names sort in shard
    order at any count; `wider` more zeros give the same index another name (see free_shard_name). Readers
    never rely on the name: a shard's index is in its record."""
    return f"shard-{index:0{max(NAME_DIGITS, len(str(max(num_shards - 1, 0)))) + wider}d}.h5"


def shard_index(name: str) -> int | None:
    """The index a shard file's name gives, whatever its width; None for other names."""
    match = _SHARD_FILE.fullmatch(name)
    return int(match[1]) if match else None


def holds_shards(root: Path) -> bool:
    """Whether the folder holds a shard file: a finished shard, whatever its record says (or none does)."""
    return any(Path(root).glob("shard-*.h5"))


def free_shard_name(index: int, num_shards: int, held: dict[str, int]) -> str:
    """The file name of new shard `index`: its own name, unless a kept shard that moved to another index
    holds it (`held`: file name -> the index it answers for); then the same index padded wider, still a
    `shard-*.h5` file of that index. A name depends only on `index` and `held`, so torchrun ranks, which
    all read the kept shards from the manifest, never pick one name for two shards."""
    wider = 0
    while held.get(name := shard_name(index, num_shards, wider), index) != index:
        wider += 1
    return name
