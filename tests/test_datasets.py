"""Data sources read the real layouts; every image mode becomes 8-bit RGB; subsets are seeded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import DECODE_ERRORS, open_rgb, to_rgb
from pipeline.formats import open_source
from pipeline.errors import DataError
from tests.conftest import make_image_folder, write_cifar10, write_gtsrb, write_image


def test_imagefolder_lists_classes_and_ids(image_folder):
    source = open_source("imagefolder", image_folder)
    assert source.classes == ["cat", "dog", "fox"]
    assert [s.sample_id for s in source.samples[:2]] == ["cat/img00.png", "cat/img01.png"]
    assert [s.target for s in source.samples] == [0] * 4 + [1] * 4 + [2] * 4


def test_hidden_folders_are_left_out_at_every_depth(tmp_path):
    """A class's .thumbnails (or a NAS's .@__thumb) held copies that became training images of the class,
    and tl predict labelled them; hidden class folders and files were already left out."""
    from pipeline.datasets import FileListSource

    root = make_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=2)
    for hidden in (root / "cat" / ".thumbnails", root / "dog" / "trip" / ".@__thumb", root / ".hidden"):
        write_image(hidden / "copy.png", seed=1)
    write_image(root / "dog" / "trip" / "beach.png", seed=2)  # a plain sub-folder is still read
    source = open_source("imagefolder", root)
    assert [s.sample_id for s in source.samples] == ["cat/img00.png", "cat/img01.png", "dog/img00.png",
                                                     "dog/img01.png", "dog/trip/beach.png"]
    listed = FileListSource([str(root)])  # what tl predict labels
    assert len(listed) == 5 and not any("/." in s.sample_id for s in listed.samples), [s.sample_id for s in listed.samples]


def test_imagefolder_uses_the_split_folder_when_present(tmp_path):
    make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    make_image_folder(tmp_path / "test", classes=("a", "b"), per_class=1)
    assert len(open_source("imagefolder", tmp_path, split="test")) == 2
    assert len(open_source("imagefolder", tmp_path, split="train")) == 4
    with pytest.raises(DataError, match="has no split folder 'tset', but has test, train; pass --split"):
        open_source("imagefolder", tmp_path, split="tset")  # would have made the splits its classes
    assert open_source("imagefolder", tmp_path / "train", split="test").classes == ["a", "b"]  # no splits: itself
    vehicles = make_image_folder(tmp_path / "vehicles", classes=("bus", "car", "train", "tram"), per_class=1)
    assert open_source("imagefolder", vehicles, split="test").classes == ["bus", "car", "train", "tram"]


def test_csv_source_reads_paths_relative_to_the_csv(tmp_path):
    write_image(tmp_path / "pics" / "a.jpg", 1)
    write_image(tmp_path / "pics" / "b.jpg", 2)
    (tmp_path / "labels.csv").write_text("path,label\npics/a.jpg,zebra\npics/b.jpg,ant\n")
    source = open_source("csv", tmp_path / "labels.csv")
    assert source.classes == ["ant", "zebra"]
    assert [(s.sample_id, s.target) for s in source.samples] == [("pics/a.jpg", 1), ("pics/b.jpg", 0)]
    assert source.read_image(0).size == (48, 40)


def test_csv_keeps_an_image_once_and_skips_one_with_two_labels(tmp_path):
    make_image_folder(tmp_path / "pics", classes=("x",), per_class=3)
    (tmp_path / "labels.csv").write_text("pics/x/img00.png,one\n./pics/x/img00.png,one\npics/x/img01.png,zero\n"
                                         "pics/x/img02.png,one\npics/x/img01.png,one\n")
    source = open_source("csv", tmp_path / "labels.csv")
    assert [(s.sample_id, source.classes[s.target]) for s in source.samples] == [("pics/x/img00.png", "one"),
                                                                                 ("pics/x/img02.png", "one")]
    assert source.warnings == [
        f"left out 1 row of {tmp_path / 'labels.csv'} repeating an image with its label",  # not '1 rows', '1 images'
        f"skipped 1 image of {tmp_path / 'labels.csv'} given two labels, e.g. pics/x/img01.png (lines 3 and "
        "5); give each image one label"]
    (tmp_path / "labels.csv").write_text("pics/x/img00.png,one\npics/x/img00.png,two\n")
    with pytest.raises(DataError, match="gives every image two labels"):
        open_source("csv", tmp_path / "labels.csv")


def test_csv_naming_a_missing_image(tmp_path):
    (tmp_path / "labels.csv").write_text("gone.jpg,cat\n")
    with pytest.raises(DataError, match="line 1: image gone.jpg does not exist"):
        open_source("csv", tmp_path / "labels.csv")
    (tmp_path / "pics").mkdir()  # a folder was said not to exist: the user looked for a file that was there
    (tmp_path / "labels.csv").write_text("pics,cat\n")
    with pytest.raises(DataError, match="line 1: pics is a folder, not an image file; name one image per row"):
        open_source("csv", tmp_path / "labels.csv")


def test_a_csv_or_tar_given_as_an_image_folder_names_the_format_to_pass(tmp_path):
    """'tl extract --data list.csv' (no --format) said only 'is not a folder; pass --data with the folder of
    class folders'; now it names --format csv (a tar: --format webdataset). Another file is told as before."""
    for name, fix in (("list.csv", "; or --format csv for its path,label rows"),
                      ("00000.tar", "; or --format webdataset for tar shards"), ("photo.jpg", "")):
        (tmp_path / name).write_text("x")
        with pytest.raises(DataError) as refused:
            open_source("imagefolder", tmp_path / name, "train")
        assert str(refused.value) == (f"data path {tmp_path / name} is not a folder; pass --data with the folder of "
                                      f"class folders{fix}")


