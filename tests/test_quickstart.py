"""The quickstart end to end on a reduced set of digits: real offline weights, accuracy well above
chance, and a second run reuses the caches; `tl quickstart` turns its flags into the config and prints."""

from __future__ import annotations

import json

import pytest

from pipeline.quickstart import QuickstartConfig, run_quickstart


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One quickstart on 10 digits per class (75/25 split: 80 train, 20 test images): (config, result)."""
    config = QuickstartConfig(out=tmp_path_factory.mktemp("quickstart") / "qs", per_class=10, quiet=True)
    return config, run_quickstart(config, say=lambda text: None)


def test_quickstart_end_to_end_and_resume(first_run):
    config, first = first_run
    out = config.out
    assert first.report == out / "report" / "report.md" and first.report.is_file()
    assert first.head == out / "heads" / "digits-logreg.pt" and first.head.is_file()
    assert [extract.shards_written for extract in first.extracts.values()] == [1, 1]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["rows"] == 20 and report["accuracy"] >= 0.5  # ten classes: chance is 0.1
    assert (first.accuracy, first.mAP) == (report["accuracy"], report["mAP"])
    assert (out / "report" / "confusion_matrix.png").is_file()
    said = []
    second = run_quickstart(config, say=said.append)
    assert [(extract.shards_written, extract.shards_reused) for extract in second.extracts.values()] == [(0, 1)] * 2
    assert sum("(reused)" in line for line in said) == 2, said
    assert second.accuracy == report["accuracy"]
    assert json.loads((out / "report" / "report.json").read_text())["accuracy"] == report["accuracy"]


def test_cli_quickstart_turns_flags_into_the_config_and_prints_the_result(run_tl, first_run, monkeypatch):
    """The CLI alone: the stage is replaced by one that records its config and answers with the real
    result of the first run (a second real run would only repeat the test above)."""
    config, first = first_run
    refused = run_tl("quickstart", "--out", config.out, "--per-class", "5")  # the real stage refuses it
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert refused.err.startswith("error: --per-class must be 0 (all) or at least 8") and "got 5" in refused.err
    given = []
    monkeypatch.setattr("pipeline.quickstart.run_quickstart", lambda config, say: given.append(config) or first)
    result = run_tl("quickstart", "--out", config.out, "--per-class", "10", "--quiet")
    assert result.code == 0 and given == [config], (result, given)
    assert (f"test accuracy {first.accuracy:.3f} (raw pixels: {first.baseline:.3f}). "
            f"Report: {config.out / 'report' / 'report.md'}") in result.out
    assert result.out.rstrip().endswith(f"next: tl predict --head {config.out / 'heads' / 'digits-logreg.pt'} IMAGE...")
    assert run_tl("quickstart", "--per-class", "0").code == 0
    assert given[-1] == QuickstartConfig(per_class=None)  # 0: every digit; the other options' defaults


def test_the_baseline_is_the_same_head_on_the_raw_pixels_of_the_same_split(first_run):
    from pipeline.examples import digits_split
    from pipeline.quickstart import raw_pixel_baseline

    config, first = first_run
    assert first.baseline == raw_pixel_baseline(config.seed, config.per_class)
    assert 0.1 < first.baseline <= 1.0
    split = digits_split(seed=config.seed, per_class=config.per_class)
    written = {path.stem for path in (config.out / "data" / "digits-10-seed0" / "test").rglob("*.png")}
    assert written == {f"digit-{index:04d}" for index in split["test"]} and len(split["train"]) == 80


def test_other_settings_never_meet_an_earlier_runs_files(first_run, tmp_path):
    """A run with another --per-class (or an older tl's layout) must not find the first run's images or
    caches: each choice of digits has its own data and cache folders."""
    import shutil

    config, first = first_run
    other = tmp_path / "qs"
    shutil.copytree(config.out, other)
    second = run_quickstart(QuickstartConfig(out=other, per_class=12, quiet=True), say=lambda text: None)
    assert [extract.shards_written for extract in second.extracts.values()] == [1, 1]
    assert json.loads((other / "report" / "report.json").read_text())["rows"] == 30
    assert sorted(p.name for p in (other / "data").iterdir()) == ["digits-10-seed0", "digits-12-seed0"]


def test_example_data_written_again_with_other_settings_holds_only_the_new_digits(run_tl, tmp_path):
    """`tl example-data DIR` twice with other settings: the second call's digits only, no image in both
    splits, the first call's files that are still wanted left as they were; the user's own files stay."""
    from PIL import Image

    from pipeline.examples import write_digits

    out = tmp_path / "digits"
    assert run_tl("example-data", out, "--per-class", "10").code == 0
    (out / "train" / "0" / "notes.txt").write_text("mine")
    kept = {path: path.stat().st_mtime_ns for path in out.rglob("*.png")}
    assert run_tl("example-data", out, "--per-class", "5").code == 0
    files = {split: {path.relative_to(out / split) for path in (out / split).rglob("*.png")}
             for split in ("train", "test")}
    assert sum(len(names) for names in files.values()) == 50 and not files["train"] & files["test"]
    assert all(kept[path] == path.stat().st_mtime_ns for path in out.rglob("*.png") if path in kept)
    assert (out / "train" / "0" / "notes.txt").read_text() == "mine"
    write_digits(out, per_class=5, size=32)  # files of the same names, other pixels: written again
    assert {Image.open(path).size for path in out.rglob("*.png")} == {(32, 32)}


def test_example_data_and_seeds_refuse_what_would_silently_drop_or_crash(run_tl, tmp_path):
    """--per-class -1 kept all but one image of each digit, 1 wrote no training split; a negative
    --seed ended in numpy's traceback, one of 2**64 in torch's. Each is one line now, and nothing is written."""
    for per_class, message in (("-1", "-1 is not in the range x>=0"), ("1", "--per-class must be 0 (all) or at least 2")):
        result = run_tl("example-data", tmp_path / "d", "--per-class", per_class)
        assert result.code == 2 and result.err.count("\n") == 1 and message in result.err, result
    for command in (("example-data", tmp_path / "d"), ("quickstart", "--out", tmp_path / "q"),
                    ("fit-head", "--cache", tmp_path, "--out", tmp_path / "h.pt"),
                    ("finetune", "--data", tmp_path, "--head", tmp_path / "h.pt", "--out", tmp_path / "m.pt"),
                    ("extract", "--data", tmp_path, "--out", tmp_path / "c"), ("sweep", "--cache", tmp_path)):
        for seed in ("-1", str(2**32)):  # 2**32 and up: torch's or scikit-learn's traceback
            result = run_tl(*command, "--seed", seed)
            assert result.code == 2 and f"Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295" \
                in result.err, (command, result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("foreign", ["heads/digits-logreg.pt", "report/report.json"])
def test_a_foreign_file_where_quickstart_writes_is_refused_with_a_remedy_it_takes(run_tl, tmp_path, foreign):
    """A user's file at the head or a report file was refused by the stage, after both extracts, saying to
    'pass --overwrite', which tl quickstart has not. Now refused first, with what a quickstart user can do."""
    (tmp_path / foreign).parent.mkdir(parents=True)
    (tmp_path / foreign).write_text("mine")
    result = run_tl("quickstart", "--out", tmp_path, "--per-class", "8", "--quiet")
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert "choose another --out, or move it away" in result.err and "--overwrite" not in result.err, result
    assert (tmp_path / foreign).read_text() == "mine" and not (tmp_path / "data").exists()


@pytest.mark.parametrize("where,folder", [("report", False), ("heads", False), ("heads/digits-logreg.pt", True)])
def test_a_file_or_folder_of_the_wrong_kind_where_quickstart_writes_is_refused_first(run_tl, tmp_path, where, folder):
    """A user's file at OUT/report (or OUT/heads, or a folder at the head) ran both extracts and fit-head (28 s),
    then stopped with 'error: --out OUT/report is a file; --out names the folder of the report: choose another
    --out', a flag named for a path the user never gave. Now refused before any work, kept, in quickstart's terms."""
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).mkdir() if folder else (tmp_path / where).write_text("mine")
    result = run_tl("quickstart", "--out", tmp_path, "--per-class", "8", "--quiet")
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert f"{tmp_path / where} is a {'folder' if folder else 'file'}, where tl quickstart writes" in result.err
    assert "choose another --out, or move it away" in result.err and not (tmp_path / "data").exists(), result
    assert folder or (tmp_path / where).read_text() == "mine"


def test_an_out_that_is_a_file_is_refused_in_quickstart_terms(run_tl, tmp_path):
    """'tl quickstart --out notes.txt' said 'cannot write example images to notes.txt/data/digits-120-seed0:
    Not a directory', a folder the user never named. Now it names the --out and keeps the file."""
    (tmp_path / "notes.txt").write_text("mine")
    result = run_tl("quickstart", "--out", tmp_path / "notes.txt", "--per-class", "8", "--quiet")
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert f"{tmp_path / 'notes.txt'} is a file, where tl quickstart writes its folder" in result.err, result
    assert "choose another --out, or move it away" in result.err and "data/digits" not in result.err, result
    assert (tmp_path / "notes.txt").read_text() == "mine"
