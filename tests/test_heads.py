"""Heads on synthetic codes: as accurate as scikit-learn's own estimators, the same function as a module,
streamed from a cache one block at a time, and head files that round-trip without executing code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC

from cache.reader import CacheReader
from pipeline.code_rows import CodeRows, validation_score
from pipeline.errors import HeadError, TLError
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.heads import LogRegHead, MlpHead, SvmHead
from pipeline.model_files import load_head, save_head
from pipeline.training import TrainingOptions
from tests.conftest import blobs, make_image_folder, multi_label_blobs, write_code_cache


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


def test_an_sgd_cost_that_diverged_is_not_chosen_over_one_that_did_not(tmp_path):
    # C 1e-6 (weight decay 1/(C n) times lr 1e4) diverges; its NaN probabilities had scored 0.25 to the
    # finite C's 0.0 (lr 1e4 is no good either) and made it the head written
    codes, targets = blobs(13, n=80)
    cache = write_code_cache(tmp_path / "c", codes.astype(np.float32), targets, ["a", "b", "c", "d"])
    result = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h.pt", head="logreg", solver="sgd", C=(1e-6, 1.0),
                                    val_fraction=0.25, training=TrainingOptions(max_epochs=3, lr=1e4)))
    head, _ = load_head(tmp_path / "h.pt")
    assert result.chosen["C"] == 1.0 and not any(point.get("diverged") for point in head.curve_)


def test_head_file_round_trip(tmp_path):
    codes, targets = blobs(5)
    head = LogRegHead().fit(codes, targets)
    save_head(head, tmp_path / "heads" / "h.pt", {"classes": ["a", "b", "c", "d"], "layer": "fc7"})
    payload = torch.load(tmp_path / "heads" / "h.pt", weights_only=True)  # loads without executing code
    assert set(payload) == {"metadata", "tensors", "sha256"}
    loaded, metadata = load_head(tmp_path / "heads" / "h.pt")
    assert metadata["layer"] == "fc7" and metadata["kind"] == "logreg" and metadata["state"]["C_"] == 1.0
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
    with pytest.raises(HeadError, match="hold one class, "):
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
    assert bad_c.code == 2 and "--C takes float numbers" in bad_c.err


def test_validation_cache_of_other_codes_is_refused(run_tl, tmp_path):
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    fast = ["--backbone", "alexnet", "--layers", "fc7", "--workers", "0", "--quiet", "--data", folder]
    assert run_tl("extract", "--weights", "none", "--seed", "0", "--out", tmp_path / "c0", *fast).code == 0
    assert run_tl("extract", "--weights", "none", "--seed", "1", "--out", tmp_path / "c1", *fast).code == 0
    result = run_tl("fit-head", "--cache", tmp_path / "c0", "--val-cache", tmp_path / "c1", "--out", tmp_path / "h.pt")
    assert result.code == 2 and "was made with other weights" in result.err and "weights: random-init:seed=0" in result.err
    assert not (tmp_path / "h.pt").exists()


HARD = dict(n=600, classes=5, width=64, spread=10)  # overlapping classes: accuracies near 0.83, chance 0.2


def hard_split():
    return blobs(0, **HARD), blobs(0, **{**HARD, "n": 2000}, draw=1)


def scikit_learn_accuracy(estimator, train, test):
    return make_pipeline(StandardScaler(), estimator).fit(*train).score(*test)


def test_sgd_logreg_streams_to_the_accuracy_of_scikit_learn():
    train, test = hard_split()
    head = LogRegHead(solver="sgd", training=TrainingOptions(max_epochs=20)).fit(*train)
    ours = np.mean(head.predict(test[0]) == test[1])
    assert ours >= scikit_learn_accuracy(LogisticRegression(max_iter=1000), train, test) - 0.01
    assert len(head.curve_) == 20 and head.curve_[-1]["train_loss"] < head.curve_[0]["train_loss"]


def test_mlp_reaches_scikit_learn_mlp():
    train, test = hard_split()
    head = MlpHead(hidden=(256,), training=TrainingOptions(max_epochs=20)).fit(*train)
    ours = np.mean(head.predict(test[0]) == test[1])
    theirs = scikit_learn_accuracy(MLPClassifier((256,), max_iter=500, random_state=0), train, test)
    assert ours > 0.6 and ours >= theirs - 0.02


def test_svm_matches_scikit_learn_linear_svc():
    train, test = hard_split()
    ours = np.mean(SvmHead().fit(*train).predict(test[0]) == test[1])
    assert abs(ours - scikit_learn_accuracy(LinearSVC(), train, test)) <= 0.01


def small_mlp(**training):
    return MlpHead(hidden=(32, 16), dropout=0.5, training=TrainingOptions(max_epochs=3, **training))


@pytest.mark.parametrize("make_head", [LogRegHead, SvmHead, lambda: LogRegHead(solver="sgd"), small_mlp],
                         ids=["logreg", "svm", "logreg-sgd", "mlp"])
@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_every_head_is_its_module_and_survives_its_file(make_head, multilabel, tmp_path):
    codes, targets = multi_label_blobs(1) if multilabel else blobs(7)
    head = make_head().fit(codes, targets)
    probabilities = head.predict_proba(codes)
    with torch.no_grad():
        module_probabilities = head.to_module()(torch.from_numpy(codes).float()).double().numpy()
    np.testing.assert_allclose(module_probabilities, probabilities, atol=1e-5)
    if multilabel:
        assert set(np.unique(head.predict(codes))) <= {0, 1} and head.predict(codes).shape == targets.shape
    else:
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)  # float32 for the mlp
    save_head(head, tmp_path / "h.pt", {"layer": "feat"})
    loaded, metadata = load_head(tmp_path / "h.pt")
    assert type(loaded) is type(head) and metadata["state"]["multilabel"] is multilabel
    np.testing.assert_array_equal(loaded.predict_proba(codes), probabilities)


@pytest.mark.parametrize("make_head", [LogRegHead, SvmHead, lambda: MlpHead(hidden=(64,))], ids=["logreg", "svm", "mlp"])
def test_multi_label_heads_rank_well_above_chance(make_head):
    codes, targets = multi_label_blobs(2)
    test_codes, test_targets = multi_label_blobs(2, draw=1)
    head = make_head().fit(codes, targets)
    chance = validation_score(test_targets, np.random.default_rng(0).random(test_targets.shape))
    assert validation_score(test_targets, head.predict_proba(test_codes)) > max(0.85, chance + 0.4)


def test_multi_label_logreg_is_scikit_learn_one_vs_rest():
    codes, targets = multi_label_blobs(3)
    ours = LogRegHead().fit(codes, targets).predict_proba(codes)
    reference = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=1000)))
    np.testing.assert_allclose(ours, reference.fit(codes, targets).predict_proba(codes), atol=1e-4)


def test_svm_chooses_a_cost_per_class_on_validation():
    codes, targets = blobs(4, n=400, spread=6.0)
    head = SvmHead(C=[1e-4, 1.0]).fit(codes[:250], targets[:250], codes[250:], targets[250:])
    assert len(head.C_) == 4 and set(head.C_) <= {1e-4, 1.0} and len(head.validation_scores_) == 4


def test_mlp_early_stopping_keeps_the_best_epoch():
    codes, targets = blobs(8, n=120, spread=8.0, width=64)  # small and noisy: a wide MLP overfits fast
    val_codes, val_targets = blobs(8, n=300, spread=8.0, width=64, draw=1)
    options = TrainingOptions(optimizer="adam", lr=0.01, max_epochs=40, early_stop=True, patience=2, weight_decay=0)
    head = MlpHead(hidden=(512,), dropout=0.0, training=options).fit(codes, targets, val_codes, val_targets)
    losses = [point["val_loss"] for point in head.curve_]
    assert len(losses) < 40
    best = int(np.argmin(losses))
    assert len(losses) == best + 1 + 2 and head.curve_[best]["kept"]
    kept_loss = torch.nn.functional.nll_loss(torch.from_numpy(np.log(head.predict_proba(val_codes))),
                                             torch.from_numpy(val_targets)).item()
    assert kept_loss == pytest.approx(losses[best], rel=1e-4)
    with pytest.raises(HeadError, match="--early-stop needs a validation split"):
        MlpHead(training=options).fit(codes, targets)


def test_same_seed_same_mlp():
    codes, targets = blobs(9)
    first, second = small_mlp().fit(codes, targets), small_mlp().fit(codes, targets)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, second.tensors()[name])


def test_streaming_mlp_holds_one_block_of_one_shard(tmp_path):
    codes, targets = blobs(10, n=500)
    write_code_cache(tmp_path / "c", codes, targets, ["a", "b", "c", "d"], shard_rows=100)
    reader = CacheReader(tmp_path / "c")
    rows = CodeRows.from_cache(reader, "feat", block_rows=40)
    head = small_mlp(batch_size=20).fit(rows)
    assert reader.most_open == 1 and reader.largest_read == 40  # never a shard, let alone the cache
    assert reader.shards_opened == 5 * (1 + 1 + 3)  # targets, the standardization pass, 3 epochs
    in_memory = small_mlp(batch_size=20).fit(codes.astype(np.float32), targets)
    streamed_accuracy, in_memory_accuracy = (np.mean(h.predict(codes) == targets) for h in (head, in_memory))
    assert streamed_accuracy > 0.7 and abs(streamed_accuracy - in_memory_accuracy) < 0.05


def test_fit_head_on_a_cache_with_nan_names_the_shard(tmp_path):
    codes, targets = blobs(11, n=200)
    codes[150, 2] = np.inf
    write_code_cache(tmp_path / "c", codes, targets, ["a", "b", "c", "d"], shard_rows=64)
    for head in ("logreg", "mlp"):
        with pytest.raises(TLError, match=r"shard-00002.h5 .* holds NaN or Inf in feat .*row 22 of the shard"):
            fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt", head=head))
    assert not (tmp_path / "h.pt").exists()


def test_a_layer_named_by_its_alias_is_the_cached_layer(tmp_path):
    """extract --layers relu6 caches alexnet's fc6 as fc6; fit-head --layer relu6 and sweep --layers relu6
    then said the cache had no layer relu6 (the flowers recipe's name for it)."""
    from pipeline.sweep import SweepConfig, run_sweep

    codes, targets = blobs(13, n=90, classes=3)
    write_code_cache(tmp_path / "c", codes, targets, ["a", "b", "c"], layer="fc6", backbone="alexnet")
    result = fit_head(FitHeadConfig(cache=tmp_path / "c", layer="relu6", out=tmp_path / "h.pt"))
    assert result.layer == "fc6" and load_head(tmp_path / "h.pt")[1]["layer"] == "fc6"
    swept = run_sweep(SweepConfig(cache=tmp_path / "c", layers=("relu6",), heads=("logreg",), C=(1.0,),
                                  out=tmp_path / "s"))
    assert len(swept.rows) == 1 and "fc6" in swept.rows[0]["name"], swept.rows
    with pytest.raises(TLError, match="has no layer 'relu7'; it has: fc6"):  # the name as typed
        fit_head(FitHeadConfig(cache=tmp_path / "c", layer="relu7", out=tmp_path / "h.pt"))


def test_a_class_without_training_rows_is_refused(tmp_path):
    codes, targets = blobs(12, n=100, classes=3)
    write_code_cache(tmp_path / "c", codes, targets, ["a", "b", "c", "unused"])
    with pytest.raises(HeadError, match="class unused has no training rows"):
        fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    write_code_cache(tmp_path / "one", codes, np.zeros(100, np.int64), ["a"])
    with pytest.raises(HeadError, match="hold one class, a; a classifier needs at least two: extract a cache of "
                                        "images of another class too"):
        fit_head(FitHeadConfig(cache=tmp_path / "one", out=tmp_path / "h.pt"))
    # an empty class folder beside one full one: which class is missing is what the user can act on
    write_code_cache(tmp_path / "emptied", codes, np.ones(100, np.int64), ["cat", "dog"])
    with pytest.raises(HeadError, match="hold one class, dog; a classifier needs at least two: add images of cat$"):
        fit_head(FitHeadConfig(cache=tmp_path / "emptied", out=tmp_path / "h.pt"))


def test_a_validation_cache_of_the_training_images_extracted_again_is_refused(run_tl, tmp_path):
    """Codes of the same image files extracted a second time (float32 here, float16 for training; or a
    --split train given by mistake) have another content digest, and validation scored training images: their
    rows carry the training rows' sample ids, with the same codes. So do some of them in shards of another size
    or in a --samples-per-class subset, which the shards' input digests (whole shards) let through. A cache of
    other images is taken, though its ids (a/img00.png, relative to its split) are the training cache's too."""
    make_image_folder(tmp_path / "images/train", classes=("a", "b"), per_class=4)
    make_image_folder(tmp_path / "images/val", classes=("a", "b"), per_class=2, size=(40, 48))

    def extract(data, out, *more):
        result = run_tl("extract", "--data", data, "--backbone", "alexnet", "--weights", "none", "--layers", "pool5",
                        "--workers", "0", "--quiet", "--out", tmp_path / out, *more)
        assert result.code == 0, result

    extract(tmp_path / "images", "train")
    extract(tmp_path / "images", "again", "--dtype", "float32")
    extract(tmp_path / "images", "val", "--split", "val")
    extract(tmp_path / "images", "other-shards", "--shard-rows", "3")
    extract(tmp_path / "images", "subset", "--samples-per-class", "1", "--dtype", "float32")
    for command in (["fit-head", "--out", tmp_path / "h.pt"], ["sweep", "--out", tmp_path / "sweep"]):
        for again, shared in (("again", "8 of its 8 rows"), ("other-shards", "8 of its 8 rows"),
                              ("subset", "2 of its 2 rows")):
            result = run_tl(*command, "--cache", tmp_path / "train", "--val-cache", tmp_path / again, "--C", "1,10")
            assert result.code == 2 and result.err.startswith(
                f"error: --val-cache {tmp_path / again} holds codes of the images of the training cache "
                f"{tmp_path / 'train'} ({shared} are training samples, e.g. a/img0"), result
            assert result.err.endswith(".png): validation would score training images; extract the validation "
                                       "images into their own cache, or pass --val-fraction\n"), result
    assert not (tmp_path / "h.pt").exists() and not (tmp_path / "sweep").exists()
    taken = run_tl("fit-head", "--cache", tmp_path / "train", "--val-cache", tmp_path / "val", "--C", "1,10",
                   "--out", tmp_path / "h.pt")
    assert taken.code == 0, taken


def test_a_validation_cache_of_the_training_images_decoded_the_other_way_is_refused(run_tl, tmp_path):
    """A training cache extracted on a GPU (JPEGs decoded there, at full size) and a validation cache of the
    same files decoded in workers (a CPU machine, or --device-decode off) hold codes 4-6% apart for photos
    larger than twice the input (efficientnet_lite0's weights): the codes check (within 2%) let it through,
    and validation scored training images, where the shards' input digests (the same ids, sizes and times)
    had refused it."""
    from tests.test_decoding import photo

    for number, name in enumerate(("a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg")):
        photo(tmp_path / "images/train" / name, (1024, 768), seed=number)
    for where in ("on", "off"):
        result = run_tl("extract", "--data", tmp_path / "images", "--backbone", "efficientnet_lite0", "--workers", "0",
                        "--quiet", "--device-decode", where, "--out", tmp_path / where)
        assert result.code == 0, result
    on, off = (CacheReader(tmp_path / where) for where in ("on", "off"))
    codes = on.load("pool").astype(np.float64)
    apart = np.linalg.norm(codes - off.load("pool"), axis=1) / np.linalg.norm(codes, axis=1)
    assert (apart > 0.02).all(), apart  # what the codes check alone lets through
    refused = run_tl("fit-head", "--cache", tmp_path / "on", "--val-cache", tmp_path / "off", "--out", tmp_path / "h.pt")
    assert refused.code == 2 and refused.err == (
        f"error: --val-cache {tmp_path / 'off'} holds codes of the images of the training cache {tmp_path / 'on'} "
        "(4 of its 4 rows are training samples, e.g. a/0.jpg): validation would score training images; extract the "
        "validation images into their own cache, or pass --val-fraction\n"), refused
    assert not (tmp_path / "h.pt").exists()


def test_fit_head_hidden_0_says_how_fit_head_spells_no_hidden_layer(run_tl, tmp_path):
    """sweep --hidden 0 is an mlp without a hidden layer; fit-head's --hidden 0 was refused without saying
    that fit-head spells it --hidden '' (its commas are layers, not settings)."""
    write_code_cache(tmp_path / "codes", *blobs(13, n=80), ["a", "b", "c", "d"])
    refused = run_tl("fit-head", "--cache", tmp_path / "codes", "--out", tmp_path / "h.pt", "--head", "mlp",
                     "--hidden", "0")
    assert refused.code == 2 and refused.err == ("error: --hidden widths must be positive, got 0; for no hidden layer "
                                                 "give an empty --hidden '' (sweep's --hidden 0)\n"), refused
    taken = run_tl("fit-head", "--cache", tmp_path / "codes", "--out", tmp_path / "h.pt", "--head", "mlp",
                   "--hidden", "", "--max-epochs", "1", "--quiet")
    assert taken.code == 0 and (tmp_path / "h.pt").is_file(), taken


def test_fit_head_bad_inputs_are_one_line_errors(run_tl, tmp_path):
    codes, targets = blobs(13, n=80)

    def refused(cache, *more):
        result = run_tl("fit-head", "--cache", cache, "--out", tmp_path / "h.pt", *more)
        assert result.code == 2 and result.err.startswith("error: ") and result.err.count("\n") == 1, result
        assert not (tmp_path / "h.pt").exists()
        return result.err

    write_code_cache(tmp_path / "empty", codes[:0], targets[:0], ["a", "b", "c", "d"])
    assert "has no rows" in refused(tmp_path / "empty")
    write_code_cache(tmp_path / "one", codes, np.zeros(80, np.int64), ["a"])
    assert "hold one class, a; a classifier needs at least two" in refused(tmp_path / "one", "--head", "mlp")
    write_code_cache(tmp_path / "good", codes, targets, ["a", "b", "c", "d"])
    assert "has no layer 'fc7'; it has: feat" in refused(tmp_path / "good", "--layer", "fc7")
    assert "--early-stop needs a validation split" in refused(tmp_path / "good", "--head", "mlp", "--early-stop")
    assert "several C values need a validation split" in refused(tmp_path / "good", "--head", "svm", "--C", "0.1,1")
    assert "--hidden takes int numbers" in refused(tmp_path / "good", "--head", "mlp", "--hidden", "wide")
    assert "'--val-fraction': 1.5 is not in the range 0<=x<1" in refused(tmp_path / "good", "--val-fraction", "1.5")
    import shutil

    shutil.copytree(tmp_path / "good", tmp_path / "copy")  # the same codes: the same content digest
    for validation in (tmp_path / "good", tmp_path / "copy"):
        assert "holds the codes of the training cache" in refused(tmp_path / "good", "--val-cache", validation,
                                                                  "--C", "1,10")
    # an infinite lr diverged and blamed the cache; an infinite momentum or C was a traceback
    for head in ("logreg", "svm"):
        assert "--C values must be positive and finite, got inf" in refused(tmp_path / "good", "--head", head, "--C", "inf")
    assert "--lr must be a positive finite number, got inf" in refused(tmp_path / "good", "--head", "mlp", "--lr", "inf")
    assert "must be finite and 0 or more, got inf" in refused(tmp_path / "good", "--head", "mlp", "--momentum", "inf")
    # one C that diverges is refused; every C of a grid diverging wrote a head of NaN probabilities, unsaid
    assert "stopped being finite at every --C; lower --lr" in refused(
        tmp_path / "good", "--head", "logreg", "--solver", "sgd", "--C", "1,10", "--lr", "1e12", "--val-fraction", "0.25")
    assert "'--val-fraction': 'nan' is not a fraction between 0 and 1" in refused(tmp_path / "good", "--val-fraction", "nan")
    # 0 holds out nothing (Keras's validation_split=0), so early stopping has nothing to watch
    assert "--early-stop needs a validation split" in refused(tmp_path / "good", "--head", "mlp", "--early-stop",
                                                              "--val-fraction", "0")
    assert "Invalid value for '--max-iter': 0 is not in the range x>=1." in refused(
        tmp_path / "good", "--max-iter", "0", "--block-rows", "100000")
    assert ("--val-fraction 0.99 leaves 0 training rows for 4 classes; lower --val-fraction"
            in refused(tmp_path / "good", "--val-fraction", "0.99"))
    assert ("--val-fraction 0.01 gives 1 validation rows for 4 classes; raise --val-fraction or pass --val-cache"
            in refused(tmp_path / "good", "--val-fraction", "0.01"))
    assert "is not a tl cache" in refused(tmp_path / "absent")


def test_step_schedule_drops_the_learning_rate():
    codes, targets = blobs(14, n=100)
    options = TrainingOptions(lr=0.1, lr_steps=(2, 4), lr_factors=(0.5,), max_epochs=5)
    head = MlpHead(hidden=(8,), training=options).fit(codes, targets)
    assert [point["lr"] for point in head.curve_] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cosine = MlpHead(hidden=(8,), training=TrainingOptions(lr=0.1, max_epochs=4)).fit(codes, targets)
    assert [point["lr"] for point in cosine.curve_] == pytest.approx([0.1, 0.085355, 0.05, 0.014645], abs=1e-6)
    with pytest.raises(HeadError, match="--lr-steps must be epochs"):
        MlpHead(training=TrainingOptions(lr_steps=(0,))).fit(codes, targets)


def test_each_lr_step_takes_the_factor_listed_in_its_place_in_any_order():
    """--lr-steps 4,2 --lr-factors 0.5,0.1 drops by 0.1 after epoch 2 and by 0.5 after epoch 4; the steps
    were sorted and the factors not, so epoch 2 took 0.5 and epoch 4 0.1."""
    codes, targets = blobs(14, n=100)
    options = TrainingOptions(lr=0.1, lr_steps=(4, 2), lr_factors=(0.5, 0.1), max_epochs=5)
    head = MlpHead(hidden=(8,), training=options).fit(codes, targets)
    assert [point["lr"] for point in head.curve_] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.005])


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_a_confident_mlp_keeps_its_ranking_where_float32_saturates(multilabel):
    # logits scaled to gaps up to 34: float32's softmax/sigmoid is exactly 1.0 past 16.6, float64's past 36.7
    codes, targets = multi_label_blobs(4) if multilabel else blobs(4)
    head = small_mlp().fit(codes, targets)
    with torch.no_grad():
        logits = head.network_(torch.from_numpy(codes).float())
        spread = (logits.max(dim=1).values - logits.min(dim=1).values).max() if not multilabel else logits.abs().max()
        head.network_[-1].weight.mul_(34 / spread)
        head.network_[-1].bias.mul_(34 / spread)
        logits = head.network_(torch.from_numpy(codes).float())
        float32_probabilities = head._activation()(logits).double().numpy()
    logits = logits.double().numpy()  # the reference: the network's float32 logits, activated in float64
    if multilabel:
        reference = 1 / (1 + np.exp(-logits))
    else:
        reference = np.exp(logits - logits.max(axis=1, keepdims=True))
        reference /= reference.sum(axis=1, keepdims=True)
    probabilities = head.predict_proba(codes)
    assert (float32_probabilities == 1.0).sum() >= 5 and not (probabilities == 1.0).any()
    np.testing.assert_allclose(probabilities, reference, rtol=1e-12, atol=0)
    # predictions do not move: the float64 activation keeps the logits' order, as float32's did here
    expected = (logits >= 0).astype(np.int64) if multilabel else logits.argmax(axis=1)
    np.testing.assert_array_equal(head.predict(codes), expected)
    old = (float32_probabilities >= 0.5).astype(np.int64) if multilabel else float32_probabilities.argmax(axis=1)
    np.testing.assert_array_equal(head.predict(codes), old)


