"""The shard store: atomic shards, manifest, lock, key checks, checksums, streaming reads."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cache.manifest import load_manifest
from cache.reader import CacheReader
from cache.writer import CacheWriter
from pipeline.errors import CacheError

KEY = {"backbone": "test", "weights": "none"}


def write_cache(root, num_samples=10, shard_rows=4, width=3, dtype="float32", compression="none", key=KEY,
                overwrite=False, shards=None):
    codes = np.arange(num_samples * width, dtype=np.float32).reshape(num_samples, width) / 7
    with CacheWriter(root, key, ["a", "b"], {"fc7": width}, dtype, shard_rows, num_samples, compression,
                     overwrite) as writer:
        for k in range(writer.manifest.num_shards) if shards is None else shards:
            rows = slice(k * shard_rows, min(num_samples, (k + 1) * shard_rows))
            ids = [f"s{i}" for i in range(rows.start, rows.stop)]
            writer.write_shard(k, {"fc7": codes[rows]}, np.arange(rows.start, rows.stop) % 2, ids, [])
        writer.finish()
    return codes


def test_round_trip_across_shards(tmp_path):
    codes = write_cache(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "manifest.json", "shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "shards.jsonl"]
    reader = CacheReader(tmp_path / "c")
    assert reader.num_rows == 10 and reader.taps == {"fc7": 3} and reader.classes == ["a", "b"]
    np.testing.assert_array_equal(reader.load("fc7"), codes)
    batches = list(reader.iter_batches("fc7", batch_size=3))
    assert [len(b["fc7"]) for b in batches] == [3, 1, 3, 1, 2]  # never more than one batch of rows
    np.testing.assert_array_equal(np.concatenate([b["fc7"] for b in batches]), codes)
    assert list(np.concatenate([b["sample_id"] for b in batches])) == [f"s{i}" for i in range(10)]
    np.testing.assert_array_equal(reader.read_rows("fc7", [9, 0, 5, 5]), codes[[9, 0, 5, 5]])
    np.testing.assert_array_equal(reader.load_column("target"), np.arange(10) % 2)


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_and_float16(tmp_path, compression):
    codes = write_cache(tmp_path / "c", dtype="float16", compression=compression)
    with h5py.File(tmp_path / "c" / "shard-00000.h5") as shard:
        assert shard["fc7"].compression == compression and shard["fc7"].dtype == np.float16
    np.testing.assert_allclose(CacheReader(tmp_path / "c").load("fc7"), codes, rtol=1e-3)


def test_chunks_are_rows_of_about_one_mebibyte(tmp_path):
    width = 4096
    with CacheWriter(tmp_path / "c", KEY, ["a"], {"fc7": width}, "float16", 1000, 1000) as writer:
        writer.write_shard(0, {"fc7": np.zeros((1000, width))}, np.zeros(1000, int), [str(i) for i in range(1000)], [])
    with h5py.File(tmp_path / "c" / "shard-00000.h5") as shard:
        assert shard["fc7"].chunks == (128, width)  # 128 rows x 4096 x 2 bytes = 1 MiB


def test_incomplete_cache_is_refused_by_the_reader(tmp_path):
    write_cache(tmp_path / "c", shards=[0])
    with pytest.raises(CacheError, match=r"incomplete \(1 of 3 shards\); re-run the same tl extract"):
        CacheReader(tmp_path / "c")


def test_corrupt_shard_is_detected_by_its_checksum(tmp_path):
    write_cache(tmp_path / "c")
    path = tmp_path / "c" / "shard-00001.h5"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="shard-00001.h5 .* is corrupt \\(checksum mismatch\\); re-run the tl extract that made it"):
        reader.load("fc7")
    assert len(reader.verify_all()) == 1


def test_a_different_key_is_refused_and_the_cache_kept(tmp_path):
    codes = write_cache(tmp_path / "c")
    with pytest.raises(CacheError, match="made with other settings \\(backbone: test -> other\\).*--overwrite"):
        write_cache(tmp_path / "c", key={"backbone": "other", "weights": "none"})
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").load("fc7"), codes)
    write_cache(tmp_path / "c", key={"backbone": "other", "weights": "none"}, overwrite=True, num_samples=4)
    assert CacheReader(tmp_path / "c").manifest.key["backbone"] == "other"


def test_resume_keeps_finished_shards_and_redoes_missing_ones(tmp_path):
    write_cache(tmp_path / "c", shards=[0, 2])
    first = load_manifest(tmp_path / "c").shards
    (tmp_path / "c" / "shard-00002.h5").unlink()
    (tmp_path / "c" / ".shard-00001.h5.tmp-999").write_bytes(b"half a shard")
    with CacheWriter(tmp_path / "c", KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10) as writer:
        assert writer.finished == {0}
        assert writer.manifest.shards[0] == first[0]
    assert not (tmp_path / "c" / ".shard-00001.h5.tmp-999").exists()


def test_second_writer_is_refused(tmp_path):
    with CacheWriter(tmp_path / "c", KEY, ["a"], {"fc7": 3}, "float32", 4, 4):
        with pytest.raises(CacheError, match=f"another tl process \\(pid {os.getpid()}\\) is writing"):
            CacheWriter(tmp_path / "c", KEY, ["a"], {"fc7": 3}, "float32", 4, 4).__enter__()


def test_stale_lock_of_a_dead_process_is_taken(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; h = open(sys.argv[1], 'a+'); fcntl.lockf(h, fcntl.LOCK_EX);"
         "h.write(str(os.getpid())); h.flush(); print('locked', flush=True); time.sleep(60)", str(root / ".lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CacheError, match=f"pid {holder.pid}"):
        CacheWriter(root, KEY, ["a"], {"fc7": 3}, "float32", 4, 4).__enter__()
    holder.kill()
    holder.wait()
    time.sleep(0.05)
    with CacheWriter(root, KEY, ["a"], {"fc7": 3}, "float32", 4, 4) as writer:
        assert writer.lock.path.read_text() == str(os.getpid())


def test_manifest_records_rows_checksums_and_skipped(tmp_path):
    with CacheWriter(tmp_path / "c", KEY, ["a"], {"fc7": 2}, "float32", 3, 3) as writer:
        writer.write_shard(0, {"fc7": np.ones((2, 2))}, np.zeros(2, int), ["x", "z"],
                           [{"sample_id": "y", "reason": "OSError: truncated"}])
        writer.finish()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "c" / "shards.jsonl").read_text().splitlines()]
    assert manifest["complete"] and records[0]["rows"] == 2 and records[0]["samples"] == 3
    assert len(records[0]["sha256"]) == 64 and len(manifest["content"]) == 64
    assert records[0]["skipped"] == [{"sample_id": "y", "reason": "OSError: truncated"}]
    assert manifest["tl_version"] and manifest["key_digest"]
    assert load_manifest(tmp_path / "c").skipped == [{"sample_id": "y", "reason": "OSError: truncated", "shard": 0}]


def test_unknown_tap_names_the_ones_present(tmp_path):
    write_cache(tmp_path / "c")
    with pytest.raises(CacheError, match="has no layer 'fc6'; it has: fc7"):
        CacheReader(tmp_path / "c").load("fc6")


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="is not a tl cache"):
        CacheReader(tmp_path)


def test_a_cache_without_finished_shards_may_change_its_key(tmp_path):
    """A run that failed before its first shard (say, weights that did not fit) blocks no corrected run."""
    write_cache(tmp_path / "c", shards=[])
    write_cache(tmp_path / "c", key={"backbone": "other", "weights": "none"})
    assert CacheReader(tmp_path / "c").manifest.key["backbone"] == "other"


def test_shard_files_missing_from_the_manifest_are_adopted(tmp_path):
    """A follower rank (or a run killed between renaming a shard and saving the manifest) leaves shard
    files the manifest does not list: the next writer of the same key records them, checksums and all."""
    codes = np.arange(30, dtype=np.float32).reshape(10, 3)
    with CacheWriter(tmp_path / "c", KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10) as writer:
        writer.write_shard(0, {"fc7": codes[:4]}, np.zeros(4), [f"s{i}" for i in range(4)], [])
    with CacheWriter(tmp_path / "c", KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10, follower=True,
                     rank=1) as follower:
        follower.write_shard(2, {"fc7": codes[9:]}, np.ones(1), ["s9"], [{"sample_id": "s8", "reason": "bad"}])
    # a follower records its shards in a file of its own, which readers merge
    assert len((tmp_path / "c" / "shards.jsonl").read_text().splitlines()) == 1
    assert [s.index for s in load_manifest(tmp_path / "c").shards] == [0, 2]
    (tmp_path / "c" / "shards-rank1.jsonl").unlink()  # as if killed before it recorded: the file is adopted
    assert [s.index for s in load_manifest(tmp_path / "c").shards] == [0]
    with CacheWriter(tmp_path / "c", KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10) as writer:
        assert writer.finished == {0, 2}
        writer.write_shard(1, {"fc7": codes[4:8]}, np.zeros(4), [f"s{i}" for i in range(4, 8)], [])
        manifest = writer.finish()
    assert manifest.complete and manifest.skipped == [{"sample_id": "s8", "reason": "bad", "shard": 2}]
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").load("fc7"), np.delete(codes, 8, axis=0))
    other = dict(KEY, backbone="vgg16")
    follower = CacheWriter(tmp_path / "c", other, ["a", "b"], {"fc7": 3}, "float32", 4, 10, follower=True)
    with pytest.raises(CacheError, match="opened by rank 0 with other settings"):
        follower.__enter__()


def test_the_typed_manifest_round_trips_its_file_and_describes_the_cache(tmp_path):
    from cache.manifest import ShardEntry, TapSpec

    from tests.conftest import blobs, write_code_cache

    codes, targets = blobs(0, n=150, classes=3, width=5)
    write_code_cache(tmp_path / "c", codes, targets, ["x", "y", "z"], shard_rows=64)
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest = load_manifest(tmp_path / "c")
    records = [json.loads(line) for line in (tmp_path / "c" / "shards.jsonl").read_text().splitlines()]
    assert manifest.header() == raw  # nothing lost or renamed between the file and the object
    assert isinstance(manifest.taps["feat"], TapSpec) and all(isinstance(s, ShardEntry) for s in manifest.shards)
    assert manifest.rows == sum(r["rows"] for r in records) == 150 and not manifest.multilabel
    assert [vars(s) for s in manifest.shards] == [{k: v for k, v in r.items() if k != "skipped"} for r in records]
    lines = manifest.describe(tmp_path / "c")
    assert lines[0] == f"cache      {tmp_path / 'c'} (complete)"
    manifest.complete = False
    assert manifest.describe(tmp_path / "c")[0] == f"cache      {tmp_path / 'c'} (INCOMPLETE: re-run tl extract to finish)"
    assert any(line.startswith("layer      feat") for line in lines)
    assert any(line.startswith(f"rows       {manifest.rows} of {manifest.num_samples} samples in 3/3 shards")
               for line in lines)


def test_a_record_cut_short_by_a_kill_is_ignored_and_its_shard_adopted_again(tmp_path):
    codes = np.arange(30, dtype=np.float32).reshape(10, 3)
    root = tmp_path / "c"
    with CacheWriter(root, KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10) as writer:
        writer.write_shard(0, {"fc7": codes[:4]}, np.zeros(4), [f"s{i}" for i in range(4)], [])
        writer.write_shard(1, {"fc7": codes[4:8]}, np.zeros(4), [f"s{i}" for i in range(4, 8)], [])
    records = root / "shards.jsonl"
    whole = records.read_bytes()
    records.write_bytes(whole[: len(whole) - 40])  # the second line torn while it was appended
    assert [s.index for s in load_manifest(root).shards] == [0]
    with CacheWriter(root, KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 10) as writer:
        assert sorted(writer.finished) == [0, 1]  # shard 1's file is whole: adopted from its attributes
    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(b"{not a record\n" + b"".join(lines))
    with pytest.raises(CacheError, match=r"shards.jsonl line 1 is not a shard record; re-run the same tl extract command"):
        load_manifest(root)


def test_shard_names_are_padded_to_the_widest_index_and_read_by_index(tmp_path):
    from cache.manifest import shard_index, shard_name, uniform_plan

    assert shard_name(7, 10) == "shard-00007.h5" and shard_name(7, 100_001) == "shard-000007.h5"
    assert shard_name(100_000, 100_001) == "shard-100000.h5" and shard_index("shard-000007.h5") == 7
    names = [shard_name(k, 1_000_001) for k in (999_999, 10, 100_000, 2)]
    assert sorted(names) == [shard_name(k, 1_000_001) for k in (2, 10, 100_000, 999_999)]
    root = tmp_path / "c"
    plan = uniform_plan(100_001, 1)
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 1, 100_001, plan=plan) as writer:
        writer.write_shard(100_000, {"fc7": np.ones((1, 2))}, np.zeros(1), ["last"], [])
        writer.write_shard(3, {"fc7": np.zeros((1, 2))}, np.zeros(1), ["s3"], [])
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-000003.h5", "shard-100000.h5"]
    assert [(s.index, s.file) for s in load_manifest(root).shards] == [(3, "shard-000003.h5"),
                                                                       (100_000, "shard-100000.h5")]


def test_a_cache_of_the_earlier_format_is_read_and_not_written_into(tmp_path):
    """tl-cache/1 kept its shards inside manifest.json: every reader still takes it; extract asks for
    --overwrite rather than mixing shards without input digests into it."""
    from tests.conftest import cache_document

    codes = write_cache(tmp_path / "c")
    document = cache_document(tmp_path / "c")
    document["format"] = "tl-cache/1"
    for name in ("records", "content"):
        document.pop(name)
    document["shards"] = [{k: shard[k] for k in ("index", "file", "rows", "bytes", "sha256")} for shard in document["shards"]]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(document))
    (tmp_path / "c" / "shards.jsonl").unlink()
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").load("fc7"), codes)
    with pytest.raises(CacheError, match=r"earlier tl \(tl-cache/1\).*pass --overwrite"):
        write_cache(tmp_path / "c")


def test_a_kill_while_shards_are_dropped_leaves_a_cache_that_opens(tmp_path, monkeypatch):
    """Opening drops shards whose inputs changed: a kill between its steps must leave no record of a
    deleted file, no complete=True with a shard missing, and a cache the next run opens."""
    import cache.writer as writer_module
    from cache.manifest import uniform_plan

    root = tmp_path / "c"
    write_cache(root)
    plan = uniform_plan(9, 4)  # one sample fewer: the last shard's inputs differ
    plan = [writer_module.PlannedShard(p.first, p.samples, "", p.unit) for p in plan[:2]] + [
        writer_module.PlannedShard(8, 1, "changed", 2)]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "write_records", killed)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter(root, KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 9, plan=plan).__enter__()
    monkeypatch.undo()
    assert not load_manifest(root).complete
    with CacheWriter(root, KEY, ["a", "b"], {"fc7": 3}, "float32", 4, 9, plan=plan) as writer:
        assert sorted(writer.finished) == [0, 1] and writer.changed == 1
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]


def test_moved_samples_keep_a_shard_unless_its_rows_depend_on_their_position(tmp_path):
    """A shard whose samples only moved in the listing (same inputs, another first sample) is kept with its
    new position; a writer told that rows depend on the position (multiscale training) redoes it."""
    from cache.manifest import PlannedShard

    root = tmp_path / "c"
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 4,
                     plan=[PlannedShard(0, 2, "x", 0), PlannedShard(2, 2, "y", 1)]) as writer:
        for index in (0, 1):
            writer.write_shard(index, {"fc7": np.ones((2, 2))}, np.zeros(2), ["s0", "s1"], [])
    moved = [PlannedShard(0, 2, "x", 0), PlannedShard(3, 2, "y", 1)]  # a sample was added before shard 1
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 5, plan=moved, position_matters=True) as writer:
        assert sorted(writer.finished) == [0] and writer.changed == 1
        writer.write_shard(1, {"fc7": np.ones((2, 2))}, np.zeros(2), ["s0", "s1"], [])
    moved = [PlannedShard(0, 2, "x", 0), PlannedShard(4, 2, "y", 1)]
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 6, plan=moved) as writer:
        assert sorted(writer.finished) == [0, 1] and writer.changed == 0 and writer.kept == 2
    assert [s.first for s in load_manifest(root).shards] == [0, 4]


def test_a_moved_shard_is_adopted_from_its_file_when_its_records_are_lost(tmp_path):
    """A kept shard that moved in the listing still says its old first sample in its file; rebuilding lost
    records from the shard files keeps it all the same (by its samples and inputs), at its new position."""
    from cache.manifest import PlannedShard

    root = tmp_path / "c"
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 4,
                     plan=[PlannedShard(0, 2, "x", 0), PlannedShard(2, 2, "y", 1)]) as writer:
        for index in (0, 1):
            writer.write_shard(index, {"fc7": np.ones((2, 2))}, np.zeros(2), ["s0", "s1"], [])
        writer.finish()
    moved = [PlannedShard(0, 2, "x", 0), PlannedShard(3, 2, "y", 1)]  # a sample was added before shard 1
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 5, plan=moved) as writer:
        assert writer.kept == 2
    (root / "shards.jsonl").write_text("not a record\n" * 2)  # damaged: rebuilt from the shard files
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 5, plan=moved) as writer:
        assert sorted(writer.finished) == [0, 1]
        writer.finish()
    assert [(s.index, s.first) for s in load_manifest(root).shards] == [(0, 0), (1, 3)]


def test_another_ranks_records_are_adopted_only_for_this_plan(tmp_path):
    """A rank that listed other data records shards for another plan: rank 0 does not adopt them."""
    from cache.manifest import PlannedShard

    root = tmp_path / "c"
    plan = [PlannedShard(0, 2, "x", 0), PlannedShard(2, 2, "y", 1)]
    other = [PlannedShard(0, 2, "x", 0), PlannedShard(2, 2, "changed", 1)]
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 4, plan=plan) as main:
        main.write_shard(0, {"fc7": np.ones((2, 2))}, np.zeros(2), ["s0", "s1"], [])
        with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 4, plan=other, follower=True, rank=1) as rank:
            rank.write_shard(1, {"fc7": np.ones((2, 2))}, np.zeros(2), ["s2", "s3"], [])
        main.adopt_shards()
        assert not main.finish().complete and sorted(main.finished) == [0]


def test_verify_finds_codes_that_are_not_finite_behind_a_sound_checksum(tmp_path, run_tl):
    """A shard written with NaN in it (its checksum written with it) passes the checksum: verify reads
    the codes too, as every stage that reads them would refuse them."""
    from tests.conftest import write_code_cache

    codes = np.ones((6, 3), np.float32)
    codes[5, 1] = np.nan  # the second block of the second shard
    cache = write_code_cache(tmp_path / "cache", codes, np.arange(6) % 2, ["a", "b"], shard_rows=3)
    problems = CacheReader(cache).verify_all(block_rows=2)
    assert problems == [f"shard shard-00001.h5 of {cache} holds NaN or Inf in feat (1 row, first at row 2 of the "
                        "shard); re-extract the cache with tl extract --overwrite"]
    result = run_tl("info", cache, "--verify")
    assert result.code == 2 and "holds NaN or Inf in feat" in result.err and "Traceback" not in result.err
    assert result.err.startswith(f"error: 1 problem in {cache}: shard"), result.err  # it said "1 problems"


def test_a_run_stopped_before_its_first_shard_withdraws_its_manifest_alone(tmp_path, monkeypatch):
    """One process withdraws the manifest of a cache it began and stopped before a shard of; rank 0 under
    torchrun keeps it, since another rank may be writing a shard it cannot see yet."""
    from pipeline import distributed
    from pipeline.distributed import World
    from pipeline.extract import _opened

    monkeypatch.setattr(distributed, "broadcast", lambda current, value: value)
    for world, kept in ((World(0, 2), True), (World(0, 1), False)):
        root = tmp_path / str(world.size)
        with pytest.raises(KeyboardInterrupt):
            with _opened(CacheWriter(root, KEY, ["a", "b"], {"fc7": 3}, "float32", 2, 4), world):
                assert (root / "manifest.json").is_file()
                raise KeyboardInterrupt
        assert (root / "manifest.json").exists() == kept and root.exists() == kept


@pytest.mark.parametrize("column, data, said", [
    ("feat", np.array([["x"] * 4] * 6, dtype=h5py.string_dtype()), "holds feat as object (6, 4), not what tl writes"),
    ("feat", np.zeros((6, 3), dtype=np.float32), "holds feat as float32 (6, 3), not what tl writes ((6, 4) floats)"),
    ("target", np.array([0, 1, -5, 0, 1, 0]), "shard-00000.h5 of {cache}: class -5 is negative; re-run"),
    ("target", np.array([0, 1, -1, 0, 1, 0]), "class -1 is negative"),  # tl writes no -1: it is counted as a class
    ("target", np.array([0, 1, 2, 0, 1, 0]), "shard-00000.h5 of {cache}: has class 2 but the manifest names 2 classes"),
    ("target", np.full(6, 0.5), "holds target as float64 (6,), not what tl writes (integers)"),
    ("feat", None, "holds feat as a group, not what tl writes"),
])
def test_a_shard_crafted_with_its_checksum_is_one_line(tmp_path, column, data, said):
    """A shard edited together with its record passes the checksum; the columns' types still say it is
    not tl's: string codes or negative classes ended in a numpy traceback or a wrong accuracy."""
    from pipeline.files import file_digest
    from tests.conftest import cache_document, write_cache_document, write_code_cache

    cache = write_code_cache(tmp_path / "c", np.ones((6, 4), np.float32), np.array([0, 1] * 3), ["a", "b"])
    shard = cache / "shard-00000.h5"
    with h5py.File(shard, "r+") as handle:
        del handle[column]
        if data is None:
            handle.create_group(column)
        else:
            handle.create_dataset(column, data=data)
    document = cache_document(cache)
    document["shards"][0].update(sha256=file_digest(shard), bytes=shard.stat().st_size)
    write_cache_document(cache, document)
    with pytest.raises(CacheError, match=re.escape(said.format(cache=cache))):
        next(CacheReader(cache).iter_batches("feat"))


