"""What a cache is: its key, taps, classes and finished shards, kept in `manifest.json`.

The manifest is replaced atomically, so a reader sees the old one or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from pipeline import __version__
from pipeline.errors import CacheError

MANIFEST = "manifest.json"
FORMAT = "tl-cache/1"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def key_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human lines naming each key field that differs, e.g. `backbone: alexnet -> vgg16`."""
    lines = []
    for field in sorted(set(old) | set(new)):
        before, after = old.get(field), new.get(field)
        name = f"{prefix}{field}"
        if isinstance(before, dict) and isinstance(after, dict):
            lines += key_differences(before, after, prefix=f"{name}.")
        elif before != after:
            short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 40 else v  # noqa: E731
            lines.append(f"{name}: {short(before)} -> {short(after)}")
    return lines


def new_manifest(key: dict, classes: list[str], taps: dict[str, int], dtype: str, shard_rows: int,
                 num_samples: int, target_kind: str = "class") -> dict:
    return {
        "format": FORMAT,
        "tl_version": __version__,
        "key": key,
        "key_digest": key_digest(key),
        "classes": list(classes),
        "taps": {name: {"width": width, "dtype": dtype} for name, width in taps.items()},
        "target": target_kind,
        "shard_rows": shard_rows,
        "num_samples": num_samples,
        "num_shards": -(-num_samples // shard_rows),
        "shards": [],
        "skipped": [],
        "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not a tl cache (no {MANIFEST}); create one with tl extract")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({exc}); re-run tl extract with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} manifest; re-run tl extract with --overwrite")
    return manifest


def save_manifest(root: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(root) / MANIFEST
    temporary = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def finished_rows(manifest: dict) -> int:
    return sum(shard["rows"] for shard in manifest["shards"])
