"""What a cache is (a typed Manifest): its key, taps, classes and finished shards, checked field by field
when read, described for `tl info`.

Two files: `manifest.json` holds what the whole cache is (key, classes, taps, the shard plan's size, whether
it is complete) and is replaced atomically at the start and the end of a run; `shards.jsonl` holds one
record per finished shard (its file, rows, checksum, the samples it covers and a digest of their inputs)
and only grows while a run goes: recording a shard appends one line, whatever the shard count. Readers
stream the records line by line; a later record of a shard supersedes an earlier one, and a last line torn
by a kill is ignored (the shard file it described is adopted again from its own attributes).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from cache.shard_names import shard_index, shard_name
from pipeline import __version__
from pipeline.errors import CacheError, listed
from pipeline.files import write_bytes

MANIFEST = "manifest.json"
RECORDS = "shards.jsonl"
RANK_RECORDS = "shards-rank{}.jsonl"  # a torchrun rank other than 0 records its shards here; merged on opening
FORMAT = "tl-cache/2"  # /2: shard records in shards.jsonl, each with the samples it covers and their digest
LEGACY_FORMAT = "tl-cache/1"  # shards inside manifest.json; still read (fit-head, evaluate, info), never written
_LAYER_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]*")  # no path: a sweep names its head files after it


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def class_digest(names: list[str]) -> str:
    """The cache key's digest of the data's class list, which the manifest holds by name."""
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]


# key fields left out when they hold their default, so that older keys stay equal: named by it in messages
_ABSENT_MEANS = {"preprocessing.decode": "exact"}


def key_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human lines naming each key field that differs, e.g. `backbone: alexnet -> vgg16`."""
    lines = []
    for entry in sorted(set(old) | set(new)):
        name = f"{prefix}{entry}"
        before, after = old.get(entry, _ABSENT_MEANS.get(name)), new.get(entry, _ABSENT_MEANS.get(name))
        if isinstance(before, dict) and isinstance(after, dict):
            lines += key_differences(before, after, prefix=f"{name}.")
        elif before != after:
            lines.append(f"{name}: {_shown(before)} -> {_shown(after)}")
    return lines


def _shown(value) -> str:
    """A key value as words: long digests cut, lists joined (`fc6, fc7`), nothing as `none`."""
    if isinstance(value, str):
        return value[:12] + "…" if len(value) > 40 else value
    if isinstance(value, (list, tuple)):
        return listed(value)
    return "none" if value is None else str(value)


def decode_of(preprocessing: dict) -> str:
    """The decoding mode recorded in a cache key's preprocessing (absent: exact, from before --decode)."""
    return preprocessing.get("decode", _ABSENT_MEANS["preprocessing.decode"])


@dataclass
class TapSpec:
    width: int  # one cached layer: its width once flattened, and the dtype its codes are stored in
    dtype: str


@dataclass
class ShardEntry:
    """A finished shard file: samples [first, first + samples) of the listing (minus skipped ones give
    `rows` rows; a patch cache has many rows per sample), and `inputs`, the digest of those samples' ids,
    targets and file stamps when it was written (empty for a cache of an earlier tl)."""

    index: int
    file: str
    rows: int
    bytes: int
    sha256: str
    first: int = 0
    samples: int = 0
    inputs: str = ""


@dataclass(frozen=True)
class PlannedShard:
    """What shard k of a run will hold: samples [first, first + samples), the digest of their inputs,
    and the input unit it belongs to (a tar file; for folders the shard itself): torchrun ranks take
    whole units, so one tar is read by one rank."""

    first: int
    samples: int
    inputs: str = ""
    unit: int = 0


def uniform_plan(num_samples: int, shard_rows: int) -> list[PlannedShard]:
    """Shard k holds samples [k * shard_rows, (k + 1) * shard_rows) (no input digests)."""
    return [PlannedShard(first, min(shard_rows, num_samples - first), "", k)
            for k, first in enumerate(range(0, num_samples, shard_rows))]