def test_training_validation_scores_a_confident_network_as_its_head_does():
    """The validation mAP of training (early stopping, the sweep's ranking, fit-head's summary) took sigmoid of
    float32 logits: logits 40 and 20 both scored exactly 1.0, a tie that halved the AP the head's float64
    scores give (evaluate's report). It is the mAP of those float64 scores."""
    from pipeline.training import _evaluate_networks, probabilities

    codes, targets = np.array([[40.0], [20.0], [-5.0]], dtype=np.float32), np.array([[1], [0], [0]])
    network = torch.nn.Sequential(torch.nn.Linear(1, 1))
    with torch.no_grad():
        network[0].weight.fill_(1.0)
        network[0].bias.zero_()
        expected = validation_score(targets, probabilities(network(torch.from_numpy(codes)), True))
    scored = _evaluate_networks([network], CodeRows.from_arrays(codes, targets), torch.nn.BCEWithLogitsLoss(),
                                torch.device("cpu"))
    assert expected == 1.0 and scored[0]["val_map"] == expected


def test_mlp_scores_with_its_own_network_without_copying_it(monkeypatch):
    codes, targets = blobs(15)
    head = small_mlp().fit(codes, targets)
    expected = head.to_module()(torch.from_numpy(codes).float()).detach().double().numpy()

    def no_copies():
        raise AssertionError("predict_proba must not build a module per call")

    monkeypatch.setattr(head, "to_module", no_copies)
    monkeypatch.setattr("copy.deepcopy", lambda *args, **kwargs: no_copies())
    np.testing.assert_allclose(head.predict_proba(codes), expected, atol=1e-6)


