"""`tl sweep`: a grid of heads from one cache, ranked on validation; mini-batch heads of a layer trained
in one pass over the codes (and equal to the same head trained alone); the best a normal head file;
a sweep killed midway and run again skips what it finished and ends with the same leaderboard."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.code_rows import CacheRows
from pipeline.errors import HeadError
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.model_files import load_head
from pipeline.sweep import SweepConfig, run_sweep
from pipeline.training import TrainingOptions
from tests.conftest import blobs, multi_label_blobs, start_stage, write_code_cache


def _two_layer_cache(root: Path, seed: int, n: int, draw: int = 0) -> Path:
    """A cache with a weak layer (`noisy`) and a clear one (`clear`) over the same rows."""
    from cache.writer import CacheWriter

    clear, targets = blobs(seed, n=n, classes=3, width=16, draw=draw)
    noisy = clear + np.random.default_rng(seed + 7 + draw).normal(0, 6, clear.shape)
    key = {"backbone": "synthetic", "weights": "synthetic", "taps": ["clear", "noisy"], "precision": "float32",
           "preprocessing": {"resize": 0, "crop": 0, "mean": [0, 0, 0], "std": [1, 1, 1]},
           "dataset": {"format": "synthetic", "rows": n}, "layout": {"dtype": "float32", "shard_rows": 64},
           "patches": None}
    with CacheWriter(root, key, ["a", "b", "c"], {"clear": 16, "noisy": 16}, "float32", 64, n) as writer:
        for index, start in enumerate(range(0, n, 64)):
            stop = min(start + 64, n)
            writer.write_shard(index, {"clear": clear[start:stop].astype(np.float32),
                                       "noisy": noisy[start:stop].astype(np.float32)},
                               targets[start:stop], [f"row{i:05d}" for i in range(start, stop)], [])
        writer.finish()
    return root


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return _two_layer_cache(root / "train", 1, 300), _two_layer_cache(root / "test", 1, 120, draw=1)


def test_a_grid_ranked_on_validation_with_a_usable_best_head(run_tl, caches, tmp_path):
    train, test = caches
    result = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", "--heads", "logreg,svm,mlp",
                    "--C", "0.01,1", "--hidden", "8,16x8", "--lr", "0.05", "--max-epochs", "3", "--quiet")
    assert result.code == 0, result
    board = json.loads((tmp_path / "s/sweep.json").read_text())
    names = [row["name"] for row in board["heads"]]
    assert len(names) == 2 * (2 + 2 + 2) and len(set(names)) == len(names)  # layers x (logreg C, svm C, mlp hidden)
    scores = [row["val_score"] for row in board["heads"]]
    assert scores == sorted(scores, reverse=True) and board["metric"] == "accuracy" and board["on"] == "validation"
    assert board["best"] == names[0] and names[0].startswith("clear-")  # the clear layer wins
    assert "noisy-mlp-h16x8-lr0.05" in names and "clear-svm-C0.01" in names
    markdown = (tmp_path / "s/sweep.md").read_text()
    assert "| 1 | `" + names[0] + "`" in markdown and (tmp_path / "s/sweep.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "s/heads").glob("*.pt")) == [names[0] + ".pt"]  # --keep best
    assert f"best: {tmp_path / 's/best.pt'} ({names[0]})" in result.out

    head, metadata = load_head(tmp_path / "s/best.pt")
    assert metadata["layer"] == "clear"
    evaluated = run_tl("evaluate", "--head", tmp_path / "s/best.pt", "--cache", test, "--out", tmp_path / "r")
    assert evaluated.code == 0 and json.loads((tmp_path / "r/report.json").read_text())["accuracy"] > 0.8

    kept = run_tl("sweep", "--cache", train, "--out", tmp_path / "all", "--layers", "clear", "--C", "0.1,1",
                  "--keep", "all", "--quiet")
    assert kept.code == 0 and len(list((tmp_path / "all/heads").glob("*.pt"))) == 2, kept
    validated = run_tl("sweep", "--cache", train, "--val-cache", test, "--out", tmp_path / "v", "--layers", "clear",
                       "--C", "1", "--quiet")
    assert validated.code == 0, validated
    record = json.loads(next((tmp_path / "v/heads").glob("*.json")).read_text())
    assert record["shared"]["val_fraction"] is None  # the unused 0.2 default was recorded beside the cache
    defaults = [json.loads(path.read_text())["shared"]["val_fraction"] for path in (tmp_path / "s/heads").glob("*.json")]
    assert defaults and set(defaults) == {0.2}  # as before: earlier sweeps' records are still reused
    assert (tmp_path / "v/sweep.md").read_text().startswith("# Sweep of 1 head on ")


def test_mini_batch_heads_share_each_read_and_train_as_alone(caches, tmp_path, monkeypatch):
    """Five sgd logreg heads read the codes as often as one does; each equals the head fit-head trains
    alone with its C and lr (a linear head has no randomness in training)."""
    train, _ = caches
    reads = []
    blocks = CacheRows.blocks
    monkeypatch.setattr(CacheRows, "blocks", lambda self, rng=None: (reads.append(len(self)), blocks(self, rng))[1])
    options = TrainingOptions(max_epochs=3, batch_size=32)

    def sweep(out, costs):
        reads.clear()
        run_sweep(SweepConfig(cache=train, out=out, layers=("noisy",), C=costs, lr=(0.05,), solver="sgd",
                              keep="all", training=options))
        return list(reads)

    one, five = sweep(tmp_path / "one", (1.0,)), sweep(tmp_path / "five", (0.01, 0.1, 1.0, 10.0, 100.0))
    assert len(five) == len(one) and sum(five) == sum(one), (str(one), str(five))

    fit_head(FitHeadConfig(cache=train, out=tmp_path / "alone.pt", layer="noisy", C=(0.1,), solver="sgd",
                           val_fraction=0.2, training=TrainingOptions(max_epochs=3, batch_size=32, lr=0.05)))
    alone, _ = load_head(tmp_path / "alone.pt")
    together, _ = load_head(tmp_path / "five/heads/noisy-logreg-C0.1-lr0.05.pt")
    np.testing.assert_allclose(together.coef_, alone.coef_, atol=1e-6)
    assert [p["train_loss"] for p in together.curve_] == pytest.approx([p["train_loss"] for p in alone.curve_])


def test_a_killed_sweep_resumes_to_the_same_leaderboard(caches, tmp_path):
    train, _ = caches
    config = dict(cache=train, heads=("svm", "logreg"), C=tuple(10.0 ** k for k in range(-4, 4)), max_iter=20000)
    whole = run_sweep(SweepConfig(out=tmp_path / "whole", **config))
    killed = SweepConfig(out=tmp_path / "killed", **config)
    process = start_stage("pipeline.sweep:run_sweep", killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed/heads").glob("*.json")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finished = len(list((tmp_path / "killed/heads").glob("*.json")))
    resumed = run_sweep(killed)
    assert resumed.reused == finished and resumed.trained == len(whole.rows) - finished
    assert [(r["name"], r["val_score"]) for r in resumed.rows] == [(r["name"], r["val_score"]) for r in whole.rows]
    again = run_sweep(killed)  # everything finished: nothing trains, the same board
    assert again.trained == 0 and [r["name"] for r in again.rows] == [r["name"] for r in whole.rows]


@pytest.mark.parametrize("args,message", [
    (["--heads", "forest"], "unknown head 'forest' in --heads"),
    (["--layers", "fc9"], "has no layer fc9; its layers: clear, noisy"),
    (["--C", "0,1"], "--C values must be positive and finite, got 0, 1"),
    (["--heads", "mlp", "--lr", "-1"], "error: --lr values must be positive and finite, got -1\n"),  # no C quoted
    (["--C", "one"], "--C takes float numbers"),
    (["--heads", "mlp", "--hidden", "wide"], "--hidden takes widths such as 256,1024 or 512x256"),
    (["--heads", "mlp", "--hidden", "0x8"], "--hidden takes positive widths, one setting per comma"),
    (["--heads", ","], "--heads is empty"),
    (["--heads", "logreg,"], "--heads is empty or has an empty name"),
    (["--layers", "clear,,noisy"], "--layers has an empty layer name (a comma too many?); layers of cache"),
])
def test_bad_grids_are_one_line(run_tl, caches, tmp_path, args, message):
    train, _ = caches
    result = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", *args)
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1, result
    assert not (tmp_path / "s" / "sweep.json").exists()


def test_an_mlp_trains_in_a_sweep_as_it_does_alone(caches, tmp_path):
    """Each network of a shared pass draws its dropout masks from its own seeded generator."""
    train, _ = caches
    options = TrainingOptions(max_epochs=2, batch_size=32, lr=0.05)
    run_sweep(SweepConfig(cache=train, out=tmp_path / "s", layers=("clear",), heads=("mlp",), hidden=((8,), (4,)),
                          lr=(0.05,), keep="all", training=options))
    fit_head(FitHeadConfig(cache=train, out=tmp_path / "alone.pt", layer="clear", head="mlp", hidden=(8,), dropout=0.5,
                           val_fraction=0.2, training=options))
    alone, _ = load_head(tmp_path / "alone.pt")
    together, _ = load_head(tmp_path / "s/heads/clear-mlp-h8-lr0.05.pt")
    for (name, a), (_, b) in zip(alone.network_.state_dict().items(), together.network_.state_dict().items()):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-6), name


def test_hidden_0_is_an_mlp_without_a_hidden_layer_as_fit_head_makes_it(run_tl, caches, tmp_path):
    """fit-head's --hidden '' (no hidden layer: softmax regression trained as the mlp is) had no spelling in a
    sweep, whose --hidden lists layouts: 0 is that layout, named h0, beside the others of the grid."""
    train, _ = caches
    swept = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", "--layers", "clear", "--heads", "mlp",
                   "--hidden", "0,8", "--lr", "0.05", "--max-epochs", "2", "--keep", "all", "--quiet")
    assert swept.code == 0, swept
    alone = run_tl("fit-head", "--cache", train, "--out", tmp_path / "alone.pt", "--layer", "clear", "--head", "mlp",
                   "--hidden", "", "--lr", "0.05", "--max-epochs", "2", "--val-fraction", "0.2", "--quiet")
    assert alone.code == 0, alone
    together, _ = load_head(tmp_path / "s/heads/clear-mlp-h0-lr0.05.pt")
    assert together.hidden == () and len(together.network_) == 2  # standardization, one affine map
    assert (tmp_path / "s/heads/clear-mlp-h8-lr0.05.pt").is_file()
    for (name, a), (_, b) in zip(load_head(tmp_path / "alone.pt")[0].network_.state_dict().items(),
                                 together.network_.state_dict().items()):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-6), name
    assert "| `clear-mlp-h0-lr0.05` | clear | mlp | – | 0 | 0.05 |" in (tmp_path / "s" / "sweep.md").read_text()



@pytest.mark.parametrize("optimizer, rate", [("sgd", "0.05"), ("adam", "0.001")])
def test_the_leaderboard_shows_the_default_lr_a_head_trained_at(caches, tmp_path, optimizer, rate):
    """Without --lr an mlp (and logreg --solver sgd) trains at its optimizer's default rate, which sweep.md
    showed as '–', as if the head had no rate; heads without one (lbfgs logreg, svm) still show '–'."""
    train, _ = caches
    options = TrainingOptions(optimizer=optimizer, max_epochs=1, batch_size=64)
    run_sweep(SweepConfig(cache=train, out=tmp_path / "sgd", layers=("clear",), heads=("mlp", "logreg"), C=(1.0,),
                          hidden=((4,),), solver="sgd", training=options))
    run_sweep(SweepConfig(cache=train, out=tmp_path / "exact", layers=("clear",), heads=("logreg", "svm"), C=(1.0,),
                          training=options))
    trained = (tmp_path / "sgd/sweep.md").read_text()
    assert f"| `clear-mlp-h4` | clear | mlp | – | 4 | {rate} |" in trained
    assert f"| `clear-logreg-C1` | clear | logreg | 1 | – | {rate} |" in trained
    exact = (tmp_path / "exact/sweep.md").read_text()
    assert "| `clear-logreg-C1` | clear | logreg | 1 | – | – |" in exact
    assert "| `clear-svm-C1` | clear | svm | 1 | – | – |" in exact

def test_a_diverging_head_leaves_the_pass_and_ranks_last(run_tl, caches, tmp_path):
    train, _ = caches
    result = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", "--layers", "clear", "--heads", "mlp",
                    "--hidden", "8", "--lr", "0.05,1e12", "--max-epochs", "3", "--quiet")
    assert result.code == 0, result
    board = json.loads((tmp_path / "s/sweep.json").read_text())["heads"]
    assert [row["name"] for row in board] == ["clear-mlp-h8-lr0.05", "clear-mlp-h8-lr1e+12"]
    assert board[0]["diverged"] is None and board[1]["diverged"] == 1 and board[0]["epochs"] == 3


def test_a_head_whose_validation_loss_overflows_has_diverged(run_tl, caches, tmp_path):
    # the epoch's last steps (lr 1e4) leave finite weights whose validation logits overflow: the loss was
    # inf, and writing the head file (its curve in JSON) ended fit-head and the sweep in a ValueError
    train, _ = caches
    grid = ["--layers", "clear", "--heads", "mlp", "--hidden", "8", "--max-epochs", "1", "--batch-size", "1000",
            "--quiet"]
    result = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", *grid, "--lr", "0.05,1e4")
    assert result.code == 0, result
    board = json.loads((tmp_path / "s/sweep.json").read_text())["heads"]
    assert [(row["name"], row["diverged"]) for row in board] == [("clear-mlp-h8-lr0.05", None),
                                                                ("clear-mlp-h8-lr10000", 1)]
    alone = run_tl("fit-head", "--cache", train, "--layer", "clear", "--head", "mlp", "--hidden", "8", "--lr", "1e4",
                   "--max-epochs", "1", "--batch-size", "1000", "--val-fraction", "0.2", "--out", tmp_path / "h.pt")
    assert alone.code == 2 and "the validation loss of mlp became inf in epoch 1; lower --lr" in alone.err, alone
    assert not (tmp_path / "h.pt").exists()


def test_a_head_alone_in_its_pass_diverges_as_among_others(run_tl, caches, tmp_path):
    # a widened grid leaves the new lr alone in its pass (the other heads finished before), as does one mlp
    # per layer beside lbfgs heads: its divergence ended the sweep in an error; the fresh wide grid ranks it last
    train, _ = caches
    grid = ["--cache", train, "--layers", "clear", "--heads", "mlp", "--hidden", "8", "--max-epochs", "3", "--quiet"]
    assert run_tl("sweep", *grid, "--out", tmp_path / "s", "--lr", "0.05").code == 0
    widened = run_tl("sweep", *grid, "--out", tmp_path / "s", "--lr", "0.05,1e12")
    assert widened.code == 0 and "1 trained, 1 finished before" in widened.out, widened
    assert run_tl("sweep", *grid, "--out", tmp_path / "fresh", "--lr", "0.05,1e12").code == 0
    boards = [json.loads((tmp_path / folder / "sweep.json").read_text())["heads"] for folder in ("s", "fresh")]
    assert [(row["name"], row["diverged"]) for row in boards[0]] == [("clear-mlp-h8-lr0.05", None),
                                                                    ("clear-mlp-h8-lr1e+12", 1)]
    assert [row["val_score"] for row in boards[0]] == [row["val_score"] for row in boards[1]]
    beside = run_tl("sweep", *grid, "--out", tmp_path / "beside", "--lr", "1e12", "--heads", "mlp,logreg", "--C", "1")
    assert beside.code == 0, beside
    board = json.loads((tmp_path / "beside/sweep.json").read_text())["heads"]
    assert [(row["name"], row["diverged"]) for row in board] == [("clear-logreg-C1", None), ("clear-mlp-h8-lr1e+12", 1)]
    # every head of a pass diverging in one batch left none to train on the next: a RuntimeError (torch.stack);
    # then best.pt was a head of NaN probabilities, written without a word. Now one line, and no best.pt
    every = run_tl("sweep", *grid, "--out", tmp_path / "all", "--lr", "1e12,1e13")
    assert every.code == 2 and every.err == ("error: every head of the sweep diverged (its loss stopped being finite); "
                                             "none is best and no best.pt was written; lower --lr (tried 1e+12, "
                                             "1e+13)\n"), every
    assert not (tmp_path / "all/best.pt").exists() and len(list((tmp_path / "all/heads").glob("*.json"))) == 2
    # the leaderboard says which heads diverged, on the console and in sweep.md
    shown = run_tl("sweep", *grid[:-1], "--out", tmp_path / "fresh", "--lr", "0.05,1e12")
    assert shown.code == 0 and "clear-mlp-h8-lr1e+12" in shown.out and "  diverged in epoch 1" in shown.out, shown
    assert "| diverged (epoch 1) |" in (tmp_path / "fresh/sweep.md").read_text()


def test_every_head_diverging_at_the_default_lr_names_no_tried_rates(caches, tmp_path, monkeypatch):
    """No --lr given: the heads train at the optimizer's default, and the error said "(tried none)"."""
    import pipeline.training

    monkeypatch.setitem(pipeline.training.DEFAULT_LR, "sgd", 1e12)
    config = SweepConfig(cache=caches[0], out=tmp_path / "s", layers=("clear",), heads=("mlp",), hidden=((8,),),
                         training=TrainingOptions(max_epochs=3, quiet=True))
    with pytest.raises(HeadError) as refused:
        run_sweep(config, say=lambda text: None)
    assert str(refused.value).endswith("no best.pt was written; lower --lr"), refused.value


