"""Heads on synthetic codes: as accurate as scikit-learn's own estimator, same function as a module,
and a head file that round-trips without executing code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.heads import HeadError, LogRegHead, load_head, save_head


def blobs(seed=0, n=300, classes=4, width=32, spread=2.5, draw=0):
    """Gaussian classes: `seed` fixes the class centres, `draw` the samples drawn around them."""
    centres = np.random.default_rng(seed).normal(0, 1, (classes, width)) * 3
    rng = np.random.default_rng([seed, draw])
    targets = rng.integers(0, classes, n)
    return centres[targets] + rng.normal(0, spread, (n, width)), targets


def test_logreg_beats_chance_and_matches_scikit_learn():
    codes, targets = blobs(0)
    test_codes, test_targets = blobs(0, n=400, draw=1)
    head = LogRegHead(C=1.0).fit(codes, targets)
    ours = np.mean(head.predict(test_codes) == test_targets)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(codes, targets)
    theirs = reference.score(test_codes, test_targets)
    assert ours > 0.8  # chance is 0.25
    assert abs(ours - theirs) <= 0.01


def test_to_module_gives_predict_proba():
    codes, targets = blobs(2)
    head = LogRegHead().fit(codes, targets)
    with torch.no_grad():
        module_probabilities = head.to_module()(torch.from_numpy(codes).float()).numpy()
    np.testing.assert_allclose(module_probabilities, head.predict_proba(codes), atol=1e-5)


def test_two_classes_work_as_softmax():
    codes, targets = blobs(3, classes=2)
    head = LogRegHead().fit(codes, targets)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(codes, targets)
    np.testing.assert_allclose(head.predict_proba(codes), reference.predict_proba(codes), atol=1e-6)


def test_c_sweep_picks_the_best_on_validation():
    codes, targets = blobs(4, spread=6.0)
    val_codes, val_targets = codes[200:], targets[200:]
    head = LogRegHead(C=[1e-4, 1.0]).fit(codes[:200], targets[:200], val_codes, val_targets)
    assert set(head.validation_scores_) == {1e-4, 1.0}
    assert head.C_ == max(head.validation_scores_, key=head.validation_scores_.get)
    with pytest.raises(HeadError, match="need a validation split"):
        LogRegHead(C=[0.1, 1.0]).fit(codes, targets)


def test_head_file_round_trip(tmp_path):
    codes, targets = blobs(5)
    head = LogRegHead().fit(codes, targets)
    save_head(head, tmp_path / "heads" / "h.pt", {"classes": ["a", "b", "c", "d"], "layer": "fc7"})
    payload = torch.load(tmp_path / "heads" / "h.pt", weights_only=True)  # loads without executing code
    assert set(payload) == {"metadata", "tensors"}
    loaded, metadata = load_head(tmp_path / "heads" / "h.pt")
    assert metadata["layer"] == "fc7" and metadata["kind"] == "logreg" and metadata["hyperparameters"]["C_"] == 1.0
    np.testing.assert_array_equal(loaded.predict_proba(codes), head.predict_proba(codes))


def test_a_file_that_is_not_a_head(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(HeadError, match="is not a tl head file"):
        load_head(tmp_path / "x.pt")
    torch.save({"metadata": "{}", "tensors": {}}, tmp_path / "y.pt")
    with pytest.raises(HeadError, match="is not a tl-head/1 head file"):
        load_head(tmp_path / "y.pt")
    with pytest.raises(HeadError, match="does not exist"):
        load_head(tmp_path / "z.pt")


def test_bad_codes_are_refused():
    codes, targets = blobs(6)
    with pytest.raises(HeadError, match="single class"):
        LogRegHead().fit(codes, np.zeros_like(targets))
    codes[7, 3] = np.nan
    with pytest.raises(HeadError, match=r"NaN or Inf \(row 7\)"):
        LogRegHead().fit(codes, targets)
    with pytest.raises(HeadError, match="empty"):
        LogRegHead().fit(np.zeros((0, 4)), np.zeros(0))


def test_fit_head_cli_on_an_extracted_cache(run_tl, tmp_path):
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
    fast = ["--backbone", "alexnet", "--weights", "none", "--workers", "0", "--quiet"]
    assert run_tl("extract", "--data", folder, "--out", tmp_path / "c", "--layers", "fc6,fc7", *fast).code == 0
    several = run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt")
    assert several.code == 2 and "several layers (fc6, fc7); choose one with --layer" in several.err
    result = run_tl("fit-head", "--cache", tmp_path / "c", "--layer", "fc7", "--val-fraction", "0.34",
                    "--C", "0.1,1", "--out", tmp_path / "h.pt")
    assert result.code == 0, result
    assert "train accuracy" in result.out and "validation accuracy" in result.out
    head, metadata = load_head(tmp_path / "h.pt")
    assert metadata["classes"] == ["a", "b"] and metadata["layer"] == "fc7" and metadata["width"] == 4096
    assert metadata["codes_key"]["backbone"] == "alexnet"
    missing = run_tl("fit-head", "--cache", tmp_path / "c", "--layer", "pool", "--out", tmp_path / "h2.pt")
    assert missing.code == 2 and "has no layer 'pool'; it has: fc6, fc7" in missing.err
    bad_c = run_tl("fit-head", "--cache", tmp_path / "c", "--layer", "fc7", "--C", "x", "--out", tmp_path / "h3.pt")
    assert bad_c.code == 2 and "--C takes numbers" in bad_c.err


def test_validation_cache_of_other_codes_is_refused(run_tl, tmp_path):
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    fast = ["--backbone", "alexnet", "--layers", "fc7", "--workers", "0", "--quiet", "--data", folder]
    assert run_tl("extract", "--weights", "none", "--seed", "0", "--out", tmp_path / "c0", *fast).code == 0
    assert run_tl("extract", "--weights", "none", "--seed", "1", "--out", tmp_path / "c1", *fast).code == 0
    result = run_tl("fit-head", "--cache", tmp_path / "c0", "--val-cache", tmp_path / "c1", "--out", tmp_path / "h.pt")
    assert result.code == 2 and "holds other codes" in result.err and "weights: random-init:seed=0" in result.err
    assert not (tmp_path / "h.pt").exists()
