"""What a new user sees: progress bars on a terminal for every long step (and none with --quiet or in a
log), summaries in words that agree with the files written, refusals before any work."""

from __future__ import annotations

import pytest

from pipeline import progress as progress_module
from pipeline.errors import FinetuneError
from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import FinetuneConfig, run_finetune
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.model_files import checkpoint_paths
from pipeline.predict import PredictConfig, run_predict
from pipeline.training import TrainingOptions
from tests.conftest import blobs, make_image_folder, write_code_cache


@pytest.fixture(scope="module")
def small_head(tmp_path_factory):
    """Two classes of images, a pool5 cache of a seeded random AlexNet and a logreg head on it."""
    root = tmp_path_factory.mktemp("first-hour")
    make_image_folder(root / "train", classes=("a", "b"), per_class=4)
    run_extract(ExtractConfig(data=root / "train", out=root / "cache", backbone="alexnet", weights="none",
                              layers=("pool5",), dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=root / "cache", out=root / "head.pt"))
    return root


@pytest.fixture
def terminal(monkeypatch):
    """stderr treated as a terminal, so bars are drawn (into pytest's captured stderr)."""
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)


def test_bars_show_on_a_terminal_only_and_never_with_quiet(capsys, monkeypatch):
    def drawn(quiet: bool) -> str:
        for _ in progress_module.progress(range(3), desc="probe", unit="step", quiet=quiet):
            pass
        return capsys.readouterr().err

    assert "probe" not in drawn(False)  # pytest's stderr is no terminal: a log stays clean
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    assert "probe" in drawn(False) and "3/3" in drawn(False)
    assert drawn(True) == ""


def test_finetune_shows_each_batch_with_loss_and_rate(small_head, tmp_path, capsys, terminal):
    config = FinetuneConfig(data=small_head / "train", head=small_head / "head.pt", out=tmp_path / "m.pt", epochs=2,
                            batch_size=4, workers=0)
    run_finetune(config, say=lambda text: None)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "loss=" in err and "images_per_s=" in err
    run_finetune(FinetuneConfig(**{**config.__dict__, "out": tmp_path / "q.pt", "quiet": True}),
                 say=lambda text: None)
    assert "epoch 1/2" not in capsys.readouterr().err


def test_evaluate_and_predict_with_a_model_show_bars(small_head, tmp_path, capsys, terminal):
    model = tmp_path / "m.pt"
    run_finetune(FinetuneConfig(data=small_head / "train", head=small_head / "head.pt", out=model, epochs=0,
                                workers=0, quiet=True), say=lambda text: None)
    capsys.readouterr()
    run_evaluate(EvaluateConfig(head=None, cache=None, model=model, data=small_head / "train", split="train",
                                out=tmp_path / "report", workers=0))
    assert "evaluate" in capsys.readouterr().err
    labels = list(run_predict(PredictConfig(head=None, model=model, paths=(small_head / "train",), workers=0)))
    assert len(labels) == 8 and "predict" in capsys.readouterr().err
    list(run_predict(PredictConfig(head=None, model=model, paths=(small_head / "train",), workers=0, quiet=True)))
    assert "predict" not in capsys.readouterr().err


def test_an_existing_checkpoint_is_refused_before_any_work_is_announced(small_head, tmp_path):
    config = FinetuneConfig(data=small_head / "train", head=small_head / "head.pt", out=tmp_path / "m.pt", epochs=1,
                            batch_size=4, workers=0, quiet=True)
    run_finetune(config, say=lambda text: None)
    said = []
    with pytest.raises(FinetuneError, match="holds an earlier run; pass --resume"):
        run_finetune(config, say=said.append)
    assert said == []  # no "training N parameters" before the refusal
    checkpoint_paths(config.out)[0].unlink()
    run_finetune(FinetuneConfig(**{**config.__dict__, "resume": True}), say=said.append)  # stopped in epoch 1
    assert said[0] == (f"no checkpoint {checkpoint_paths(config.out)[0]} yet (the run stopped before its first epoch "
                       "ended): starting from the head")


