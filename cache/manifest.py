"""What a cache is: its key, taps, classes and finished shards, kept in `manifest.json`.

The manifest is replaced atomically, so a reader sees the old one or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pipeline import __version__
from pipeline.errors import CacheError
from pipeline.files import write_bytes

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


class ForeignManifest(CacheError):
    """A manifest.json that no tl wrote: --overwrite must never delete it."""


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not a tl cache (no {MANIFEST}); create one with tl extract")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc.strerror}") from None
    if FORMAT.encode() not in raw:
        raise ForeignManifest(f"{path} is not a tl cache's manifest (someone else's file?); tl neither reads "
                              "nor replaces it")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({exc}); re-run tl extract with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} manifest; re-run tl extract with --overwrite")
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"{path} is damaged ({problem}); re-run tl extract with --overwrite")
    return manifest


# field -> type of a well-formed manifest; a hand-edited or truncated one is refused, not half-read
_FIELDS = {"key": dict, "key_digest": str, "classes": list, "taps": dict, "target": str, "shard_rows": int,
           "num_samples": int, "num_shards": int, "shards": list, "skipped": list, "complete": bool}
_SHARD_FIELDS = {"index": int, "file": str, "rows": int, "bytes": int, "sha256": str}


def _manifest_problem(manifest: dict) -> str:
    """What is wrong with a manifest's shape, or '' when it is sound."""
    for field, kind in _FIELDS.items():
        if not isinstance(manifest.get(field), kind) or isinstance(manifest.get(field), bool) and kind is int:
            return f"'{field}' is missing or not a {kind.__name__}"
    if key_digest(manifest["key"]) != manifest["key_digest"]:
        return "its key was edited: key_digest does not match"
    if not all(isinstance(name, str) for name in manifest["classes"]):
        return "'classes' must be names"
    for name, spec in manifest["taps"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("width"), int) or spec.get("dtype") not in (
                "float16", "float32"):
            return f"layer '{name}' needs a width and a dtype"
    if len(set(manifest["classes"])) != len(manifest["classes"]):
        return "a class name appears twice in 'classes'"
    if manifest["shard_rows"] < 1 or manifest["num_shards"] != -(-manifest["num_samples"] // manifest["shard_rows"]):
        return "num_shards does not follow from num_samples and shard_rows"
    indices = []
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or any(not isinstance(shard.get(f), kind) for f, kind in _SHARD_FIELDS.items()):
            return f"a shard entry lacks one of {', '.join(_SHARD_FIELDS)}"
        if shard["file"] != shard_name(shard["index"]) or shard["rows"] < 0 \
                or not 0 <= shard["index"] < manifest["num_shards"]:
            return f"shard entry {shard['file']} is inconsistent"
        indices.append(shard["index"])
    if len(set(indices)) != len(indices):
        return "a shard is listed twice"
    if manifest["complete"] and len(indices) != manifest["num_shards"]:
        return f"it says complete with {len(indices)} of {manifest['num_shards']} shards"
    if manifest["key"].get("patches") is None:  # one row per sample: shard k holds its samples or skips them
        skipped = {}
        for item in manifest["skipped"]:
            if isinstance(item, dict):
                skipped[item.get("shard")] = skipped.get(item.get("shard"), 0) + 1
        for shard in manifest["shards"]:
            start = shard["index"] * manifest["shard_rows"]
            expected = min(manifest["shard_rows"], manifest["num_samples"] - start)
            if shard["rows"] + skipped.get(shard["index"], 0) != expected:
                return (f"{shard['file']} should account for {expected} samples but has {shard['rows']} rows and "
                        f"{skipped.get(shard['index'], 0)} skipped")
    return ""


def save_manifest(root: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # allow_nan=False: Infinity and NaN are not JSON; settings that produce them are refused earlier
    write_bytes(Path(root) / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False).encode(), "manifest")


def finished_rows(manifest: dict) -> int:
    return sum(shard["rows"] for shard in manifest["shards"])
