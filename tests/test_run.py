"""`tl run`: a recipe in one command. The digits recipe end to end, then skipped when up to date and
partly redone when a setting changes; --only/--from/--rerun; a crashed finetune resumed; every bad
recipe refused in one line before any stage starts; no validation on the test data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from cache.reader import CacheReader
from tests.conftest import REPO, blobs, make_image_folder, write_code_cache

DIGITS = REPO / "configs" / "digits_efficientnet_lite0.yaml"
# the digits recipe's outputs, named after its backbone (${backbone})
TRAIN, TEST = "caches/digits-efficientnet_lite0-train", "caches/digits-efficientnet_lite0-test"
HEAD, REPORT = "heads/digits-efficientnet_lite0-logreg.pt", "reports/digits-efficientnet_lite0-logreg"


def _steps(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("== ")]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits recipe's data, run once by `tl run` in a scratch working directory."""
    root = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "cli", "example-data", root / "data/digits", "--per-class", "8"], cwd=REPO,
                   check=True, capture_output=True)
    return root


def test_digits_recipe_runs_end_to_end_then_only_what_changed(run_tl, digits_run, monkeypatch):
    monkeypatch.chdir(digits_run)
    first = run_tl("run", DIGITS, "--quiet")
    assert first.code == 0, first
    assert _steps(first.out) == [f"== extract 1/2 (train) -> {TRAIN}", f"== extract 2/2 (test) -> {TEST}",
                                 f"== fit-head -> {HEAD}", f"== evaluate -> {REPORT}"]
    assert "4 steps ran, 0 up to date" in first.out
    report = json.loads((digits_run / f"{REPORT}/report.json").read_text())
    assert report["accuracy"] >= 0.5
    record = json.loads((digits_run / f"{HEAD}.tl-run.json").read_text())
    assert record["status"] == "done" and record["settings"]["val_fraction"] == 0.2
    assert record["metrics"]["val_accuracy"] >= 0 and record["facts"]["codes_key"]["backbone"] == "efficientnet_lite0"

    # how, not what: a decoding path not in the cache key too (a CUDA error's remedy is --device-decode off)
    again = run_tl("run", DIGITS, "--set", "workers=0", "--set", "extract.batch_size=7",
                   "--set", "extract.device_decode=off")
    assert again.code == 0 and "0 steps ran, 4 up to date" in again.out, again
    assert all(line.endswith("is up to date, skipped") for line in _steps(again.out))

    head_changed = run_tl("run", DIGITS, "--quiet", "--set", "fit-head.C=[1.0]")
    assert _steps(head_changed.out)[2:] == [f"== fit-head -> {HEAD}", f"== evaluate -> {REPORT}"], head_changed
    assert all("skipped" in line for line in _steps(head_changed.out)[:2])

    (digits_run / f"{REPORT}/report.json").write_text("{}")  # an output changed by hand is redone
    redone = run_tl("run", DIGITS, "--quiet", "--set", "fit-head.C=[1.0]", "--only", "evaluate")
    assert redone.code == 0 and _steps(redone.out) == [  # no longer a report of tl's: made again, not refused
        f"== evaluate: {REPORT} is not as this recipe wrote it: making it again", f"== evaluate -> {REPORT}"], redone
    forced = run_tl("run", DIGITS, "--quiet", "--set", "fit-head.C=[1.0]", "--from", "fit-head", "--rerun")
    assert _steps(forced.out) == [f"== fit-head -> {HEAD}", f"== evaluate -> {REPORT}"]
    data_changed = run_tl("run", DIGITS, "--quiet", "--set", "fit-head.C=[1.0]", "--set", "extract.2.samples_per_class=1")
    assert _steps(data_changed.out)[1:] == ["== extract 2/2 (test): settings or inputs changed since "
                                            f"{TEST} was made: extracting again",
                                            f"== extract 2/2 (test) -> {TEST}",
                                            f"== fit-head: {HEAD} is up to date, skipped",
                                            f"== evaluate -> {REPORT}"], data_changed
    assert json.loads((digits_run / f"{REPORT}/report.json").read_text())["rows"] == 10


def test_mlflow_is_never_imported_without_track(tmp_path):
    code = ("import sys, cli\n"
            "try:\n    cli.main(['run', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print('mlflow' in sys.modules)")
    (tmp_path / "r.yaml").write_text("fit-head: {cache: nowhere, out: h.pt}\n")
    done = subprocess.run([sys.executable, "-c", code, tmp_path / "r.yaml"], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done
    assert "fit-head cache nowhere does not exist" in done.stderr


@pytest.fixture
def code_caches(tmp_path):
    classes = [f"class{c}" for c in range(3)]
    write_code_cache(tmp_path / "caches/train", *blobs(3, n=90, classes=3, width=16), classes)
    write_code_cache(tmp_path / "caches/test", *blobs(3, n=30, classes=3, width=16, draw=1), classes)
    make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    return tmp_path


def _recipe(root, text: str):
    path = root / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BAD_RECIPES = [
    ("unknown_key", "colour: red\nfit-head: {cache: caches/train, out: h.pt}\n", "unknown key 'colour'"),
    ("misplaced", "fit-head: {cache: caches/train, out: h.pt, unfreeze: 2}\n",
     "fit-head has no option 'unfreeze' (an option of finetune)"),
    # a typo'd key said only that it was none: now the option it was one letter from
    ("typo", "fit-head: {cache: caches/train, out: h.pt, val_fration: 0.2}\n",
     "fit-head has no option 'val_fration'; did you mean val_fraction?"),
    ("other_command", "export: {model: m.pt}\nfit-head: {cache: caches/train, out: h.pt}\n",
     "section export is not a stage tl run runs"),
    ("missing_data", "extract: {data: no/such/folder, out: caches/x}\n", "extract (train) data no/such/folder does not exist"),
    ("layer_of_another_backbone", "backbone: efficientnet_lite0\nlayers: [pool5]\nextract: {data: images, out: caches/x}\n",
     "extract (train): unknown layer 'pool5' for backbone efficientnet_lite0; valid layers: pool (1280)"),
    ("empty_layer_name", "backbone: alexnet\nlayers: 'fc7,,fc6'\nextract: {data: images, out: caches/x}\n",
     "extract (train): --layers has an empty layer name (a comma too many?); valid layers of alexnet: pool5"),
    ("type", "fit-head: {cache: caches/train, out: h.pt, max_epochs: many}\n",
     "fit-head key 'max_epochs': 'many' is not a valid integer"),
    ("required", "evaluate: {head: h.pt, cache: caches/test}\n", "evaluate needs 'out'"),
    ("switch", "fit-head: {cache: caches/train, out: h.pt, early_stop: sometimes}\n",
     "fit-head key 'early_stop' is a switch: true or false (1 or 0), not 'sometimes'"),
    ("section_shape", "fit-head: [1, 2]\n", "section fit-head must be a mapping"),
    ("no_stage", "seed: 1\n", "names no stage"),
    ("input_of_no_step", "evaluate: {head: h.pt, cache: caches/test, out: r}\n", "evaluate head h.pt does not exist"),
    ("val_is_test_cache", "fit-head: {cache: caches/train, val_cache: caches/test, out: h.pt}\n"
                          "evaluate: {head: h.pt, cache: caches/test, out: r}\n", "fit-head validates on the test data"),
    ("early_stop_without_validation", "fit-head: {cache: caches/train, head: mlp, early_stop: 1, val_fraction: 0, "
                                      "out: h.pt}\n", "fit-head has early_stop but nothing to validate on; give it "
                                                       "val_fraction (above 0) or val_cache, or early_stop: false"),
    ("finetune_early_stop_without_validation", "format: imagefolder\nfit-head: {cache: caches/train, out: h.pt}\n"
                                               "finetune: {data: images, head: h.pt, early_stop: true, out: m.pt}\n",
     "finetune has early_stop but nothing to validate on; give it val_fraction (above 0) or val_data"),
    # a stage's own value checks, which ran only once the steps before it had (hours of VOC extraction)
    ("duplicate_scales", "extract: {data: images, out: caches/x, multiscale: true, scales: [1, 2, 2]}\n",
     "extract (train): --scales lists a scale twice"),
    ("background_share", "extract: {data: images, out: caches/x, multiscale: true, background_fraction: 1.5}\n",
     "extract (train): --background-fraction must be in [0, 1], got 1.5"),
    ("fit_head_cost", "fit-head: {cache: caches/train, out: h.pt, C: -1}\n",
     "fit-head: --C values must be positive and finite, got -1"),
    ("fit_head_dropout", "fit-head: {cache: caches/train, out: h.pt, head: mlp, dropout: 1.5}\n",
     "fit-head: --dropout must be in [0, 1), got 1.5"),
    ("fit_head_lr", "fit-head: {cache: caches/train, out: h.pt, head: mlp, lr: .inf}\n",
     "fit-head: --lr must be a positive finite number, got inf"),
    ("fit_head_costs_unvalidated", "fit-head: {cache: caches/train, out: h.pt, C: [0.1, 1], val_fraction: 0}\n",
     "fit-head: several C values need a validation split to choose from"),
    ("fit_head_layer", "extract: {data: images, out: caches/x, backbone: alexnet, layers: [fc7]}\n"
                       "fit-head: {cache: caches/x, layer: nope, out: h.pt}\n",
     "fit-head: layer 'nope' is not one that extract (train) caches (fc7); set the layer to one of them"),
    ("finetune_two_validations", "format: imagefolder\nfit-head: {cache: caches/train, out: h.pt}\n"
                                 "finetune: {data: images, head: h.pt, val_data: images, val_fraction: 0.2, out: m.pt}\n",
     "finetune: --val-data and --val-fraction both name validation images; pass one of them (--val-fraction 0 holds "
     "out none)"),
    ("finetune_schedule", "fit-head: {cache: caches/train, out: h.pt}\nfinetune: {data: images, head: h.pt, "
                          "lr_steps: [0], out: m.pt}\n", "finetune: --lr-steps"),
    ("patch_option_alone", "extract: {data: images, out: caches/x, scales: [1, 2]}\n",
     "extract (train): --scales sets --multiscale patches; add --multiscale, or leave it out"),
    ("multiscale_bicubic", "backbone: timm:resnet18\nlayers: [pool]\nextract: {data: images, out: caches/x, multiscale: true}\n",
     "timm:resnet18 resizes by bicubic: --multiscale takes bilinear backbones"),
    ("multiscale_without_boxes", "format: imagefolder\nbackbone: alexnet\nlayers: [fc7]\n"
                                 "extract: {data: images, out: caches/x, multiscale: true}\n",
     "--multiscale labels patches by their boxes: imagefolder data has none"),
    ("exponent", "fit-head: {cache: caches/train, out: h.pt}\nevaluate: {head: h.pt, cache: caches/test, out: r, "
                 "exponent: 0}\n", "evaluate: --exponent must be a positive finite number"),
    ("val_fraction_of_one", "fit-head: {cache: caches/train, out: h.pt, val_fraction: 1}\n",
     "fit-head key 'val_fraction': 1.0 is not in the range 0<=x<1"),
    ("same_out", "fit-head: [{cache: caches/train, out: h.pt}, {cache: caches/train, C: 2, out: ./h.pt}]\n",
     "fit-head 1/2 and fit-head 2/2 both write h.pt"),
    ("out_without_name", "fit-head: {cache: caches/train, out: .}\n", "out '.' names no file or folder"),
    # a report's plots there would be images of that data (a class 'report') when the recipe runs again
    ("out_inside_image_folder", "format: imagefolder\nextract: {data: images, out: caches/x}\n"
                                "fit-head: {cache: caches/train, out: h.pt}\n"
                                "evaluate: {head: h.pt, cache: caches/test, out: images/report}\n",
     "evaluate out images/report lies inside the image folder images that extract (train) reads"),
    ("list_value_of_a_later_step", "fit-head: [{cache: caches/train, out: a.pt}, {cache: caches/train, C: abc, out: h.pt}]\n",
     "fit-head 2/2: --C takes float numbers separated by commas, got 'abc'"),
    ("list_value", "fit-head: {cache: caches/train, out: h.pt, lr_steps: [2, soon]}\n",
     "fit-head: --lr-steps takes int numbers separated by commas, got '2,soon'"),
    ("val_is_test_spelled_otherwise", "format: imagefolder\n"
                                      "extract: [{data: images, split: a, out: caches/a}, {data: images/a, out: caches/b}]\n"
                                      "fit-head: {cache: caches/train, val_cache: caches/b, out: h.pt}\n"
                                      "evaluate: {head: h.pt, cache: caches/a, out: r}\n", "fit-head validates on the test data"),
    ("val_is_test_images", "format: imagefolder\n"
                           "extract: [{data: images, split: train, out: caches/a}, {data: images, split: test, out: caches/b}]\n"
                           "fit-head: {cache: caches/a, out: h.pt}\n"
                           "finetune: {data: images, head: h.pt, val_data: images, val_split: test, out: m.pt}\n"
                           "evaluate: {head: h.pt, cache: caches/b, out: r}\n", "finetune validates on the test data"),
]


@pytest.mark.parametrize("name,text,message", BAD_RECIPES, ids=[case[0] for case in BAD_RECIPES])
def test_a_bad_recipe_is_one_line_before_any_stage(run_tl, code_caches, monkeypatch, name, text, message):
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, text)
    before = sorted(p.relative_to(code_caches) for p in code_caches.rglob("*"))
    result = run_tl("run", recipe)
    assert result.code == 2 and result.err.count("\n") == 1 and message in result.err, result
    assert "recipe.yaml" in result.err or name == "no_stage" or "recipe" in result.err
    assert "==" not in result.out
    assert sorted(p.relative_to(code_caches) for p in code_caches.rglob("*")) == before