def test_a_diverged_head_of_a_multi_label_cache_ranks_last(run_tl, tmp_path):
    # its last finite weights give NaN probabilities on some validation rows: the mAP that ranks it (and
    # fit-head's choice among --C values of logreg --solver sgd) ended in scikit-learn's "Input contains NaN"
    codes, targets = multi_label_blobs(4, n=300)
    cache = write_code_cache(tmp_path / "multi", codes.astype(np.float32), targets, ["a", "b", "c"])
    result = run_tl("sweep", "--cache", cache, "--out", tmp_path / "s", "--heads", "mlp", "--hidden", "8",
                    "--lr", "0.05,1e12", "--max-epochs", "3", "--quiet")
    assert result.code == 0, result
    board = json.loads((tmp_path / "s/sweep.json").read_text())
    assert board["metric"] == "mAP" and [row["diverged"] for row in board["heads"]] == [None, 1]
    assert all(0 <= row["val_score"] <= 1 for row in board["heads"])
    chosen = run_tl("fit-head", "--cache", cache, "--head", "logreg", "--solver", "sgd", "--C", "1,10", "--lr", "1e12",
                    "--max-epochs", "3", "--val-fraction", "0.2", "--out", tmp_path / "h.pt")
    assert "Traceback" not in chosen.err and "NaN" not in chosen.err, chosen