@dataclass(kw_only=True)
class Manifest:
    """What a cache is (`manifest.json` plus the records of `shards.jsonl`, read by `load_manifest`).

    `key` is the cache key (backbone, weights, taps, precision, preprocessing, dataset, layout, patches),
    digested and compared as a whole: a cache answers only for the same key. Which samples each shard
    holds, and a digest of their inputs, is in its record, so changed inputs redo only their shards.
    `skipped` lists the unreadable samples ({sample_id, reason, shard}); `warnings` what the data listing
    noticed; `content` digests every shard's checksum once the cache is complete (it changes whenever a
    shard was redone, so records of results made from the codes can tell).
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
    content: str = ""

    @classmethod
    def new(cls, key: dict, classes: list[str], taps: dict[str, int], dtype: str, shard_rows: int,
            num_samples: int, target_kind: str = "class", num_shards: int | None = None) -> "Manifest":
        return cls(key=key, classes=list(classes), taps={name: TapSpec(width, dtype) for name, width in taps.items()},
                   target=target_kind, shard_rows=shard_rows, num_samples=num_samples,
                   num_shards=-(-num_samples // shard_rows) if num_shards is None else num_shards,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), key_digest=key_digest(key))

    def header(self) -> dict:
        """manifest.json: everything but the shard records."""
        left_out = ("shards", "skipped") + (("updated",) if self.updated is None else ())
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in left_out}
        data["taps"] = {name: asdict(spec) for name, spec in self.taps.items()}
        data["format"], data["records"] = FORMAT, RECORDS
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
        state = "complete" if self.complete else "INCOMPLETE: re-run tl extract to finish"
        rounded = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
        lines = [f"cache      {root} ({state})",
                 f"backbone   {key['backbone']}   weights {key['weights']}   precision {key['precision']}",
                 f"input      resize {pre['resize']}, crop {pre['crop']}, decode {decode_of(pre)} (part of "
                 f"the key), mean {rounded(pre['mean'])}, std {rounded(pre['std'])}",
                 f"data       {data.get('format')} split {data.get('split')}"
                 + (f", labels from .{data['label_key']}" if data.get("label_key") else "")
                 + (f", {data['samples_per_class']} per class" if data.get("samples_per_class") else "")]
        if key["patches"]:
            patches, kept, seed = key["patches"], data.get("background_fraction"), data.get("background_seed")
            lines.append(f"patches    scales {', '.join(f'{s:g}' for s in patches['scales'])}; a box labels a patch "
                         f"covering {patches['patch_overlap']:g} of it and {patches['box_overlap']:g} of the box; "
                         + (f"{kept:g} of background kept (seed {seed})" if kept is not None else "every patch kept"))
        lines += [f"layer      {tap:<8} width {spec.width:<6} {spec.dtype}" for tap, spec in self.taps.items()]
        lines.append(f"classes    {len(self.classes)}: {', '.join(self.classes[:10])}"
                     + (f", ... ({len(self.classes)} in all)" if len(self.classes) > 10 else ""))
        lines.append(f"rows       {self.rows} of {self.num_samples} samples in {len(self.shards)}/{self.num_shards} "
                     f"shards, {human_bytes(sum(shard.bytes for shard in self.shards))}")
        if self.skipped:
            lines.append(f"skipped    {len(self.skipped)} image{'s' * (len(self.skipped) != 1)} that could not be read "
                         "or labelled:")
        return lines + [f"written    by tl {self.tl_version}, {self.created} .. {self.updated or ''}"]


def human_bytes(count: float) -> str:
    """A byte count as B, KiB, MiB or GiB with one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


class ForeignManifest(CacheError):
    """A manifest.json that no tl wrote: --overwrite must never delete it."""


REBUILD = "re-run the same tl extract command: it rebuilds the records from the shard files (--overwrite starts over)"


REBUILD_HEADER = ("re-run the tl extract command that made the cache: it rebuilds manifest.json from the shard files "
                  "(--overwrite starts over)")
_OPENING = b'{\n "format": "' + FORMAT.encode()  # how save_manifest starts the file: a file cut inside it is tl's


class HeaderDamage(CacheError):
    """A manifest.json of tl's that cannot be read: tl extract rebuilds it from the shard files' attributes."""


class RecordDamage(CacheError):
    """Shard records that cannot be trusted under a sound manifest.json: tl extract rebuilds them from
    the shard files' own attributes, so no finished shard is lost."""