@pytest.mark.parametrize("column, data", [
    ("feat", np.zeros((6, 3), dtype=np.float32)), ("target", np.array([0, 1, 2, 0, 1, 0])),
    ("feat", np.full((6, 4), np.nan, dtype=np.float32)), ("target", np.arange(4))])
def test_a_shard_changed_since_its_record_says_to_rerun_the_extract_not_to_overwrite(tmp_path, column, data):
    """A shard whose file changed after tl recorded it (its checksum no longer holds) is refused for its checksum,
    before its columns are looked at: the same extract command redoes that shard alone (the writer drops a shard
    whose checksum fails), where the columns' line says --overwrite, which extracts every shard again."""
    from tests.conftest import write_code_cache

    cache = write_code_cache(tmp_path / "c", np.ones((6, 4), np.float32), np.array([0, 1] * 3), ["a", "b"])
    with h5py.File(cache / "shard-00000.h5", "r+") as handle:
        del handle[column]
        handle.create_dataset(column, data=data)
    with pytest.raises(CacheError) as refused:
        CacheReader(cache).load("feat") if column == "feat" and data.shape == (6, 4) else \
            next(CacheReader(cache).iter_batches("feat"))
    assert str(refused.value) == (f"shard shard-00000.h5 of {cache} is corrupt (checksum mismatch); re-run the tl "
                                  "extract that made it: it writes that shard again")