def test_a_diverged_head_of_a_patch_cache_is_ranked_by_the_mean_ap_of_its_object_classes():
    # the patch mAP called scikit-learn per class itself: NaN probabilities were its "Input contains NaN"
    from types import SimpleNamespace

    from sklearn.metrics import average_precision_score

    from pipeline.code_rows import CodeRows
    from pipeline.sweep import _score

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 200)  # class 0: background
    rows = CodeRows.from_arrays(rng.normal(size=(200, 5)).astype(np.float32), targets)
    probabilities = rng.random((200, 4))
    head = SimpleNamespace(num_classes_=4, predict_proba=lambda codes: probabilities[:len(codes)])
    reader = SimpleNamespace(manifest=SimpleNamespace(key={"patches": {"scales": [1]}}))
    expected = np.mean([average_precision_score(targets == c, probabilities[:, c]) for c in (1, 2, 3)])
    assert _score(head, rows, reader) == ("mAP", pytest.approx(expected, abs=1e-12))
    probabilities[::7] = np.nan
    metric, value = _score(head, rows, reader)
    assert metric == "mAP" and 0 <= value <= 1


def test_a_validation_cache_without_a_swept_layer_is_refused_before_any_head_trains(run_tl, caches, tmp_path):
    # it was found at that layer: every head of the layers before it had trained by then
    train, _ = caches
    codes, targets = blobs(1, n=60, classes=3, width=16, draw=2)
    val = write_code_cache(tmp_path / "val", codes.astype(np.float32), targets, ["a", "b", "c"], layer="clear")
    result = run_tl("sweep", "--cache", train, "--val-cache", val, "--C", "1", "--out", tmp_path / "s", "--quiet")
    assert result.code == 2 and not (tmp_path / "s").exists(), result
    assert result.err == (f"error: --val-cache {val} has no layer noisy; its layers: clear; extract it with these "
                          "--layers too, or pass --layers\n")
    assert run_tl("sweep", "--cache", train, "--val-cache", val, "--layers", "clear", "--C", "1",
                  "--out", tmp_path / "s", "--quiet").code == 0