def test_a_recipe_out_where_a_linked_class_folder_leads_is_refused(run_tl, code_caches, monkeypatch):
    """An out named by the real path of a class folder that links to images kept elsewhere lies in the image
    folder as much as one named through it (the walk follows the link): its report's plots would be images."""
    monkeypatch.chdir(code_caches)
    (code_caches / "kept").mkdir()
    (code_caches / "images" / "c").symlink_to(code_caches / "kept", target_is_directory=True)
    recipe = _recipe(code_caches, "format: imagefolder\nextract: {data: images, out: caches/x}\n"
                                  "fit-head: {cache: caches/train, out: h.pt}\n"
                                  "evaluate: {head: h.pt, cache: caches/test, out: kept/report}\n")
    result = run_tl("run", recipe)
    assert result.code == 2 and result.err == (
        f"error: recipe {recipe}: evaluate out kept/report lies inside the image folder images (its folder c links "
        "there) that extract (train) reads; give the step an out outside it\n"), result
    assert list((code_caches / "kept").iterdir()) == [] and not (code_caches / "caches/x").exists()


def test_a_required_option_left_out_is_one_line(run_tl):
    """A required option (here evaluate's --out) never takes a stage default of None."""
    result = run_tl("evaluate", "--head", "h.pt", "--cache", "c")
    assert result.code == 2 and result.err.startswith("error: Missing option '--out'"), result


@pytest.mark.parametrize("assignment,message", [
    ("nokey", "--set takes key=value"), ("predict.top_k=3", "'predict' is not a stage"),
    ("extract.3.seed=1", "has no extract section"), ("fit-head.3.seed=1", "has 1 step(s); use fit-head.N.key"),
    ("track=wandb", "track 'wandb' is not one of: mlflow"), ("finetune.unfreeze=2", "has no finetune section"),
    ("max_epochs=3", "fit-head of {recipe} sets max_epochs itself; set it there: --set fit-head.max_epochs=..."),
    ("max-epochs=3", "fit-head of {recipe} sets max-epochs itself"),  # the same key, spelled as the flag
    ("fit-head.\u00b2=1", "fit-head has no option '\u00b2'"), ("fit-head.early_stop=no", "'early_stop' is a switch"),
    # was refused once the step ran, saying to delete the recipe
    ("fit-head.out=recipe.yaml", "fit-head out recipe.yaml is this recipe; give the step another out\n")])
def test_a_bad_set_is_one_line(run_tl, code_caches, monkeypatch, assignment, message):
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, out: h.pt, max_epochs: 2}\n")
    result = run_tl("run", recipe, "--set", assignment)
    assert result.code == 2 and message.format(recipe=recipe) in result.err and result.err.count("\n") == 1, result
    assert "==" not in result.out and (code_caches / "recipe.yaml").read_text().startswith("fit-head:")


def test_references_name_outputs_after_settings(run_tl, code_caches, monkeypatch):
    """`${KEY}` in a recipe's text is KEY's value after --set (mlflow run's -P): outputs named after a
    setting keep one per value (-P backbone=... replaced the one cache the recipe named). A whole float is
    the number it is (mlflow run's 300.0 names what tl run's 300 names); --config reads them too."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        seed: 0
        fit-head: {cache: caches/train, max_epochs: 2, out: "heads/h${seed}-${fit-head.max_epochs}.pt"}
        evaluate: {head: "heads/h${seed}-${fit-head.max_epochs}.pt", cache: caches/test, out: "reports/${seed}"}
        """)
    assert run_tl("run", recipe, "--quiet", "--set", "fit-head.max_epochs=3.0").code == 0
    assert (code_caches / "heads/h0-3.pt").is_file() and (code_caches / "reports/0/report.json").is_file()
    assert run_tl("run", recipe, "--quiet", "--set", "seed=1").code == 0
    assert (code_caches / "heads/h1-2.pt").is_file() and (code_caches / "heads/h0-3.pt").is_file()
    again = run_tl("run", recipe, "--quiet", "--set", "fit-head.max_epochs=3")  # what 3.0 named: up to date
    assert again.code == 0 and "0 steps ran, 2 up to date" in again.out, again
    config = run_tl("fit-head", "--config", recipe, "--quiet")
    assert config.code == 0 and (code_caches / "heads/h0-2.pt").is_file(), config
    # a key named as the stages read it: max-epochs is max_epochs, and a --set spelled otherwise is what runs
    spelled = run_tl("run", recipe, "--dry-run", "--set", "fit-head.max-epochs=4")
    assert spelled.code == 0 and "\n== fit-head -> heads/h0-4.pt: would run" in spelled.out, spelled
    recipe.write_text(recipe.read_text().replace("${fit-head.max_epochs}", "${fit-head.max-epochs}"))
    dashed = run_tl("run", recipe, "--dry-run")
    assert dashed.code == 0 and "\n== fit-head -> heads/h0-2.pt: would run" in dashed.out, dashed
    # a value that is one reference alone keeps its type (a switch); fit-head.1 is a one-mapping section's
    # step, as --set names it; $${ is a literal ${
    recipe.write_text("seed: 0\nfit-head: {cache: caches/train, head: mlp, early_stop: true, val_fraction: 0.2, "
                      "max_epochs: 2, out: \"heads/$${x}-${fit-head.1.max_epochs}.pt\"}\n"
                      "finetune: {head: h.pt, data: images, early_stop: \"${fit-head.early_stop}\", out: m.pt}\n")
    typed = run_tl("run", recipe, "--only", "fit-head", "--quiet")
    assert typed.code == 0 and (code_caches / "heads/${x}-2.pt").is_file(), typed


@pytest.mark.parametrize("out,message", [
    ("h-${colour}.pt", "fit-head.out refers to ${colour}, which the file does not set; set it"),
    ("h-${extract.seed}.pt", "refers to ${extract.seed}, which the file does not set (a list section: name its "
                             "step, section.N.key)"),
    ("h-${extract.1}.pt", "refers to ${extract.1}, which is not one value"),
    ("h-${experiment}.pt", "refers to ${experiment}, which refers to another"),
    ("h-${layers}.pt", "refers to ${layers}, which is not one value")])
def test_a_bad_reference_is_one_line(run_tl, code_caches, monkeypatch, out, message):
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, f"""\
        seed: 1
        experiment: "x-${{seed}}"
        layers: [a, b]
        extract: [{{data: images, out: caches/x}}]
        fit-head: {{cache: caches/train, out: "{out}"}}
        """)
    result = run_tl("run", recipe, "--only", "fit-head")
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1, result
    assert not result.out and not list(code_caches.glob("h-*")), result