def test_the_writer_keeps_whole_targets_as_integers_and_refuses_fractions(tmp_path):
    from tests.conftest import write_code_cache

    cache = write_code_cache(tmp_path / "c", np.ones((4, 2), np.float32), np.array([0.0, 1.0, 1.0, 0.0]), ["a", "b"])
    assert next(CacheReader(cache).iter_batches("feat"))["target"].dtype.kind == "i"
    with pytest.raises(CacheError, match="targets must be whole numbers"):
        write_code_cache(tmp_path / "d", np.ones((4, 2), np.float32), np.array([0.0, 0.5, 1.0, 0.0]), ["a", "b"])


# ------------------------------------------------------------------ shards kept wherever the plan puts them

def planned(*contents, size=2):
    """A plan of one shard of `size` samples per content name (the name stands for its inputs digest)."""
    from cache.manifest import PlannedShard

    return [PlannedShard(size * k, size, name, k) for k, name in enumerate(contents)]


def write_planned(root, plan, only=None, **options):
    """Open a cache for `plan`, write the shards it lacks (`only`: those indices) with codes that say their
    content (the inputs digest's letters), finish; (writer, {index: file name written})."""
    written = {}
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, sum(p.samples for p in plan), plan=plan,
                     **options) as writer:
        for index, shard in enumerate(plan):
            if index not in writer.finished and (only is None or index in only):
                written[index] = writer.write_shard(index, {"fc7": content_codes(shard.inputs)}, np.zeros(2),
                                                    [f"{shard.inputs}{i}" for i in range(2)], []).file
        writer.finish()
    return writer, written