def load_manifest(root: Path, records: bool = True) -> Manifest:
    """The manifest of the cache at `root` with its shard records (streamed from shards.jsonl), sorted
    by index (`records=False`: the header alone); CacheError when it is missing or damaged, RecordDamage
    when only the records are."""
    path = Path(root) / MANIFEST
    if not path.is_file():  # a head, a model or a shard file given where a cache folder goes is said so
        raise CacheError(f"{root} is a file, not a tl cache (the folder tl extract writes); pass the cache folder"
                         if Path(root).is_file() else f"{root} is not a tl cache (no {MANIFEST}); create one with tl extract")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc.strerror}") from None
    if FORMAT.encode() not in raw and LEGACY_FORMAT.encode() not in raw and not _OPENING.startswith(raw):
        raise ForeignManifest(f"{path} is not a tl cache's manifest (someone else's file?); tl neither reads "
                              "nor replaces it")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HeaderDamage(f"{path} is not valid JSON ({exc}); {REBUILD_HEADER}") from None
    if not isinstance(header, dict) or header.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise HeaderDamage(f"{path} is not a {FORMAT} manifest; {REBUILD_HEADER}")
    legacy = header["format"] == LEGACY_FORMAT
    problem = _header_problem(header, legacy)
    if problem:
        raise HeaderDamage(f"{path} is damaged ({problem}); {REBUILD_HEADER}")
    known = {f.name for f in fields(Manifest)} - {"shards", "skipped"}
    manifest = Manifest(**{name: value for name, value in header.items() if name in known})
    manifest.taps = {name: TapSpec(**spec) for name, spec in header["taps"].items()}
    found = _legacy_records(header) if legacy else iter_records(Path(root), manifest) if records else []
    entries = {entry.index: (entry, skipped) for entry, skipped in found}  # a later record of a shard wins
    if len({entry.file for entry, _ in entries.values()}) != len(entries):  # one file read as two shards
        raise RecordDamage(f"{path.parent / RECORDS} names one shard file for two shards; {REBUILD}")
    manifest.shards = [entries[index][0] for index in sorted(entries)]
    manifest.skipped = [dict(item, shard=index) for index in sorted(entries) for item in entries[index][1]]
    if manifest.complete and records and len(entries) != manifest.num_shards:
        raise RecordDamage(f"{path} says complete but its records name {len(entries)} of {manifest.num_shards} "
                           f"shards; {REBUILD}")
    return manifest


def record_files(root: Path) -> list[Path]:
    """shards.jsonl, then the other ranks' record files (by rank)."""
    ranks = [(int(match[1]), path) for path in Path(root).glob(RANK_RECORDS.format("*"))
             if (match := re.fullmatch(RANK_RECORDS.format(r"(\d+)").replace(".", r"\."), path.name))]
    return [Path(root) / RECORDS] + [path for _, path in sorted(ranks)]


def iter_records(root: Path, manifest: Manifest, only: Path | None = None) -> Iterator[tuple[ShardEntry, list[dict]]]:
    """(entry, skipped samples) of each line of the record files (`only`: of that one), in the order
    written; each checked against the manifest. A last line cut short by a kill is left out; any other
    bad line is damage."""
    for path in [only] if only is not None else record_files(root):
        yield from _records_of(path, manifest)


def _records_of(path: Path, manifest: Manifest) -> Iterator[tuple[ShardEntry, list[dict]]]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        pending = None  # a line is judged once the next one shows it was not the last
        for number, line in enumerate(handle, start=1):
            if pending is not None:
                yield _record(*pending, manifest, path, last=False)
            pending = (number, line)
        found = _record(*pending, manifest, path, last=True) if pending is not None else None
        if found is not None:
            yield found


def _record(number: int, line: bytes, manifest: Manifest, path: Path, last: bool):
    try:
        record = json.loads(line.decode("utf-8"))
        if not line.endswith(b"\n"):
            raise ValueError("no line end")
    except (ValueError, UnicodeDecodeError):
        if last:
            return None  # torn by a kill while it was appended: the shard file is adopted again
        raise RecordDamage(f"{path} line {number} is not a shard record; {REBUILD}") from None
    if problem := _record_problem(record, manifest):
        raise RecordDamage(f"{path} line {number} is damaged ({problem}); {REBUILD}")
    return ShardEntry(**{name: record[name] for name in _SHARD_FIELDS}, inputs=record["inputs"]), record["skipped"]


def _legacy_records(header: dict) -> Iterator[tuple[ShardEntry, list[dict]]]:
    """The shards of a tl-cache/1 manifest (listed inside it), as records."""
    skipped: dict[int, list] = {}
    for item in header["skipped"]:
        skipped.setdefault(item.get("shard"), []).append({k: v for k, v in item.items() if k != "shard"})
    for shard in header["shards"]:
        first = shard["index"] * header["shard_rows"]
        yield (ShardEntry(**{name: shard[name] for name in ("index", "file", "rows", "bytes", "sha256")}, first=first,
                          samples=min(header["shard_rows"], header["num_samples"] - first)),
               skipped.get(shard["index"], []))


