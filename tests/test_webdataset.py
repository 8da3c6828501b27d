"""--format webdataset: tar shards of KEY.jpg/png + KEY.cls/txt/json read from their offsets, brace
patterns, label keys, bad entries skipped and recorded, shards that follow tars (a repaired tar redoes its
own shards only)."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from cache.reader import CacheReader
from pipeline.errors import DataError, TLError
from pipeline.formats import open_source
from pipeline.formats.tar_listings import TarListings, listing_file
from pipeline.formats.tar_paths import expand_braces
from tests.conftest import cache_document, write_image, write_tar, write_webdataset
from tests.test_extract import extract


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="must count up"):
        expand_braces("{5..1}.tar")


def test_tars_give_the_codes_of_the_same_images_as_files(tmp_path):
    tars = write_webdataset(tmp_path, tars=3, per_tar=5)
    result = extract(tars, tmp_path / "c", format="webdataset", shard_rows=4)
    reader = CacheReader(tmp_path / "c")
    assert result.rows == 15 and reader.classes == ["0", "1", "2"]
    # shards follow tars: 5 images of a tar in shards of 4 -> 2 shards per tar
    assert [(s.first, s.samples) for s in reader.shards] == [(0, 4), (4, 1), (5, 4), (9, 1), (10, 4), (14, 1)]
    ids = list(reader.load_column("sample_id"))
    assert ids[:2] == ["00000.tar/000000", "00000.tar/000001"] and ids[-1] == "00002.tar/000014"
    np.testing.assert_array_equal(reader.load_column("target"), np.arange(15) % 3)
    extract(tmp_path / "images", tmp_path / "files")
    files = CacheReader(tmp_path / "files")
    by_name = {name.split("_")[1][:6]: row for row, name in enumerate(files.load_column("sample_id"))}
    order = [by_name[name.split("/")[1]] for name in ids]
    # the same pixels; other batches may round a float16 code differently
    np.testing.assert_allclose(reader.load("fc7"), files.load("fc7")[order], atol=1e-5, rtol=0)
    pattern = extract(str(tars / "{00000..00002}.tar"), tmp_path / "pattern", format="webdataset", shard_rows=4)
    assert pattern.rows == 15
    np.testing.assert_array_equal(CacheReader(tmp_path / "pattern").load("fc7"), reader.load("fc7"))


def test_label_keys_and_class_lists(tmp_path):
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    members = []
    for k, name in enumerate(["dog", "cat", "dog"]):
        members += [(f"s{k}.png", picture), (f"s{k}.txt", name.encode()),
                    (f"s{k}.json", json.dumps({"species": name, "label": k % 2}).encode())]
    tar = write_tar(tmp_path / "d" / "00000.tar", members)
    source = open_source("webdataset", tar, label_key="txt")
    assert source.classes == ["cat", "dog"] and [s.target for s in source.samples] == [1, 0, 1]
    source = open_source("webdataset", tar, label_key="json:species")
    assert [s.target for s in source.samples] == [1, 0, 1]
    source = open_source("webdataset", tmp_path / "d", label_key="json")
    assert source.classes == ["0", "1"] and [s.target for s in source.samples] == [0, 1, 0]
    source = open_source("webdataset", tar, classes="cat,dog,emu", label_key="txt")
    assert source.classes == ["cat", "dog", "emu"] and [s.target for s in source.samples] == [1, 0, 1]
    with pytest.raises(DataError, match="--label-key is for webdataset data, not imagefolder"):
        open_source("imagefolder", tmp_path, label_key="txt")
    with pytest.raises(DataError, match="1 of the 2 tars of .* do not exist"):
        open_source("webdataset", str(tmp_path / "d" / "{00000..00001}.tar"))
    with pytest.raises(DataError, match="no .tar files"):
        open_source("webdataset", tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_bad_entries_are_skipped_and_recorded(tmp_path):
    good = [write_image(tmp_path / f"g{k}.png", seed=k).read_bytes() for k in range(4)]
    members = [("a.png", good[0]), ("a.cls", b"0"),
               ("b.png", good[1]),  # no label
               ("c.png", b"\x89PNG not really"), ("c.cls", b"1"),  # corrupt image
               ("d.png", good[2]), ("d.cls", b"1"), ("d.jpg", good[3]),  # one key twice
               ("e.png", good[3]), ("e.cls", b"one"), ("f.png", good[0]), ("f.cls", b"1")]
    write_tar(tmp_path / "t" / "00000.tar", members)
    whole = write_tar(tmp_path / "t" / "00001.tar", [("g.png", good[1]), ("g.cls", b"0"), ("h.png", good[2]),
                                                        ("h.cls", b"1")])
    data = whole.read_bytes()
    whole.write_bytes(data[:2048])  # cut short inside h.png's header block: g is kept
    (tmp_path / "t" / "00002.tar").write_bytes(b"not a tar at all" * 100)
    result = extract(tmp_path / "t", tmp_path / "c", format="webdataset")
    reasons = {item["sample_id"]: item["reason"] for item in result.skipped}
    assert set(reasons) == {"00000.tar/b", "00000.tar/c", "00000.tar/d", "00000.tar/e"}
    assert "no label" in reasons["00000.tar/b"] and "more than once" in reasons["00000.tar/d"]
    assert "unreadable label in e.cls: 'one' is not a class number" in reasons["00000.tar/e"]
    assert reasons["00000.tar/c"].startswith(("OSError", "UnidentifiedImageError", "SyntaxError"))
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.load_column("sample_id")) == ["00000.tar/a", "00000.tar/f", "00001.tar/g"]
    warnings = reader.manifest.warnings
    assert any("00001.tar is damaged" in line for line in warnings)
    assert any("00002.tar is not an uncompressed tar" in line for line in warnings)


def test_a_repaired_tar_redoes_only_its_shards(tmp_path):
    tars = write_webdataset(tmp_path, tars=3, per_tar=5)
    extract(tars, tmp_path / "c", format="webdataset", shard_rows=4)
    before = {s["index"]: s["sha256"] for s in cache_document(tmp_path / "c")["shards"]}
    middle = tars / "00001.tar"
    members = [(f"{k:06d}.png", write_image(tmp_path / "new.png", seed=99 + k).read_bytes()) for k in range(5, 10)]
    members = [m for k, m in zip(range(5, 10), members) for m in (m, (f"{k:06d}.cls", str(k % 3).encode()))]
    write_tar(middle, members)
    os.utime(middle, ns=(1, 2))
    rerun = extract(tars, tmp_path / "c", format="webdataset", shard_rows=4)
    assert (rerun.shards_written, rerun.shards_dropped, rerun.shards_reused) == (2, 2, 4)
    after = {s["index"]: s["sha256"] for s in cache_document(tmp_path / "c")["shards"]}
    assert [index for index in before if before[index] != after[index]] == [2, 3]
    extract(tars, tmp_path / "fresh", format="webdataset", shard_rows=4)
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").load("fc7"), CacheReader(tmp_path / "fresh").load("fc7"))


def test_a_tar_that_gains_an_image_moves_the_later_shards_without_redoing_them(tmp_path):
    tars = write_webdataset(tmp_path, tars=3, per_tar=5)
    extract(tars, tmp_path / "c", format="webdataset", shard_rows=4)
    before = {s["index"]: s["sha256"] for s in cache_document(tmp_path / "c")["shards"]}
    first = tars / "00000.tar"
    extra = write_image(tmp_path / "extra.png", seed=500).read_bytes()
    import tarfile
    with tarfile.open(first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    write_tar(first, members + [("zz.png", extra), ("zz.cls", b"2")])  # 6 images: still 2 shards
    rerun = extract(tars, tmp_path / "c", format="webdataset", shard_rows=4)
    assert (rerun.shards_written, rerun.shards_dropped, rerun.shards_reused, rerun.rows) == (2, 2, 4, 16)
    after = cache_document(tmp_path / "c")["shards"]
    assert [s["index"] for s in after if s["sha256"] != before[s["index"]]] == [0, 1]
    assert [s["first"] for s in after] == [0, 4, 6, 10, 11, 15]
    extract(tars, tmp_path / "fresh", format="webdataset", shard_rows=4)
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").load("fc7"), CacheReader(tmp_path / "fresh").load("fc7"))


def test_a_tar_removed_shrunk_or_inserted_redoes_only_its_own_shards(tmp_path):
    """Shards follow tars, so a tar of fewer shards (or none) moves every later tar's shards to other indices:
    those are kept, files and all, and only the changed tar's shards are written; the codes read back are a
    fresh extraction's."""
    tars = write_webdataset(tmp_path, tars=5, per_tar=5)
    shards = lambda: [(s["index"], s["file"]) for s in cache_document(tmp_path / "c")["shards"]]  # noqa: E731

    def rerun(*counts):
        result = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
        assert (result.shards_written, result.shards_dropped, result.shards_reused) == counts
        fresh = tmp_path / f"fresh{len(list(tmp_path.glob('fresh*')))}"
        extract(tars, fresh, format="webdataset", shard_rows=3)
        reader = CacheReader(tmp_path / "c")
        np.testing.assert_array_equal(reader.load("fc7"), CacheReader(fresh).load("fc7"))
        np.testing.assert_array_equal(reader.load_column("sample_id"), CacheReader(fresh).load_column("sample_id"))
        assert reader.verify_all() == []
        assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == sorted(file for _, file in shards())

    extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)  # 5 images a tar: 2 shards each
    second = tars / "00001.tar"
    whole = second.read_bytes()
    with tarfile.open(second) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    write_tar(second, members[:6])  # 3 images: 1 shard, and the 6 shards after it move up by one
    rerun(1, 2, 8)  # its 2 shards dropped, 1 written
    assert shards()[2:4] == [(2, "shard-00002.h5"), (3, "shard-00004.h5")]
    second.unlink()
    rerun(0, 1, 8)  # its one shard dropped with it
    assert shards()[2:] == [(k - 2, f"shard-{k:05d}.h5") for k in range(4, 10)]
    (tars / "0.tar").write_bytes(whole)  # a tar inserted first: its shards' own names are held
    rerun(2, 0, 8)
    assert shards()[:4] == [(0, "shard-000000.h5"), (1, "shard-000001.h5"), (2, "shard-00000.h5"),
                            (3, "shard-00001.h5")]