def content_codes(name):
    return np.array([[ord(c), len(name)] for c in name[:2].ljust(2)], np.float32)


def test_a_shard_whose_samples_moved_to_another_index_keeps_its_file(tmp_path):
    """Shards follow tars: a tar removed or inserted before others shifts the index of every later shard;
    those are kept (their files as they are), and only the shards of the changed tar are written."""
    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c", "d", "e"))
    writer, written = write_planned(root, planned("a", "c", "d", "e"))  # "b" went
    assert (writer.kept, writer.changed, writer.gone, written) == (4, 0, 1, {})
    assert [(s.index, s.file) for s in load_manifest(root).shards] == [
        (0, "shard-00000.h5"), (1, "shard-00002.h5"), (2, "shard-00003.h5"), (3, "shard-00004.h5")]
    assert not (root / "shard-00001.h5").exists()
    reader = CacheReader(root)
    np.testing.assert_array_equal(reader.load("fc7"), np.concatenate([content_codes(c) for c in "acde"]))
    assert list(reader.load_column("sample_id")) == ["a0", "a1", "c0", "c1", "d0", "d1", "e0", "e1"]
    assert reader.verify_all() == []
    # a shard inserted before the moved ones: its own name is held by a kept shard, so it gets a wider one
    writer, written = write_planned(root, planned("x", "a", "c", "d", "e"))
    assert (writer.kept, writer.changed, written) == (4, 0, {0: "shard-000000.h5"})
    assert [(s.index, s.file) for s in load_manifest(root).shards] == [
        (0, "shard-000000.h5"), (1, "shard-00000.h5"), (2, "shard-00002.h5"), (3, "shard-00003.h5"),
        (4, "shard-00004.h5")]
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "xacde"]))
    # a shard that changed and one that shrank (no longer held anywhere) are redone at their index alone
    writer, written = write_planned(root, planned("x", "a", "C", "d", "e"))
    assert (writer.kept, writer.changed, written) == (4, 1, {2: "shard-00002.h5"})
    writer, written = write_planned(root, planned("x", "a", "C", "d", "e"))  # unchanged: nothing written
    assert (writer.kept, writer.changed, written) == (5, 0, {})
    assert sorted(p.name for p in root.glob("shard-*")) == sorted(s.file for s in load_manifest(root).shards)