def test_a_dry_run_says_what_would_run_and_why_and_writes_nothing(run_tl, code_caches, monkeypatch):
    """tl run --dry-run checks the recipe and says, per step, whether it is up to date or why it would run:
    not run yet, the settings that changed, an output changed or gone, a stopped run, or a step before it
    that makes its input. It writes nothing, records included."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, head: logreg, C: 1.0, out: heads/h.pt}
        evaluate: {head: heads/h.pt, cache: caches/test, out: reports/r}
        """)

    def lines(*options):
        result = run_tl("run", recipe, "--dry-run", *options)
        assert result.code == 0, result
        return result.out.splitlines()

    before = sorted(code_caches.rglob("*"))
    assert lines() == ["== fit-head -> heads/h.pt: would run (not run yet)",
                       "== evaluate -> reports/r: would run (after fit-head, which makes its head)", "",
                       "dry run: 2 steps would run, 0 up to date; nothing was run or written"]
    assert sorted(code_caches.rglob("*")) == before
    bad = run_tl("run", recipe, "--dry-run", "--set", "fit-head.C=-1")  # checked as a run is
    assert bad.code == 2 and "C" in bad.err and not bad.out, bad
    assert run_tl("run", recipe, "--quiet").code == 0
    assert lines()[:2] == ["== fit-head: heads/h.pt is up to date", "== evaluate: reports/r is up to date"]
    assert lines("--set", "fit-head.C=0.5", "--set", "fit-head.max_iter=50")[0] == (
        "== fit-head -> heads/h.pt: would run (changed: C '1.0' -> '0.5', max_iter 1000 -> 50)")
    shutil.rmtree(code_caches / "reports/r")
    assert lines()[:2] == ["== fit-head: heads/h.pt is up to date", "== evaluate -> reports/r: would run (reports/r is gone)"]
    (code_caches / "heads/h.pt").write_bytes((code_caches / "heads/h.pt").read_bytes())  # rewritten by hand
    assert lines()[0] == "== fit-head -> heads/h.pt: would run (heads/h.pt changed since it was written)"
    record = code_caches / "heads/h.pt.tl-run.json"
    record.write_text(record.read_text().replace('"status": "done"', '"status": "started"'))
    stopped = record.read_bytes()
    assert lines()[0] == "== fit-head -> heads/h.pt: would run (its last run stopped)"
    # a stopped run of other settings is not resumed (a finetune starts over): the changes are why
    assert lines("--set", "fit-head.C=0.5")[0] == "== fit-head -> heads/h.pt: would run (changed: C '1.0' -> '0.5')"
    assert record.read_bytes() == stopped and not (code_caches / "reports/r").exists()
    assert lines("--rerun", "--only", "evaluate") == ["== evaluate -> reports/r: would run (--rerun)", "",
                                                       "dry run: 1 step would run, 0 up to date; nothing was run or written"]


def test_set_values_read_as_they_mean(run_tl, code_caches, monkeypatch):
    """`1.0` is a number, `[8]` a list, `010` stays text (not YAML 1.1's octal 8), an empty value is empty."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, out: h.pt, head: mlp, max_epochs: 2}\n")
    result = run_tl("run", recipe, "--quiet", "--set", "fit-head.hidden=", "--set", "fit-head.C=[0.5]",
                    "--set", "seed=010", "--set", "fit-head.dropout=0.25")
    assert result.code == 0, result
    record = json.loads((code_caches / "h.pt.tl-run.json").read_text())
    assert record["settings"]["hidden"] == "" and record["settings"]["C"] == "0.5"
    assert record["settings"]["seed"] == 10 and record["settings"]["dropout"] == 0.25
    both = run_tl("run", recipe, "--only", "fit-head", "--from", "fit-head")
    assert both.code == 2 and "--only and --from" in both.err


def test_only_and_from_need_the_stage_and_its_inputs(run_tl, code_caches, monkeypatch):
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, out: heads/h.pt}\n"
                                  "evaluate: {head: heads/h.pt, cache: caches/test, out: reports/r}\n")
    missing = run_tl("run", recipe, "--only", "evaluate")
    assert missing.code == 2 and "which fit-head makes; run that stage too" in missing.err, missing
    assert run_tl("run", recipe, "--only", "finetune").err.startswith("error: --only finetune: the recipe has no")
    assert run_tl("run", recipe, "--only", "fit-head", "--quiet").code == 0
    evaluated = run_tl("run", recipe, "--from", "evaluate")
    assert evaluated.code == 0 and _steps(evaluated.out) == ["== evaluate -> reports/r"], evaluated
    assert json.loads((code_caches / "reports/r/report.json").read_text())["accuracy"] > 0.6


def test_a_val_fraction_of_zero_holds_out_nothing(run_tl, code_caches, monkeypatch):
    """As Keras's validation_split=0: a recipe with val_fraction 0 (and no early stopping) trains on every
    image. A head that ignores early_stop (lbfgs logreg) is not refused for it, as fit-head only warns."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, head: mlp, max_epochs: 2, early_stop: 1, out: h.pt}\n")
    result = run_tl("run", recipe, "--quiet", "--set", "fit-head.early_stop=0", "--set", "fit-head.val_fraction=0.0")
    assert result.code == 0 and "90 training rows" in result.out and "validation" not in result.out, result
    held = run_tl("run", recipe, "--quiet", "--set", "fit-head.early_stop=0", "--set", "fit-head.val_fraction=0.2")
    assert held.code == 0 and "72 training rows" in held.out and "validation accuracy" in held.out, held
    lbfgs = run_tl("run", recipe, "--quiet", "--set", "fit-head.head=logreg", "--set", "fit-head.val_fraction=0")
    assert lbfgs.code == 0 and "warning: fit-head key 'early_stop' does nothing for --head logreg" in lbfgs.out, lbfgs


def test_a_training_cache_scored_as_test_is_said(run_tl, code_caches, monkeypatch):
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, out: h.pt, val_fraction: 0.2}\n"
                                  "evaluate: {head: h.pt, cache: caches/train, out: r}\n")
    result = run_tl("run", recipe, "--quiet")
    assert result.code == 0 and "note: evaluate scores caches/train, the cache fit-head trained on" in result.out


def test_a_section_key_its_head_does_not_read_is_warned_of_and_a_top_level_one_is_not(run_tl, code_caches, monkeypatch):
    """fit-head: {head: svm, solver: sgd} trained an svm as if solver were not there, without a word. A
    patience waiting for early_stop (mlflow run -P use_early_stop=0 turns it off) is not warned of."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "max_iter: 50\nfit-head: {cache: caches/train, out: h.pt, head: mlp, solver: sgd, "
                                  "hidden: [8], max_epochs: 1, early_stop: false, patience: 2}\n")
    result = run_tl("run", recipe, "--quiet")
    assert result.code == 0, result
    assert [line for line in result.out.splitlines() if line.startswith("warning")] == [
        "warning: fit-head key 'solver' does nothing for --head mlp; it applies to logreg heads"], result
    # an empty --weights (a path, imagenet or none) is refused while the recipe is checked, before any step
    recipe.write_text("data: images\nbackbone: alexnet\nextract: {out: caches/new}\n"
                      "fit-head: {cache: caches/new, out: h2.pt}\n")
    empty = run_tl("run", recipe, "--quiet", "--set", "weights=")
    assert empty.code == 2 and "'weights': is empty; name a path" in empty.err and "==" not in empty.out, empty


def test_a_stages_remedy_that_names_its_flags_names_the_recipe_keys_too(run_tl, code_caches, monkeypatch):
    """'pass --val-cache or --val-fraction' cannot be typed into a recipe or an mlflow run."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, "fit-head: {cache: caches/train, out: h.pt, C: [0.1, 1]}\n")
    result = run_tl("run", recipe, "--quiet")
    assert result.code == 2 and result.err == (  # refused before any step: the recipe and step are named
        f"error: recipe {recipe}: fit-head: several C values need a validation split to choose from; pass --val-cache "
        "or --val-fraction (in a recipe: --val-cache is --set fit-head.val_cache=..., --val-fraction is --set "
        "fit-head.val_fraction=...)\n"), result
    # a flag no key gives names the section, for each of its steps: extract.1.download fetched the train
    # set and the test extraction stopped the same way; a remedy naming the step's own command is translated
    (code_caches / "empty").mkdir()
    recipe.write_text("format: cifar10\nextract: [{data: empty, out: caches/x}, {data: empty, split: test, out: caches/y}]\n")
    missing = run_tl("run", recipe, "--quiet")
    assert missing.code == 2 and missing.err.endswith(
        "fetch them with tl extract --download (in a recipe: --download is --set extract.download=true)\n"), missing
    # a remedy that is another command's (tl finetune --head) is left as it is
    recipe.write_text("fit-head: {cache: caches/train, out: h.pt}\nevaluate: {model: h.pt, data: images, out: r}\n")
    other = run_tl("run", recipe, "--quiet")
    assert other.code == 2 and "make a model of it with tl finetune --head h.pt" in other.err, other
    assert "in a recipe" not in other.err, other


RANDOM_ALEXNET = "data: images\nformat: imagefolder\nbackbone: alexnet\nweights: none\nlayers: [pool5]\nquiet: true\n"


def _alexnet_recipe(root, per_class: int, more: str = ""):
    """Images of two classes under root/images/train and a recipe that extracts alexnet pool5 codes of
    them into caches/train, then `more` steps."""
    make_image_folder(root / "images" / "train", classes=("a", "b"), per_class=per_class)
    return _recipe(root, """\
        data: images
        backbone: alexnet
        weights: none
        quiet: true
        extract: {layers: [pool5], dtype: float32, out: caches/train}
        """ + textwrap.dedent(more).replace("\n", "\n        "))