def test_a_tar_removed_beside_a_new_one_is_not_said_to_be_redone(run_tl, tmp_path):
    """The extract line said '1 shard new (1 of them redone: their inputs changed)' when 00001.tar was removed
    and 00003.tar added, nothing changed: a shard's record cannot tell that from 00001.tar changed and moved
    last, so the line says what it knows, the shard dropped with its inputs (changed or gone)."""
    from tests.test_extract import FAST

    tars = write_webdataset(tmp_path, tars=3, per_tar=3)
    args = ["extract", "--data", tars, "--format", "webdataset", "--shard-rows", "3", "--out", tmp_path / "c", *FAST]
    assert run_tl(*args).code == 0
    members = [(f"9{k:05d}.png", write_image(tmp_path / "n.png", seed=900 + k).read_bytes()) for k in range(3)]
    (tars / "00001.tar").unlink()
    write_tar(tars / "00003.tar", [m for k, m in enumerate(members) for m in (m, (m[0][:-4] + ".cls", b"1"))])
    again = run_tl(*args)
    assert again.code == 0 and "redone" not in again.out, again
    assert "1 shard new, 2 reused, 1 dropped (its inputs changed or went)" in again.out


def test_labels_that_cannot_make_classes_are_one_line(tmp_path):
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    tar = write_tar(tmp_path / "d" / "00000.tar", [("a.png", picture), ("a.cls", b"0"), ("b.png", picture),
                                                   ("b.cls", b"4000000000")])
    source = open_source("webdataset", tar)
    assert source.classes == ["0"] and [s.target for s in source.samples] == [0, -1]
    with pytest.raises(OSError, match=r"class number 4000000000 is not in 0\.\.100,000"):
        source.read_image(1)
    with pytest.raises(DataError, match=r"none of the 2 images .* has a readable .txt label; name the label files"):
        open_source("webdataset", tar, label_key="txt")
    with pytest.raises(DataError, match="--classes names a class twice"):
        open_source("webdataset", tar, classes="cat,cat")
    gz = tmp_path / "g" / "00000.tar"
    gz.parent.mkdir()
    import gzip
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(DataError, match="hold no images .*00000.tar is not an uncompressed tar"):
        open_source("webdataset", gz)


def test_finetune_evaluate_and_export_read_tars_with_their_label_key(run_tl, tmp_path):
    """Stage three and four take tar data too: the head of an imagefolder cache finetunes on the same
    images as tars with .txt labels, and evaluate --model and export's check read them back."""
    from pipeline.export import export_model
    from pipeline.fit_head import FitHeadConfig, fit_head

    members = []
    for k in range(8):
        name = "ab"[k % 2]
        image = write_image(tmp_path / "images" / name / f"{k}.png", seed=k)
        members += [(f"{k:04d}.png", image.read_bytes()), (f"{k:04d}.txt", name.encode())]
    write_tar(tmp_path / "tars" / "00000.tar", members)
    tar = tmp_path / "tars"
    (tar / "00001.tar").write_bytes(b"not a tar at all" * 100)  # said by finetune and evaluate, as by extract
    extract(tmp_path / "images", tmp_path / "cache", layers=("pool5",), dtype="float32")
    fit_head(FitHeadConfig(cache=tmp_path / "cache", out=tmp_path / "head.pt"))
    tuned = run_tl("finetune", "--data", tar, "--format", "webdataset", "--label-key", "txt", "--head",
                   tmp_path / "head.pt", "--out", tmp_path / "m.pt", "--epochs", "1", "--batch-size", "4", "--workers",
                   "0", "--quiet")  # said even with --quiet, on stderr, as extract says it
    assert tuned.code == 0 and "1 epoch run" in tuned.out, tuned
    assert [line for line in tuned.err.splitlines()
            if "00001.tar is not an uncompressed tar" in line and line.startswith("warning: ")], tuned
    evaluated = run_tl("evaluate", "--model", tmp_path / "m.pt", "--data", tar, "--format", "webdataset",
                       "--label-key", "txt", "--split", "", "--out", tmp_path / "r", "--workers", "0", "--quiet")
    assert evaluated.code == 0 and "warning: " in evaluated.err and "00001.tar is not an uncompressed tar" in evaluated.err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"] == 8
    assert [line for line in report["source"]["warnings"] if "00001.tar is not an uncompressed tar" in line]
    exported = export_model(tmp_path / "m.pt", "torchscript", tmp_path / "m.ts")
    assert exported.checked == 8 and exported.checked_on.endswith("tars")  # the tars' images, by label key


def test_a_sample_without_a_label_is_not_taken_for_the_last_class_by_a_head(tmp_path):
    """A tar sample without a label has target -1 (skipped when read); renumbering the targets into a head's classes
    took -1 for the data's last class: finetune and evaluate --model refused data whose last class the head lacks
    ('has labels ... does not know: 2', though no image is labelled 2), or gave the sample that class."""
    from pipeline.compatibility import head_targets

    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    tar = write_tar(tmp_path / "t" / "00000.tar", [("a.png", picture), ("a.cls", b"0"), ("b.png", picture),
                                                   ("b.cls", b"1"), ("c.png", picture)])  # c: no label
    source = open_source("webdataset", tar, classes="0,1,2")
    assert list(source.targets()) == [0, 1, -1]
    assert list(head_targets(source.targets(), source.classes, ["0", "1"], "data", "head")) == [0, 1, -1]
    source = open_source("webdataset", tar)
    assert list(head_targets(source.targets(), source.classes, ["1", "0"], "data", "head")) == [1, 0, -1]
    with pytest.raises(TLError, match="data has labels head does not know: 1;"):
        head_targets(source.targets(), source.classes, ["0"], "data", "head")