def test_a_changed_shard_is_counted_redone_when_another_moved_into_its_place(tmp_path):
    """Counted by number, not by index: "b" changed and "c" moved into b's place, so b's index is kept (by c),
    yet one shard is written because b's inputs changed."""
    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c"))
    writer, written = write_planned(root, planned("a", "c", "B"))
    assert (writer.kept, writer.changed, writer.gone, sorted(written)) == (2, 1, 0, [2])
    writer, written = write_planned(root, planned("a", "c"))  # "B" went with its data: nothing redone
    assert (writer.kept, writer.changed, writer.gone, written) == (2, 0, 1, {})


def test_shards_without_input_digests_answer_for_their_own_index_only(tmp_path):
    """A uniform plan digests no inputs: an empty digest proves nothing, so a shard of 2 samples is not
    taken for another shard of 2 samples at another index."""
    from cache.manifest import uniform_plan

    root = tmp_path / "c"
    write_planned(root, uniform_plan(8, 2))
    writer, written = write_planned(root, uniform_plan(6, 2))
    assert (writer.kept, writer.gone, sorted(written)) == (3, 1, [])
    assert [(s.index, s.file) for s in load_manifest(root).shards] == [(k, f"shard-0000{k}.h5") for k in range(3)]
    assert not (root / "shard-00003.h5").exists()


