"""The shipped recipes run as written: their fit-head sections train on codes (synthetic here, standing
in for the data sets this machine cannot download), and `tl run` runs each recipe end to end on tiny
data in its real format (digits in test_run, CIFAR-10 through `mlflow run` in test_tracking)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import REPO, blobs, make_image_folder, write_cifar10, write_code_cache, write_gtsrb

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def synthetic_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    classes = [f"class{c}" for c in range(5)]
    write_code_cache(root / "train", *blobs(30, n=250, classes=5, width=48), classes, shard_rows=100)
    write_code_cache(root / "test", *blobs(30, n=100, classes=5, width=48, draw=1), classes)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipe_fit_head_section_learns(run_tl, synthetic_caches, tmp_path, config):
    recipe = yaml.safe_load(config.read_text())
    assert {"fit-head", "evaluate"} <= set(recipe), f"{config.name} lacks a stage"
    evaluations = recipe["evaluate"] if isinstance(recipe["evaluate"], list) else [recipe["evaluate"]]
    assert recipe["fit-head"]["out"] in [step.get("head") for step in evaluations]
    fitted = run_tl("fit-head", "--config", config, "--cache", synthetic_caches / "train", "--out", tmp_path / "h.pt",
                    "--quiet")
    assert fitted.code == 0, fitted
    evaluated = run_tl("evaluate", "--head", tmp_path / "h.pt", "--cache", synthetic_caches / "test",
                       "--out", tmp_path / "report")
    assert evaluated.code == 0, evaluated
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["accuracy"] > 0.6  # five classes: chance is 0.2
    head = json.loads(__import__("torch").load(tmp_path / "h.pt", weights_only=True)["metadata"])
    assert head["kind"] == recipe["fit-head"]["head"]


def test_a_commands_flags_reach_the_references_of_its_config_file(run_tl, synthetic_caches, tmp_path, monkeypatch):
    """`tl fit-head --config r.yaml --max-epochs 3` trained 3 epochs into the head the file's max_epochs (2)
    named: ${KEY} took the file's values whatever the flags said. A flag now counts as tl run's --set of
    the key the command reads (its section's, else the top level's); a key the file does not set is no
    reference's."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"seed: 0\nfit-head:\n  cache: {synthetic_caches / 'train'}\n  head: mlp\n  max-epochs: 2\n"
                      "  out: heads/h${seed}-${fit-head.max_epochs}.pt\n")
    fitted = run_tl("fit-head", "--config", recipe, "--max-epochs", "3", "--seed", "1", "--lr", "0.01")
    assert fitted.code == 0 and fitted.out.startswith("wrote heads/h1-3.pt: ") and "trained 3 epochs" in fitted.out, \
        fitted
    plain = run_tl("fit-head", "--config", recipe, "--quiet")
    assert plain.code == 0 and plain.out.startswith("wrote heads/h0-2.pt: "), plain


def test_a_flag_that_holds_a_dollar_brace_is_taken_as_written_under_a_config_file(run_tl, synthetic_caches, tmp_path,
                                                                                  monkeypatch):
    """The command line's values joined the file's ${KEY} references (5521007), so --out 'heads/x${HOME}.pt' was
    read as a reference to a key the file does not set and refused ('fit-head.out refers to ${HOME}, which the
    file does not set'), where a flag is taken as written; so it is again, and a reference to it gets it so."""
    from pipeline.config import command_defaults

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"fit-head:\n  cache: {synthetic_caches / 'train'}\n  out: heads/h.pt\n")
    written = run_tl("fit-head", "--config", recipe, "--out", "heads/x${HOME}.pt", "--quiet")
    assert written.code == 0 and written.out.startswith("wrote heads/x${HOME}.pt: "), written
    recipe.write_text("fit-head:\n  out: heads/h.pt\n  val-cache: ${fit-head.out}\n  cache: c-${fit-head.out}\n")
    keys = {"out": "out", "val_cache": "val_cache", "cache": "cache"}
    defaults = command_defaults(recipe, "fit-head", keys, set(keys), {"fit-head"}, set(), {"out": "heads/x${HOME}.pt"})
    assert defaults == {"out": "heads/x${HOME}.pt", "val_cache": "heads/x${HOME}.pt", "cache": "c-heads/x${HOME}.pt"}


SMALL = ["--quiet", "--set", "backbone=alexnet", "--set", "weights=none", "--set", "layers=[pool5]"]


def test_gtsrb_recipe_runs_on_the_torchvision_layout(run_tl, tmp_path, monkeypatch):
    """Every step of the traffic-sign recipe by `tl run`; only the backbone and the validation share
    (six training images) are overridden."""
    monkeypatch.chdir(tmp_path)
    write_gtsrb(tmp_path / "data" / "gtsrb", classes=range(43))  # every class: sgd logreg needs rows of each
    result = run_tl("run", REPO / "configs" / "gtsrb_alexnet_fc7.yaml", *SMALL, "--set", "fit-head.val_fraction=0.5")
    assert result.code == 0 and "4 steps ran" in result.out, result
    report = json.loads((tmp_path / "reports/gtsrb-alexnet-logreg/report.json").read_text())
    assert report["rows"] == 3