def test_a_validation_fraction_reads_the_target_column_once(tmp_path, monkeypatch):
    codes, targets = blobs(16, n=200)
    write_code_cache(tmp_path / "c", codes, targets, ["a", "b", "c", "d"], shard_rows=50)
    reads = []
    original = CacheReader.load_column
    monkeypatch.setattr(CacheReader, "load_column", lambda self, column: reads.append(column) or original(self, column))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt", val_fraction=0.25))
    assert reads.count("target") == 1


def test_head_files_from_before_lr_factors_load_and_both_flag_spellings_parse(tmp_path, run_tl):
    import dataclasses

    old = {k: v for k, v in dataclasses.asdict(TrainingOptions(lr_steps=(3,))).items() if k != "lr_factors"}
    restored = TrainingOptions.from_saved({**old, "lr_factor": 0.5, "lr_steps": [3]})
    assert restored.lr_factors == (0.5,) and restored.lr_steps == (3,)
    codes, targets = blobs(0, n=60, classes=3, width=6)
    cache = write_code_cache(tmp_path / "cache", codes, targets, ["a", "b", "c"])
    for flag in ("--lr-factor", "--lr-factors"):
        result = run_tl("fit-head", "--cache", cache, "--head", "mlp", "--hidden", "8", "--max-epochs", "3",
                        "--lr-steps", "1,2", flag, "0.5,0.2", "--out", tmp_path / f"{flag}.pt")
        assert result.code == 0, result
        _, metadata = load_head(tmp_path / f"{flag}.pt")
        assert metadata["hyperparameters"]["training"]["lr_factors"] == [0.5, 0.2]