def test_moved_shards_are_redone_when_their_rows_depend_on_their_position(tmp_path):
    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c"))
    writer, written = write_planned(root, planned("a", "c"), position_matters=True)  # "c" moved: redone
    assert (writer.kept, sorted(written)) == (1, [1])
    assert [(s.index, s.file) for s in load_manifest(root).shards] == [(0, "shard-00000.h5"), (1, "shard-00001.h5")]
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]


def test_lost_records_are_rebuilt_from_files_at_the_index_their_samples_moved_to(tmp_path):
    """Adoption (records lost, or another rank's unrecorded file) follows the same rule as the records."""
    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c", "d"))
    write_planned(root, planned("x", "a", "c", "d"))  # "b" went, "x" came first: its name is a wider one
    (root / "shards.jsonl").write_text("not a record\n" * 2)
    writer, written = write_planned(root, planned("x", "a", "c", "d"))
    assert written == {} and sorted(writer.finished) == [0, 1, 2, 3]
    assert [s.file for s in load_manifest(root).shards] == ["shard-000000.h5", "shard-00000.h5", "shard-00002.h5",
                                                             "shard-00003.h5"]
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "xacd"]))
    # a shard file a killed run left unrecorded, for samples now elsewhere: adopted there, not rewritten
    records = (root / "shards.jsonl").read_text().splitlines(keepends=True)
    (root / "shards.jsonl").write_text("".join(records[:-1]) + records[-1][:10])  # the last line torn
    writer, written = write_planned(root, planned("a", "c", "d"))
    assert written == {} and sorted(writer.finished) == [0, 1, 2]
    assert [s.file for s in load_manifest(root).shards] == ["shard-00000.h5", "shard-00002.h5", "shard-00003.h5"]
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.h5", "shard-00002.h5", "shard-00003.h5"]


@pytest.mark.parametrize("step", ["records", "after records", "header"])
def test_a_kill_while_moved_shards_are_recorded_leaves_a_manifest_that_tells_the_truth(tmp_path, monkeypatch, step):
    """Opening writes, in order: a header that admits old and new, the kept shards' records at their new
    index, deletes the dropped files, then the new header. Killed at any of them, every record names a
    file that holds what it says, and the next run keeps every moved shard."""
    import cache.writer as writer_module
    from cache.manifest import save_manifest
    from cache.records import write_records
    from pipeline.files import file_digest

    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c", "d"))
    headers = []

    def records(*args, **kwargs):
        if step == "after records":
            write_records(*args, **kwargs)
        raise KeyboardInterrupt

    def header(*args, **kwargs):
        headers.append(args)
        if len(headers) == 2:  # the dropped file is deleted: killed before the new header
            raise KeyboardInterrupt
        save_manifest(*args, **kwargs)

    monkeypatch.setattr(writer_module, *(("save_manifest", header) if step == "header" else ("write_records", records)))
    with pytest.raises(KeyboardInterrupt):
        write_planned(root, planned("a", "c", "d"))  # "b" went: "c" and "d" move to 1 and 2
    monkeypatch.undo()
    manifest = load_manifest(root)
    assert not manifest.complete
    for shard in manifest.shards:  # every record names a file that holds what it says
        assert file_digest(root / shard.file) == shard.sha256
        with h5py.File(root / shard.file) as handle:
            assert handle.attrs["inputs"] == shard.inputs
    writer, written = write_planned(root, planned("a", "c", "d"))
    assert written == {} and writer.damaged == 0 and sorted(writer.finished) == [0, 1, 2]
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "acd"]))
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000.h5", "shard-00002.h5", "shard-00003.h5"]


