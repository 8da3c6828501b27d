"""What a cache is (a typed Manifest): its key, taps, classes and finished shards, kept in `manifest.json`,
checked field by field when read, described for `tl info`.

The manifest is replaced atomically, so a reader sees the old one or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
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
    for entry in sorted(set(old) | set(new)):
        before, after = old.get(entry), new.get(entry)
        name = f"{prefix}{entry}"
        if isinstance(before, dict) and isinstance(after, dict):
            lines += key_differences(before, after, prefix=f"{name}.")
        elif before != after:
            short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 40 else v  # noqa: E731
            lines.append(f"{name}: {short(before)} -> {short(after)}")
    return lines


@dataclass
class TapSpec:
    """One cached layer: its width once flattened and the dtype its codes are stored in."""

    width: int
    dtype: str


@dataclass
class ShardEntry:
    """A finished shard file: shard k holds samples [k * shard_rows, (k + 1) * shard_rows), minus skipped ones."""

    index: int
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class Manifest:
    """What a cache is (`manifest.json`, read by `load_manifest`, written by `save_manifest`).

    `key` is the cache key (backbone, weights, taps, precision, preprocessing, dataset, layout, patches),
    digested and compared as a whole: two caches of one key hold the same codes. `skipped` lists the
    unreadable samples ({sample_id, reason, shard}); `warnings` what the data listing noticed.
    """

    format: str = FORMAT
    tl_version: str = __version__
    key: dict
    key_digest: str
    classes: list[str]
    taps: dict[str, TapSpec]
    target: str  # "class" (one index per row) or "multi-hot"
    shard_rows: int
    num_samples: int
    num_shards: int
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    complete: bool = False
    created: str = ""
    updated: str | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, key: dict, classes: list[str], taps: dict[str, int], dtype: str, shard_rows: int,
            num_samples: int, target_kind: str = "class") -> "Manifest":
        return cls(key=key, classes=list(classes), taps={name: TapSpec(width, dtype) for name, width in taps.items()},
                   target=target_kind, shard_rows=shard_rows, num_samples=num_samples,
                   num_shards=-(-num_samples // shard_rows), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   key_digest=key_digest(key))

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        """A manifest from its JSON form, already checked by `_manifest_problem`."""
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        values["taps"] = {name: TapSpec(**spec) for name, spec in data["taps"].items()}
        values["shards"] = [ShardEntry(**{f: shard[f] for f in _SHARD_FIELDS}) for shard in data["shards"]]
        return cls(**values)

    def to_json(self) -> dict:
        data = asdict(self)
        if data["updated"] is None:
            del data["updated"]
        return data

    @property
    def multilabel(self) -> bool:
        return self.target == "multi-hot"

    @property
    def rows(self) -> int:
        """Rows in the finished shards."""
        return sum(shard.rows for shard in self.shards)

    @property
    def widths(self) -> dict[str, int]:
        return {name: spec.width for name, spec in self.taps.items()}

    def describe(self, root) -> list[str]:
        """What `tl info` prints: one line per aspect, a label and its text."""
        key, pre, data = self.key, self.key["preprocessing"], self.key["dataset"]
        state = "complete" if self.complete else "INCOMPLETE (re-run tl extract to finish)"
        rounded = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
        lines = [f"cache      {root} ({state})",
                 f"backbone   {key['backbone']}   weights {key['weights']}   precision {key['precision']}",
                 f"input      resize {pre['resize']}, crop {pre['crop']}, mean {rounded(pre['mean'])}, "
                 f"std {rounded(pre['std'])}",
                 f"data       {data.get('format')} split {data.get('split')}, fingerprint "
                 f"{str(data.get('fingerprint'))[:12]}"
                 + (f", {data['samples_per_class']} per class" if data.get("samples_per_class") else "")]
        if key["patches"]:
            patches, kept = key["patches"], data.get("background_fraction")
            lines.append(f"patches    scales {', '.join(f'{s:g}' for s in patches['scales'])}; a box labels a patch "
                         f"covering {patches['patch_overlap']:g} of it and {patches['box_overlap']:g} of the box; "
                         + (f"{kept:g} of background kept" if kept is not None else "every patch kept"))
        lines += [f"layer      {tap:<8} width {spec.width:<6} {spec.dtype}" for tap, spec in self.taps.items()]
        shown = ", ".join(self.classes[:10]) + (f", ... ({len(self.classes)} in all)" if len(self.classes) > 10 else "")
        lines.append(f"classes    {len(self.classes)}: {shown}")
        lines.append(f"rows       {self.rows} of {self.num_samples} samples in {len(self.shards)}/{self.num_shards} "
                     f"shards, {human_bytes(sum(shard.bytes for shard in self.shards))}")
        if self.skipped:
            lines.append(f"skipped    {len(self.skipped)} unreadable images, e.g. {self.skipped[0]['sample_id']}: "
                         f"{self.skipped[0]['reason']}")
        lines.append(f"written    by tl {self.tl_version}, {self.created} .. {self.updated or ''}")
        return lines


def human_bytes(count: float) -> str:
    """A byte count as B, KiB, MiB or GiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


class ForeignManifest(CacheError):
    """A manifest.json that no tl wrote: --overwrite must never delete it."""


def load_manifest(root: Path) -> Manifest:
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
    return Manifest.from_json(manifest)


# field -> type of a well-formed manifest; a hand-edited or truncated one is refused, not half-read
_FIELDS = {"key": dict, "key_digest": str, "classes": list, "taps": dict, "target": str, "shard_rows": int,
           "num_samples": int, "num_shards": int, "shards": list, "skipped": list, "complete": bool}
_SHARD_FIELDS = {"index": int, "file": str, "rows": int, "bytes": int, "sha256": str}


def _manifest_problem(manifest: dict) -> str:
    """What is wrong with a manifest's shape, or '' when it is sound."""
    for name, kind in _FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool) and kind is int:
            return f"'{name}' is missing or not a {kind.__name__}"
    if key_digest(manifest["key"]) != manifest["key_digest"]:
        return "its key was edited: key_digest does not match"
    if not isinstance(manifest.get("warnings", []), list) or not all(
            isinstance(line, str) for line in manifest.get("warnings", [])):
        return "'warnings' must be lines of text"
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


def save_manifest(root: Path, manifest: Manifest) -> None:
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # allow_nan=False: Infinity and NaN are not JSON; settings that produce them are refused earlier
    write_bytes(Path(root) / MANIFEST, json.dumps(manifest.to_json(), indent=1, allow_nan=False).encode(),
                "manifest")