@pytest.mark.parametrize("stage", ["fit-head", "finetune"])
def test_a_factor_without_a_step_to_take_it_is_one_line(tmp_path, run_tl, stage):
    """One schedule check for both stages: a factor per step, or one for all; more is a mistake."""
    codes, targets = blobs(0, n=30, classes=3, width=6)
    cache = write_code_cache(tmp_path / "cache", codes, targets, ["a", "b", "c"])
    where = (["--cache", cache, "--head", "mlp"] if stage == "fit-head"
             else ["--data", tmp_path, "--head", tmp_path / "no-head.pt"])
    result = run_tl(stage, *where, "--lr-steps", "5", "--lr-factors", "0.1,0.2", "--out", tmp_path / "out.pt")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "error: --lr-factors gives 2 factors for 1 --lr-steps; give one factor, or one per step" in result.err


def test_a_class_of_one_row_names_the_class_and_a_remedy_that_works(run_tl, tmp_path):
    """Raising --val-fraction never helps a class of one row; the message said it would."""
    from tests.conftest import blobs, write_code_cache

    codes, targets = blobs(8, n=40, classes=3)
    targets[targets == 2] = 1
    targets[0] = 2  # one row of "cow"
    write_code_cache(tmp_path / "c", codes, targets, ["ant", "bee", "cow"])
    result = run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt", "--C", "0.1,1",
                    "--val-fraction", "0.5")
    assert result.code == 2 and result.err == (
        "error: cow: one example only, and a stratified validation share needs two of each class; pass --val-cache, "
        "or add images of it\n"), result

    both = run_tl("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt", "--val-cache", tmp_path / "c",
                  "--val-fraction", "0.2")
    assert both.code == 2 and "--val-cache and --val-fraction both name validation rows" in both.err, both