def test_labels_and_patterns_that_would_exhaust_memory_are_refused(tmp_path):
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    tar = write_tar(tmp_path / "d" / "00000.tar", [
        ("a.png", picture), ("a.json", b'{"label": 0}'), ("b.png", picture), ("b.json", b'{"label": 1000000000000000000000000000000}'),
        ("c.png", picture), ("c.json", b'{"label": -3}'), ("d.png", b"not an image"), ("d.json", b'{"label": 0}')])
    source = open_source("webdataset", tar, label_key="json")
    assert source.classes == ["0"] and [s.target for s in source.samples] == [0, -1, -1, 0]
    with pytest.raises(OSError, match=r"class number 10000000000000000000 is not in 0\.\.100,000"):
        source.read_image(1)
    with pytest.raises(OSError, match=r"class number -3 is not in"):
        source.read_image(2)
    with pytest.raises(OSError) as unreadable:  # named by its tar member, never by an object's address
        source.read_image(3)
    assert "00000.tar/d" in str(unreadable.value) and "0x" not in str(unreadable.value)
    with pytest.raises(DataError, match="names more than 10,000,000 tars"):
        expand_braces("{0..999}{0..999}{0..99}")
    named = write_tar(tmp_path / "n" / "00000.tar", [("a.png", picture), ("a.txt", b"dog")])
    with pytest.raises(DataError, match="no image in the tars of .* has a label among --classes"):
        open_source("webdataset", named, classes="x,y", label_key="txt")
    with pytest.raises(DataError, match="--classes , names no class"):
        open_source("webdataset", tar, classes=",", label_key="json")
    with pytest.raises(DataError, match="--label-key json: names no field"):
        open_source("webdataset", tar, label_key="json:")
    with pytest.raises(TLError, match="--multiscale labels patches by their boxes: webdataset data has none"):
        extract(tar, tmp_path / "m", format="webdataset", label_key="json", multiscale=True)


def test_class_numbers_that_hold_no_images_are_warned(tmp_path):
    """.cls numbers index the classes from 0: labels from 1, a gap or one stray large number leave classes
    without images; the listing says which (and how many more), fit-head's refusal counts them too."""
    from pipeline.errors import HeadError
    from pipeline.fit_head import FitHeadConfig, fit_head

    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()

    def numbered(name, numbers):
        return write_tar(tmp_path / name / "00000.tar",
                         [m for k, n in enumerate(numbers) for m in ((f"s{k}.png", picture), (f"s{k}.cls", str(n).encode()))])

    source = open_source("webdataset", numbered("from1", [1, 2, 1, 2]))
    assert source.classes == ["0", "1", "2"] and [s.target for s in source.samples] == [1, 2, 1, 2]
    assert source.warnings == ["class 0 holds no images; the .cls numbers 0..2 index the classes from 0, and fit-head "
                               "needs images of every class; renumber the labels from 0 without gaps (a test split "
                               "may lack some)"]
    stray = numbered("stray", [0, 1, 0, 1, 40])
    assert open_source("webdataset", stray).warnings[0].startswith(
        "38 of the 41 classes hold no images: 2, 3, 4, 5, 6 (+33 more); the .cls numbers 0..40 index the classes")
    named = open_source("webdataset", stray, classes="a,b,c")
    assert named.warnings[0].startswith("class c holds no images; the .cls numbers index the classes of --classes "
                                        "from 0")
    picture_named = write_tar(tmp_path / "txt" / "00000.tar", [("a.png", picture), ("a.txt", b"dog")])
    assert open_source("webdataset", picture_named, classes="cat,dog", label_key="txt").warnings == [
        "class cat holds no images; fit-head needs images of every class of --classes (a test split may lack some)"]
    assert open_source("webdataset", numbered("whole", [0, 1, 0, 1])).warnings == []
    extract(stray, tmp_path / "c", format="webdataset")
    assert CacheReader(tmp_path / "c").manifest.warnings[0].startswith("38 of the 41 classes hold no images")
    with pytest.raises(HeadError, match=r"^38 classes have no training rows: 2, 3, 4, 5, 6 \(\+33 more\); add images"):
        fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))


def test_info_shows_the_listing_warnings(run_tl, tmp_path):
    tars = write_webdataset(tmp_path, tars=1, per_tar=4, classes=2)
    (tars / "00001.tar").write_bytes(b"not a tar at all" * 100)
    extract(tars, tmp_path / "one", format="webdataset")
    listed = run_tl("info", tmp_path / "one")
    lines = [line for line in listed.out.splitlines() if line.startswith("warning    ")]
    assert listed.code == 0 and len(lines) == 1 and "00001.tar is not an uncompressed tar" in lines[0], listed
    for k in range(2, 10):
        (tars / f"{k:05d}.tar").write_bytes(b"not a tar at all" * 100)
    extract(tars, tmp_path / "many", format="webdataset")
    lines = [line for line in run_tl("info", tmp_path / "many").out.splitlines() if line.startswith("warning    ")]
    assert len(lines) == 6 and "00001.tar is not an uncompressed tar" in lines[0]
    assert lines[-1] == "warning    ... and 4 more (manifest.json's warnings)"


def test_tars_of_one_name_in_two_folders_give_distinct_ids(tmp_path):
    """`dup/{a,b}/00000.tar`: the ids name each tar by its path from the tars' common folder; tars of
    distinct names keep `NAME.tar/KEY`, so existing caches keep their ids."""
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    for folder, label in (("a", b"0"), ("b", b"1")):
        write_tar(tmp_path / "dup" / folder / "00000.tar", [("k.png", picture), ("k.cls", label)])
    source = open_source("webdataset", str(tmp_path / "dup" / "{a,b}" / "00000.tar"))
    assert [s.sample_id for s in source.samples] == ["a/00000.tar/k", "b/00000.tar/k"]
    assert [s.target for s in source.samples] == [0, 1]
    write_tar(tmp_path / "dup" / "b" / "00001.tar", [("k.png", picture), ("k.cls", b"1")])
    source = open_source("webdataset", str(tmp_path / "dup" / "{a/00000,b/00001}.tar"))
    assert [s.sample_id for s in source.samples] == ["00000.tar/k", "00001.tar/k"]
    extract(str(tmp_path / "dup" / "{a,b}" / "00000.tar"), tmp_path / "c", format="webdataset")
    assert list(CacheReader(tmp_path / "c").load_column("sample_id")) == ["a/00000.tar/k", "b/00000.tar/k"]


def test_the_images_of_a_tar_take_one_open_per_process(tmp_path, monkeypatch):
    """An open is a metadata operation on a shared file system: a billion images must not be a billion
    opens. A process keeps the tar it reads open; another process (a spawned worker) opens its own."""
    import builtins
    import copy
    import pickle

    tars = write_webdataset(tmp_path, tars=2, per_tar=5)
    source = open_source("webdataset", tars)
    opened = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_os_open(path, *a, **k))
    read = [source.encoded(index) for index in range(len(source))]
    assert sorted(opened) == [str(tars / "00000.tar"), str(tars / "00001.tar")]
    monkeypatch.undo()
    assert read[6] == pickle.loads(pickle.dumps(source)).encoded(6) == copy.copy(source).encoded(6)
    assert read[0].startswith(b"\x89PNG") and len(set(read)) == 10


def test_a_pattern_the_shell_expanded_is_a_short_line_that_says_to_quote_it(run_tl, tmp_path):
    """`--data laion/{00000..99999}.tar` unquoted reaches tl as 100,000 arguments: one short line, not a
    line that lists every tar."""
    tars = [tmp_path / f"{k:05d}.tar" for k in range(1000)]
    result = run_tl("extract", "--format", "webdataset", "--data", *tars, "--out", tmp_path / "c")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and len(lines[0]) < 400, lines[0][:500]
    assert lines[0].startswith(f"error: Got 999 unexpected extra arguments ({tars[1]} {tars[2]} ...); the shell "
                               "expanded a pattern into one argument per tar: quote it")
    assert run_tl("extract", "--data", "a", "b", "--out", tmp_path / "c").err.startswith(
        "error: Got unexpected extra argument (b) (see")
    spaced = [f"my tars/{k}.tar" for k in range(5)]  # a path with a space is one argument, not two
    assert run_tl("extract", "--format", "webdataset", "--data", *spaced, "--out", tmp_path / "c").err.startswith(
        "error: Got 4 unexpected extra arguments (my tars/1.tar my tars/2.tar ...); the shell expanded")
    upper = [tmp_path / f"SHARD{k}.TAR" for k in range(5)]  # a camera card's names: tars too (7c696a9)
    assert "the shell expanded a pattern into one argument per tar" in run_tl(
        "extract", "--format", "webdataset", "--data", *upper, "--out", tmp_path / "c").err