def test_a_crashed_finetune_resumes_and_changed_settings_start_over(run_tl, tmp_path, monkeypatch):
    """A finetune stopped after its first checkpoint (its record says "started", the model file is not
    written) resumes on the next `tl run`; after a finished run, a changed setting starts over."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 2, batch_size: 4, val_fraction: 0.25, out: models/m.pt}
        """)
    assert run_tl("run", recipe).code == 0
    record_path = tmp_path / "models/m.pt.tl-run.json"
    record = json.loads(record_path.read_text())
    assert [point[0] for point in record["history"]["train_loss"]] == [1, 2] and "val_loss" in record["history"]
    record["status"] = "started"
    record_path.write_text(json.dumps(record))
    (tmp_path / "models/m.pt").unlink()
    resumed = run_tl("run", recipe)
    assert resumed.code == 0 and "== finetune: resuming the run that stopped (checkpoint m.last.ckpt)" in resumed.out
    assert "resumed after epoch 2" in resumed.out, resumed
    changed = run_tl("run", recipe, "--set", "finetune.lr=0.001")
    assert changed.code == 0 and "settings or inputs changed since models/m.pt was made: starting over" in changed.out
    assert "wrote models/m.pt: 2 epochs run" in changed.out, changed
    rerun = run_tl("run", recipe, "--set", "finetune.lr=0.001", "--only", "finetune", "--rerun")
    assert rerun.code == 0 and "== finetune: --rerun: starting over" in rerun.out, rerun
    (tmp_path / "models/m.pt").write_bytes(b"edited by hand")
    edited = run_tl("run", recipe, "--set", "finetune.lr=0.001", "--only", "finetune")
    assert edited.code == 0 and "== finetune: models/m.pt is not as this recipe wrote it: starting over" in edited.out


def test_a_finetune_whose_epochs_went_up_goes_on_from_its_run_to_the_weights_of_a_run_from_the_start(
        run_tl, tmp_path, monkeypatch):
    """Only finetune's epochs went up since it ran (a recipe's --set finetune.epochs=N): the next tl run goes on
    from its last checkpoint, where it started over and trained every epoch again, and ends at the weights a
    run of N epochs from the start gives (the step schedule counts epochs from the start). --dry-run says so;
    fewer epochs, or another setting changed with them, start over."""
    import torch

    from pipeline.model_files import load_model_file

    recipes = []
    for root in (tmp_path / "grown", tmp_path / "fresh"):
        root.mkdir()
        recipes.append(_alexnet_recipe(root, 4, """\
            fit-head: {cache: caches/train, out: heads/h.pt}
            finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, lr: 0.01, lr_steps: [1], val_fraction: 0.25,
                       out: models/m.pt}
            """))
    grown, fresh = recipes
    monkeypatch.chdir(tmp_path / "grown")
    assert run_tl("run", grown).code == 0
    planned = run_tl("run", grown, "--dry-run", "--set", "finetune.epochs=3")
    assert "== finetune -> models/m.pt: would run (changed: epochs 1 -> 3: goes on from its checkpoint)" \
        in planned.out, planned
    went_on = run_tl("run", grown, "--set", "finetune.epochs=3")
    assert went_on.code == 0 and "== finetune: epochs 1 -> 3: going on from its run (checkpoint m.last.ckpt)" \
        in went_on.out and "resumed after epoch 1" in went_on.out, went_on
    monkeypatch.chdir(tmp_path / "fresh")
    assert run_tl("run", fresh, "--set", "finetune.epochs=3").code == 0
    weights = [load_model_file(root / "models/m.pt")[0].state_dict() for root in (tmp_path / "grown", tmp_path / "fresh")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1]), "not the weights from the start"
    monkeypatch.chdir(tmp_path / "grown")
    for more, said in ((["--set", "finetune.epochs=2"], "changed: epochs 3 -> 2"),
                       (["--set", "finetune.epochs=4", "--set", "finetune.lr=0.001"], "changed: epochs 3 -> 4, lr")):
        again = run_tl("run", grown, "--dry-run", *more)
        assert said in again.out and "goes on" not in again.out, again
    fewer = run_tl("run", grown, "--set", "finetune.epochs=2")
    assert fewer.code == 0 and "settings or inputs changed since models/m.pt was made: starting over" in fewer.out


def test_a_finetune_whose_epochs_went_up_starts_over_where_its_model_was_made_again_by_hand(run_tl, tmp_path,
                                                                                             monkeypatch):
    """Epochs went up, and the model was made again by hand since the recipe made it (tl's files, another lr): the
    run went on from that run's checkpoint (its lr not in the checkpoint's identity), ending at weights no run of
    the recipe gives. It starts over, as it does with the epochs as they were; likewise where the hand run was
    stopped after its checkpoint, the recipe's model file left as it was."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, lr: 0.01, out: models/m.pt}
        """)
    assert run_tl("run", recipe).code == 0
    model = tmp_path / "models/m.pt"
    shutil.copy2(model, tmp_path / "kept.pt")
    by_hand = ["finetune", "--data", "images", "--head", "heads/h.pt", "--weights", "none", "--epochs", "1",
               "--batch-size", "4", "--lr", "0.5", "--out", model, "--overwrite", "--quiet"]
    for stopped in (False, True):
        assert run_tl(*by_hand).code == 0
        if stopped:  # the recipe's model file as it wrote it; the checkpoint the hand run's
            shutil.copy2(tmp_path / "kept.pt", model)
        planned = run_tl("run", recipe, "--dry-run", "--set", "finetune.epochs=2")
        assert "goes on" not in planned.out, planned
        again = run_tl("run", recipe, "--set", "finetune.epochs=2")
        assert again.code == 0 and "going on" not in again.out and "starting over" in again.out, again
        assert run_tl("run", recipe).code == 0  # back to the recipe's epochs, for the next round
        shutil.copy2(model, tmp_path / "kept.pt")


def test_a_finetune_validating_on_its_training_images_is_refused_before_any_step(run_tl, tmp_path, monkeypatch):
    """finetune val_data naming its own training images was refused only when that step ran, after the
    extract and fit-head steps before it; the images are there from the start, so it is refused before any."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 2, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, val_data: images, out: models/m.pt}
        """)
    refused = run_tl("run", recipe)
    assert refused.code == 2 and "holds the training images" in refused.err and refused.out == "", refused
    assert not (tmp_path / "caches").exists() and not (tmp_path / "heads").exists()