def _outputs(config, *sets) -> list[str]:
    """Every step's out of a shipped recipe, after `--set`s."""
    from pipeline.recipe import STAGES, read_recipe, section_items

    document = read_recipe(config, sets).document
    return [step["out"] for stage in STAGES for step in section_items(document.get(stage, []))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipe_outputs_are_named_after_the_backbone(config):
    """--set backbone=... (mlflow run's -P) gives every step an out of its own: no recipe writes another
    backbone's codes, head or report over the ones it made with its own."""
    backbone = yaml.safe_load(config.read_text())["backbone"]
    own, other = _outputs(config), _outputs(config, "backbone=resnet50")
    assert all(backbone in out for out in own) and all("resnet50" in out and backbone not in out for out in other)
    assert not set(own) & set(other) and len(set(own)) == len(own)


def test_another_backbone_without_its_layer_is_one_line_naming_the_key(run_tl, tmp_path, monkeypatch):
    """--set backbone=efficientnet_lite0 on a recipe of pool5 codes: the layers it has, and the key to set."""
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data/cifar10")
    result = run_tl("run", REPO / "configs" / "cifar10_vgg16.yaml", "--dry-run", "--set", "backbone=efficientnet_lite0")
    assert result.code == 2 and result.err.count("\n") == 1 and not result.out, result
    assert ("extract 1/2 (train): unknown layer 'pool5' for backbone efficientnet_lite0; valid layers: pool (1280), "
            "block12 (9408); give --layers one of them (in a recipe: --layers is --set layers=...)") in result.err


def test_flowers_recipe_runs_and_says_its_test_is_its_training_cache(run_tl, tmp_path, monkeypatch):
    """...and another backbone writes beside it: the first backbone's steps stay up to date."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data/flower_photos", classes=("daisy", "dandelion", "roses", "sunflowers", "tulips"),
                      per_class=4)
    flowers = (REPO / "configs" / "flowers_vgg16_relu6.yaml", "--set", "fit-head.val_fraction=0.25",
               "--set", "fit-head.max_epochs=2")
    result = run_tl("run", *flowers, *SMALL)
    assert result.code == 0 and "3 steps ran" in result.out, result
    assert "note: evaluate scores caches/flowers-alexnet, the cache fit-head trained on" in result.out
    written = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    other = run_tl("run", *flowers, "--quiet", "--set", "backbone=efficientnet_lite0", "--set", "weights=none",
                   "--set", "layers=[pool]")
    assert other.code == 0 and "3 steps ran, 0 up to date" in other.out, other
    assert (tmp_path / "heads/flowers-efficientnet_lite0-mlp.pt").is_file()
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in written.items())
    again = run_tl("run", *flowers, *SMALL)
    assert again.code == 0 and "0 steps ran, 3 up to date" in again.out, again


def test_voc_recipe_runs_on_a_voc_format_folder(run_tl, tmp_path, monkeypatch):
    """The neon recipe's steps by `tl run` on drawn shapes: only the data, the classes, the scales, the
    backbone's weights and the lengths of training are overridden (no VOC 2007 or ImageNet AlexNet
    here). The head is scored on the test codes, and the network finetuned from it on the test images'
    patches, both pooled with exponent 5."""
    from pipeline.examples import write_shapes_voc
    from pipeline.model_files import load_model_file

    monkeypatch.chdir(tmp_path)
    base = write_shapes_voc(tmp_path, {"trainval": 16, "test": 8})
    result = run_tl("run", REPO / "configs" / "voc2007_alexnet_multiscale.yaml", "--quiet", "--set", f"data={base}",
                    "--set", "classes=auto", "--set", "scales=[1.0,2.0]", "--set", "weights=none",
                    "--set", "layers=[pool5]", "--set", "fit-head.max_epochs=3", "--set", "fit-head.hidden=[64]",
                    "--set", "fit-head.val_fraction=0.3", "--set", "finetune.epochs=1")
    assert result.code == 0 and "6 steps ran" in result.out, result
    settings = json.loads((tmp_path / "models/voc07-alexnet.pt.tl-run.json").read_text())["settings"]
    assert settings["unfreeze"] == "all" and settings["backbone_lr_scale"] == 1 and settings["lr"] == 0.0001
    assert load_model_file(tmp_path / "models/voc07-alexnet.pt")[1]["trainable"]["conv_layers"] == [
        "features.0", "features.3", "features.6", "features.8", "features.10"]  # every layer, as neon
    for report in ("voc07-alexnet-multiscale", "voc07-alexnet-finetuned"):
        scored = json.loads((tmp_path / "reports" / report / "report.json").read_text())
        assert scored["pooling"]["exponent"] == 5 and scored["ap_method"] == "voc07" and scored["rows"] == 8, report
    # the closing line names the multi-label accuracy as the report does (it said "accuracy"), after the mAP
    assert f", mAP {scored['mAP']:.4f}, exact-match accuracy {scored['accuracy']:.4f}\n" in result.out, result.out


def test_the_voc_recipe_finetunes_every_layer_of_another_backbone_too():
    """neon trained every layer; the recipe said so as `unfreeze: 5`, AlexNet's conv layers, which under
    --set backbone=vgg16 trained the last 5 of VGG16's 13. `all` counts the backbone's own."""
    from pipeline.backbones import get_backbone
    from pipeline.model_files import check_unfreeze, tap_conv_layers

    recipe = yaml.safe_load((REPO / "configs" / "voc2007_alexnet_multiscale.yaml").read_text())
    unfreeze, layer = recipe["finetune"]["unfreeze"], recipe["layers"][0]
    counts = {name: check_unfreeze(unfreeze, *tap_conv_layers(get_backbone(name), layer))
              for name in ("alexnet", "vgg16")}
    assert counts == {"alexnet": 5, "vgg16": 13}


@pytest.mark.parametrize("config", [c for c in CONFIGS if "finetune" in yaml.safe_load(c.read_text())],
                         ids=lambda p: p.name)
def test_recipe_finetune_sections_name_known_options(run_tl, tmp_path, config):
    """The only complaint about a finetune section is the head file this machine has not trained."""
    result = run_tl("finetune", "--config", config, "--head", tmp_path / "absent.pt")
    assert result.code == 2 and "absent.pt does not exist" in result.err and "config file" not in result.err, result