def test_fit_head_reports_the_epoch_it_kept(tmp_path):
    codes, targets = blobs(0, n=240, classes=3, width=8, spread=0.6)
    cache = write_code_cache(tmp_path / "cache", codes, targets, ["a", "b", "c"])
    result = fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h.pt", head="mlp", hidden=(16,), val_fraction=0.3,
                                    training=TrainingOptions(max_epochs=30, early_stop=True, patience=2, lr=0.5)))
    from pipeline.model_files import load_head

    head, _ = load_head(tmp_path / "h.pt")
    kept = [point["epoch"] for point in head.curve_ if point.get("kept")]
    assert result.chosen["epoch"] == kept[0] and result.epochs == len(head.curve_)


def test_summaries_are_sentences(tmp_path, run_tl):
    codes, targets = blobs(0, n=200, classes=3, width=8)
    cache = write_code_cache(tmp_path / "cache", codes, targets, ["a", "b", "c"])
    svm = run_tl("fit-head", "--cache", cache, "--head", "svm", "--C", "0.01,1", "--val-fraction", "0.3",
                 "--out", tmp_path / "svm.pt")
    assert svm.code == 0 and "C per class " in svm.out and "[" not in svm.out and "{" not in svm.out, svm
    mlp = run_tl("fit-head", "--cache", cache, "--head", "mlp", "--hidden", "8", "--max-epochs", "1", "--quiet",
                 "--out", tmp_path / "mlp.pt")
    assert "trained 1 epoch" in mlp.out and "epochs" not in mlp.out, mlp
    report = run_tl("evaluate", "--head", tmp_path / "svm.pt", "--cache", cache, "--out", tmp_path / "report",
                    "--save-predictions", tmp_path / "elsewhere.csv")
    assert report.code == 0, report
    listed = next(line for line in report.out.splitlines() if line.startswith("report: "))
    assert "elsewhere.csv" not in listed and f"predictions: {tmp_path / 'elsewhere.csv'}" in report.out
    inside = run_tl("evaluate", "--head", tmp_path / "svm.pt", "--cache", cache, "--out", tmp_path / "report",
                    "--save-predictions", tmp_path / "report" / "p.csv")  # said once, on its own line
    listed = next(line for line in inside.out.splitlines() if line.startswith("report: "))
    assert "p.csv" not in listed and f"predictions: {tmp_path / 'report' / 'p.csv'}" in inside.out, inside


def test_a_terminal_means_stdout_and_stderr_both(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for stdout, stderr, expected in ((True, True, True), (False, True, False), (True, False, False)):
        monkeypatch.setattr("sys.stdout", Stream(stdout))
        monkeypatch.setattr("sys.stderr", Stream(stderr))
        assert progress_module.on_terminal() is expected


def test_evaluating_a_cache_shows_a_bar_unless_quiet(tmp_path, capsys, terminal):
    codes, targets = blobs(0, n=200, classes=3, width=8)
    cache = write_code_cache(tmp_path / "cache", codes, targets, ["a", "b", "c"])
    fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h.pt"))
    capsys.readouterr()
    run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=cache, out=tmp_path / "r"))
    assert "score" in capsys.readouterr().err
    run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=cache, out=tmp_path / "q", quiet=True))
    assert "score" not in capsys.readouterr().err


def test_a_checkpoint_of_the_earlier_optimizer_layout_is_refused_in_one_line(small_head, tmp_path):
    import json as json_module

    import torch

    from pipeline.model_files import read_payload, write_payload

    config = FinetuneConfig(data=small_head / "train", head=small_head / "head.pt", out=tmp_path / "m.pt", epochs=1,
                            batch_size=4, workers=0, quiet=True)
    run_finetune(config, say=lambda text: None)
    last = checkpoint_paths(config.out)[0]
    payload, metadata = read_payload(last, "checkpoint", "", require_checksum=True)
    metadata["format"] = "tl-checkpoint/1"  # written by a tl whose optimizer had one group per learning rate
    write_payload({**payload, "metadata": json_module.dumps(metadata)}, last, "checkpoint")
    with pytest.raises(FinetuneError, match="does not match this run .*pass --overwrite"):
        run_finetune(FinetuneConfig(**{**config.__dict__, "resume": True, "epochs": 2}), say=lambda text: None)
    assert torch.load(last, weights_only=True)  # refused, not damaged