def test_a_validation_cache_of_another_backbone_is_refused_as_such(run_tl, caches, tmp_path):
    """A cache of another backbone lacks the swept layers too: a sweep said only that, as if --layers were
    the fix; it, and fit-head, name the backbone of each cache and re-extracting the validation images."""
    train, _ = caches
    codes, targets = blobs(1, n=60, classes=3, width=16, draw=2)
    val = write_code_cache(tmp_path / "val", codes.astype(np.float32), targets, ["a", "b", "c"], layer="fc7",
                           backbone="vgg16")
    expected = (f"error: --val-cache {val} was made by another backbone than --cache {train} (backbone: synthetic -> "
                "vgg16); extract the validation images with the same backbone as --cache\n")
    swept = run_tl("sweep", "--cache", train, "--val-cache", val, "--C", "1", "--out", tmp_path / "s", "--quiet")
    assert swept.code == 2 and swept.err == expected and not (tmp_path / "s").exists(), swept
    fitted = run_tl("fit-head", "--cache", train, "--layer", "clear", "--val-cache", val, "--out", tmp_path / "h.pt")
    assert fitted.code == 2 and fitted.err == expected and not (tmp_path / "h.pt").exists(), fitted

def test_records_answer_only_for_the_same_codes_and_keep(run_tl, caches, tmp_path):
    train, test = caches
    common = ["--out", tmp_path / "s", "--layers", "clear", "--C", "0.1,1", "--quiet"]
    assert "2 trained, 0 finished before" in run_tl("sweep", "--cache", train, *common).out
    assert "0 trained, 2 finished before" in run_tl("sweep", "--cache", train, *common).out
    assert "2 trained, 0 finished before" in run_tl("sweep", "--cache", test, *common).out  # other data
    kept = run_tl("sweep", "--cache", test, *common, "--keep", "all")  # the dropped head's file is made again
    assert "1 trained, 1 finished before" in kept.out and len(list((tmp_path / "s/heads").glob("*.pt"))) == 2


