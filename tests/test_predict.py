"""Predict: the same labels and probabilities as the head on the cached codes of the same images,
backbone and preprocessing taken from the head file, unreadable files skipped (the CLI warns)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from cache.reader import CacheReader
from pipeline.backbones import get_backbone, weights_for_digest
from pipeline.errors import BackboneError
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import FinetuneConfig, run_finetune
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.model_files import load_head
from pipeline.predict import PredictConfig, run_predict
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def head_on_images(tmp_path_factory):
    """Images of three classes, a float32 fc7 cache of a seeded random AlexNet, a logreg head on it; then
    a broken PNG among the images (after the cache was made)."""
    root = tmp_path_factory.mktemp("predict")
    folder = make_image_folder(root / "images", classes=("a", "b", "c"), per_class=4)
    run_extract(ExtractConfig(data=folder, out=root / "c", backbone="alexnet", weights="none", layers=("fc7",),
                              dtype="float32", seed=3, workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=root / "c", out=root / "h.pt"))
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_predict_agrees_with_the_head_on_cached_codes(head_on_images):
    root, folder = head_on_images, head_on_images / "images"
    config = PredictConfig(head=root / "h.pt", top_k=2,
                           paths=(folder / "a", folder / "b", folder / "c" / "img01.png"))
    predictions = list(run_predict(config))
    skipped = [p for p in predictions if p.error]
    assert [p.path for p in skipped] == [str(folder / "b" / "broken.png")] and not skipped[0].labels
    labelled = [p for p in predictions if not p.error]
    assert len(labelled) == 9 and all(len(p.labels) == 2 for p in labelled)
    head, _ = load_head(root / "h.pt")
    reader = CacheReader(root / "c")
    cached = dict(zip(reader.load_column("sample_id"), head.predict_proba(reader.load("fc7"))))
    for prediction in labelled:
        probabilities = cached[str(root.joinpath(prediction.path).relative_to(folder))]
        label, probability = prediction.labels[0]  # the best label of each image
        assert label == "abc"[int(np.argmax(probabilities))]
        assert probability == pytest.approx(probabilities.max(), abs=1e-4)


def test_a_head_of_float16_codes_scores_new_images_as_their_cached_codes(tmp_path):
    """A head fitted on a float16 cache saw codes rounded to float16: predict rounds the new codes so too,
    and gives the probabilities the head gives the same images' cached codes (the unrounded float32 codes
    were up to 3e-5 off on efficientnet_lite0, and 41 of 50 labels off on a random-init one)."""
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=4)
    run_extract(ExtractConfig(data=folder, out=tmp_path / "c", backbone="efficientnet_lite0", layers=("block12",),
                              dtype="float16", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    head, metadata = load_head(tmp_path / "h.pt")
    assert metadata["codes_dtype"] == "float16"
    reader = CacheReader(tmp_path / "c")
    cached = dict(zip(reader.load_column("sample_id"), head.predict_proba(reader.load("block12"))))
    predictions = list(run_predict(PredictConfig(head=tmp_path / "h.pt", top_k=3, paths=(folder,))))
    assert len(predictions) == 12
    for prediction in predictions:
        probabilities = cached[str(tmp_path.joinpath(prediction.path).relative_to(folder))]
        for label, probability in prediction.labels:
            assert probability == pytest.approx(probabilities["abc".index(label)], abs=1e-7), prediction
    # the model of --epochs 0 is the head: its codes are rounded as predict --head rounds them (the rounding
    # was written twice, once in the model's forward, once here, free to drift apart)
    run_finetune(FinetuneConfig(data=folder, head=tmp_path / "h.pt", out=tmp_path / "m.pt", epochs=0, workers=0,
                                quiet=True), say=lambda text: None)
    through_model = list(run_predict(PredictConfig(head=None, model=tmp_path / "m.pt", top_k=3, paths=(folder,))))
    assert [p.path for p in through_model] == [p.path for p in predictions]
    for mine, theirs in zip(through_model, predictions):
        assert [label for label, _ in mine.labels] == [label for label, _ in theirs.labels], (mine, theirs)
        np.testing.assert_allclose([p for _, p in mine.labels], [p for _, p in theirs.labels], atol=1e-6)


def test_codes_are_rounded_as_a_float16_cache_holds_them(tmp_path):
    """as_cached (the finetuned model's and predict --head's rounding) gives the codes a float16 cache
    reads back, ties and values below float16's normal range included; a float32 cache, or a head of an
    earlier tl that recorded no dtype, keeps them as computed."""
    import torch

    from pipeline.backbones import as_cached
    from tests.conftest import write_code_cache

    rng = np.random.default_rng(0)
    ties = np.float32(1 + 2.0 ** -11) * 2.0 ** np.arange(8, dtype=np.float32)  # halfway between float16 steps
    codes = np.concatenate([rng.normal(0, 3, 56), rng.normal(0, 1e-6, 32), ties, -ties]).astype(np.float32)
    codes = codes.reshape(8, 13)
    write_code_cache(tmp_path / "c", codes, np.arange(8) % 2, ["a", "b"], dtype="float16")
    stored = CacheReader(tmp_path / "c").load("feat")
    rounded = as_cached(torch.from_numpy(codes), "float16")
    assert rounded.dtype == torch.float32 and np.array_equal(rounded.numpy(), stored)
    assert not np.array_equal(codes, stored)  # the check above is not of codes that float16 holds exactly
    for kept in ("float32", None):
        assert np.array_equal(as_cached(torch.from_numpy(codes), kept).numpy(), codes)


def test_cli_writes_csv_rows_warns_and_refuses(run_tl, head_on_images):
    root, folder = head_on_images, head_on_images / "images"
    result = run_tl("predict", "--head", root / "h.pt", "--top-k", "2", folder / "a", folder / "b",
                    folder / "c" / "img01.png")
    assert result.code == 0, result
    assert result.err.startswith(f"warning: skipped {folder / 'b' / 'broken.png'}: ") and result.err.count("\n") == 1
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert len(rows) == 2 * 9 and list(rows[0]) == ["path", "label", "prob"]
    assert {row["label"] for row in rows} <= {"a", "b", "c"} and all(0 <= float(row["prob"]) <= 1 for row in rows)
    gone = run_tl("predict", "--head", root / "h.pt", folder / "a", root / "gone.png")
    assert gone.code == 2 and "gone.png does not exist" in gone.err and gone.out == ""
    unreadable = run_tl("predict", "--head", root / "h.pt", folder / "b" / "broken.png")
    assert unreadable.code == 2 and "none of the 1 files could be read" in unreadable.err


def test_an_exponent_where_nothing_is_pooled_is_said(run_tl, head_on_images):
    """--exponent pools a multiscale head's patch scores; for a one-crop head or cache it changes nothing,
    which a user comparing exponents would otherwise read as 'the exponent does not matter'."""
    root, image = head_on_images, head_on_images / "images" / "a" / "img00.png"
    plain, given = (run_tl("predict", "--head", root / "h.pt", image, *extra) for extra in ((), ("--exponent", "2")))
    assert plain.code == given.code == 0 and plain.out == given.out and "exponent" not in plain.err, (plain, given)
    assert given.err == (f"warning: --exponent 2 pools the patch scores of multiscale caches and heads; head "
                         f"{root / 'h.pt'} scores one crop per image, so it changes nothing here (leave it out)\n")
    scored = run_tl("evaluate", "--head", root / "h.pt", "--cache", root / "c", "--out", root / "r", "--exponent", "3")
    assert scored.code == 0 and scored.err.startswith("warning: --exponent 3 pools") and f"cache {root / 'c'}" in scored.err
    assert "--exponent 3" in json.loads((root / "r" / "report.json").read_text())["source"]["warnings"][0]


def test_predict_refuses_what_it_cannot_use(run_tl, tmp_path):
    (tmp_path / "h.pt").write_bytes(b"not a head")
    missing = run_tl("predict", "--head", tmp_path / "h.pt", tmp_path / "nothing.png")
    assert missing.code == 2 and "is not a tl head file" in missing.err
    no_args = run_tl("predict", "--head", tmp_path / "h.pt")
    assert no_args.code == 2 and "Missing argument" in no_args.err
    for exponent in ("nan", "inf", "0"):  # k = inf or nan pools every image to 0 or nan, silently
        for command in (("predict", "--head", tmp_path / "h.pt", tmp_path / "x.png"),
                        ("evaluate", "--head", tmp_path / "h.pt", "--cache", tmp_path, "--out", tmp_path / "r")):
            refused = run_tl(*command, "--exponent", exponent)
            assert refused.code == 2 and refused.err == (
                f"error: --exponent must be a positive finite number (the paper's range is 1 to 10), got "
                f"{float(exponent)}\n"), (command, refused)


def test_weights_are_found_again_from_their_digest(tmp_path):
    alexnet = get_backbone("alexnet")
    assert weights_for_digest(alexnet, "random-init:seed=7").seed == 7
    # a recipe's top-level `weights: none` (or imagenet) reaches finetune and predict: it must agree
    assert weights_for_digest(alexnet, "random-init:seed=7", "none").seed == 7
    with pytest.raises(BackboneError, match="--weights imagenet was given, but the head's codes came from random"):
        weights_for_digest(alexnet, "random-init:seed=7", "imagenet")
    with pytest.raises(BackboneError, match="--weights none was given, but the head's codes came from a weights file"):
        weights_for_digest(alexnet, "file:sha256=" + "0" * 64, "none")
    with pytest.raises(BackboneError, match="pass that file with --weights PATH"):
        weights_for_digest(alexnet, "file:sha256=" + "0" * 64)
    (tmp_path / "other.pt").write_bytes(b"other weights")
    with pytest.raises(BackboneError, match="is not the one the head was made with"):
        weights_for_digest(alexnet, "file:sha256=" + "0" * 64, str(tmp_path / "other.pt"))


def test_predict_given_a_tar_says_where_tars_are_read(run_tl, tmp_path):
    from tests.conftest import write_webdataset

    tar = write_webdataset(tmp_path, tars=1, per_tar=2) / "00000.tar"
    (tmp_path / "h.pt").write_bytes(b"not a head")  # refused before the head is read: a tar is never an image
    refused = run_tl("predict", "--head", tmp_path / "h.pt", tmp_path / "images", tar)
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert refused.err == (f"error: {tar} is a tar and predict reads image files; label tar shards with tl evaluate "
                           f"--model M --data {tar} --format webdataset --out R --save-predictions F.csv, or for a "
                           "head tl extract --format webdataset then tl evaluate --head H --cache C --out R "
                           "--save-predictions F.csv\n")


def test_a_folder_given_as_head_says_what_to_pass_not_to_look_inside_it(run_tl, tmp_path):
    """'--head CACHE' said 'head file CACHE is a folder; pass the file inside it', and a cache holds no head.
    Now a sweep's folder names its best.pt, any other folder says how to make a head; a model never best.pt."""
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "best.pt").write_bytes(b"a head")
    result = run_tl("predict", "--head", tmp_path / "cache", image)
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert f"head file {tmp_path / 'cache'} is a folder; train one with tl fit-head" in result.err, result
    result = run_tl("predict", "--head", tmp_path / "sweep", image)
    assert result.code == 2 and f"pass {tmp_path / 'sweep' / 'best.pt'}, a sweep's best head" in result.err, result
    result = run_tl("predict", "--model", tmp_path / "sweep", image)
    assert result.code == 2 and "is a folder; train one with tl finetune" in result.err, result