def test_labels_without_an_image_are_a_warning(tmp_path):
    """A tar of images in a format not listed (.tif) gives no samples: its labels say so, not silence."""
    tars = write_webdataset(tmp_path, tars=1, per_tar=4, classes=2)
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    write_tar(tars / "00001.tar", [("a.tif", picture), ("a.cls", b"0"), ("b.tif", picture), ("b.cls", b"1")])
    source = open_source("webdataset", tars)
    assert len(source) == 4 and source.warnings == [
        "2 .cls label files name a key without an image (looked for .jpg, .jpeg, .png, .webp, .ppm, .bmp), "
        f"the first a.cls in {tars / '00001.tar'}; no sample was listed for them"]
    assert open_source("webdataset", tars / "00000.tar").warnings == []


def test_an_empty_tar_is_a_warning(tmp_path):
    tars = write_webdataset(tmp_path, tars=1, per_tar=4, classes=2)
    write_tar(tars / "00001.tar", [])
    source = open_source("webdataset", tars)
    assert len(source) == 4 and source.warnings == [f"{tars / '00001.tar'} is an empty tar (no entries); it was skipped"]
    with pytest.raises(DataError, match=r"hold no images .*; .*00001.tar is an empty tar \(no entries\)"):
        open_source("webdataset", tars / "00001.tar")