# field -> type of a well-formed manifest; a hand-edited or truncated one is refused, not half-read
_FIELDS = {"key": dict, "key_digest": str, "classes": list, "taps": dict, "target": str, "shard_rows": int,
           "num_samples": int, "num_shards": int, "complete": bool}
_LEGACY_FIELDS = {"shards": list, "skipped": list}
_SHARD_FIELDS = {"index": int, "file": str, "rows": int, "bytes": int, "sha256": str, "first": int, "samples": int}


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _header_problem(manifest: dict, legacy: bool) -> str:
    """What is wrong with a manifest's shape, or '' when it is sound."""
    for name, kind in {**_FIELDS, **(_LEGACY_FIELDS if legacy else {})}.items():
        if not _is(manifest.get(name), kind):
            return f"'{name}' is missing or not a {kind.__name__}"
    if key_digest(manifest["key"]) != manifest["key_digest"]:
        return "its key was edited: key_digest does not match"
    if not isinstance(manifest.get("warnings", []), list) or not all(
            isinstance(line, str) for line in manifest.get("warnings", [])):
        return "'warnings' must be lines of text"
    if not all(isinstance(name, str) for name in manifest["classes"]):
        return "'classes' must be names"
    for name, spec in manifest["taps"].items():
        if not _LAYER_NAME.fullmatch(name) or not isinstance(spec, dict) or not isinstance(spec.get("width"), int) \
                or spec.get("dtype") not in ("float16", "float32"):
            return f"layer {json.dumps(name)} needs a plain name (letters, digits, '_', '.', '-'), a width and a dtype"
    if len(set(manifest["classes"])) != len(manifest["classes"]):
        return "a class name appears twice in 'classes'"
    recorded, patches = (manifest["key"].get("dataset") or {}).get("classes"), manifest["key"].get("patches")
    if isinstance(recorded, str) and class_digest(manifest["classes"][1 if patches else 0:]) != recorded:
        return "its class list was edited: 'classes' do not match the key's digest of them"  # [0]: background
    if manifest["shard_rows"] < 1 or manifest["num_shards"] < 0 or manifest["num_samples"] < 0:
        return "shard_rows, num_samples and num_shards must be positive"
    if legacy:
        return _legacy_problem(manifest)
    return ""


def _legacy_problem(manifest: dict) -> str:
    if manifest["num_shards"] != -(-manifest["num_samples"] // manifest["shard_rows"]):
        return "num_shards does not follow from num_samples and shard_rows"
    indices = []
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or any(not _is(shard.get(f), kind) for f, kind in _SHARD_FIELDS.items()
                                              if f not in ("first", "samples")):
            return "a shard entry lacks one of index, file, rows, bytes, sha256"
        if shard["file"] != shard_name(shard["index"]) or shard["rows"] < 0 \
                or not 0 <= shard["index"] < manifest["num_shards"]:
            return f"shard entry {shard['file']} is inconsistent"
        indices.append(shard["index"])
    if len(set(indices)) != len(indices):
        return "a shard is listed twice"
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


def _record_problem(record, manifest: Manifest) -> str:
    if not isinstance(record, dict) or any(not _is(record.get(f), kind) for f, kind in _SHARD_FIELDS.items()) \
            or not isinstance(record.get("inputs"), str) or not isinstance(record.get("skipped"), list):
        return f"a record needs {', '.join(_SHARD_FIELDS)}, inputs and skipped"
    # a kept shard that moved in the listing keeps its file, named after the index it was written at
    if shard_index(record["file"]) is None or not 0 <= record["index"] < manifest.num_shards:
        return f"shard record {record['file']} is inconsistent"
    if record["rows"] < 0 or record["first"] < 0 or record["samples"] < 1 \
            or record["first"] + record["samples"] > manifest.num_samples:
        return f"shard record {record['file']} covers samples the cache does not have"
    if not all(isinstance(item, dict) and isinstance(item.get("sample_id"), str) for item in record["skipped"]):
        return f"the skipped samples of {record['file']} need a sample_id"
    if manifest.key.get("patches") is None and record["rows"] + len(record["skipped"]) != record["samples"]:
        return (f"{record['file']} should account for {record['samples']} samples but has {record['rows']} rows "
                f"and {len(record['skipped'])} skipped")
    return ""


def save_manifest(root: Path, manifest: Manifest) -> None:
    """Replace manifest.json (the header; the shard records are appended by `append_record`)."""
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    header = json.dumps(manifest.header(), indent=1, allow_nan=False).encode()  # no NaN: such settings are refused
    write_bytes(Path(root) / MANIFEST, header, "manifest", follow=False)  # a link planted there is replaced