def test_a_folder_given_as_a_csv_is_not_said_to_be_missing(tmp_path):
    """'--format csv --data photos' (a folder) said 'CSV file photos does not exist', though it does."""
    with pytest.raises(DataError) as refused:
        open_source("csv", tmp_path, "train")
    assert str(refused.value) == (f"CSV file {tmp_path} is a folder; pass --data with a file of path,label rows, or "
                                  "--format imagefolder for a folder of class folders")


def test_classes_given_to_a_format_that_finds_its_own_is_refused_not_ignored(tmp_path):
    """'tl extract --data photos --classes a,b' extracted every class folder, the list dropped unsaid, as
    --label-key on such data is refused; the default (voc) is not a choice the user made."""
    make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=1)
    with pytest.raises(DataError) as refused:
        open_source("imagefolder", tmp_path / "images", "train", classes="a,b")
    assert str(refused.value) == ("--classes is for voc, webdataset data, not imagefolder, whose classes are found in "
                                  "the data; leave it out")
    assert open_source("imagefolder", tmp_path / "images", "train").classes == ["a", "b", "c"]


def test_cifar10_reader_on_real_format_batches(tmp_path):
    root = write_cifar10(tmp_path)
    train = open_source("cifar10", root, split="train")
    test = open_source("cifar10", root / "cifar-10-batches-py", split="test")
    assert len(train) == 30 and len(test) == 6
    assert train.classes[3] == "cat"
    # pixel (row 0, col 0) of the first training image is bytes 0, 1024, 2048 of its row (R, G, B planes)
    import pickle

    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle)
    pixel = np.asarray(train.read_image(0))[0, 0]
    assert pixel.tolist() == [batch["data"][0][0], batch["data"][0][1024], batch["data"][0][2048]]
    assert train.samples[0].target == batch["labels"][0]


def test_cifar10_missing_suggests_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 python batches not found.*; fetch them with tl extract --download"):
        open_source("cifar10", tmp_path, split="train")


