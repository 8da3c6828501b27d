"""Faults found by the fault campaign (issue #11) in reading data: CIFAR batches that run code or are not
batches, symlink loops and dangling links, names that are not UTF-8, bad VOC boxes, empty labels."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from types import FunctionType

import numpy as np
import pytest

from pipeline.datasets import DECODE_ERRORS, FileListSource
from pipeline.formats import open_source
from pipeline.formats.voc import VocSource
from pipeline.errors import DataError
from pipeline.examples import write_shapes_voc, write_voc_annotation
from tests.conftest import make_image_folder, write_cifar10, write_gtsrb, write_image


class OpensAFile:
    """Unpickled by the standard unpickler, this creates the file at `path` (a harmless stand-in for code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class RunsACommand:
    def __init__(self, path: Path):
        self.command = f"touch {path}"

    def __reduce__(self):
        return os.system, (self.command,)


def rewrite(path: Path, content, protocol=pickle.DEFAULT_PROTOCOL) -> None:
    path.write_bytes(pickle.dumps(content, protocol=protocol))


def cifar_batch(rows=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"batch_label": "x", "labels": [int(v) for v in rng.integers(0, 10, rows)],
            "data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8), "filenames": ["a.png"] * rows}


# --- 1. CIFAR-10 batches are read with a restricted unpickler ---------------------------------------------

@pytest.mark.parametrize("payload", [OpensAFile, RunsACommand])
@pytest.mark.parametrize("target", ["batches.meta", "data_batch_1"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_file_that_would_run_code_is_refused(tmp_path, payload, target, protocol):
    root = write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    path = root / "cifar-10-batches-py" / target
    if target == "batches.meta":
        rewrite(path, {"label_names": payload(marker)}, protocol)
    else:
        rewrite(path, {**cifar_batch(), "labels": payload(marker)}, protocol)
    with pytest.raises(DataError, match=f"{target} is not a readable CIFAR-10 python file .*refers to") as error:
        open_source("cifar10", root, split="train")
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_cifar_garbage_and_truncated_batches_are_data_errors(tmp_path, damage):
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    content = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\x01this is not a pickle" * 10, "truncated": content[: len(content) // 2],
                      "empty": b""}[damage])
    with pytest.raises(DataError, match="data_batch_2 is not a readable CIFAR-10 python file"):
        open_source("cifar10", root, split="train")
    assert len(open_source("cifar10", root, split="test")) == 6  # the other split does not read that batch


@pytest.mark.parametrize("batch, message", [
    ({"data": np.zeros((6, 3072), np.uint8)}, "has no 'labels' entry"),
    ([1, 2, 3], "holds a list, not a CIFAR-10 dict"),
    ({"data": np.zeros((6, 100), np.uint8), "labels": [0] * 6}, r"'data' is uint8 \(6, 100\), not rows of 3072"),
    ({"data": np.zeros((6, 3072), np.float32), "labels": [0] * 6}, "'data' is float32"),
    ({"data": "pixels", "labels": [0] * 6}, "'data' is str"),
    ({"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 5}, "'labels' is not one integer per row"),
    ({"data": np.zeros((6, 3072), np.uint8), "labels": ["cat"] * 6}, "'labels' is not one integer per row"),
    ({"data": np.zeros((6, 3072), np.uint8), "labels": [0, 1, 2, 3, 4, 10]}, r"labels outside 0\.\.9"),
])
def test_cifar_batch_of_the_wrong_shape(tmp_path, batch, message):
    root = write_cifar10(tmp_path)
    rewrite(root / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(DataError, match=f"test_batch.*{message}"):
        open_source("cifar10", root, split="test")


def test_cifar_full_size_file_must_be_the_official_one(tmp_path):
    root = write_cifar10(tmp_path)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        handle.truncate(31035704)  # the official size of data_batch_1, but zeros (a sparse file)
    with pytest.raises(DataError, match=r"data_batch_1 is not the official CIFAR-10 file \(md5 mismatch\); "
                                        "download it again"):
        open_source("cifar10", root, split="train")


def test_cifar_fixture_reads_as_before(tmp_path):
    root = write_cifar10(tmp_path)
    folder = root / "cifar-10-batches-py"
    train = open_source("cifar10", root, split="train")
    expected_pixels, expected_labels = [], []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as handle:  # the test's own file: trusted
            batch = pickle.load(handle)
        expected_pixels.append(batch["data"])
        expected_labels += batch["labels"]
    expected = np.concatenate(expected_pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert [s.target for s in train.samples] == expected_labels
    for i in range(len(train)):
        np.testing.assert_array_equal(np.asarray(train.read_image(i)), expected[i])
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    assert train.warnings == []


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_bytes_keys_and_other_protocols_read(tmp_path, protocol):
    """A batch read with encoding='bytes' and pickled again has bytes keys and names; protocol 2 pickles
    bytes through _codecs.encode, protocol 5 arrays through _frombuffer."""
    root = write_cifar10(tmp_path)
    folder = root / "cifar-10-batches-py"
    batch = cifar_batch(rows=4, seed=7)
    rewrite(folder / "test_batch", {b"data": batch["data"], b"labels": batch["labels"], b"batch_label": b"x"},
            protocol)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    rewrite(folder / "batches.meta", {b"label_names": names}, protocol)
    test = open_source("cifar10", root, split="test")
    assert test.classes[1] == "car" and [s.target for s in test.samples] == batch["labels"]
    expected = batch["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(test.read_image(3)), expected)


class Python2Pickler(pickle._Pickler):
    """Writes what python 2's cPickle wrote in the official batches: byte strings as STRING opcodes (text
    when read with encoding latin1) and numpy 1's module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or "numpy.core.multiarray"
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(module, module)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[FunctionType] = save_global


def test_cifar_python2_batches_read(tmp_path):
    root = write_cifar10(tmp_path)
    folder = root / "cifar-10-batches-py"
    batch = cifar_batch(rows=3, seed=4)
    for name, content in [("test_batch", {b"data": batch["data"], b"labels": batch["labels"], b"batch_label": b"x"}),
                          ("batches.meta", {b"label_names": [b"plane"] + [b"other"] * 9, b"num_vis": 3072})]:
        with open(folder / name, "wb") as handle:
            Python2Pickler(handle, protocol=2).dump(content)
    content = (folder / "test_batch").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in content and b"_codecs" not in content
    test = open_source("cifar10", root, split="test")
    assert test.classes[0] == "plane" and [s.target for s in test.samples] == batch["labels"]
    expected = batch["data"][2].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(test.read_image(2)), expected)


# --- 2. symlink loops and dangling links ----------------------------------------------------------------

def test_symlink_loop_is_walked_once_with_one_warning(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=(8, 8))
    (root / "a" / "loop").symlink_to("..")  # the old walk listed 328 rows here
    source = open_source("imagefolder", root)
    assert len(source) == 8
    assert [s.target for s in source.samples] == [0] * 4 + [1] * 4
    assert source.warnings == [f"symlink loop at {root / 'a' / 'loop'} skipped"]
    (root / "b" / "deep").mkdir()
    (root / "b" / "deep" / "again").symlink_to("../..")
    source = open_source("imagefolder", root)
    assert len(source) == 8
    assert source.warnings == [f"2 symlink loops skipped, the first at {root / 'a' / 'loop'}"]


def test_an_image_reached_twice_is_listed_once(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, size=(8, 8))
    (root / "b" / "copy.png").symlink_to("../a/img00.png")  # the same file under two classes
    (root / "a" / "sub").symlink_to("../b")  # a folder listed as its own class too
    (root / "c").symlink_to("a")  # a class folder that is another class folder
    source = open_source("imagefolder", root)
    assert source.classes == ["a", "b", "c"]
    assert [(s.sample_id, s.target) for s in source.samples] == [
        ("a/img00.png", 0), ("a/img01.png", 0), ("b/img00.png", 1), ("b/img01.png", 1)]
    assert source.warnings == [
        f"2 symlinked folders lead to a folder already listed and were skipped, the first at {root / 'a' / 'sub'}",
        "1 image files reached a second time through symlinks were listed once",
        "class folder c holds no images"]


def test_dangling_and_self_links_are_listed_and_skipped_when_decoded(tmp_path):
    from pipeline.image_sets import DecodedImages

    root = make_image_folder(tmp_path / "data", classes=("a",), per_class=2, size=(8, 8))
    (root / "a" / "gone.jpg").symlink_to("nowhere.jpg")
    (root / "a" / "self.jpg").symlink_to("self.jpg")
    source = open_source("imagefolder", root)
    assert [s.sample_id for s in source.samples] == ["a/gone.jpg", "a/img00.png", "a/img01.png", "a/self.jpg"]
    assert [s.stamp for s in source.samples][::3] == ["missing", "missing"]
    source.fingerprint()
    for index in (0, 3):
        with pytest.raises(DECODE_ERRORS):
            source.read_image(index)
    decoded = DecodedImages(source, lambda image: image)
    assert decoded[0][0] is None and decoded[0][2].startswith("FileNotFoundError")
    assert decoded[3][0] is None and decoded[3][2]
    assert decoded[1][2] == ""


def test_a_fifo_or_a_device_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    """A FIFO named like an image blocked the decoding of a folder until something wrote to it (tl extract and
    tl predict hung), and a link to /dev/zero is read without end by the byte-reading (GPU decoding) path:
    both are unreadable files, skipped and recorded as such, at once."""
    import signal

    from pipeline.image_sets import DecodedImages

    root = make_image_folder(tmp_path / "data", classes=("a",), per_class=1, size=(8, 8))
    os.mkfifo(root / "a" / "pipe.jpg")
    (root / "a" / "zero.png").symlink_to("/dev/zero")
    source = open_source("imagefolder", root)
    assert [s.sample_id for s in source.samples] == ["a/img00.png", "a/pipe.jpg", "a/zero.png"]

    def waited(signum, frame):  # not an OSError, which decoding would record as one more unreadable file
        pytest.fail("blocked on a file that is not an image")

    before = signal.signal(signal.SIGALRM, waited)
    signal.alarm(10)
    try:
        decoded = DecodedImages(source, lambda image: image)
        for index in (1, 2):
            assert decoded[index][0] is None and decoded[index][2] == (
                "OSError: not a regular file (a FIFO, socket or device)"), decoded[index]
            with pytest.raises(OSError, match="not a regular file"):
                source.encoded(index)
        assert decoded[0][2] == "" and len(source.encoded(0)) > 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_an_image_is_checked_on_its_open_file_not_by_a_stat_beside_it(tmp_path, monkeypatch):
    """The FIFO check stat'ed every image before opening it: a second metadata round trip per image on a
    network file system. The open file itself is checked now (fstat); a bad file keeps its message."""
    from pipeline.datasets import open_rgb

    root = make_image_folder(tmp_path / "data", classes=("a",), per_class=1, size=(8, 8))
    (root / "a" / "bad.png").write_bytes(b"not an image")
    source = open_source("imagefolder", root)

    def refused(*args, **kwargs):
        raise AssertionError("os.stat called while decoding")

    monkeypatch.setattr(os, "stat", refused)
    assert source.read_image(1).size == (8, 8) and len(source.encoded(1)) > 0
    with pytest.raises(OSError, match=r"^cannot identify image file '.*bad\.png'$"):
        open_rgb(str(root / "a" / "bad.png"))


def test_file_list_with_a_loop_and_a_dangling_link(tmp_path):
    folder = tmp_path / "pics"
    write_image(folder / "one.png", 1, size=(8, 8))
    (folder / "loop").symlink_to(".")
    (folder / "gone.png").symlink_to("missing.png")
    source = FileListSource([folder])
    assert [Path(s.sample_id).name for s in source.samples] == ["gone.png", "one.png"]
    assert source.warnings == [f"symlink loop at {folder / 'loop'} skipped"]


# --- 3. names that are not UTF-8; CSV encodings -----------------------------------------------------------

def test_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "data"
    folder = root / os.fsdecode(b"caf\xe9")
    try:
        write_image(folder / os.fsdecode(b"img\xff.png"), 1, size=(8, 8))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    write_image(root / "plain" / "x.png", 2, size=(8, 8))
    (root / "empty\udcff").mkdir()
    source = open_source("imagefolder", root)
    assert source.classes == [os.fsdecode(b"caf\xe9"), "empty\udcff", "plain"]
    assert source.samples[0].sample_id == os.fsdecode(b"caf\xe9/img\xff.png")
    assert len(source.fingerprint()) == 64
    assert source.read_image(0).size == (8, 8)
    assert source.warnings == ["class folder empty\\xff holds no images"]
    assert len(FileListSource([folder]).fingerprint()) == 64


def test_csv_that_is_not_utf8(tmp_path):
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    (tmp_path / "labels.csv").write_bytes(b"a.jpg,caf\xe9\n")
    with pytest.raises(DataError, match="labels.csv is not UTF-8 text; save it as UTF-8"):
        open_source("csv", tmp_path / "labels.csv")


def test_csv_with_a_byte_order_mark(tmp_path):
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    (tmp_path / "labels.csv").write_bytes("\ufeffpath,label\na.jpg,café\n".encode())
    source = open_source("csv", tmp_path / "labels.csv")
    assert source.classes == ["café"] and [s.sample_id for s in source.samples] == ["a.jpg"]
    (tmp_path / "bare.csv").write_bytes("\ufeffa.jpg,cat\n".encode())  # no header: the BOM is not in the path
    assert [s.sample_id for s in open_source("csv", tmp_path / "bare.csv").samples] == ["a.jpg"]


def test_csv_with_a_nul_byte_is_one_line(tmp_path):
    """Python's csv reads NUL bytes since 3.11 (before, csv.Error): one in a path stopped tl extract with a
    traceback (ValueError: embedded null byte), one in a label made a class of it. Either is one line now, as
    Python 3.10's csv.Error is."""
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    for text in (b"a.jpg,cat\na\0.jpg,dog\n", b"a.jpg,cat\0\n"):
        (tmp_path / "labels.csv").write_bytes(text)
        with pytest.raises(DataError, match=r"labels.csv.* NUL"):
            open_source("csv", tmp_path / "labels.csv")



def test_csv_naming_a_symlink_loop_is_one_line(tmp_path):
    """A row naming a link to itself stopped tl extract with a traceback (RuntimeError: Symlink loop, from
    Path.resolve); it is an image that does not exist, as a dangling link is."""
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "labels.csv").write_text("a.jpg,cat\nloop.jpg,dog\n")
    with pytest.raises(DataError, match="labels.csv line 2: image loop.jpg does not exist"):
        open_source("csv", tmp_path / "labels.csv")


def test_csv_header_after_blank_lines_is_a_header(tmp_path):
    """The path,label header was looked for on line 1 only: after a blank line it was read as a row, and tl
    extract stopped with 'line 2: image path does not exist'."""
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    for text in ("\npath,label\na.jpg,cat\n", "\ufeff \r\n\r\nPath,Label\r\na.jpg,cat\r\n"):
        (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
        source = open_source("csv", tmp_path / "labels.csv")
        assert source.classes == ["cat"] and [s.sample_id for s in source.samples] == ["a.jpg"]
    (tmp_path / "labels.csv").write_text("a.jpg,cat\npath,label\n")  # a row first: a later path,label is a row
    with pytest.raises(DataError, match="line 2: image path does not exist"):
        open_source("csv", tmp_path / "labels.csv")


def test_csv_row_without_a_path_says_so(tmp_path):
    """A row with a label and no path (',dog') named the CSV's folder: 'line 2:  is a folder, not an image file'."""
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    (tmp_path / "labels.csv").write_text("a.jpg,cat\n  ,dog\n")
    with pytest.raises(DataError, match="labels.csv line 2: no image path before the label; write path,label$"):
        open_source("csv", tmp_path / "labels.csv")


def test_a_fifo_in_csv_data_is_not_said_to_be_missing(tmp_path):
    """A FIFO given as the CSV, or named by a row, was said not to exist. The CSV is refused as not a regular file;
    a row's FIFO is an unreadable image, skipped and recorded when read, as in an image folder."""
    from pipeline.image_sets import DecodedImages

    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match="pipe.csv is not a regular file .*; pass --data with a file of path,label"):
        open_source("csv", tmp_path / "pipe.csv")
    (tmp_path / "labels.csv").write_text("a.jpg,cat\npipe.jpg,dog\n")
    source = open_source("csv", tmp_path / "labels.csv")
    assert [s.sample_id for s in source.samples] == ["a.jpg", "pipe.jpg"]
    decoded = DecodedImages(source, lambda image: image)
    assert decoded[0][2] == "" and decoded[1][2] == "OSError: not a regular file (a FIFO, socket or device)"


def test_csv_quote_left_open_is_one_line_naming_its_row(tmp_path):
    """A quote left open made one field of the rows after it: the error printed them all, one per line ('line 2:
    image b.jpg,dog<newline>a.jpg,cat ... does not exist'), or said 'expected path,label' of the rest of the file."""
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    for tail in ('x",cat\na.jpg,cat\n', ""):
        (tmp_path / "labels.csv").write_text('a.jpg,cat\n"b.jpg,dog\n' + "a.jpg,cat\n" * 20 + tail)
        with pytest.raises(DataError) as refused:
            open_source("csv", tmp_path / "labels.csv")
        assert str(refused.value) == (f"{tmp_path / 'labels.csv'} line 2: a quoted field runs on over several lines; "
                                      'close its quote (") and write each row on one line')


def test_csv_quotes_after_a_space_quote(tmp_path):
    """Rows written `path, label` with a quoted label (`b.jpg, "dog, big"`) kept the quotes and cut the label at its
    comma: a class '"dog' (the rest of the label dropped unsaid), and '"cat"' beside the 'cat' of other rows."""
    write_image(tmp_path / "a b.jpg", 1, size=(8, 8))
    write_image(tmp_path / "b.jpg", 2, size=(8, 8))
    write_image(tmp_path / "c.jpg", 3, size=(8, 8))
    (tmp_path / "labels.csv").write_text('path, label\n"a b.jpg", "cat"\nb.jpg, "dog, big"\nc.jpg,cat\n')
    source = open_source("csv", tmp_path / "labels.csv")
    assert source.classes == ["cat", "dog, big"] and [s.target for s in source.samples] == [0, 1, 0]

# --- 4. VOC boxes and annotation files ----------------------------------------------------------------------

def test_voc_unusable_boxes_are_skipped_and_counted(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 2})
    nan, inf = float("nan"), float("inf")
    write_voc_annotation(base, "000001", [
        ("disc", (5, 5, 40, 40)),  # fine
        ("bar", (40, 5, 5, 40)),  # reversed x
        ("bar", (5, 40, 40, 5)),  # reversed y
        ("bar", (nan, 5, 40, 40)),
        ("bar", (5, 5, inf, 40)),
        ("bar", (130, 5, 150, 40)),  # right of the 120 px wide image
        ("bar", (5, -50, 40, -10)),  # above it
        ("square", (-10, 5, 40, 40)),  # reaches outside: clipped, kept
    ], (120, 90))
    source = VocSource(base, "trainval", "auto")
    annotation = source.annotations[0]
    np.testing.assert_array_equal(annotation.boxes, [[5, 5, 40, 40], [0, 5, 40, 40]])
    assert [source.classes[i] for i in annotation.labels] == ["disc", "square"]
    assert np.isfinite(annotation.boxes).all()
    assert source.warnings == ["1 boxes reached outside their image and were clipped to it",
                               "6 boxes were reversed, not finite or outside their image and were skipped"]


@pytest.mark.parametrize("obj, missing", [
    ("<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>", "<name>"),
    ("<name> </name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>", "<name>"),
    ("<name>disc</name>", "<bndbox>"),
    ("<name>disc</name><bndbox><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>", "<xmin>"),
    ("<name>disc</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax></ymax></bndbox>", "<ymax>"),
])
def test_voc_annotation_missing_an_element(tmp_path, obj, missing):
    base = write_shapes_voc(tmp_path, {"trainval": 2})
    xml = base / "Annotations" / "000002.xml"
    good = "<object><name>disc</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    xml.write_text(f"<annotation><size><width>120</width><height>90</height></size>{good}<object>{obj}</object>"
                   "</annotation>")
    with pytest.raises(DataError, match=f"000002.xml: <object> 2 has no {missing}; fix the annotation file"):
        VocSource(base, "trainval", "auto")


def test_voc_size_that_is_not_finite(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 1})
    write_voc_annotation(base, "000001", [("disc", (5, 5, 40, 40))], ("inf", 90))
    with pytest.raises(DataError, match="cannot read .*000001.xml"):
        VocSource(base, "trainval", "auto")


def test_gtsrb_lists_that_do_not_parse_are_data_errors(tmp_path):
    root = write_gtsrb(tmp_path)
    test_list = root / "gtsrb" / "GT-final_test.csv"
    test_list.write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;48;40\n")
    with pytest.raises(DataError, match="cannot read GTSRB test"):
        open_source("gtsrb", root, split="test")
    test_list.write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;48;40;1;1;47;39;99\n")
    with pytest.raises(DataError, match="class of 00000.ppm is not a class number 0..42"):
        open_source("gtsrb", root, split="test")
    write_image(root / "gtsrb" / "GTSRB" / "Training" / "extra" / "x.ppm", 1, size=(8, 8))
    with pytest.raises(DataError, match="GTSRB train folder extra is not a class number"):
        open_source("gtsrb", root, split="train")


# --- 5. empty labels and empty class folders -------------------------------------------------------------------

def test_csv_rows_with_an_empty_label_are_skipped_and_recorded(tmp_path):
    write_image(tmp_path / "a.jpg", 1, size=(8, 8))
    write_image(tmp_path / "b.jpg", 2, size=(8, 8))
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,\nb.jpg,cat\nc.jpg, \n")
    source = open_source("csv", tmp_path / "labels.csv")
    assert source.classes == ["cat"] and [s.sample_id for s in source.samples] == ["b.jpg"]
    assert source.warnings == [f"skipped 2 rows of {tmp_path / 'labels.csv'} with an empty label"]


def test_empty_class_folder_keeps_its_index_and_warns(tmp_path):
    make_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=1, size=(8, 8))
    make_image_folder(tmp_path / "test", classes=("a", "c"), per_class=1, size=(8, 8))
    (tmp_path / "test" / "b").mkdir()
    test = open_source("imagefolder", tmp_path, split="test")
    assert test.classes == open_source("imagefolder", tmp_path, split="train").classes == ["a", "b", "c"]
    assert [s.target for s in test.samples] == [0, 2]
    assert test.warnings == ["class folder b holds no images"]


def test_a_class_folder_linked_under_another_name_never_takes_the_real_ones_images(tmp_path):
    """Found by the second fault campaign: `0b -> b` sorts first and used to claim b's images."""
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    (root / "0b").symlink_to(root / "b")
    source = open_source("imagefolder", root)
    by_class = {name: [s.sample_id for s in source.samples if source.classes[s.target] == name]
                for name in source.classes}
    assert by_class["b"] == ["b/img00.png", "b/img01.png"] and by_class["0b"] == []
    assert any("0b" in warning for warning in source.warnings)