def test_options_the_head_does_not_read_are_named_when_typed(run_tl, tmp_path):
    """`--head svm --solver sgd` and `--head mlp --C 0.1,1` trained as if the option were not there, without a
    word; each now warns, naming the heads that read it. A config's keys reach every stage, so not those."""
    from tests.conftest import blobs, write_code_cache

    write_code_cache(tmp_path / "c", *blobs(3, n=60, classes=3), ["ant", "bee", "cow"])
    fit = ("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt", "--quiet")
    svm = run_tl(*fit, "--head", "svm", "--solver", "sgd", "--no-early-stop")
    assert svm.code == 0 and svm.err == "warning: --solver does nothing for --head svm; it applies to logreg heads\n", svm
    mlp = run_tl(*fit, "--head", "mlp", "--C", "0.1,1", "--hidden", "8", "--max-epochs", "1", "--patience", "2")
    assert mlp.code == 0 and mlp.err.splitlines() == [
        "warning: --C does nothing for --head mlp; it applies to logreg and svm heads",
        "warning: --patience does nothing without --early-stop"], mlp
    lbfgs = run_tl(*fit, "--lr", "0.1", "--max-iter", "50.0")  # a whole number as a float, as mlflow run passes it
    assert lbfgs.err == ("warning: --lr does nothing for --head logreg --solver lbfgs; it applies to logreg --solver "
                         "sgd and mlp heads\n"), lbfgs
    half = run_tl(*fit, "--max-iter", "1.5")
    assert half.code == 2 and "'--max-iter': '1.5' is not a valid integer." in half.err, half
    read = run_tl(*fit, "--solver", "sgd", "--lr", "0.1", "--max-epochs", "2", "--C", "1", "--device", "cpu")
    assert read.code == 0 and read.err == "", read

    config = tmp_path / "svm.yaml"
    config.write_text("solver: sgd\nlr: 0.1\nhidden: 8\n")
    quiet = run_tl(*fit, "--config", config, "--head", "svm")
    assert quiet.code == 0 and quiet.err == "", quiet

    sweep = run_tl("sweep", "--cache", tmp_path / "c", "--out", tmp_path / "s", "--heads", "svm,logreg", "--C", "1",
                   "--hidden", "8", "--quiet")
    assert sweep.code == 0 and sweep.err == "warning: --hidden does nothing for --heads svm,logreg; it applies to mlp heads\n", sweep
    alone = run_tl("sweep", "--cache", tmp_path / "c", "--out", tmp_path / "s2", "--C", "1", "--lr", "0.1", "--quiet")
    assert alone.err.startswith("warning: --lr does nothing for --heads logreg --solver lbfgs;"), alone


