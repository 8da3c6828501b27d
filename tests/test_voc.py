"""PASCAL VOC: the devkit layout as a source, multiscale patch caches, and image-level mAP from pooled
patch scores, on generated VOC-format folders of drawn shapes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cache.reader import CacheReader
from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.extract import ExtractConfig, ExtractResult, run_extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.formats.voc import VOC_CLASSES, VocSource
from pipeline.errors import DataError, HeadError
from pipeline.examples import write_shapes_voc, write_voc_annotation
from pipeline.metrics import per_class_ap, mean_ap
from pipeline.predict import PredictConfig, run_predict
from pipeline.multiscale import PatchSettings, patch_grid
from pipeline.report import headline

FAST = ["--backbone", "alexnet", "--weights", "none", "--layers", "pool5", "--workers", "0", "--quiet"]
FAST_OPTIONS = dict(backbone="alexnet", weights="none", layers=("pool5",), workers=0, quiet=True)


def extract(base, out, split, **options) -> ExtractResult:
    """Stage one on a VOC folder of shapes, with the classes found in its annotations."""
    return run_extract(ExtractConfig(data=base, out=out, format="voc", split=split, classes="auto",
                                     **{**FAST_OPTIONS, **options}))


def test_voc_source_targets_difficult_and_classes(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 4})
    write_voc_annotation(base, "000001", [("disc", (5, 5, 40, 40)), ("bar", (50, 10, 90, 30))], (120, 90),
                         difficult=(1,))
    source = VocSource(base, "trainval", "auto")
    assert source.classes == ["bar", "disc", "square"] and source.target_kind == "multi-hot"
    assert source.samples[0].target == (0, 1, 0)  # the bar is difficult: not a positive...
    assert source.columns(0)["ignore"].tolist() == [1, 0, 0]  # ...and left out of the bar's AP
    np.testing.assert_array_equal(source.annotations[0].boxes, [[5, 5, 40, 40], [50, 10, 90, 30]])
    assert VocSource(base, "trainval", "square,disc,bar").classes == ["square", "disc", "bar"]
    with pytest.raises(DataError, match="has class 'disc', not among the 20 classes; pass --classes auto"):
        VocSource(base, "trainval")
    assert len(VOC_CLASSES) == 20


def test_voc_bad_inputs(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 3}, with_size=False)
    source = VocSource(base, "trainval", "auto")
    assert (source.annotations[0].width, source.annotations[0].height) == (120, 90)  # read from the JPEG
    write_voc_annotation(base, "000002", [("disc", (-10, 5, 40, 200))], (120, 90))
    write_voc_annotation(base, "000003", [], (120, 90))  # no objects at all
    source = VocSource(base, "trainval", "auto")
    np.testing.assert_array_equal(source.annotations[1].boxes, [[0, 5, 40, 89]])
    assert source.warnings == ["1 boxes reached outside their image and were clipped to it"]
    assert sum(source.samples[2].target) == 0
    with pytest.raises(DataError, match="no split file .*test.txt; pass --split with one of the splits here: trainval"):
        VocSource(base, "test", "auto")
    # a folder that is no devkit year said 'splits here: none', neither what was wrong nor what to pass
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match=r"photos holds no ImageSets/Main/SPLIT.txt; pass --data with a VOC devkit "
                                        r"year \(VOCdevkit/VOC2007\)$"):
        VocSource(tmp_path / "photos", "train", "auto")
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000099\n")
    with pytest.raises(DataError, match="names 000099 but .*000099.jpg is missing"):
        VocSource(base, "trainval", "auto")


def test_multiscale_pipeline_end_to_end(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 30, "test": 20})
    patches = PatchSettings(scales=(1.0, 2.0), background_fraction=0.3)
    train = extract(base, tmp_path / "tr", "trainval", multiscale=True, patches=patches)
    assert train.images_processed == 30 and train.patches == train.rows > 0
    test = extract(base, tmp_path / "te", "test", multiscale=True, patches=patches, shard_rows=8)
    test_cache = CacheReader(tmp_path / "te")
    assert test_cache.classes == ["background", "bar", "disc", "square"]
    # at test time every patch stays
    assert test.rows == test_cache.num_rows == 20 * len(patch_grid(120, 90, (1.0, 2.0))[0])
    boxes, scales = test_cache.load_column("box"), test_cache.load_column("scale")
    assert boxes.shape == (test_cache.num_rows, 4) and set(scales.tolist()) == {1.0, 2.0}
    assert len(set(test_cache.load_column("image_id"))) == 20
    train_cache = CacheReader(tmp_path / "tr")
    train_targets = train_cache.load_column("target")
    assert train_cache.num_rows < 30 * len(patch_grid(120, 90, (1.0, 2.0))[0])  # background thinned
    assert (train_targets > 0).sum() > 0.4 * len(train_targets)

    # validation held out of a patch cache takes whole images: patches of one image on both sides flattered
    # C selection, early stopping and a sweep's board (validation mAP 1.0 on a tiny VOC)
    from pipeline.fit_head import training_rows

    rows, val = training_rows(train_cache, "pool5", None, 0.2, 0, 4096)
    image_ids = train_cache.load_column("image_id")
    held, kept = set(image_ids[val.rows]), set(image_ids[rows.rows])
    assert held and kept and not held & kept and len(held) == 6 and len(rows) + len(val) == train_cache.num_rows
    with pytest.raises(HeadError, match=r"--val-fraction 0.95 holds out every image of .*; lower --val-fraction, "
                                        r"change --seed, or pass --val-cache"):  # unstratified: said, not 'no rows'
        training_rows(train_cache, "pool5", None, 0.95, 0, 4096)

    fit_head(FitHeadConfig(cache=tmp_path / "tr", out=tmp_path / "h.pt"))
    report = run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "te", out=tmp_path / "r",
                                         save_predictions=tmp_path / "p.csv")).report
    assert "patches pooled into images" in dict(headline(report))
    assert report == json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"] == 20 and report["pooling"]["images"] == 20
    chance = np.mean([c["support"] / 20 for c in report["classes"]])
    assert report["mAP"] > max(0.85, chance + 0.3)
    assert [c["name"] for c in report["classes"]] == ["bar", "disc", "square"]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 21  # one row per image
    # tl predict on the test JPEGs pools every patch as evaluate did: each object class's share of S
    saved = {row[0]: np.array(row[-3:], float) for row in csv.reader((tmp_path / "p.csv").open())
             if row[0] != "sample_id"}
    jpegs = sorted((base / "JPEGImages").glob("*.jpg"))
    predictions = {Path(p.path).stem: p for p in run_predict(PredictConfig(
        head=tmp_path / "h.pt", paths=tuple(jpegs), top_k=3, workers=0, quiet=True)) if Path(p.path).stem in saved}
    assert len(predictions) == 20
    for image, prediction in predictions.items():
        shares = dict(prediction.labels)
        assert sorted(shares) == ["bar", "disc", "square"] and sum(shares.values()) == pytest.approx(1.0)
        expected = saved[image] / saved[image].sum()
        # the cache holds float16 codes, predict's are float32; the power 5 magnifies the rounding (3e-6 seen)
        np.testing.assert_allclose([shares[name] for name in ("bar", "disc", "square")], expected, atol=1e-4)
    # a training cache (thinned background) pools the same way
    single = run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "tr", out=tmp_path / "r2")).report
    assert single["pooling"]["images"] == 30


def test_image_level_voc_cache_uses_the_ignore_marks(tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 12, "test": 8})
    write_voc_annotation(base, "000013", [("disc", (5, 5, 40, 40)), ("bar", (50, 10, 90, 30))], (120, 90),
                         difficult=(0,))
    extract(base, tmp_path / "tr", "trainval")
    extract(base, tmp_path / "te", "test")
    reader = CacheReader(tmp_path / "te")
    assert reader.manifest.multilabel and reader.load_column("ignore")[0].tolist() == [0, 1, 0]
    fit_head(FitHeadConfig(cache=tmp_path / "tr", out=tmp_path / "h.pt"))
    report = run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "te", out=tmp_path / "r",
                                         save_predictions=tmp_path / "p.csv", ap="area")).report
    assert report == json.loads((tmp_path / "r" / "report.json").read_text())
    # the predictions file alone gives the report's mAP: its ignore column carries the difficult-only classes
    header, *lines = list(csv.reader((tmp_path / "p.csv").open()))
    assert header[:3] == ["sample_id", "target", "ignore"] and lines[0][2] == "disc"
    names = [name.removeprefix("score:") for name in header[3:]]

    def hot(field):
        return [int(name in field.split(";")) for name in names]

    scores = np.array([[float(v) for v in line[3:]] for line in lines])
    targets, ignore = np.array([hot(line[1]) for line in lines]), np.array([hot(line[2]) for line in lines])
    np.testing.assert_array_equal(ignore, reader.load_column("ignore"))
    expected = mean_ap(per_class_ap(targets, scores, "area", ignore))
    assert report["mAP"] == expected  # the scores are written to read back exactly
    # a test cache of the same classes in another order: the ignore marks follow the head's classes too
    # (they stayed in the cache's order, leaving another class's AP out)
    run_extract(ExtractConfig(data=base, out=tmp_path / "te2", format="voc", split="test", classes="disc,square,bar",
                              **FAST_OPTIONS))
    reordered = run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "te2", out=tmp_path / "r4",
                                            save_predictions=tmp_path / "p4.csv", ap="area")).report
    assert reordered["mAP"] == pytest.approx(report["mAP"], abs=1e-6)
    assert next(csv.reader((tmp_path / "p4.csv").open()))[:3] == ["sample_id", "target", "ignore"]
    assert list(csv.reader((tmp_path / "p4.csv").open()))[1][2] == "disc"
    extract(base, tmp_path / "tp", "test", multiscale=True, patches=PatchSettings(scales=(1.0,)))
    # the remedy names what differs: the scales, not the backbone, weights and preprocessing
    with pytest.raises(HeadError, match=r"was made with other patches.*patches.*; extract both with the same patches "
                                        r"\(--multiscale, --scales, --patch-overlap, --box-overlap\)$"):
        run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "tp", out=tmp_path / "r3"))


def test_multiscale_resume_is_bit_identical(tmp_path):
    base = write_shapes_voc(tmp_path, {"test": 6})
    options = dict(multiscale=True, patches=PatchSettings(scales=(1.0, 1.6)), shard_rows=2, batch_size=7)
    extract(base, tmp_path / "whole", "test", **options)
    extract(base, tmp_path / "resumed", "test", **options)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    (tmp_path / "resumed" / "shard-00001.h5").unlink()
    rerun = extract(base, tmp_path / "resumed", "test", **options)
    assert (rerun.shards_written, rerun.shards_reused) == (1, 2)
    whole, resumed = CacheReader(tmp_path / "whole"), CacheReader(tmp_path / "resumed")
    np.testing.assert_array_equal(whole.load("pool5"), resumed.load("pool5"))
    np.testing.assert_array_equal(whole.load_column("box"), resumed.load_column("box"))
    assert manifest["num_shards"] == 3


def test_cli_multiscale_flags_reach_the_cache_and_info_shows_them(run_tl, tmp_path):
    base = write_shapes_voc(tmp_path, {"trainval": 3, "test": 2})
    common = ["--format", "voc", "--data", base, "--classes", "auto", "--multiscale", "--scales", "1.0,2.0",
              *FAST]
    train = run_tl("extract", *common, "--split", "trainval", "--background-fraction", "0.3", "--out", tmp_path / "tr")
    assert train.code == 0 and "patches from 3 images" in train.out, train
    every = run_tl("extract", *common, "--split", "trainval", "--background-fraction", "1", "--out", tmp_path / "all")
    assert every.code == 0 and "left out" not in every.out, every
    dropped = CacheReader(tmp_path / "all").manifest.rows - CacheReader(tmp_path / "tr").manifest.rows
    assert dropped > 0 and f"patches from 3 images; {dropped} background patches left out (--background-fraction " \
                           "0.3, seed 0)" in train.out, train
    assert run_tl("extract", *common, "--split", "test", "--out", tmp_path / "te").code == 0
    key = json.loads((tmp_path / "tr" / "manifest.json").read_text())["key"]
    assert key["patches"]["scales"] == [1.0, 2.0] and key["dataset"]["background_fraction"] == 0.3
    assert key["preprocessing"]["decode"] == "fast"  # the default mode, for patches too
    info = run_tl("info", tmp_path / "te").out
    assert "scales 1, 2" in info and "every patch kept" in info
    assert "0.3 of background kept (seed 0)" in run_tl("info", tmp_path / "tr").out