@pytest.mark.parametrize("args,message", [
    (["--C", "1,1.0000001"], "two settings of the grid are both named clear-logreg-C1"),
    (["--C", "inf"], "--C values must be positive and finite"),
    (["--heads", "mlp", "--momentum", "-1"], "--momentum and --weight-decay must be finite and 0 or more"),
    # an infinite momentum was a ValueError traceback writing the head's JSON; an infinite decay blamed the cache
    (["--heads", "mlp", "--momentum", "inf"], "--momentum and --weight-decay must be finite and 0 or more, got inf"),
    (["--heads", "mlp", "--weight-decay", "inf"], "--momentum and --weight-decay must be finite and 0 or more"),
    (["--max-iter", "0"], "Invalid value for '--max-iter': 0 is not in the range x>=1."),
    (["--val-fraction", "0"], "Invalid value for '--val-fraction': 0.0 is not in the range 0<x<1."),  # ranks on validation
    # the fraction was ignored beside a validation cache, yet recorded; fit-head refuses the pair
    # ... and its remedy offered --val-fraction 0, which a sweep refuses
    (["--val-fraction", "0.3", "--val-cache", "{train}"], "both name validation rows; pass one of them\n"),
    (["--val-cache", "{train}"], "holds the codes of the training cache"),  # it scored the rows heads train on
    (["--out", "{train}/board"], "lies inside --cache"),  # a sweep's heads and board among the shards
])
def test_more_bad_grids_are_one_line(run_tl, caches, tmp_path, args, message):
    train, _ = caches
    args = [str(arg).format(train=train) for arg in args]
    result = run_tl("sweep", "--cache", train, "--out", tmp_path / "s", "--layers", "clear", *args)
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1, result
    assert result.out == "" and not (tmp_path / "s").exists()  # refused before the folder and any progress line