def test_records_may_name_the_file_of_another_index_but_no_path_and_no_file_twice(tmp_path):
    from tests.conftest import cache_document, write_cache_document

    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c"))
    document = cache_document(root)
    for name in ("../shard-00001.h5", "sub/shard-00001.h5", "/tmp/shard-00001.h5", "shard-00001.h5.bak", "x.h5",
                 "shard-00001.h5/.."):
        edited = json.loads(json.dumps(document))
        edited["shards"][0]["file"] = name
        write_cache_document(root, edited)
        with pytest.raises(CacheError, match="is inconsistent"):
            load_manifest(root)
    edited = json.loads(json.dumps(document))
    edited["shards"][0]["file"] = "shard-00001.h5"  # the file of shard 1 read twice
    write_cache_document(root, edited)
    with pytest.raises(CacheError, match="names one shard file for two shards; re-run the same tl extract"):
        load_manifest(root)
    edited["shards"][0]["file"], edited["shards"][1]["file"] = "shard-00001.h5", "shard-00000.h5"  # swapped: sound
    write_cache_document(root, edited)
    assert [s.file for s in load_manifest(root).shards] == ["shard-00001.h5", "shard-00000.h5", "shard-00002.h5"]


def test_a_kill_before_a_ranks_records_are_merged_leaves_no_file_read_as_two_shards(tmp_path, monkeypatch):
    """A rank's record of a shard that moved, left by a kill between shards.jsonl (the shard at its new
    index) and the removal of the rank's records file (at its old index): the records name one file for
    two shards, which readers refuse and the next run rebuilds from the files."""
    import cache.writer as writer_module
    from cache.manifest import RecordDamage
    from cache.records import write_records

    root = tmp_path / "c"
    plan = planned("a", "b", "c")
    with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 6, plan=plan) as main:
        for index in (0, 1):
            main.write_shard(index, {"fc7": content_codes("ab"[index])}, np.zeros(2), ["x", "y"], [])
        with CacheWriter(root, KEY, ["a"], {"fc7": 2}, "float32", 2, 6, plan=plan, follower=True, rank=1) as rank:
            rank.write_shard(2, {"fc7": content_codes("c")}, np.zeros(2), ["x", "y"], [])

    def killed(*args, **kwargs):
        write_records(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "write_records", killed)
    with pytest.raises(KeyboardInterrupt):
        write_planned(root, planned("b", "c"))  # "a" went: "c" moves from 2 to 1
    monkeypatch.undo()
    with pytest.raises(RecordDamage, match="names one shard file for two shards"):
        load_manifest(root)
    writer, written = write_planned(root, planned("b", "c"))
    assert written == {} and sorted(writer.finished) == [0, 1]
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "bc"]))


def test_a_damaged_shard_is_not_adopted_again_after_a_kill_while_the_cache_opens(tmp_path, monkeypatch):
    """A recorded shard whose file changed is redone. A run killed after it rewrote the records without it, before
    it deleted the file, left the file unrecorded, and the next run adopted it from its own attributes: the
    damaged codes with a fresh checksum, which no reader could tell from sound ones."""
    import cache.writer as writer_module
    from cache.records import write_records

    root = tmp_path / "c"
    write_planned(root, planned("a", "b"))
    path = root / "shard-00001.h5"
    with h5py.File(path) as handle:
        codes = handle["fc7"][()].tobytes()
    data = bytearray(path.read_bytes())
    data[bytes(data).index(codes)] ^= 1  # the lowest bit of the first code: a file that still reads

    def killed(*args, **kwargs):
        write_records(*args, **kwargs)
        raise KeyboardInterrupt

    path.write_bytes(bytes(data))
    monkeypatch.setattr(writer_module, "write_records", killed)
    with pytest.raises(KeyboardInterrupt):
        write_planned(root, planned("a", "b"))
    monkeypatch.undo()
    writer, written = write_planned(root, planned("a", "b"))
    assert written == {1: "shard-00001.h5"}
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "ab"]))


@pytest.mark.parametrize("damage", [b"", b'{\n "format": "tl-c', b'{"format": "tl-cache/2", "key": {',
                                    b'{"format": "tl-cache/2"}'])
def test_a_damaged_header_is_rebuilt_from_the_shard_files_of_this_key(tmp_path, damage):
    """manifest.json cut short or garbled: the run of the same key knows the header, and each shard file
    names its key and samples, so every finished shard is kept and only the missing ones are written."""
    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c"), only={0, 2})
    (root / "manifest.json").write_bytes(damage)
    with pytest.raises(CacheError, match="re-run the tl extract command that made the cache"):
        CacheReader(root)
    writer, written = write_planned(root, planned("a", "b", "c"))
    assert list(written) == [1] and writer.notes == [f"{root / 'manifest.json'} was damaged: rebuilt from its 2 "
                                                     "shard files"]
    assert load_manifest(root).complete
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "abc"]))
    writer, written = write_planned(root, planned("a", "b", "c"))  # a sound cache says nothing
    assert written == {} and writer.notes == []