def test_a_head_kind_that_does_not_say_what_it_reads_is_warned_of_nothing(monkeypatch):
    """A kind registered elsewhere reads options fit-head cannot know of: no warning is better than a false one."""
    from pipeline.fit_head import unread_options
    from pipeline.heads import HEAD_KINDS, LogRegHead

    class Ridge(LogRegHead):
        kind = "ridge"

        @classmethod
        def reads(cls, solver):
            return None

    monkeypatch.setitem(HEAD_KINDS, "ridge", Ridge)
    assert unread_options(("ridge",), "lbfgs", {"C": "--C", "lr": "--lr"}, False) == []
    assert unread_options(("svm",), "lbfgs", {"lr": "--lr"}, False) == [
        "--lr does nothing for --head svm; it applies to logreg --solver sgd and mlp heads"]


def test_counts_below_one_are_refused_by_the_stage_too(tmp_path):
    """The CLI refuses them when it parses the command; a caller of the stage gets the stage's own line."""
    from tests.conftest import blobs, write_code_cache

    write_code_cache(tmp_path / "c", *blobs(3, n=30, classes=3), ["ant", "bee", "cow"])
    for counts in ({"max_iter": 0}, {"block_rows": 0}):
        with pytest.raises(HeadError, match="--block-rows and --max-iter must be at least 1"):
            fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt", **counts))
    assert not (tmp_path / "h.pt").exists()
    for options in ({"batch_size": 0}, {"max_epochs": 0}, {"patience": 0}):
        with pytest.raises(HeadError, match="--batch-size, --max-epochs and --patience must be at least 1"):
            TrainingOptions(**options).check()
