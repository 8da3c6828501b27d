"""The shipped recipes run as written: their fit-head and evaluate sections train and report on codes
(synthetic here, standing in for the data sets this machine cannot download), and the offline digits
recipe runs end to end through every stage."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import REPO, blobs, write_code_cache

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def synthetic_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    classes = [f"class{c}" for c in range(5)]
    write_code_cache(root / "train", *blobs(30, n=250, classes=5, width=48), classes, shard_rows=100)
    write_code_cache(root / "test", *blobs(30, n=100, classes=5, width=48, draw=1), classes)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipe_fit_head_and_evaluate_sections_run(run_tl, synthetic_caches, tmp_path, config):
    recipe = yaml.safe_load(config.read_text())
    assert {"fit-head", "evaluate"} <= set(recipe), f"{config.name} lacks a stage"
    assert recipe["evaluate"]["head"] == recipe["fit-head"]["out"]
    fitted = run_tl("fit-head", "--config", config, "--cache", synthetic_caches / "train", "--out", tmp_path / "h.pt",
                    "--quiet")
    assert fitted.code == 0, fitted
    evaluated = run_tl("evaluate", "--config", config, "--head", tmp_path / "h.pt",
                       "--cache", synthetic_caches / "test", "--out", tmp_path / "report")
    assert evaluated.code == 0, evaluated
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["accuracy"] > 0.6  # five classes: chance is 0.2
    head = json.loads(__import__("torch").load(tmp_path / "h.pt", weights_only=True)["metadata"])
    assert head["kind"] == recipe["fit-head"]["head"]


def test_digits_recipe_end_to_end(run_tl, tmp_path, monkeypatch):
    """Every stage of the offline recipe as its comments say, in a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "digits_efficientnet_lite0.yaml"
    assert run_tl("example-data", "data/digits", "--per-class", "8").code == 0
    assert run_tl("extract", "--config", config, "--quiet").code == 0
    assert run_tl("extract", "--config", config, "--split", "test", "--out", "caches/digits-test", "--quiet").code == 0
    fitted = run_tl("fit-head", "--config", config)
    assert fitted.code == 0 and "validation accuracy" in fitted.out, fitted
    evaluated = run_tl("evaluate", "--config", config)
    assert evaluated.code == 0, evaluated
    assert json.loads((tmp_path / "reports/digits-logreg/report.json").read_text())["accuracy"] >= 0.5


def test_voc_recipe_runs_on_a_voc_format_folder(run_tl, tmp_path, monkeypatch):
    """The neon recipe's stages on drawn shapes: only the data, the classes, the scales and the
    backbone's weights are overridden (no VOC 2007 or ImageNet AlexNet here)."""
    from pipeline.examples import write_shapes_voc

    monkeypatch.chdir(tmp_path)
    base = write_shapes_voc(tmp_path, {"trainval": 16, "test": 8})
    config = REPO / "configs" / "voc2007_alexnet_multiscale.yaml"
    here = ["--data", base, "--classes", "auto", "--scales", "1.0,2.0", "--weights", "none", "--layers", "pool5",
            "--quiet"]
    assert run_tl("extract", "--config", config, *here).code == 0
    assert run_tl("extract", "--config", config, *here, "--split", "test", "--out", "caches/voc07-alexnet-test").code == 0
    fitted = run_tl("fit-head", "--config", config, "--max-epochs", "3", "--hidden", "64", "--val-fraction", "0.3", "--quiet")
    assert fitted.code == 0, fitted
    evaluated = run_tl("evaluate", "--config", config)
    assert evaluated.code == 0 and "patches pooled into images" in evaluated.out, evaluated
    report = json.loads((tmp_path / "reports/voc07-alexnet-multiscale/report.json").read_text())
    assert report["pooling"]["exponent"] == 5 and report["ap_method"] == "voc07"


@pytest.mark.parametrize("config", [c for c in CONFIGS if "finetune" in yaml.safe_load(c.read_text())],
                         ids=lambda p: p.name)
def test_recipe_finetune_sections_name_known_options(run_tl, tmp_path, config):
    """The only complaint about a finetune section is the head file this machine has not trained."""
    result = run_tl("finetune", "--config", config, "--head", tmp_path / "absent.pt")
    assert result.code == 2 and "absent.pt does not exist" in result.err and "config file" not in result.err, result