def _finetune_stopped_before_its_model_file(run_tl, tmp_path, monkeypatch, epochs: int):
    """(recipe, the finetune's record) of a run whose finetune stopped after its last checkpoint, before its model
    file was written (its record says "started"), with the user's notes at the model file's path since."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4, f"""\
        fit-head: {{cache: caches/train, out: heads/h.pt}}
        finetune: {{head: heads/h.pt, epochs: {epochs}, batch_size: 4, out: models/m.pt}}
        """)
    assert run_tl("run", recipe).code == 0
    record_path = tmp_path / "models/m.pt.tl-run.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "status": "started"}))
    (tmp_path / "models/m.pt").write_text("my notes\n")
    return recipe, record_path


def test_a_stopped_finetune_whose_model_file_is_not_tls_says_what_tl_run_can_do(run_tl, tmp_path, monkeypatch):
    """A finetune to resume whose model file holds what tl did not write was refused with finetune's remedy,
    'pass --overwrite to replace it', a flag tl run has not. The line says what a tl run user can do: move
    the file away, then run again, which resumes from the checkpoint; the file and the checkpoint are kept."""
    recipe, record_path = _finetune_stopped_before_its_model_file(run_tl, tmp_path, monkeypatch, epochs=2)
    checkpoint = (tmp_path / "models/m.last.ckpt").read_bytes()
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.err == (
        "error: finetune: models/m.pt holds a file that tl did not write as a model file; move it away (or delete "
        "it), then run again: the step resumes from its checkpoint m.last.ckpt\n"), refused
    assert "--overwrite" not in refused.err
    assert (tmp_path / "models/m.pt").read_text() == "my notes\n"
    assert (tmp_path / "models/m.last.ckpt").read_bytes() == checkpoint
    assert json.loads(record_path.read_text())["status"] == "started"  # the claim holds: the next run resumes
    for rerun in ((), ("--rerun",)):  # --rerun resumes it too (and was said to run for --rerun alone)
        said = run_tl("run", recipe, "--dry-run", "--only", "finetune", *rerun)
        assert said.code == 0 and said.out.startswith(
            "== finetune -> models/m.pt: would run (its last run stopped, and stop: models/m.pt holds a file that tl "
            "did not write as a model file)\n"), said
    assert run_tl("run", recipe, "--only", "finetune", "--rerun").err == refused.err
    (tmp_path / "models/m.pt").rename(tmp_path / "notes.txt")
    resumed = run_tl("run", recipe)
    assert resumed.code == 0 and "resuming the run that stopped (checkpoint m.last.ckpt)" in resumed.out, resumed
    assert (tmp_path / "models/m.pt").read_bytes()[:2] == b"PK"


def test_a_stopped_finetune_that_starts_over_after_its_head_is_made_again_is_not_refused(run_tl, tmp_path,
                                                                                          monkeypatch):
    """A stopped finetune whose model file is not tl's is refused ahead only where it would resume: after a
    fit-head that runs (--rerun), the head it reads is new, its digest changes and it starts over, replacing the
    file its record says it made. tl run --rerun refused that run before any step, and --dry-run said it stops."""
    recipe, _ = _finetune_stopped_before_its_model_file(run_tl, tmp_path, monkeypatch, epochs=1)
    said = run_tl("run", recipe, "--dry-run", "--from", "fit-head", "--rerun")
    assert said.code == 0 and "\n== finetune -> models/m.pt: would run (--rerun)\n" in said.out, said
    again = run_tl("run", recipe, "--from", "fit-head", "--rerun")
    assert again.code == 0 and "== finetune: settings or inputs changed since models/m.pt was made: starting over" \
        in again.out, again
    assert (tmp_path / "models/m.pt").read_bytes()[:2] == b"PK"


def test_a_data_sets_warning_is_said_once_a_run(run_tl, tmp_path, monkeypatch):
    """A recipe that extracts and then finetunes the same images opened them twice and printed the
    --samples-per-class warning twice: a step does not say again what an earlier step of the run said of the
    same data. A run whose extract is up to date hears it from finetune; the manifest keeps it."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 3, """\
        samples_per_class: 3
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, out: models/m.pt}
        """)
    next((tmp_path / "images/train/b").iterdir()).unlink()
    short = "warning: --samples-per-class 3: 1 of 2 classes have fewer images (b has the fewest, 2); all were kept"
    first = run_tl("run", recipe)
    assert first.code == 0 and first.err.count(short) == 1, first
    assert "== finetune -> models/m.pt" in first.out
    finetune_only = run_tl("run", recipe, "--set", "finetune.lr=0.001")
    assert finetune_only.code == 0 and "== extract (train): caches/train is up to date, skipped" in finetune_only.out
    assert finetune_only.err.count(short) == 1, finetune_only
    info = run_tl("info", tmp_path / "caches/train")
    assert short.removeprefix("warning: ") in info.out, info


def test_unfreeze_is_checked_against_the_heads_backbone_before_any_step(run_tl, tmp_path, monkeypatch):
    """finetune's unfreeze (mlflow run's retrained_conv_layers) was refused only when finetune ran, after
    the extraction and the head: it is now counted on the architecture the head will have, before any step,
    from the recipe's steps or, with the head already made, from its file."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, out: models/m.pt}
        """)
    refused = run_tl("run", recipe, "--set", "finetune.unfreeze=6")
    assert refused.code == 2 and not refused.out and not (tmp_path / "caches").exists(), refused
    assert refused.err == (f"error: recipe {recipe}: finetune: --unfreeze 6 is more than the 5 conv layers of this "
                           "backbone before the tap; pass --unfreeze 5 or less (in a recipe: --unfreeze is --set "
                           "finetune.unfreeze=...)\n"), refused
    assert run_tl("run", recipe, "--set", "finetune.unfreeze=5", "--set", "finetune.epochs=0").code == 0
    on_disk = run_tl("run", recipe, "--only", "finetune", "--set", "finetune.unfreeze=6")  # the head file says
    assert on_disk.code == 2 and "more than the 5 conv layers" in on_disk.err and not on_disk.out, on_disk
    # a layer no backbone has, its extract step not run: fit-head's own one line, not a KeyError from the count
    lacking = run_tl("run", recipe, "--from", "fit-head", "--set", "fit-head.layer=nope",
                     "--set", "finetune.unfreeze=2")
    assert lacking.code == 2 and "Traceback" not in lacking.err and lacking.err.count("\n") == 1, lacking
    assert "nope" in lacking.err, lacking
    # a cache on disk that no step of the recipe makes: its manifest says, before fit-head runs
    cached = _recipe(tmp_path, """\
        data: images
        fit-head: {cache: caches/train, out: heads/other.pt}
        finetune: {head: heads/other.pt, epochs: 1, batch_size: 4, unfreeze: 6, out: models/other.pt}
        """)
    refused = run_tl("run", cached, "--quiet")
    assert refused.code == 2 and "more than the 5 conv layers" in refused.err and not refused.out, refused
    assert not (tmp_path / "heads/other.pt").exists()


def test_a_step_that_failed_before_writing_keeps_its_earlier_record(run_tl, tmp_path, monkeypatch):
    """A refused step (a setting only the stage checks) left a "started" record of its bad settings, and the
    next good run redid it and every step after it; a finetune stopped before its first checkpoint of new
    settings resumed the earlier run's checkpoint, refused it, and no tl run could get past it."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, out: models/m.pt}
        """)
    assert run_tl("run", recipe).code == 0
    layer = run_tl("run", recipe, "--set", "fit-head.layer=fc9")  # not among the extract step's: before any step
    assert layer.code == 2 and "layer 'fc9' is not one that extract (train) caches (pool5)" in layer.err, layer
    assert not layer.out, layer
    refused = run_tl("run", recipe, "--set", "fit-head.val_cache=caches/train")  # the stage reads the caches to know
    assert refused.code == 2 and "holds the codes of the training cache" in refused.err and "== fit-head" in refused.out, refused
    counted = run_tl("run", recipe, "--set", "fit-head.max_iter=0")  # a count: refused before any step
    assert counted.code == 2 and "'max_iter': 0 is not in the range x>=1" in counted.err and not counted.out, counted
    again = run_tl("run", recipe)
    assert again.code == 0 and "0 steps ran, 3 up to date" in again.out, again

    import pipeline.finetune

    def stopped(*args, **kwargs):  # Ctrl-C before the first epoch of the new settings ends
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.finetune, "_run_finetune", stopped)
    interrupted = run_tl("run", recipe, "--set", "finetune.unfreeze=1")
    assert interrupted.code == 130 and interrupted.err.startswith("error: interrupted; "), interrupted  # no empty line
    assert interrupted.err.count("\n") == 1
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    resumed = run_tl("run", recipe, "--set", "finetune.unfreeze=1")
    # the stopped run had started over: the earlier run's checkpoint is gone, and nothing is resumed
    assert resumed.code == 0 and "resuming" not in resumed.out and "== finetune -> models/m.pt" in resumed.out, resumed
    assert "1 epoch run" in resumed.out, resumed

    # stopped after its first checkpoint of new settings: that run's record stays, and the next one resumes it
    save = pipeline.finetune.save_checkpoint

    def stopped_after(path, *args, **kwargs):
        save(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.finetune, "save_checkpoint", stopped_after)
    assert run_tl("run", recipe, "--set", "finetune.unfreeze=2", "--set", "finetune.epochs=2").code == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert json.loads((tmp_path / "models/m.pt.tl-run.json").read_text())["status"] == "started"
    resumed = run_tl("run", recipe, "--set", "finetune.unfreeze=2", "--set", "finetune.epochs=2")
    assert resumed.code == 0 and "resuming the run that stopped" in resumed.out and "resumed after epoch 1" in resumed.out


def test_a_cache_made_again_by_hand_with_other_settings_is_extracted_again(run_tl, tmp_path, monkeypatch):
    """The README's promise: a cache made with other settings is made again, also when another
    `tl extract --overwrite` replaced the recipe's cache (its record still has the recipe's settings)."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 2)
    assert run_tl("run", recipe).code == 0
    by_hand = run_tl("extract", "--data", "images", "--backbone", "alexnet", "--weights", "none", "--layers", "fc7",
                     "--overwrite", "--out", "caches/train", "--quiet")
    assert by_hand.code == 0, by_hand
    again = run_tl("run", recipe)
    assert again.code == 0, again
    assert "caches/train was made again with other settings since this recipe made it: extracting again" in again.out
    assert list(CacheReader(tmp_path / "caches/train").taps) == ["pool5"]
    assert "is up to date, skipped" in run_tl("run", recipe).out
    record_file = tmp_path / "caches/train.tl-run.json"
    for change in ({"facts": {}}, {"status": "started"}):  # a record of an earlier tl; a run that stopped
        assert run_tl("extract", "--data", "images", "--backbone", "alexnet", "--weights", "none", "--layers", "fc7",
                      "--overwrite", "--out", "caches/train", "--quiet").code == 0
        record_file.write_text(json.dumps({**json.loads(record_file.read_text()), **change}))
        again = run_tl("run", recipe)
        assert again.code == 0 and "== extract (train) -> caches/train" in again.out, (change, again)
        assert list(CacheReader(tmp_path / "caches/train").taps) == ["pool5"]


def test_a_first_extract_stopped_midway_keeps_its_claim_and_a_damaged_manifest_is_said(run_tl, tmp_path,
                                                                                         monkeypatch):
    """A first extract stopped after one shard made its folder: the next run, with other settings,
    extracts again rather than calling the folder someone else's. A manifest that cannot be read is
    named before the cache is made again."""
    from cache.writer import CacheWriter

    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 4)
    write_shard = CacheWriter.write_shard

    def stopped_after_one(self, *args, **kwargs):
        write_shard(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "write_shard", stopped_after_one)
    assert run_tl("run", recipe, "--set", "extract.shard_rows=2").code == 130
    monkeypatch.setattr(CacheWriter, "write_shard", write_shard)
    assert json.loads((tmp_path / "caches/train.tl-run.json").read_text())["status"] == "started"
    again = run_tl("run", recipe, "--set", "extract.shard_rows=2", "--set", "extract.layers=[fc7]")
    assert again.code == 0 and "settings or inputs changed since caches/train was made" in again.out, again
    manifest = tmp_path / "caches/train/manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    damaged = run_tl("run", recipe, "--set", "extract.shard_rows=2", "--set", "extract.layers=[fc7]")
    assert damaged.code == 0, damaged
    assert "== extract (train): caches/train has a manifest that cannot be used (" in damaged.out
    assert "is not valid JSON" in damaged.out and "): extracting again" in damaged.out


def test_a_cache_this_recipe_did_not_make_is_kept_and_the_remedy_is_the_recipes(run_tl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 2)
    theirs = run_tl("extract", "--data", "images", "--backbone", "alexnet", "--weights", "none", "--layers", "fc7",
                    "--out", "caches/train", "--quiet")
    assert theirs.code == 0, theirs
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert refused.err.startswith("error: extract (train): caches/train holds a cache made with other settings (")
    assert refused.err.endswith(f"), and this recipe did not make it; give the step another out in {recipe}, or delete "
                                "caches/train and run again\n"), refused
    assert list(CacheReader(tmp_path / "caches/train").taps) == ["fc7"]  # theirs, untouched
    assert not (tmp_path / "caches/train.tl-run.json").exists()  # and not claimed: a second run refuses alike
    assert run_tl("run", recipe).err == refused.err
    said = run_tl("run", recipe, "--dry-run")
    assert said.out.startswith("== extract (train) -> caches/train: would run (and stop: caches/train holds a cache "
                               "made with other settings (layout.dtype: float16 -> float32; taps: fc7 -> pool5), and "
                               "this recipe did not make it)\n"), said