def test_gtsrb_reader_on_torchvision_layout(tmp_path):
    root = write_gtsrb(tmp_path)
    train = open_source("gtsrb", root, split="train")
    assert len(train.classes) == 43
    # targets are the folder numbers even though classes 1 and 3..41 have no folder here
    assert sorted({s.target for s in train.samples}) == [0, 2, 42]
    test = open_source("gtsrb", root, split="test")
    assert [s.target for s in test.samples] == [5, 42, 0]
    assert test.read_image(1).mode == "RGB"


def test_a_gtsrb_download_that_fails_says_so_not_that_the_files_are_bad(tmp_path, monkeypatch):
    """Offline, torchvision's URLError (an OSError) was 'cannot read GTSRB train from DIR: <urlopen error
    ...>; download the train set again', which is what had just failed."""
    import socket
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for split, archives in (("train", "GTSRB-Training_fixed.zip by hand"),
                            ("test", "GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip by hand")):
        with pytest.raises(DataError) as failed:
            open_source("gtsrb", tmp_path, split=split, download=True)
        assert str(failed.value).startswith(f"cannot download GTSRB {split} into {tmp_path / 'gtsrb'} ([Errno -3] "
                                            "Temporary failure in name resolution); check the network, or fetch "
                                            + archives), failed.value
    with pytest.raises(DataError, match="GTSRB train images not found .*; fetch it with tl extract --download$"):
        open_source("gtsrb", tmp_path, split="train")


def test_samples_per_class_is_stratified_and_seeded(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=5, size=(8, 8))
    first = open_source("imagefolder", folder, samples_per_class=2, seed=1)
    again = open_source("imagefolder", folder, samples_per_class=2, seed=1)
    other = open_source("imagefolder", folder, samples_per_class=2, seed=2)
    assert np.bincount([s.target for s in first.samples]).tolist() == [2, 2, 2]
    assert [s.sample_id for s in first.samples] == [s.sample_id for s in again.samples]
    assert [s.sample_id for s in first.samples] != [s.sample_id for s in other.samples]
    assert first.fingerprint() != other.fingerprint()
    assert not [line for line in first.warnings if "samples-per-class" in line]
    for extra in sorted((folder / "b").iterdir())[:3]:  # b keeps 2, c 5 of the 4 asked
        extra.unlink()
    (folder / "a" / "img00.png").unlink()
    short = open_source("imagefolder", folder, samples_per_class=4, seed=1)
    assert np.bincount([s.target for s in short.samples]).tolist() == [4, 2, 4]
    assert "--samples-per-class 4: 1 of 3 classes have fewer images (b has the fewest, 2); all were kept" \
        in short.warnings


def test_fingerprint_changes_when_a_file_changes(image_folder):
    before = open_source("imagefolder", image_folder).fingerprint()
    write_image(image_folder / "cat" / "img00.png", seed=999, size=(50, 41))
    assert open_source("imagefolder", image_folder).fingerprint() != before


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = write_image(tmp_path / f"img.{fmt.lower()}", seed=0, mode=mode, fmt=fmt)
    image = open_rgb(str(path))
    assert image.mode == "RGB" and image.size == (48, 40)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    rgb = np.asarray(open_rgb(str(tmp_path / "deep.png")))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_over_white():
    image = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(image)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_a_colour_key_is_transparency_too(tmp_path):
    """A gray or RGB PNG marks its transparent pixels by one colour (tRNS), as a palette PNG marks an entry:
    those pixels are composited over white as well; they kept the key's colour (here near black)."""
    for mode, key in (("RGB", (10, 20, 30)), ("L", 10)):
        image = Image.new(mode, (2, 1), key)
        image.putpixel((1, 0), (40, 50, 60) if mode == "RGB" else 40)
        image.save(tmp_path / f"{mode}.png", transparency=key)
        pixels = np.asarray(open_rgb(str(tmp_path / f"{mode}.png"))).tolist()
        assert pixels == [[[255, 255, 255], [40, 50, 60] if mode == "RGB" else [40, 40, 40]]], mode