def test_an_out_that_cannot_be_made_is_one_line(run_tl, caches, tmp_path):
    (tmp_path / "file").write_text("")
    result = run_tl("sweep", "--cache", caches[0], "--out", tmp_path / "file" / "sub")
    assert result.code == 2 and "cannot make the sweep folder" in result.err, result


def test_records_of_the_same_key_but_other_codes_are_not_reused(run_tl, caches, tmp_path):
    """A cache whose changed inputs redid a shard keeps its key: the records compare the cache's content
    digest too, so heads of the old codes are trained again."""
    redone = _two_layer_cache(tmp_path / "redone", 1, 300, draw=2)  # same key and rows, other codes
    common = ["--out", tmp_path / "s", "--layers", "clear", "--C", "0.1,1", "--quiet"]
    assert "2 trained, 0 finished before" in run_tl("sweep", "--cache", caches[0], *common).out
    assert "2 trained, 0 finished before" in run_tl("sweep", "--cache", redone, *common).out


def test_a_second_sweep_into_one_folder_is_refused_and_progress_counts_its_own_layer(run_tl, caches, tmp_path):
    from pipeline.files import OutputLock
    from pipeline.sweep import LOCK, SweepConfig, run_sweep

    train, _ = caches
    out = tmp_path / "s"
    out.mkdir()
    with OutputLock(out / LOCK, "sweeping"):  # another sweep at work there
        refused = run_tl("sweep", "--cache", train, "--out", out, "--layers", "clear", "--quiet")
    assert refused.code == 2 and "is sweeping into" in refused.err and refused.err.count("\n") == 1, refused
    said = []
    run_sweep(SweepConfig(cache=train, out=out, layers=("clear",), C=(0.1, 1.0)), say=said.append)
    assert said == ["clear: training 2 heads (0 of this layer finished before)"]
    said.clear()
    run_sweep(SweepConfig(cache=train, out=out, layers=("clear", "noisy"), C=(0.1, 1.0)), say=said.append)
    assert said == ["noisy: training 2 heads (0 of this layer finished before)"]  # not clear's 2


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EFBIG])
def test_a_sweep_that_finds_no_room_says_to_make_room_there_and_reuse_its_heads(run_tl, caches, tmp_path,
                                                                               monkeypatch, error_number):
    """A file-size limit (EFBIG) while a sweep wrote said 'raise the limit or write to another file system and
    re-run the same command': the re-run reuses the heads finished where they are, and another file system is
    another --out, whose sweep starts over. The line says what makes room in place, then the re-run, and the
    other file system as the start over it is."""
    import pipeline.files
    import pipeline.sweep
    from tests.conftest import disk_full_at

    written = []

    def second_record_full(path, *args, **options):
        written.append(path)
        if len(written) == 2:  # the second head's record: the first head is finished
            disk_full_at(monkeypatch, 1, error_number)
        return pipeline.files.write_bytes(path, *args, **options)

    monkeypatch.setattr(pipeline.sweep, "write_bytes", second_record_full)
    common = ["--cache", caches[0], "--out", tmp_path / "s", "--layers", "clear", "--C", "0.1,1", "--quiet"]
    stopped = run_tl("sweep", *common)
    record = tmp_path / "s" / "heads" / "clear-logreg-C1.json"
    room = {errno.ENOSPC: f"no space left on the device of {record}; free space",
            errno.EFBIG: f"{record} is too large for its file system or the limit `ulimit -f`; raise the limit"}[
        error_number]
    then = " and re-run the same command: it reuses the heads finished"
    other = "; or write to another file system (an --out there starts over)" if error_number == errno.EFBIG else ""
    assert stopped.code == 2 and stopped.err == f"error: {room}{then}{other}\n", stopped
    monkeypatch.undo()
    assert "1 trained, 1 finished before" in run_tl("sweep", *common).out