def test_a_cache_of_other_settings_at_a_later_extract_steps_out_stops_the_run_before_any_step(run_tl, tmp_path,
                                                                                                monkeypatch):
    """A cache the recipe did not make at the test extract's out, of other layers: the run stopped there after
    the train extract had run (hours on real data). What the settings alone tell (backbone, layers, dtype,
    split, decode, patches) is now compared before any step; a cache of the step's settings is taken up."""
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        make_image_folder(tmp_path / "images" / split, classes=("a", "b"), per_class=2, size=(32, 32))
    recipe = _recipe(tmp_path, RANDOM_ALEXNET + "extract: [{split: train, out: caches/train}, "
                                                "{split: test, out: caches/test}]\n")
    by_hand = ["extract", "--data", "images", "--split", "test", "--backbone", "alexnet", "--weights", "none",
               "--out", "caches/test", "--quiet"]
    assert run_tl(*by_hand, "--layers", "fc7").code == 0
    said = run_tl("run", recipe, "--dry-run")
    assert "== extract 2/2 (test) -> caches/test: would run (and stop: caches/test holds a cache made with other " \
           "settings (taps: fc7 -> pool5), and this recipe did not make it)" in said.out, said
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.out == "" and refused.err.startswith(
        "error: extract 2/2 (test): caches/test holds a cache made with other settings (taps: fc7 -> pool5), and this "
        "recipe did not make it; give the step another out in "), refused
    assert not (tmp_path / "caches/train").exists() and list(CacheReader(tmp_path / "caches/test").taps) == ["fc7"]
    assert run_tl(*by_hand, "--layers", "pool5", "--overwrite").code == 0  # the step's own settings: taken up
    taken = run_tl("run", recipe)
    assert taken.code == 0 and "wrote caches/test: 4 rows, 0 shards new, 1 reused" in taken.out, taken


def test_a_cache_of_other_settings_with_damaged_records_stops_the_run_before_any_step(run_tl, tmp_path, monkeypatch):
    """A cache of other layers at the test extract's out whose shards.jsonl has a damaged line (its header sound):
    the look ahead read no shard of it and let the run start; the step refuses it (its shard files are finished
    shards), after the train extract had run. Now it stops before any step, as with its records whole."""
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        make_image_folder(tmp_path / "images" / split, classes=("a", "b"), per_class=2, size=(32, 32))
    recipe = _recipe(tmp_path, RANDOM_ALEXNET + "extract: [{split: train, out: caches/train}, "
                                                "{split: test, out: caches/test}]\n")
    assert run_tl("extract", "--data", "images", "--split", "test", "--backbone", "alexnet", "--weights", "none",
                  "--layers", "fc7", "--out", "caches/test", "--quiet").code == 0
    (tmp_path / "caches/test/shards.jsonl").write_text("garbage\n")
    said = run_tl("run", recipe, "--dry-run")
    assert "== extract 2/2 (test) -> caches/test: would run (and stop: caches/test holds a cache made with other " \
           "settings (taps: fc7 -> pool5), and this recipe did not make it)" in said.out, said
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.out == "" and "caches/test holds a cache made with other settings" \
        in refused.err, refused
    assert not (tmp_path / "caches/train").exists() and (tmp_path / "caches/test/shard-00000.h5").is_file()


def _finetune_beside_another_runs_checkpoint(tmp_path, monkeypatch):
    """A recipe of extract, fit-head and finetune whose finetune out has a checkpoint this recipe did not make."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 2, """\
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {head: heads/h.pt, epochs: 1, batch_size: 4, out: models/m.pt}
        """)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/m.last.ckpt").write_bytes(b"another run's checkpoint")
    return recipe


def test_a_checkpoint_this_recipe_did_not_make_is_kept_and_the_remedy_is_the_recipes(run_tl, tmp_path, monkeypatch):
    recipe = _finetune_beside_another_runs_checkpoint(tmp_path, monkeypatch)
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.err == (
        "error: finetune: models/m.last.ckpt holds an earlier run, and this recipe did not make it; give the step "
        f"another out in {recipe}, or delete models/m.last.ckpt and run again\n"), refused
    assert (tmp_path / "models/m.last.ckpt").read_bytes() == b"another run's checkpoint"
    assert not (tmp_path / "models/m.pt.tl-run.json").exists()
    assert not (tmp_path / "caches").exists() and not (tmp_path / "heads").exists()  # before any step
    said = run_tl("run", recipe, "--dry-run")  # what the run does, not "not run yet"
    assert said.code == 0 and ("\n== finetune -> models/m.pt: would run (and stop: models/m.last.ckpt holds an "
                               "earlier run, and this recipe did not make it)\n") in said.out, said


def test_a_model_file_and_a_checkpoint_this_recipe_did_not_make_stop_at_the_model_file(run_tl, tmp_path,
                                                                                       monkeypatch):
    """Both the model file and a checkpoint beside it not this recipe's: the finetune stage refuses the model
    file first (tl finetune's order), and tl run's early stop names the file the stage names, not the checkpoint."""
    recipe = _finetune_beside_another_runs_checkpoint(tmp_path, monkeypatch)
    (tmp_path / "models/m.pt").write_text("my notes\n")
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.err == (
        "error: finetune: models/m.pt holds a file that tl did not write as a model file, and this recipe did not "
        f"make it; give the step another out in {recipe}, or delete models/m.pt and run again\n"), refused
    said = run_tl("run", recipe, "--dry-run")
    assert said.code == 0 and ("\n== finetune -> models/m.pt: would run (and stop: models/m.pt holds a file that tl "
                               "did not write as a model file, and this recipe did not make it)\n") in said.out, said
    stage = run_tl("finetune", "--data", "images", "--head", tmp_path / "m.pt", "--out", "models/m.pt")
    assert stage.code == 2 and "models/m.pt holds a file that tl did not write as a model file" in stage.err, stage


def test_a_head_file_tl_did_not_write_is_kept_unless_the_recipe_made_that_out(run_tl, tmp_path, monkeypatch):
    """A recipe whose head out names the user's own file (notes, not a tl head) stops there and keeps it, with
    the recipe's remedy; a head this recipe made and that was edited by hand since is made again."""
    monkeypatch.chdir(tmp_path)
    recipe = _alexnet_recipe(tmp_path, 2, "fit-head: {cache: caches/train, out: heads/h.pt}\n")
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads/h.pt").write_text("my notes\n")
    refused = run_tl("run", recipe)
    assert refused.code == 2 and refused.err.endswith(
        "fit-head: heads/h.pt holds a file that tl did not write as a head file, and this recipe did not make it; "
        f"give the step another out in {recipe}, or delete heads/h.pt and run again\n"), refused
    assert (tmp_path / "heads/h.pt").read_text() == "my notes\n"
    assert not (tmp_path / "heads/h.pt.tl-run.json").exists()
    assert not (tmp_path / "caches").exists()  # stopped before the extract it reads: not after it
    said = run_tl("run", recipe, "--dry-run")
    assert said.code == 0 and ("== fit-head -> heads/h.pt: would run (and stop: heads/h.pt holds a file that tl did "
                               "not write as a head file, and this recipe did not make it)\n") in said.out, said
    (tmp_path / "heads/h.pt").unlink()
    assert run_tl("run", recipe).code == 0
    (tmp_path / "heads/h.pt").write_bytes(b"edited by hand")
    again = run_tl("run", recipe)
    assert again.code == 0 and "== fit-head: heads/h.pt is not as this recipe wrote it: making it again" in again.out, again
    assert (tmp_path / "heads/h.pt").read_bytes()[:2] == b"PK"
    finetune = "finetune: {head: heads/h.pt, epochs: 0, batch_size: 4, out: models/m.pt}\n"
    recipe.write_text(recipe.read_text() + finetune)
    assert run_tl("run", recipe).code == 0
    for name in ("m.pt", "m.last.ckpt", "m.best.ckpt"):  # checkpoints deleted to free space: none to start over from
        (tmp_path / "models" / name).unlink(missing_ok=True)
    (tmp_path / "models/m.pt").write_bytes(b"edited by hand")
    edited = run_tl("run", recipe)
    assert edited.code == 0 and "== finetune: models/m.pt is not as this recipe wrote it: starting over" in edited.out
    assert (tmp_path / "models/m.pt").read_bytes()[:2] == b"PK"


def test_a_predictions_file_tl_did_not_write_names_the_key_that_names_it(run_tl, code_caches, monkeypatch):
    """An evaluate step whose save_predictions names the user's own file stops there and keeps it; the remedy
    names that key, not 'another out' (the report folder, which was never the trouble)."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r, save_predictions: notes.csv}
        """)
    (code_caches / "notes.csv").write_text("my,notes\n")
    said = run_tl("run", recipe, "--dry-run")  # the run stops there, and its dry run says so
    assert said.code == 0 and ("== evaluate -> r: would run (and stop: notes.csv holds a file that tl did not write "
                               "as a predictions file)\n") in said.out, said
    refused = run_tl("run", recipe, "--quiet")
    assert refused.code == 2 and refused.err == (
        "error: evaluate: notes.csv holds a file that tl did not write as a predictions file, and this recipe did not "
        f"make it; give the step another save_predictions in {recipe}, or delete notes.csv and run again\n"), refused
    assert (code_caches / "notes.csv").read_text() == "my,notes\n"
    assert not (code_caches / "h.pt").exists()  # the fit-head before it did not run
    (code_caches / "notes.csv").unlink()
    assert run_tl("run", recipe, "--quiet").code == 0
    assert run_tl("run", recipe, "--quiet", "--rerun").code == 0  # its own predictions: replaced


def test_a_predictions_file_tl_did_not_write_names_its_key_after_the_step_ran_before(run_tl, code_caches, monkeypatch):
    """An evaluate step this recipe ran before (it has a record) whose save_predictions now names the user's
    file said only 'move it away (or delete it), then run again' (the line of a finetune resuming into a
    foreign model file): the key that names the file is said too, the file and the step's record are kept."""
    monkeypatch.chdir(code_caches)
    steps = """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r%s}
        """
    assert run_tl("run", _recipe(code_caches, steps % ""), "--quiet").code == 0
    record = (code_caches / "r.tl-run.json").read_text()
    recipe = _recipe(code_caches, steps % ", save_predictions: notes.csv")
    (code_caches / "notes.csv").write_text("my,notes\n")
    refused = run_tl("run", recipe, "--quiet")
    assert refused.code == 2 and refused.err == (
        "error: evaluate: notes.csv holds a file that tl did not write as a predictions file; give the step another "
        f"save_predictions in {recipe}, or move it away (or delete it) and run again\n"), refused
    assert (code_caches / "notes.csv").read_text() == "my,notes\n"
    assert (code_caches / "r.tl-run.json").read_text() == record
    said = run_tl("run", recipe, "--dry-run")
    assert said.code == 0 and ("== evaluate -> r: would run (and stop: notes.csv holds a file that tl did not write "
                               "as a predictions file)\n") in said.out, said
    (code_caches / "notes.csv").unlink()
    assert run_tl("run", recipe, "--quiet").code == 0