def write_keyed_png(path, values, depth: int, key: tuple[int, ...]):
    """A PNG of gray (H, W) or RGB (H, W, 3) `values` stored at `depth` bits per sample with the transparent
    colour `key` (tRNS), written chunk by chunk: Pillow writes neither 2- and 4-bit gray nor 16-bit colour."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    values = np.asarray(values)
    rows = values.reshape(len(values), -1)
    if depth == 16:
        packed = rows.astype(">u2").view(np.uint8)
    else:  # samples of 1, 2 or 4 bits, the first in the high bits of each byte
        packed = np.packbits(np.unpackbits(rows.astype(np.uint8)[..., None], axis=-1)[..., 8 - depth:].reshape(
            len(rows), -1), axis=-1)
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], depth, 2 if values.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
                     + chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row.tobytes() for row in packed)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("depth, values, key, expected", [
    (1, [[0, 1, 0]], (0,), [255, 255, 255]),
    (2, [[0, 1, 3]], (1,), [0, 255, 255]),
    (4, [[0, 1, 15]], (1,), [0, 255, 255]),
    (4, [[0, 3, 8]], (8,), [0, 51, 255]),
    (16, [[1000, 60000, 257]], (1000,), [255, 233, 1]),
    (16, [[(100, 100, 100), (25700, 25700, 25700), (60000, 0, 0)]], (100, 100, 100),
     [(255, 255, 255), (100, 100, 100), (234, 0, 0)]),
    (16, [[(40000, 40000, 40000), (40100, 40000, 40000), (256, 512, 768)]], (40000, 40000, 40000),
     [(255, 255, 255), (156, 156, 156), (1, 2, 3)])])
def test_a_colour_key_at_any_depth_is_transparency_as_at_eight_bits(tmp_path, depth, values, key, expected):
    """The colour key (tRNS) of a 1-bit, 2- or 4-bit or 16-bit PNG was left in its colour (1-bit black, 16-bit
    gray), was missed (2- and 4-bit gray: Pillow scales the pixels, not the key) or, in 16-bit colour, whitened
    the pixels whose high bytes equal the key's values (25700 reads as 100) and kept the key's own: now its
    pixels, and only they, are composited over white, as in an 8-bit PNG."""
    path = write_keyed_png(tmp_path / "keyed.png", values, depth, key)
    pixels = np.asarray(open_rgb(str(path)))[0]
    gray = np.ndim(expected) == 1
    assert (pixels[:, 0] if gray else pixels).tolist() == (expected if gray else [list(rgb) for rgb in expected])
    assert not gray or (pixels == pixels[:, :1]).all()


def test_corrupt_and_truncated_files_raise_decode_errors(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    path = write_image(tmp_path / "cut.jpg", 3, size=(64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for name in ("junk.jpg", "cut.jpg"):
        with pytest.raises(DECODE_ERRORS):
            open_rgb(str(tmp_path / name))


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source("imagefolder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        open_source("imagefolder", tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(DataError, match="no images under"):
        open_source("imagefolder", tmp_path / "empty")


def test_validation_rows_take_samples_without_a_usable_label_as_tars_keep_them():
    """A tar sample with no label (or one outside --classes) stays in the listing with target -1, to be
    skipped and recorded when read; the stratified split must not stumble on it."""
    from pipeline.datasets import validation_rows

    targets = np.array([0] * 6 + [1] * 6 + [-1] * 2)
    train, val = validation_rows(targets, 0.25, 0, "--val-data", ["a", "b"])
    assert len(train) + len(val) == 14 and not set(train) & set(val)
    with pytest.raises(DataError, match="^b: one example only"):
        validation_rows(np.array([0] * 6 + [1, -1, -1]), 0.25, 0, "--val-data",
                        ["a", "b"])
