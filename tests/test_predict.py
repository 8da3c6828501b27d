"""tl predict: the same labels and probabilities as the head on the cached codes of the same images,
backbone and preprocessing taken from the head file, unreadable files skipped with a warning."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from cache.reader import CacheReader
from pipeline.backbones import get_backbone, weights_for_digest
from pipeline.errors import BackboneError
from pipeline.model_files import load_head
from tests.conftest import make_image_folder


def test_predict_agrees_with_the_head_on_cached_codes(run_tl, tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=4)
    fast = ["--backbone", "alexnet", "--weights", "none", "--seed", "3", "--workers", "0", "--quiet"]
    assert run_tl("extract", "--data", folder, "--out", tmp_path / "c", "--layers", "fc7", "--dtype", "float32",
                  *fast).code == 0
    assert run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt").code == 0
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_tl("predict", "--head", tmp_path / "h.pt", "--top-k", "2", folder / "a", folder / "b",
                    folder / "c" / "img01.png")
    assert result.code == 0, result
    assert "warning: skipped" in result.err and "broken.png" in result.err
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert len(rows) == 2 * 9 and list(rows[0]) == ["path", "label", "prob"]
    head, _ = load_head(tmp_path / "h.pt")
    reader = CacheReader(tmp_path / "c")
    cached = dict(zip(reader.load_column("sample_id"), head.predict_proba(reader.load("fc7"))))
    for row in rows[::2]:  # the best label of each image
        probabilities = cached[str(tmp_path.joinpath(row["path"]).relative_to(folder))]
        assert row["label"] == "abc"[int(np.argmax(probabilities))]
        assert float(row["prob"]) == pytest.approx(probabilities.max(), abs=1e-4)
    gone = run_tl("predict", "--head", tmp_path / "h.pt", folder / "a", tmp_path / "gone.png")
    assert gone.code == 2 and "gone.png does not exist" in gone.err and gone.out == ""
    unreadable = run_tl("predict", "--head", tmp_path / "h.pt", folder / "b" / "broken.png")
    assert unreadable.code == 2 and "none of the 1 files could be read" in unreadable.err


def test_predict_refuses_what_it_cannot_use(run_tl, tmp_path):
    (tmp_path / "h.pt").write_bytes(b"not a head")
    missing = run_tl("predict", "--head", tmp_path / "h.pt", tmp_path / "nothing.png")
    assert missing.code == 2 and "is not a tl head file" in missing.err
    no_args = run_tl("predict", "--head", tmp_path / "h.pt")
    assert no_args.code == 2 and "Missing argument" in no_args.err


def test_weights_are_found_again_from_their_digest(tmp_path):
    alexnet = get_backbone("alexnet")
    assert weights_for_digest(alexnet, "random-init:seed=7").seed == 7
    with pytest.raises(BackboneError, match="pass that file with --weights PATH"):
        weights_for_digest(alexnet, "file:sha256=" + "0" * 64)
    (tmp_path / "other.pt").write_bytes(b"other weights")
    with pytest.raises(BackboneError, match="is not the one the head was made with"):
        weights_for_digest(alexnet, "file:sha256=" + "0" * 64, str(tmp_path / "other.pt"))