def test_a_rerun_that_would_stop_at_a_later_step_stops_before_the_first(run_tl, code_caches, monkeypatch):
    """tl run --rerun whose evaluate step names the user's file as save_predictions ran the fit-head again
    (its head replaced), then stopped at evaluate; now the run stops before any step, the head and every
    record as they were, and --dry-run says the same stop."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r, save_predictions: p.csv}
        """)
    assert run_tl("run", recipe, "--quiet").code == 0
    (code_caches / "p.csv").write_text("my,predictions\n")
    kept = {path: path.read_bytes() for path in code_caches.glob("*.tl-run.json")} | {
        code_caches / "h.pt": (code_caches / "h.pt").read_bytes()}
    head_written = (code_caches / "h.pt").stat().st_mtime_ns
    said = run_tl("run", recipe, "--dry-run", "--rerun")
    assert said.code == 0 and ("== fit-head -> h.pt: would run (--rerun)\n== evaluate -> r: would run (and stop: "
                               "p.csv holds a file that tl did not write as a predictions file)\n") in said.out, said
    refused = run_tl("run", recipe, "--rerun")
    assert refused.code == 2 and refused.out == "" and refused.err == (
        "error: evaluate: p.csv holds a file that tl did not write as a predictions file; give the step another "
        f"save_predictions in {recipe}, or move it away (or delete it) and run again\n"), refused
    assert (code_caches / "h.pt").stat().st_mtime_ns == head_written
    assert {path: path.read_bytes() for path in kept} == kept
    assert (code_caches / "p.csv").read_text() == "my,predictions\n"
    (code_caches / "p.csv").unlink()
    again = run_tl("run", recipe, "--rerun", "--quiet")
    assert again.code == 0 and "== fit-head -> h.pt" in again.out and "== evaluate -> r" in again.out, again


def test_remaking_a_report_edited_by_hand_keeps_a_predictions_file_swapped_for_the_users(run_tl, code_caches,
                                                                                         monkeypatch):
    """A report the recipe made, edited by hand, is made again with evaluate's overwrite, which replaced the
    save_predictions file too: one the user had swapped for their own was lost (exit 0). It is refused as
    without the report's edit, and kept; the report the recipe made is still made again once it is gone."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r, save_predictions: p.csv}
        """)
    assert run_tl("run", recipe, "--quiet").code == 0
    (code_caches / "r" / "report.json").write_text("my notes\n")
    (code_caches / "p.csv").write_text("my,predictions\n")
    refused = run_tl("run", recipe, "--quiet")
    assert refused.code == 2 and refused.err == (
        "error: evaluate: p.csv holds a file that tl did not write as a predictions file; give the step another "
        f"save_predictions in {recipe}, or move it away (or delete it) and run again\n"), refused
    assert (code_caches / "p.csv").read_text() == "my,predictions\n"
    assert (code_caches / "r" / "report.json").read_text() == "my notes\n"
    (code_caches / "p.csv").unlink()
    again = run_tl("run", recipe, "--quiet")
    assert again.code == 0 and "== evaluate: r is not as this recipe wrote it: making it again" in again.out, again
    assert (code_caches / "p.csv").read_text().startswith("sample_id,")


def test_an_evaluate_step_whose_predictions_file_is_gone_runs_again(run_tl, code_caches, monkeypatch):
    """The save_predictions file deleted (or moved away, as the refusal of a foreign one says), tl run said
    'evaluate: r is up to date, skipped' and --dry-run 'r is up to date': the step's record looked at the
    report alone, and the predictions were never written again. Now the step runs, and --dry-run says why."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r, save_predictions: p.csv}
        """)
    assert run_tl("run", recipe, "--quiet").code == 0
    (code_caches / "p.csv").unlink()
    preview = run_tl("run", recipe, "--dry-run")
    assert "== evaluate -> r: would run (p.csv is gone)" in preview.out, preview
    again = run_tl("run", recipe, "--quiet")
    assert again.code == 0 and "== evaluate -> r" in again.out, again
    assert (code_caches / "p.csv").read_text().startswith("sample_id,")
    assert "== evaluate: r is up to date" in run_tl("run", recipe, "--dry-run").out


def test_a_report_folder_of_the_users_own_files_stops_the_evaluate_step(run_tl, code_caches, monkeypatch):
    """An evaluate step whose out holds the user's own report.md (no report.json of tl's beside it) stops there,
    keeps it and names out; --dry-run says so; a report the recipe made is replaced by a re-run."""
    monkeypatch.chdir(code_caches)
    recipe = _recipe(code_caches, """\
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r}
        """)
    (code_caches / "r").mkdir()
    (code_caches / "r/report.md").write_text("my notes\n")
    stop = "and stop: r/report.md holds a file that tl did not write as a report file, and this recipe did not make it"
    for flags in ((), ("--rerun",)):  # before the fit-head it reads ran: the run stops there all the same
        said = run_tl("run", recipe, "--dry-run", *flags)
        assert said.code == 0 and f"== evaluate -> r: would run ({stop})\n" in said.out, said
    refused = run_tl("run", recipe, "--quiet")
    assert refused.code == 2 and refused.err == (
        "error: evaluate: r/report.md holds a file that tl did not write as a report file, and this recipe did not "
        f"make it; give the step another out in {recipe}, or delete r/report.md and run again\n"), refused
    assert (code_caches / "r/report.md").read_text() == "my notes\n"
    assert not (code_caches / "h.pt").exists()  # the fit-head before it did not run
    said = run_tl("run", recipe, "--dry-run")
    assert said.code == 0 and ("== evaluate -> r: would run (and stop: r/report.md holds a file that tl did not "
                               "write as a report file, and this recipe did not make it)\n") in said.out, said
    (code_caches / "r/report.md").unlink()
    assert run_tl("run", recipe, "--quiet").code == 0
    assert run_tl("run", recipe, "--quiet", "--rerun").code == 0  # its own report: replaced


def test_a_recipe_section_of_steps_read_by_one_command_says_so(run_tl):
    result = run_tl("extract", "--config", REPO / "configs" / "cifar10_vgg16.yaml")
    assert result.code == 2 and "section extract lists 2 steps; run them with tl run" in result.err, result


def test_every_shipped_recipe_plans_and_names_known_options(run_tl, tmp_path, monkeypatch):
    """Each recipe in configs/ passes tl run's checks up to the data it needs (absent here)."""
    monkeypatch.chdir(tmp_path)
    for config in sorted((REPO / "configs").glob("*.yaml")):
        recipe = yaml.safe_load(config.read_text())
        assert {"extract", "fit-head", "evaluate"} <= set(recipe), config.name
        assert "tl extract" not in config.read_text(), f"{config.name} still lists commands by hand"
        result = run_tl("run", config)
        assert result.code == 2 and f"data {recipe['data']} does not exist; " in result.err, (config.name, result)
        # --download is offered for the formats it fetches only (not VOC, flowers or digits)
        fetched = recipe["format"] in ("cifar10", "gtsrb")
        assert ("fetch it with --set extract.download=true" in result.err) == fetched, (config.name, result)
        assert ("put it there, or --set data=PATH" in result.err) != fetched, (config.name, result)


def test_run_under_torchrun_is_refused_in_one_line(run_tl, code_caches, monkeypatch):
    monkeypatch.chdir(code_caches)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_tl("run", _recipe(code_caches, "fit-head: {cache: caches/train, out: h.pt}\n"))
    assert result.code == 2 and not (code_caches / "h.pt").exists()
    assert result.err == ("error: tl run runs in one process, but WORLD_SIZE=2 says torchrun started it in several: "
                          "under torchrun start extract or finetune; run tl run without torchrun (and without "
                          "WORLD_SIZE in its environment)\n")
    for command in ("fit-head", "sweep", "evaluate", "predict", "export", "quickstart", "info"):  # each rank did it all
        refused = run_tl(command, "--help")
        assert refused.code == 2 and f"error: tl {command} runs in one process" in refused.err, (command, refused)
    assert run_tl("extract", "--help").code == 0 and run_tl("finetune", "--help").code == 0


def test_downloaded_data_and_inputs_rewritten_by_hand(run_tl, tmp_path, monkeypatch):
    """Data an extract step downloads is not missing before it runs, and once there it is the step's input
    (the next run is up to date); an output rewritten outside `tl run` makes its readers run again."""
    import cli
    import pipeline.run as run_module

    monkeypatch.chdir(tmp_path)
    ran = []

    class Stages(cli.ClickStages):  # the stages' work stands in; planning, checks and records are real
        def execute(self, step, extra):
            ran.append(step.label)
            out = step.path("out")
            if step.stage == "extract":
                if not step.path("data").exists():
                    make_image_folder(step.path("data"), classes=("a", "b"), per_class=2)  # "downloaded"
                out.mkdir(parents=True, exist_ok=True)
                (out / "manifest.json").write_text("{}")
            elif step.stage == "evaluate":
                out.mkdir(parents=True, exist_ok=True)
                (out / "report.json").write_text("{}")
            else:
                out.write_text("head")

    monkeypatch.setattr(run_module, "summarize", lambda step, result: {})
    recipe = _recipe(tmp_path, "extract: {data: fetched, download: true, out: caches/c}\n"
                               "fit-head: {cache: caches/c, out: h.pt}\n"
                               "evaluate: {head: h.pt, cache: caches/c, out: r}\n")

    def run(*options):
        ran.clear()
        return run_module.run_recipe(run_module.RunConfig(recipe, *options), Stages(True), say=lambda text: None)

    run()
    assert ran == ["extract (train)", "fit-head", "evaluate"]
    run()
    assert ran == []
    (tmp_path / "h.pt").write_text("a head made by hand")
    run((), "evaluate")
    assert ran == ["evaluate"]