def test_a_sweep_folder_replaces_only_tls_own_best_and_leaderboard_unless_told(run_tl, caches, tmp_path):
    """`tl sweep --out DIR` wrote best.pt, sweep.json, sweep.md and sweep.png over whatever files of those names
    DIR held, without a word. A best.pt that is no tl head, or a leaderboard file beside no sweep.json of tl's, is
    refused in one line before any head trains, and kept; a sweep's own are replaced (a re-run, a wider grid);
    --overwrite replaces any."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "best.pt").write_text("my best notes\n")
    (folder / "sweep.md").write_text("# my sweep notes\n")
    common = ["--cache", caches[0], "--out", folder, "--layers", "clear", "--C", "1", "--quiet"]
    remedy = "; choose another --out, or pass --overwrite to replace it\n"
    best = run_tl("sweep", *common)
    assert best.code == 2 and best.err == (f"error: {folder / 'best.pt'} holds a file that tl did not write as a "
                                           f"head file{remedy}"), best
    (folder / "best.pt").unlink()
    board = run_tl("sweep", *common)
    assert board.code == 2 and board.err == (f"error: {folder / 'sweep.md'} holds a file that tl did not write as a "
                                             f"sweep leaderboard file{remedy}"), board
    assert sorted(path.name for path in folder.iterdir()) == ["sweep.md"]  # nothing trained, no heads/ made
    assert (folder / "sweep.md").read_text() == "# my sweep notes\n"
    told = run_tl("sweep", *common, "--overwrite")
    assert told.code == 0 and "1 trained" in told.out, told
    wider = run_tl("sweep", *common[:-3], "--C", "0.1,1", "--quiet")  # the sweep's own files: replaced
    assert wider.code == 0 and "1 trained, 1 finished before" in wider.out, wider
    assert len(json.loads((folder / "sweep.json").read_text())["heads"]) == 2