def test_a_damaged_header_over_shards_of_another_key_is_kept_unless_overwrite(tmp_path):
    """A shard file of another key: tl cannot tell what that cache was, so only --overwrite replaces it."""
    from pipeline.errors import CacheOccupied

    root = tmp_path / "c"
    write_planned(root, planned("a", "b"))
    (root / "manifest.json").write_bytes(b"{")
    before = {path.name: path.read_bytes() for path in root.iterdir()}
    other = dict(KEY, backbone="vgg16")
    opened = CacheWriter(root, other, ["a"], {"fc7": 2}, "float32", 2, 4, plan=planned("a", "b"))
    with pytest.raises(CacheOccupied, match="has a damaged manifest.json and 2 shard files .* made with other "
                                            "settings.*choose another --out, or pass --overwrite"):
        opened.__enter__()
    assert {path.name: path.read_bytes() for path in root.iterdir()} == before
    with CacheWriter(root, other, ["a"], {"fc7": 2}, "float32", 2, 4, plan=planned("a", "b"), overwrite=True) as writer:
        assert not writer.finished and not list(root.glob("shard-*"))


@pytest.mark.parametrize("kept", [1, 0])
def test_damaged_records_over_shards_of_another_key_are_kept_unless_overwrite(tmp_path, kept):
    """A sound header of another key over a shards.jsonl with a damaged line (or, `kept` 0, only a line cut short,
    as by a kill): the header alone was read, or no record, so the cache counted as one without a finished shard
    and was cleared without --overwrite (every shard file of it deleted). It is refused as a cache of other
    settings, as with its records whole."""
    from pipeline.errors import CacheOccupied

    root = tmp_path / "c"
    write_cache(root)
    lines = (root / "shards.jsonl").read_text().splitlines(keepends=True)
    (root / "shards.jsonl").write_text("garbage\n" + "".join(lines[1:]) if kept else lines[0][:20])
    if not kept:  # a run killed while it wrote its first record
        header = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps({**header, "complete": False}))
    before = {path.name: path.read_bytes() for path in root.iterdir()}
    with pytest.raises(CacheOccupied, match=r"holds a cache made with other settings \(backbone: .*pass --overwrite"):
        write_cache(root, key=dict(KEY, backbone="vgg16"))
    assert {path.name: path.read_bytes() for path in root.iterdir()} == before
    write_cache(root)  # its own key: the shards adopted again from their files
    assert load_manifest(root).complete and len(load_manifest(root).shards) == 3


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_kill_while_a_damaged_header_is_rebuilt_loses_no_shard(tmp_path, monkeypatch, overwrite):
    """Killed after the first shard file was adopted again: the header is sound, the records name what
    they say, and the next run (with or without --overwrite, which resumes a cache of its key) adopts the rest."""
    import cache.writer as writer_module

    root = tmp_path / "c"
    write_planned(root, planned("a", "b", "c"))
    (root / "manifest.json").write_bytes(b'{\n "format": "tl-ca')
    append_record = writer_module.append_record
    calls = []

    def killed_after_one(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        append_record(*args, **kwargs)

    monkeypatch.setattr(writer_module, "append_record", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_planned(root, planned("a", "b", "c"))
    monkeypatch.undo()
    assert [shard.index for shard in load_manifest(root).shards] == [0]
    writer, written = write_planned(root, planned("a", "b", "c"), overwrite=overwrite)
    assert written == {} and sorted(writer.finished) == [0, 1, 2]
    np.testing.assert_array_equal(CacheReader(root).load("fc7"), np.concatenate([content_codes(c) for c in "abc"]))


def test_info_says_a_cache_whose_shard_files_went_is_not_whole(tmp_path, run_tl):
    """'tl info' read the manifest alone: a cache with a shard file deleted or cut short was shown as
    '(complete)', 'N/N shards', exit 0, and only --verify said otherwise. A stat per shard says it now."""
    from tests.conftest import write_code_cache

    cache = write_code_cache(tmp_path / "cache", np.ones((9, 3), np.float32), np.arange(9) % 2, ["a", "b"],
                             shard_rows=3)
    assert run_tl("info", cache).code == 0
    (cache / "shard-00001.h5").unlink()
    with open(cache / "shard-00002.h5", "r+b") as shard:
        shard.truncate(100)
    result = run_tl("info", cache)
    assert result.code == 2 and result.err.count("\n") == 1 and "Traceback" not in result.err, result
    assert (f"error: 2 shard files of {cache} missing or changed in size (shard-00001.h5, shard-00002.h5); re-run "
            "the tl extract that made the cache: it writes them again") in result.err, result


def test_a_file_given_where_a_cache_folder_goes_is_said_to_be_a_file(tmp_path, run_tl):
    """'tl info h.pt' (or --cache h.pt) said 'h.pt is not a tl cache (no manifest.json); create one with tl
    extract', as for a folder without a cache: a file is named as one, and the folder asked for."""
    from tests.conftest import write_code_cache

    cache = write_code_cache(tmp_path / "cache", np.ones((4, 3), np.float32), np.arange(4) % 2, ["a", "b"])
    (tmp_path / "h.pt").write_bytes(b"a head")
    for args in (("info", tmp_path / "h.pt"), ("info", cache / "shard-00000.h5"),
                 ("fit-head", "--cache", tmp_path / "h.pt", "--out", tmp_path / "g.pt")):
        result = run_tl(*args)
        assert result.code == 2 and result.err == (
            f"error: {args[-1] if args[0] == 'info' else args[2]} is a file, not a tl cache (the folder tl extract "
            "writes); pass the cache folder\n"), result