def test_an_output_folder_that_cannot_be_listed_is_never_taken_as_unchanged(tmp_path, monkeypatch):
    """Unlisted twice, it must not compare equal to itself, or a failed step would keep a record of
    an output it may have changed."""
    from pipeline.recipe import Step
    from pipeline.run_records import output_state as _state

    (tmp_path / "cache").mkdir()
    step = Step("extract", 1, 1, {}, {})
    assert _state(step, tmp_path / "cache") == _state(step, tmp_path / "cache")

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "iterdir", refused)
    assert _state(step, tmp_path / "cache") != _state(step, tmp_path / "cache")


def test_scoring_codes_of_the_training_images_is_noted_however_the_caches_are_named(run_tl, tmp_path, monkeypatch):
    """`--set extract.1.split=test` trained and scored the same test images through two caches of them,
    with no note: the note compared the cache paths, not the images they hold."""
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        make_image_folder(tmp_path / "images" / split, classes=("a", "b"), per_class=3, size=(32, 32))
    recipe = _recipe(tmp_path, RANDOM_ALEXNET + textwrap.dedent("""\
        extract: [{split: train, out: caches/train}, {split: test, out: caches/test}]
        fit-head: {cache: caches/train, out: h.pt}
        evaluate: {head: h.pt, cache: caches/test, out: r}
        """))
    note = ("note: evaluate scores caches/test, codes of the images fit-head trained on (caches/train): its numbers "
            "are training numbers, not a test")
    tested = run_tl("run", recipe, "--only", "extract")  # a test of other images: no note
    assert tested.code == 0 and "note:" not in tested.out, tested
    same = run_tl("run", recipe, "--set", "extract.1.split=test", "--only", "extract")
    assert same.code == 0 and note in same.out.splitlines(), same
    spelled = run_tl("run", recipe, "--set", "extract.1.data=images/test", "--set", "extract.1.split=",
                     "--only", "extract")  # the same folder named directly
    assert spelled.code == 0 and note in spelled.out.splitlines(), spelled


def test_a_remedy_names_the_key_where_the_recipe_gives_it(run_tl, code_caches, monkeypatch):
    """Offline, cifar10_vgg16.yaml (weights: at the top level) said `--set extract.1.weights=...`; following
    it ran extract 1 and stopped extract 2 on the same error. A step's own key is that step's."""
    import torch
    import urllib.error

    monkeypatch.chdir(code_caches)
    monkeypatch.setenv("TORCH_HOME", str(code_caches / "torch-home"))  # no cached ImageNet weights

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    steps = "[{split: train, out: caches/x}, {split: test, out: caches/y}]"
    recipe = _recipe(code_caches, f"data: images\nbackbone: alexnet\nweights: imagenet\nextract: {steps}\n")
    top = run_tl("run", recipe, "--quiet")
    assert top.code == 2 and top.err.endswith(
        "or pass --weights PATH (in a recipe: --weights is --set weights=...)\n"), top
    own = steps.replace("split: test,", "split: test, weights: imagenet,")
    recipe.write_text(f"data: images\nbackbone: alexnet\nextract: {own}\n")
    for split in ("train", "test"):  # the first step runs (weights none), the second stops: its own key
        make_image_folder(code_caches / "images" / split, classes=("a", "b"), per_class=2)
    second = run_tl("run", recipe, "--quiet", "--set", "extract.1.weights=none")
    assert second.code == 2 and second.err.endswith("(in a recipe: --weights is --set extract.2.weights=...)\n"), second
    # where a section also sets the top-level key, `--set weights=` is refused: the section's key it is
    recipe.write_text(f"data: images\nbackbone: alexnet\nweights: imagenet\nextract: {steps}\n"
                      "finetune: {weights: none, head: h.pt, out: m.pt}\n")
    shadowed = run_tl("run", recipe, "--quiet", "--only", "extract")
    assert shadowed.code == 2 and shadowed.err.endswith("--weights is --set extract.weights=...)\n"), shadowed

    # GTSRB downloads each split's own archives: the recipe's comment (extract.download) is right
    (code_caches / "empty").mkdir()
    gtsrb = REPO / "configs" / "gtsrb_alexnet_fc7.yaml"
    missing = run_tl("run", gtsrb, "--quiet", "--set", "data=empty")
    assert missing.code == 2 and missing.err.endswith(
        "fetch it with tl extract --download (in a recipe: --download is --set extract.download=true)\n"), missing
    assert "--set extract.download=true" in gtsrb.read_text()


def test_a_fit_head_layer_is_checked_against_the_extract_step_only_when_that_step_runs(run_tl, tmp_path,
                                                                                        monkeypatch):
    """With --only fit-head the cache on disk is read, not the one the recipe's extract step would write:
    a cache extracted with `--set layers=[pool5,fc6]` was refused for its fc6 although it holds it."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3, size=(32, 32))
    recipe = _recipe(tmp_path, RANDOM_ALEXNET + textwrap.dedent("""\
        extract: {out: caches/train}
        fit-head: {cache: caches/train, out: h.pt, val_fraction: 0}
        """))
    both = run_tl("run", recipe, "--set", "layers=[pool5,fc6]", "--only", "extract")
    assert both.code == 0, both
    fitted = run_tl("run", recipe, "--only", "fit-head", "--set", "fit-head.layer=fc6")
    assert fitted.code == 0 and "== fit-head" in fitted.out, fitted
    # the extract step runs (and would write pool5 alone): refused before any step, as before
    refused = run_tl("run", recipe, "--set", "fit-head.layer=fc6")
    assert refused.code == 2 and "layer 'fc6' is not one that extract (train) caches (pool5)" in refused.err, refused
    assert not refused.out, refused


def test_validation_data_an_extract_step_downloads_is_not_refused_before_it_runs(run_tl, tmp_path, monkeypatch):
    """finetune's settings check refused `val_data` that does not exist yet, although the recipe's extract
    step downloads it (gtsrb, download: true): the recipe check already knows what steps make."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, """\
        data: data/gtsrb
        format: gtsrb
        backbone: alexnet
        weights: none
        layers: [pool5]
        extract: [{split: train, out: caches/train, download: true}, {split: test, out: caches/test, download: true}]
        fit-head: {cache: caches/train, out: heads/h.pt}
        finetune: {data: data/gtsrb, val_data: data/gtsrb, val_split: test, head: heads/h.pt, out: models/m.pt}
        """)
    result = run_tl("run", recipe, "--quiet")  # the first step runs, and its download is what fails offline
    assert result.code == 2 and "== extract 1/2 (train)" in result.out, result
    assert "cannot download GTSRB train" in result.err and "--val-data" not in result.err, result
    # a val_data no step makes is still refused before any step
    recipe.write_text(recipe.read_text().replace("val_data: data/gtsrb", "val_data: data/nowhere"))
    missing = run_tl("run", recipe, "--quiet")
    assert missing.code == 2 and "finetune val_data data/nowhere does not exist" in missing.err, missing
    assert not missing.out, missing


@pytest.mark.parametrize("damaged, maker", [("caches/train/shard-00001.h5", "extract (train)"),
                                             ("heads/h.pt", "fit-head")])
def test_an_input_a_later_step_finds_damaged_is_made_again_by_the_next_run(run_tl, tmp_path, monkeypatch, damaged,
                                                                          maker):
    """A shard of a recipe's cache, or its head file, changed in place (bit rot; a copy that kept its time)
    leaves what dates the step's output (the cache's manifest, the file's size and time) as it was: every tl
    run skipped the step that made it as up to date and stopped in the step reading it on the same damage
    error, whose remedy (re-run tl extract, train one with tl fit-head) a recipe user cannot take from tl run.
    The error now marks the maker's record, and the next run makes the input again."""
    import os

    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images" / "train", classes=("a", "b"), per_class=3)
    recipe = _recipe(tmp_path, RANDOM_ALEXNET + "extract: {out: caches/train, shard_rows: 2}\n"
                               "fit-head: {cache: caches/train, out: heads/h.pt}\n"
                               "evaluate: {head: heads/h.pt, cache: caches/train, out: reports/r}\n")
    assert run_tl("run", recipe).code == 0
    path = tmp_path / damaged
    clean, status = path.read_bytes(), path.stat()
    changed = bytearray(clean)
    changed[len(changed) // 2] ^= 1
    path.write_bytes(bytes(changed))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    out = damaged.rsplit("/shard", 1)[0]
    for _ in range(2):  # a run that leaves the making step out keeps the mark, and says so again
        stopped = run_tl("run", recipe, "--only", "evaluate", "--rerun")
        assert stopped.code == 2 and len(stopped.err.strip().splitlines()) == 1, stopped
        assert "Traceback" not in stopped.err and ("corrupt" in stopped.err or "damaged" in stopped.err), stopped
        assert f"(in a recipe: run it again with its {maker.split()[0]} step, which now makes {out} again)" \
            in stopped.err, stopped
    dry = run_tl("run", recipe, "--dry-run")
    assert f"== {maker} -> {out}: would run (a later step found {out} damaged)" in dry.out, dry
    again = run_tl("run", recipe)
    assert again.code == 0 and "report: reports/r/report.md" in again.out, again
    assert path.read_bytes() == clean
    if maker.startswith("extract"):
        assert "wrote caches/train: 6 rows, 1 shard new, 2 reused" in again.out, again


def test_a_config_key_one_typo_away_names_the_option(run_tl, tmp_path):
    """--config's unknown keys listed the first six option names in the alphabet ('C, batch_size, ...'), not
    the one the user misspelt; now a close key names it, in a section too."""
    top, section = tmp_path / "top.yaml", tmp_path / "section.yaml"
    top.write_text("cache: c\nout: h.pt\nmax_epoch: 2\n")
    section.write_text("fit-head: {cache: c, out: h.pt, patinece: 2}\n")
    result = run_tl("fit-head", "--config", top)
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert "unknown key 'max_epoch'; did you mean max_epochs?" in result.err, result
    result = run_tl("fit-head", "--config", section)
    assert result.code == 2 and "section fit-head has unknown key 'patinece'; did you mean patience?" in result.err