def test_a_tar_cut_inside_an_image_and_listing_problems_under_on_error_fail(tmp_path):
    """An image the cut runs through is said to be cut short (its label would follow the cut), not to
    lack a label; --on-error fail names a listing problem as one, not as an image that cannot decode."""
    picture = write_image(tmp_path / "p.png", seed=1, size=(64, 64)).read_bytes()
    tar = write_tar(tmp_path / "cut" / "00000.tar", [("a.png", picture), ("a.cls", b"0"), ("b.png", picture),
                                                      ("b.cls", b"1"), ("c.png", picture), ("c.cls", b"1")])
    import tarfile
    with tarfile.open(tar) as whole:
        b = [member for member in whole if member.name == "b.png"][0]
    whole = tar.read_bytes()
    tar.write_bytes(whole[:b.offset_data + 512])  # the cut falls just after b.png, before b.cls
    assert open_source("webdataset", tar).samples[1].location.endswith("cut short after b.png, before its label b.cls")
    tar.write_bytes(whole[:b.offset_data + b.size // 2])  # the cut runs through b.png
    source = open_source("webdataset", tar)
    problems = [s.location.split("\0")[3] for s in source.samples]
    assert problems == ["", "00000.tar is cut short inside b.png, before its label b.cls"], problems
    with pytest.raises(TLError, match=r"^cannot use 00000.tar/b: 00000.tar is cut short inside b.png, before its "
                                      r"label b.cls; fix the tar, or pass --on-error skip$"):
        extract(tar, tmp_path / "c", format="webdataset", on_error="fail")
    missing = write_tar(tmp_path / "m" / "00001.tar", [("a.png", picture), ("a.cls", b"0"), ("b.png", picture)])
    with pytest.raises(TLError, match=r"^cannot use 00001.tar/b: no label \(b.cls is missing\); fix the tar, or "
                                      r"pass --on-error skip$"):
        extract(missing, tmp_path / "m2", format="webdataset", on_error="fail")
    beyond = write_tar(tmp_path / "k" / "00002.tar", [("a.png", picture), ("a.cls", b"0"), ("b.png", picture),
                                                      ("b.cls", b"5")])
    with pytest.raises(TLError, match=r"^cannot use 00002.tar/b: its label 5 is not one of the classes given by "
                                      r"--classes; name its class in --classes, or pass --on-error skip$"):
        extract(beyond, tmp_path / "k2", format="webdataset", on_error="fail", classes="x,y")


def test_a_tar_that_puts_labels_first_cut_before_an_image_says_so_once(tmp_path, monkeypatch):
    """A tar of KEY.cls before KEY.png (tar --sort=name) cut after b.cls, in or before b.png's header, said
    both that it was damaged and that '1 .cls label files name a key without an image (looked for .jpg, ...)',
    as if b's image were of a format not listed: b is now a skipped sample whose image was cut off, and the
    damage is the one warning. A label of a truly missing image before the cut is still counted as one."""
    import tarfile

    from pipeline.formats import webdataset

    picture = write_image(tmp_path / "p.png", seed=1, size=(64, 64)).read_bytes()
    members = [("a.cls", b"0"), ("a.png", picture), ("x.cls", b"1"), ("x.tif", picture), ("b.cls", b"1"),
               ("b.png", picture), ("c.cls", b"1"), ("c.png", picture)]
    tar = write_tar(tmp_path / "cut" / "00000.tar", members)
    with tarfile.open(tar) as whole:
        b = [member for member in whole if member.name == "b.png"][0]
    whole = tar.read_bytes()
    damaged = f"{tar} is damaged after 5 entries (it ends without the end-of-archive blocks); the entries before were listed"
    unpaired = ("1 .cls label files name a key without an image (looked for .jpg, .jpeg, .png, .webp, .ppm, .bmp), "
                f"the first x.cls in {tar}; no sample was listed for them")
    for cut in (b.offset, b.offset + 100):  # just before b.png's header, inside it
        tar.write_bytes(whole[:cut])
        for listed_by in ("scan_tar", "tarfile"):
            if listed_by == "tarfile":
                monkeypatch.setattr(webdataset, "scan_tar", lambda *args: None)
            source = open_source("webdataset", tar)
            assert source.warnings == [damaged, unpaired], (cut, listed_by, source.warnings)
            assert [(s.sample_id, s.target, s.location.split("\0")[3]) for s in source.samples] == [
                ("00000.tar/a", 0, ""), ("00000.tar/b", -1, "00000.tar is cut short after b.cls, before its image")]
            monkeypatch.undo()
    result = extract(tar, tmp_path / "c", format="webdataset")
    assert [(item["sample_id"], item["reason"]) for item in result.skipped] == [
        ("00000.tar/b", "00000.tar is cut short after b.cls, before its image")]
    tar.write_bytes(whole[:b.offset_data + 100])  # inside b.png's data: b is listed, and its read says it is cut
    assert open_source("webdataset", tar).warnings == [damaged.replace("after 5 entries (it ends without the "
                                                                       "end-of-archive blocks)", "after 6 entries "
                                                                       "(unexpected end of data)"), unpaired]


def test_listings_of_the_earlier_version_are_kept_but_for_a_tar_cut_short(tmp_path, monkeypatch):
    """Listings changed (VERSION 2) for tars cut short only (the labels-first cut above), but every kept listing
    was ignored: the first run after the upgrade read the headers of every tar of the data set again. A version-1
    listing of a whole tar is taken; one of a cut tar is listed again, and the samples are the fresh listing's."""
    from pipeline.formats import tar_headers, webdataset

    tars = write_webdataset(tmp_path, tars=3, per_tar=4)
    whole = (tars / "00002.tar").read_bytes()
    (tars / "00002.tar").write_bytes(whole[:len(whole) // 2])
    folder = tmp_path / "listings"
    open_source("webdataset", tars, listings=folder).listings.save()
    for kept in folder.iterdir():  # as the earlier tl wrote them (the same content: whole tars list alike)
        head, body = kept.read_bytes().split(b"\n", 1)
        kept.write_bytes(json.dumps({**json.loads(head), "version": 1}).encode() + b"\n" + body)
    reads = []
    monkeypatch.setattr(webdataset, "scan_tar", lambda handle, *args: reads.append(handle) or
                        tar_headers.scan_tar(handle, *args))
    again = open_source("webdataset", tars, listings=folder)
    assert len(reads) == 1 and again.listings.reused == 2, (len(reads), again.listings.reused)
    fresh = open_source("webdataset", tars)
    assert (again.samples, again.warnings, again.fingerprint()) == (fresh.samples, fresh.warnings, fresh.fingerprint())


def test_patterns_keys_and_splits_that_find_no_tars_say_why(tmp_path):
    tars = write_webdataset(tmp_path, tars=2, per_tar=2, classes=2)
    with pytest.raises(DataError, match=r"a \{ in .*\{00000..00001.tar is not closed by a \}; write ranges as"):
        open_source("webdataset", str(tars / "{00000..00001.tar"))
    with pytest.raises(DataError, match=r"a \} in .*00000..00001\}\{a.tar closes no \{"):
        open_source("webdataset", str(tars / "00000..00001}{a.tar"))
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    dotted = write_tar(tmp_path / "d" / "00000.tar", [("img.001.jpg", picture), ("img.001.cls", b"0")])
    with pytest.raises(DataError, match=r"hold no images: a key ends at the first dot, so img.001.jpg is key img with "
                                        r"extension .001.jpg; rename the files to KEY.jpg with no dot in KEY"):
        open_source("webdataset", dotted)
    (tmp_path / "split").mkdir()
    for split in ("train", "test"):
        write_webdataset(tmp_path / split, tars=1, per_tar=2, classes=2).rename(tmp_path / "split" / split)
    assert len(open_source("webdataset", tmp_path / "split", split="test")) == 2
    with pytest.raises(DataError, match=r"split has no split folder 'val', but has test, train; pass --split with one"):
        open_source("webdataset", tmp_path / "split", split="val")


def test_a_fifo_named_like_a_tar_is_skipped_or_refused_never_waited_on(tmp_path):
    """tarfile.open on a FIFO blocks for ever: a folder's is skipped with a warning, a named one refused."""
    tars = write_webdataset(tmp_path, tars=1, per_tar=2, classes=2)
    os.mkfifo(tars / "00001.tar")
    source = open_source("webdataset", tars)
    assert len(source) == 2 and source.warnings == [
        f"{tars / '00001.tar'} is not a regular file (a FIFO, a device or a folder); it was skipped"]
    with pytest.raises(DataError, match=r"00001.tar of .*\{00000,00001\}.tar is not a regular file \(a FIFO"):
        open_source("webdataset", str(tars / "{00000,00001}.tar"))
    with pytest.raises(DataError, match=r"^data path .*00001.tar is not a regular file \(a FIFO, a device or a "
                                        r"folder\); pass --data with a tar"):
        open_source("webdataset", tars / "00001.tar")
    (tmp_path / "lone").mkdir()
    os.mkfifo(tmp_path / "lone" / "00000.tar")
    with pytest.raises(DataError, match=r"no .tar files in .*lone; .* is not a regular file"):
        open_source("webdataset", tmp_path / "lone")
    (tars / "00001.tar").unlink()
    (tars / "00002.tar").symlink_to(tmp_path / "gone.tar")  # missing, not a FIFO
    assert open_source("webdataset", tars).warnings == [f"{tars / '00002.tar'} is a link to nothing; it was skipped"]


def _listed(data, **options) -> tuple:
    source = open_source("webdataset", data, **options)
    return source.classes, source.samples, source.warnings


def test_the_fast_header_reader_lists_what_tarfile_lists(tmp_path, monkeypatch):
    """pipeline.formats.tar_headers reads plain ustar tars and leaves every other tar to tarfile: the two
    give the same samples, labels, problems and warnings (pax and GNU long names, ustar prefixes, folders,
    repeated keys, a cut tar, a file that is not a tar, an empty tar)."""
    import io
    import tarfile

    from pipeline.formats import tar_headers, webdataset

    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    long = "deep/" * 25 + "k"  # over 100 bytes: a ustar prefix, a pax or a GNU long name
    members = [("a.png", picture), ("a.cls", b"0"), ("sub/b.png", picture), ("sub/b.cls", b"1"), (f"{long}.png", picture),
               (f"{long}.cls", b"1"), ("c.png", picture), ("c.cls", b"x"), ("c.jpg", picture), ("n.001.jpg", picture),
               ("é.png", picture), ("é.cls", b"0"), ("d.png", picture)]
    folder = tmp_path / "t"
    folder.mkdir()
    for number, kind in enumerate((tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)):
        with tarfile.open(folder / f"{number:05d}.tar", "w", format=kind) as tar:
            directory = tarfile.TarInfo("sub")
            directory.type, directory.mtime = tarfile.DIRTYPE, 1_700_000_000
            tar.addfile(directory)
            for name, data in members:
                if kind == tarfile.USTAR_FORMAT and name.startswith("é"):
                    continue
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    whole = (folder / "00000.tar").read_bytes()
    (folder / "00003.tar").write_bytes(whole[:len(whole) // 2])  # cut short
    (folder / "00004.tar").write_bytes(b"not a tar at all" * 100)
    write_tar(folder / "00005.tar", [])
    fast = _listed(folder)
    monkeypatch.setattr(webdataset, "scan_tar", lambda *args: None)
    assert _listed(folder) == fast and len(fast[1]) > 20
    monkeypatch.undo()
    fallbacks = []
    monkeypatch.setattr(webdataset, "scan_tar", lambda *args: fallbacks.append(tar_headers.scan_tar(*args)))
    _listed(folder)
    assert [found is not None for found in fallbacks] == [True, False, False, False, False, True]



def test_tar_listings_are_kept_reused_and_redone_when_their_tar_changes_or_they_are_damaged(tmp_path, monkeypatch):
    """extract keeps each tar's listing in OUT/listings: a second run reads no tar header and lists the
    same samples, labels, problems, warnings, shard plan and fingerprint; a changed tar, or a damaged or
    foreign listing file, is listed again (and its file replaced)."""
    from pipeline.formats import tar_headers, webdataset

    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    tars = write_webdataset(tmp_path, tars=3, per_tar=4)
    write_tar(tars / "00003.tar", [("a.png", picture), ("a.cls", b"1"), ("b.png", picture), ("b.cls", b"x"),
                                   ("n.001.jpg", picture), ("t.tif", picture), ("t.cls", b"0"), ("c.png", picture)])
    (tars / "00004.tar").write_bytes(b"not a tar at all" * 100)
    reads = []
    monkeypatch.setattr(webdataset, "scan_tar", lambda handle, *args: reads.append(handle) or
                        tar_headers.scan_tar(handle, *args))

    def listed(**options):
        reads.clear()
        source = open_source("webdataset", tars, listings=tmp_path / "c" / "listings", **options)
        source.listings.save()
        return (source.classes, source.samples, source.warnings, source.shard_plan(3), source.fingerprint()), len(reads)

    plain = open_source("webdataset", tars)
    expected = (plain.classes, plain.samples, plain.warnings, plain.shard_plan(3), plain.fingerprint())
    assert len(expected[2]) == 2  # the non-tar and the unpaired label
    first = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    assert sorted(path.name for path in (tmp_path / "c" / "listings").iterdir()) == sorted(
        listing_file(tmp_path / "c" / "listings", tar).name for tar in sorted(tars.glob("*.tar")))
    assert listed() == (expected, 0)  # the tar that is not one too: its listing is its warning
    with pytest.raises(DataError, match="has a readable .txt label"):
        listed(label_key="txt")
    assert len(reads) == 5  # another label key lists every tar again
    again = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    assert (again.shards_written, again.shards_reused, again.rows) == (0, first.shards_written, first.rows)
    members = [(f"{k:06d}.png", picture) for k in (4, 5)]
    write_tar(tars / "00001.tar", [m for k, m in zip((4, 5), members) for m in (m, (f"{k:06d}.cls", b"2"))])
    os.utime(tars / "00001.tar", ns=(1, 2))
    plain = open_source("webdataset", tars)
    expected = (plain.classes, plain.samples, plain.warnings, plain.shard_plan(3), plain.fingerprint())
    assert listed() == (expected, 1)  # the changed tar only
    folder = tmp_path / "c" / "listings"
    kept = listing_file(folder, tars / "00000.tar")
    head, body = kept.read_bytes().split(b"\n", 1)
    for damaged in (head + b"\n" + body.replace(b"000001", b"000009"), head[:40], b"", b"\xff\xfe", b"[]\n{}"):
        kept.write_bytes(damaged)
        assert listed() == (expected, 1)  # ignored, listed again and written again
        assert kept.read_bytes().split(b"\n", 1)[1] == body
    assert TarListings(folder, "cls").save() == 0  # nothing pending: nothing written
    rerun = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    assert rerun.shards_dropped and listed()[1] == 0  # the changed tar redone; its listing kept again


def test_listings_waiting_to_be_kept_are_held_compressed(tmp_path):
    """A run held every listing it made as JSON (some 40 bytes an image, beside the samples' 38) until the cache
    was opened and the listings could be kept: they wait compressed, and are written as they were."""
    from pipeline.datasets import file_stamp

    tar = write_webdataset(tmp_path, tars=1, per_tar=1) / "00000.tar"
    listing = {"entries": [[f"{i:09d}", 512 * i, 30_000 + i, i % 1000, None] for i in range(5000)], "notes": [],
               "dotted": "", "unpaired": [0, ""]}
    listings = TarListings(tmp_path / "listings", "cls")
    listings.add(0, tar, file_stamp(tar), listing)
    body = json.dumps(listing, separators=(",", ":")).encode()
    assert sum(len(content) for *_, content in listings.pending) < len(body) / 2
    assert listings.save() == 1 and not listings.pending
    assert listing_file(tmp_path / "listings", tar).read_bytes().split(b"\n", 1)[1] == body
    assert TarListings(tmp_path / "listings", "cls").load(tar, file_stamp(tar)) == listing


def test_a_run_that_stops_before_its_first_shard_takes_its_listings_with_the_folder_it_made(tmp_path):
    tar = write_tar(tmp_path / "t" / "00000.tar", [("a.png", b"\x89PNG not really"), ("a.cls", b"0")])
    with pytest.raises(TLError, match="cannot decode 00000.tar/a"):
        extract(tar, tmp_path / "c", format="webdataset", on_error="fail")
    assert not (tmp_path / "c").exists()


def test_a_listing_file_that_is_a_link_or_a_fifo_is_not_read_but_redone(tmp_path, monkeypatch):
    """OUT/listings holds files tl names itself: a link planted there is never followed (a link to /dev/zero
    filled the memory; one to a listing elsewhere was taken), and a FIFO is never opened for reading (it
    blocked the run): the tar is listed again and a regular file replaces the planted one."""
    from pipeline.formats import tar_headers, webdataset

    tars = write_webdataset(tmp_path, tars=1, per_tar=3)
    folder = tmp_path / "c" / "listings"
    source = open_source("webdataset", tars, listings=folder)
    source.listings.save()
    kept = listing_file(folder, tars / "00000.tar")
    outside = tmp_path / "elsewhere.json"
    kept.rename(outside)
    reads = []
    monkeypatch.setattr(webdataset, "scan_tar", lambda *args: reads.append(1) or tar_headers.scan_tar(*args))
    for plant in (lambda: kept.symlink_to(outside), lambda: kept.symlink_to("/dev/zero"), lambda: os.mkfifo(kept)):
        kept.unlink(missing_ok=True)
        plant()
        reads.clear()
        again = open_source("webdataset", tars, listings=folder)
        assert again.samples == source.samples and len(reads) == 1
        again.listings.save()
        assert not kept.is_symlink() and kept.read_bytes() == outside.read_bytes()


def test_listings_that_cannot_be_kept_are_a_warning_not_a_stopped_run(tmp_path, monkeypatch):
    """The listings only speed up the next run: a full disk, or OUT/listings that is not a folder tl can write,
    leaves the extraction going (a resume of a finished cache was refused for them) and says so."""
    from pipeline.files import DiskFullError
    from pipeline.formats import tar_listings

    tars = write_webdataset(tmp_path, tars=2, per_tar=3)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "listings").write_text("not a folder")
    result = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    assert result.rows == 6 and f"2 tar listings were not kept in {tmp_path / 'c' / 'listings'} (it is not a folder); " \
        "remove it, or the next run lists those tars again too" in result.warnings  # not mkdir's "(File exists)"
    assert "listings" not in json.dumps(cache_document(tmp_path / "c").get("warnings", []))  # this run's, not the cache's

    one = write_webdataset(tmp_path / "one", tars=1, per_tar=3)
    source = open_source("webdataset", one, listings=tmp_path / "e" / "listings")
    planted = listing_file(tmp_path / "e" / "listings", one / "00000.tar")
    planted.mkdir(parents=True)
    assert source.listings.save() == 0 and source.listings.notes == [  # it said "1 tar listings were not kept"
        f"1 tar listing was not kept in {planted.parent} ({planted} is a folder, where tl writes a tar listing); the next "
        "run lists those tars again"]

    def full(path, *args, **options):
        raise DiskFullError(f"no space left on the device of {path}; free space and re-run the same command")

    monkeypatch.setattr(tar_listings, "atomic_write", full)
    source = open_source("webdataset", tars, listings=tmp_path / "d" / "listings")
    assert source.listings.save() == 0 and source.listings.notes == [
        f"2 tar listings were not kept in {tmp_path / 'd' / 'listings'} (no space left on the device of "
        f"{listing_file(tmp_path / 'd' / 'listings', tars / '00000.tar')}); the next run lists those tars again"]


def test_a_kept_listing_is_redone_when_its_tar_is_replaced_with_the_same_size_and_mtime(tmp_path):
    """A relabelled tar of the same size whose mtime was set back (touch -d, cp -p) keeps its stamp: listed, its
    new labels still change the fingerprint, so a kept listing must not pin the old labels (and their offsets)."""
    tars = write_webdataset(tmp_path, tars=1, per_tar=3)
    tar = tars / "00000.tar"
    folder = tmp_path / "c" / "listings"
    open_source("webdataset", tars, listings=folder).listings.save()
    before = os.stat(tar)
    with tarfile.open(tar) as old:  # labels 0, 1, 2 become 2, 0, 1: the same bytes but for the labels
        members = [(m.name, old.extractfile(m).read()) for m in old]
    swapped = {b"0": b"2", b"1": b"0", b"2": b"1"}
    replacement = write_tar(tmp_path / "new.tar", [(name, swapped[data] if name.endswith(".cls") else data)
                                                   for name, data in members])
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    replacement.replace(tar)
    assert os.stat(tar).st_size == before.st_size  # the stamp `size:mtime_ns` the fingerprint takes is the same
    plain = open_source("webdataset", tars)
    again = open_source("webdataset", tars, listings=folder)
    assert again.samples == plain.samples and again.listings.reused == 0


def test_tars_named_in_upper_case_are_listed(tmp_path):
    """A folder of SHARD.TAR files (a camera card, a Windows copy) held 'no .tar files', and one .TAR among
    .tar files was left out without a word; a split folder of .TAR files was not offered as a split."""
    tars = write_webdataset(tmp_path, tars=3, per_tar=2, classes=2)
    (tars / "00001.tar").rename(tars / "00001.TAR")
    (tars / "00002.tar").rename(tars / "00002.Tar")
    (tars / ".00003.TAR").write_bytes(b"hidden")
    assert [sample.sample_id.split("/")[0] for sample in open_source("webdataset", tars).samples] == \
        ["00000.tar"] * 2 + ["00001.TAR"] * 2 + ["00002.Tar"] * 2
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tars / "00001.TAR").rename(tmp_path / "split" / "train" / "00001.TAR")
    with pytest.raises(DataError, match=r"split has no split folder 'val', but has train; pass --split with one"):
        open_source("webdataset", tmp_path / "split", split="val")


def _inputs_before_columns(classes, samples, shard_rows) -> tuple:
    """(fingerprint, shard plan) as Source computed them from a list of Sample objects, before TarSamples: the
    reference a cache made then is checked against (a run over the same tars must find it up to date)."""
    import hashlib
    import itertools

    from cache.manifest import PlannedShard

    def inputs(sample) -> bytes:
        return f"{sample.sample_id}\0{sample.target}\0{sample.stamp}\n".encode("utf-8", "surrogateescape")

    whole = hashlib.sha256(json.dumps(classes).encode() + b"".join(map(inputs, samples))).hexdigest()
    tar_of = [sample.location.split("\0")[0] for sample in samples]
    runs = [list(run) for _, run in itertools.groupby(range(len(samples)), tar_of.__getitem__)]
    plan = [PlannedShard(first, min(run[-1] + 1, first + shard_rows) - first,
                         hashlib.sha256(b"".join(map(inputs, samples[first:min(run[-1] + 1, first + shard_rows)])))
                         .hexdigest(), unit)
            for unit, run in enumerate(runs) for first in range(run[0], run[-1] + 1, shard_rows)]
    return whole, plan


def test_samples_are_columns_that_say_what_the_sample_list_said(tmp_path):
    """A billion images took a Python Sample each (some 280 bytes: hundreds of GB on every rank); the samples of
    tars are now columns (TarSamples), a Sample made when asked for. What they say is what the list said, read
    here from the tars with tarfile: ids (a key that is not UTF-8 too), targets, locations with the listing's
    problem, stamps; and the fingerprint and shard digests are those the list gave, so a cache made before
    stays up to date; after --samples-per-class, an out-of-order keep and a pickle too."""
    import copy
    import pickle
    import tarfile

    from pipeline.datasets import Sample
    from pipeline.formats.tar_samples import TarSamples

    tars = write_webdataset(tmp_path, tars=3, per_tar=5)
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    write_tar(tars / "00003.tar", [("a.png", picture), ("a.cls", b"1"), ("\udcffb.png", picture), ("\udcffb.cls", b"0"),
                                   ("c.png", picture)])
    expected = []
    for path in sorted(tars.iterdir()):
        status = path.stat()
        with tarfile.open(path) as tar:
            labels = {member.name[:-4]: int(tar.extractfile(member).read()) for member in tar
                      if member.name.endswith(".cls")}
            for member in tar:
                if member.name.endswith(".png"):
                    key = member.name[:-4]
                    problem = "" if key in labels else f"no label ({key}.cls is missing)"
                    expected.append(Sample(f"{path.name}/{key}", labels.get(key, -1),
                                           f"{path}\0{member.offset_data}\0{member.size}\0{problem}",
                                           f"{status.st_size}:{status.st_mtime_ns}"))
    source = open_source("webdataset", tars)
    assert isinstance(source.samples, TarSamples) and len(source.samples) == len(expected) == 18
    assert list(source.samples) == expected and source.samples == expected and expected == source.samples
    assert source.samples[-1] == expected[-1] and source.samples[15:17] == expected[15:17]
    with pytest.raises(IndexError):
        source.samples[18]
    assert source.listing_problem(17) == "no label (c.cls is missing); fix the tar"
    assert (source.fingerprint(), source.shard_plan(2)) == _inputs_before_columns(source.classes, expected, 2)
    part = copy.copy(source)
    part.keep([17, 2, 16, 3, 15])
    kept = [expected[i] for i in (17, 2, 16, 3, 15)]
    assert part.samples == kept and part.listing_problem(0) and not part.listing_problem(4)
    assert (part.fingerprint(), part.shard_plan(2)) == _inputs_before_columns(source.classes, kept, 2)
    source.subset(1, seed=0)
    assert len(source) == 3 and source.samples == [sample for sample in expected if sample in source.samples]
    assert (source.fingerprint(), source.shard_plan(4)) == _inputs_before_columns(source.classes, source.samples[:], 4)
    assert pickle.loads(pickle.dumps(part)).samples == kept


def test_joining_the_tars_frees_each_tars_columns_and_makes_no_second_copy():
    """Joining the tars' columns made whole copies beside them (each column concatenated from a list of shifted
    copies, sizes narrowed after): the peak was some 130 bytes an image against 38 held. Each tar's columns were
    then copied into place and freed, but every joined column was made before the first was filled: the peak
    was the tars' columns and the joined ones (110 bytes an image), and the tars held class numbers as Python
    ints (28 bytes each). One column is now joined at a time, and a tar's columns are narrow: the peak is the
    tars' columns and one joined column, not two copies of each."""
    import gc
    import tracemalloc

    from pipeline.formats.tar_samples import TarEntries, TarSamples

    per_tar, count = 20_000, 4
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tars = [(f"/d/{n}.tar", f"{n}.tar", "1:2", TarEntries([[f"{n * per_tar + i:09d}", 512 * i, 30_000 + i, i % 3,
                                                               None if i % 7 else "cut"] for i in range(per_tar)]))
                for n in range(count)]
        listed = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        samples = TarSamples.joined(tars, lambda label: (label, None))
        held, peak = (value - base for value in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    images = per_tar * count
    assert len(samples) == images and all(len(entries) == 0 for *_, entries in tars)
    # the tars freed: what is held is the joined columns alone (about what the tars held), not both
    assert held < 1.3 * listed and peak < listed + held / 2, (listed, held, peak)
    assert listed < 34 * images, listed  # keys 9, offsets 8, key ends, sizes and label numbers 4 each
    assert samples.sample_id(per_tar + 5) == f"1.tar/{per_tar + 5:09d}" and samples.where(images - 1)[1:3] == (
        512 * (per_tar - 1), 30_000 + per_tar - 1)
    assert samples.targets[per_tar + 4] == 1 and samples.problem(per_tar * 2 + 7) == "cut"
    assert samples.sizes.dtype == np.uint32 and samples.runs()[2] == (2 * per_tar, 3 * per_tar)
    # a rank's shards are a few runs of rows: their keys are sliced from the blob (a gather took 8 bytes a key byte)
    ranges = [(5, 3000), (per_tar + 7, per_tar + 2000)]
    rows = np.concatenate([np.arange(*pair) for pair in ranges])
    taken = samples.take(rows)
    assert bytes(taken.keys) == b"".join(samples.keys[samples.key_ends[a]:samples.key_ends[b]] for a, b in ranges)
    assert [taken.sample_id(i) for i in range(len(rows))] == [samples.sample_id(i) for i in rows.tolist()]
    scattered = rows[::7]  # many runs of one: gathered
    assert [samples.take(scattered).sample_id(i) for i in range(len(scattered))] == [
        samples.sample_id(i) for i in scattered.tolist()]


def test_joined_key_ends_are_64_bit_past_2_gib_of_keys(monkeypatch):
    """A tar's key ends are held as int32 until joined, where each tar's are shifted by the key bytes of the tars
    before it. Under numpy 1 (setup.cfg allows numpy>=1.24) an int32 array plus a numpy int64 that fits in int32
    stays int32: the ends of the tar whose keys cross 2 GiB of keys (some 200 million images) wrapped negative,
    and its samples got other ids (and shard digests). The shift is made in 64 bits. The 2 GiB of keys before it
    are a stand-in (a length, and a joined blob that takes no bytes): only the ends are checked."""
    from pipeline.formats import tar_samples
    from pipeline.formats.tar_samples import TarEntries, TarSamples

    before = 2**31 - 2  # fits int32: numpy 1 keeps int32 + this int32

    class Keys:
        def __len__(self):
            return before

    class Blob:
        def __init__(self, size):
            self.size = size

        def __setitem__(self, where, value):
            assert where.stop <= self.size

    first, second = TarEntries([["a", 0, 1, 0, None]]), TarEntries([[key, 0, 1, 0, None] for key in ("abc", "de", "f")])
    first.keys, first.key_ends = Keys(), np.array([before], np.int32)
    monkeypatch.setattr(tar_samples, "bytearray", Blob, raising=False)
    samples = TarSamples.joined([("/d/0.tar", "0.tar", "1:2", first), ("/d/1.tar", "1.tar", "1:2", second)],
                                lambda label: (label, None))
    assert samples.key_ends.tolist() == [0, before, before + 3, before + 5, before + 6]


def test_a_rank_holds_only_the_samples_it_extracts_numbered_as_in_the_whole(tmp_path):
    """Under torchrun every rank of tl extract held every tar's samples (38 bytes an image: a billion images
    on each rank). Once the shard plan is made from the whole, a rank holds those of the shards it extracts
    (Source.hold), still numbered as in the whole: each answers as before, and one it does not hold is an
    error, not another sample (nor a quiet end of iterating)."""
    import pickle

    tars = write_webdataset(tmp_path, tars=4, per_tar=5)
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    write_tar(tars / "00004.tar", [("a.png", picture), ("a.cls", b"1"), ("c.png", picture)])  # c: no label
    whole, part = open_source("webdataset", tars), open_source("webdataset", tars)
    plan = part.shard_plan(2)
    ranges = [(shard.first, shard.first + shard.samples) for shard in plan if shard.unit % 2 == 1]
    assert ranges == [(5, 7), (7, 9), (9, 10), (15, 17), (17, 19), (19, 20)]  # tars 1 and 3
    part.hold(ranges[1:])  # a resumed rank: the first shard of tar 1 was written before
    held = [index for first, stop in ranges[1:] for index in range(first, stop)]
    assert len(part.samples.held) == len(held) == 8 and len(part) == len(whole) == 22
    for index in held:
        assert part.samples[index] == whole.samples[index] and part.encoded(index) == whole.encoded(index)
        assert part.listing_problem(index) == whole.listing_problem(index)
    for index in (0, 5, 6, 10, 14, 21, -1):
        with pytest.raises(LookupError, match="another torchrun rank extracts it"):
            part.samples[index]
    with pytest.raises(LookupError):
        list(part.samples)
    last = open_source("webdataset", tars)
    last.hold([(20, 22)])
    assert last.listing_problem(21) == "no label (c.cls is missing); fix the tar" and last.listing_problem(20) is None
    assert pickle.loads(pickle.dumps(last)).samples[-1] == whole.samples[21]


def _ranks_opening(monkeypatch, size: int, *args, shard_rows=3, **options) -> list:
    """(source, shard plan, targets) of open_source(*args, **options) of tl extract on each of `size` torchrun
    ranks, as threads whose distributed.each_rank gathers through a barrier (as torch's all_gather_object does
    between processes)."""
    import pickle
    import threading

    from pipeline import distributed

    barrier, values, opened = threading.Barrier(size, timeout=60), [None] * size, [None] * size

    def each_rank(current, work):
        value = work()
        if not current.distributed:
            return [value]
        barrier.wait()
        values[current.rank] = value
        barrier.wait()
        sent = pickle.dumps(values)
        assert b"TarEntries" not in sent  # a tar's count and labels, never its columns
        gathered = pickle.loads(sent)  # each rank its own copy, as torch's pickles give
        barrier.wait()
        return gathered

    def rank(number):
        try:
            source = open_source(*args, world=distributed.World(number, size), own_share=True, **options)
            opened[number] = (source, source.shard_plan(shard_rows), source.targets())
        except BaseException as exc:
            barrier.abort()  # the other ranks stop waiting
            opened[number] = exc

    monkeypatch.setattr(distributed, "each_rank", each_rank)
    threads = [threading.Thread(target=rank, args=(number,)) for number in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in opened:
        if isinstance(answer, BaseException) and not isinstance(answer, threading.BrokenBarrierError):
            raise answer
    return opened


@pytest.mark.parametrize("size", [2, 3])
def test_extract_ranks_exchange_tar_summaries_and_hold_their_own_tars_samples(tmp_path, monkeypatch, size):
    """Under torchrun every rank of tl extract received every tar's columns (the whole data set on each rank,
    38 bytes an image, and its pickles) before keeping its own. The ranks now send each other each tar's count
    and labels; a rank holds the samples of the tars it lists (those it extracts), numbered as in the whole;
    the shard digests each rank computes for its tars are exchanged. Classes, warnings, shard plan and every
    digest equal one process's, with --samples-per-class (the targets gathered, 4 bytes an image) too; a tar
    without samples (empty) keeps the next tars with the ranks that list them."""
    from pipeline.formats.tar_samples import HeldSamples

    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    tars = write_webdataset(tmp_path, tars=6, per_tar=4)
    write_tar(tars / "00001.tar", [])  # an empty tar: no samples, a warning
    write_tar(tars / "00006.tar", [("a.png", picture), ("a.cls", b"1"), ("c.png", picture)])  # c: no label
    for per_class in (None, 2):
        whole = open_source("webdataset", tars, samples_per_class=per_class)
        plan = [(shard.first, shard.samples, shard.inputs) for shard in whole.shard_plan(3)]
        ranks = _ranks_opening(monkeypatch, size, "webdataset", tars, samples_per_class=per_class)
        held = []
        for number, (source, ranked_plan, targets) in enumerate(ranks):
            assert (source.classes, source.warnings, len(source)) == (whole.classes, whole.warnings, len(whole))
            assert [(shard.first, shard.samples, shard.inputs) for shard in ranked_plan] == plan
            assert (targets == whole.targets()).all()
            # the samples of the tars it listed: those of its shards (a tar's unit is its number)
            own = [(shard.first, shard.first + shard.samples) for shard in ranked_plan if shard.unit % size == number]
            indices = [index for first, stop in own for index in range(first, stop)]
            assert isinstance(source.samples, HeldSamples) and len(source.samples.held) == len(indices)
            assert all(int(source.samples.sample_id(index)[:5]) % size == number for index in indices)
            for index in indices:
                assert source.samples[index] == whole.samples[index]
                assert source.listing_problem(index) == whole.listing_problem(index)
            held += indices
            source.hold(own[1:])  # a resumed rank: its first shard was written before
            assert [source.samples[index] for index in indices[own[0][1] - own[0][0]:]] == [
                whole.samples[index] for index in indices[own[0][1] - own[0][0]:]]
            with pytest.raises(LookupError, match="another torchrun rank extracts it"):
                source.samples[indices[0]]
        assert sorted(held) == list(range(len(whole)))
    assert "00001.tar is an empty tar" in " ".join(whole.warnings) and len(whole) == 2 * len(whole.classes)


def test_fingerprint_and_shard_digests_are_those_of_caches_made_before(tmp_path, monkeypatch):
    """A cache's shards are matched by their inputs' digests: the digests of one data set, computed by the code
    that made the caches out there (pinned below, from tars of fixed sizes and mtimes), stay what they were,
    opened by one process or by ranks that exchange summaries, with --samples-per-class too; else every cache
    of a billion images would be extracted again."""
    tars = write_webdataset(tmp_path, tars=3, per_tar=5)
    picture = write_image(tmp_path / "p.png", seed=1).read_bytes()
    write_tar(tars / "00003.tar", [("a.png", picture), ("a.cls", b"1"), ("\udcffb.png", picture),
                                   ("\udcffb.cls", b"0"), ("c.png", picture)])
    for number, tar in enumerate(sorted(tars.iterdir())):
        os.utime(tar, ns=(1, 1_700_000_000_000_000_000 + number))
    assert [tar.stat().st_size for tar in sorted(tars.iterdir())] == [20480, 20480, 20480, 10240]
    pinned = {None: ("e3c347c13e62b2e4b7ac348660515cc739a051f84866eadda983b6a8ffc73016", [
        (0, 4, "731442080d7c"), (4, 1, "11a53835efc0"), (5, 4, "079db9ab1f28"), (9, 1, "294ca91c2bc6"),
        (10, 4, "f2260f21bc0b"), (14, 1, "3a10d377efb4"), (15, 3, "7618053cf961")]),
        2: ("51303fa3bf8513690311af290c7b5d892831ae6ee5e90ef71ddf69aca5c428ab", [
            (0, 2, "449b976c705b"), (2, 1, "294ca91c2bc6"), (3, 2, "8f9c71f4bafb"), (5, 1, "bca46fca4c3a")])}
    for per_class, (fingerprint, plan) in pinned.items():
        source = open_source("webdataset", tars, samples_per_class=per_class)
        assert source.fingerprint() == fingerprint
        assert [(shard.first, shard.samples, shard.inputs[:12]) for shard in source.shard_plan(4)] == plan
        whole = [(shard.first, shard.samples, shard.inputs) for shard in source.shard_plan(4)]
        for _, ranked, _ in _ranks_opening(monkeypatch, 2, "webdataset", tars, samples_per_class=per_class, shard_rows=4):
            assert [(shard.first, shard.samples, shard.inputs) for shard in ranked] == whole


def test_listings_of_tars_gone_from_the_data_are_removed_once_the_new_ones_are_kept(tmp_path):
    """OUT/listings keeps one file per tar: a tar removed from --data took its listing nowhere, and it stayed
    for ever. The run that opens the cache removes it; other files there (not listings: a temporary of a
    rank on another node, a user's) are left as they are."""
    tars = write_webdataset(tmp_path, tars=3, per_tar=4)
    folder = tmp_path / "c" / "listings"
    extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    names = {tar.name: listing_file(folder, tar).name for tar in sorted(tars.glob("*.tar"))}
    assert sorted(path.name for path in folder.iterdir()) == sorted(names.values())
    others = [folder / "notes.txt", folder / f".{names['00001.tar']}.tmp-{2 ** 22 + 12345}-0000beef"]
    for path in others:
        path.write_text("not a listing")
    (tars / "00001.tar").unlink()
    again = extract(tars, tmp_path / "c", format="webdataset", shard_rows=3)
    assert again.rows == 8
    assert sorted(path.name for path in folder.iterdir() if path not in others) == sorted(
        [names["00000.tar"], names["00002.tar"]])
    assert all(path.read_text() == "not a listing" for path in others)


def test_listings_are_not_removed_before_the_tars_are_found(tmp_path):
    """Before the tars are found, a TarListings knows of none: removing 'the others' would remove all."""
    tars = write_webdataset(tmp_path, tars=2, per_tar=2)
    source = open_source("webdataset", tars, listings=tmp_path / "listings")
    source.listings.save()
    assert source.listings.remove_others() == 0
    idle = TarListings(tmp_path / "listings", "cls")
    assert idle.remove_others() == 0 and len(list((tmp_path / "listings").iterdir())) == 2
