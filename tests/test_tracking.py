"""`tl run --track mlflow` and `mlflow run .`: every step a nested MLflow run in a real local store,
read back with MlflowClient (parameters, metric histories, artifacts); without the package, one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import TLError
from tests.conftest import REPO, blobs, write_cifar10, write_code_cache

mlflow = pytest.importorskip("mlflow", reason="the test extra installs mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def _no_active_experiment(monkeypatch):
    """Each test as a fresh `tl` process starts: an earlier test's set_experiment stays MLflow's active
    experiment in this process, and MLflow refuses to resume a run handed over (MLFLOW_RUN_ID) of another."""
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None, raising=False)


def _runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return client, parents, runs


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _tracked_blobs(tmp_path, monkeypatch, recipe: str) -> str:
    """A code cache `c` of three classes and the recipe `r.yaml` in the working folder `tmp_path`, tracked
    in an SQLite store there; returns the store's URI."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_code_cache(tmp_path / "c", *blobs(5, n=30, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text(recipe)
    return uri


def test_each_step_is_a_nested_run_with_params_histories_and_artifacts(run_tl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    classes = [f"class{c}" for c in range(3)]
    write_code_cache(tmp_path / "caches/train", *blobs(4, n=90, classes=3, width=16), classes)
    write_code_cache(tmp_path / "caches/test", *blobs(4, n=30, classes=3, width=16, draw=1), classes)
    (tmp_path / "recipe.yaml").write_text(
        "experiment: blobs\nseed: 0\n"
        "fit-head: {cache: caches/train, head: mlp, hidden: [8], max_epochs: 3, batch_size: 8, val_fraction: 0.2, out: heads/h.pt}\n"
        "evaluate: {head: heads/h.pt, cache: caches/test, out: reports/r}\n")
    result = run_tl("run", "recipe.yaml", "--track", "mlflow", "--quiet", "--set", "fit-head.lr=0.05")
    assert result.code == 0, result
    assert f"look with: mlflow ui --backend-store-uri {uri}" in result.out

    client, parents, runs = _runs(uri)
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert client.get_experiment(parent.info.experiment_id).name == "blobs"
    assert parent.data.params["tl.set"] == "fit-head.lr=0.05" and parent.data.metrics["accuracy"] > 0.6
    assert _artifacts(client, parent.info.run_id) == {"recipe/recipe.yaml", "model/h.pt"}
    children = {run.data.tags["tl.stage"]: run for run in runs if run is not parent}
    assert {run.data.tags["mlflow.parentRunId"] for run in children.values()} == {parent.info.run_id}

    fit = children["fit-head"]
    assert fit.data.params["head"] == "mlp" and fit.data.params["lr"] == "0.05" and fit.data.params["hidden"] == "8"
    assert any(name.startswith("codes_key.") for name in fit.data.params) and fit.data.tags["tl.skipped"] == "false"
    assert fit.data.metrics["val_accuracy"] > 0.6
    losses = client.get_metric_history(fit.info.run_id, "curve/train_loss")
    assert sorted(point.step for point in losses) == [1, 2, 3]
    assert len(client.get_metric_history(fit.info.run_id, "curve/val_loss")) == 3
    assert _artifacts(client, fit.info.run_id) == {"h.pt"}

    evaluated = children["evaluate"]
    assert evaluated.data.metrics["accuracy"] == parent.data.metrics["accuracy"]
    assert {"report.md", "report.json", "report.html", "confusion_matrix.png", "pr_curves.png",
            "training_curve.png"} <= _artifacts(client, evaluated.info.run_id)

    again = run_tl("run", "recipe.yaml", "--quiet", "--set", "fit-head.lr=0.05", "--set", "track=mlflow")  # the recipe key
    assert again.code == 0 and "0 steps ran, 2 up to date" in again.out
    _, parents, runs = _runs(uri)
    latest = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id]
    assert len(parents) == 2 and {run.data.tags["tl.skipped"] for run in latest} == {"true"} and len(latest) == 2
    skipped_fit = next(run for run in latest if run.data.tags["tl.stage"] == "fit-head")
    assert skipped_fit.data.metrics["val_accuracy"] == fit.data.metrics["val_accuracy"]  # from the record
    # a step up to date uploads nothing again (a VGG16 recipe's re-run added 187 MB); the run keeps its model
    assert all(not _artifacts(client, run.info.run_id) for run in latest)
    assert skipped_fit.data.tags["tl.artifacts"] == f"in run {fit.info.run_id}"
    assert _artifacts(client, parents[-1].info.run_id) == {"recipe/recipe.yaml", "model/h.pt"}

    # made without tracking, then tracked: the step up to date uploads its files, once, to this store
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    for turn in range(2):
        assert run_tl("run", "recipe.yaml", "--quiet", "--set", "fit-head.lr=0.05", "--track", "mlflow").code == 0
        client, parents, runs = _runs(other)
        fit = next(run for run in runs if run.data.tags.get("tl.stage") == "fit-head"
                   and run.data.tags["mlflow.parentRunId"] == parents[-1].info.run_id)
        assert _artifacts(client, fit.info.run_id) == ({"h.pt"} if turn == 0 else set()), turn


def test_track_without_the_package_is_one_line(run_tl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    write_code_cache(tmp_path / "c", *blobs(5, n=30, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text("fit-head: {cache: c, out: h.pt}\n")
    result = run_tl("run", "r.yaml", "--track", "mlflow")
    # tl is not on PyPI: 'tl[mlflow]' would install another project's package of that name
    assert result.code == 2 and result.err == ("error: --track mlflow needs the mlflow package: pip install -e "
                                               "'.[mlflow]' in tl's checkout\n")
    assert not (tmp_path / "h.pt").exists()


def test_mlflow_run_of_the_project_stores_the_model(tmp_path):
    """`mlflow run . --env-manager local -P ...` with the repository's MLproject, on tiny CIFAR-format
    batches (a random alexnet stands in for ImageNet VGG16, which this machine cannot download). MLproject
    declares its numbers float, as the Keras project did: 300.0 is a count of 300."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(REPO / "MLproject", project)
    shutil.copy(REPO / "configs" / "cifar10_vgg16.yaml", project / "configs")
    write_cifar10(project / "data" / "cifar10", per_batch=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow run puts this Python's bin first on PATH: its `tl` script imports `cli` through sys.path, which
    # found the installed checkout's, not the one under test (an editable install of another folder)
    python_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": python_path,
                   "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local",
                           "-P", "samples_per_class=300.0", "-P", "retrained_conv_layers=0", "-P", "use_early_stop=1",
                           "-P", "max_epochs=2", "-P", "backbone=alexnet", "-P", "layers=pool5", "-P", "weights=none",
                           "--experiment-name", "keras"],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    client, parents, runs = _runs(uri)
    assert len(parents) == 1 and len(runs) == 7  # the project's run, then 2 extracts, fit-head, finetune, 2 evaluates
    assert {client.get_experiment(run.info.experiment_id).name for run in runs} == {"keras"}
    parent = parents[0]
    assert parent.data.params["retrained_conv_layers"] == "0" and parent.data.params["max_epochs"] == "2"
    # the recipe's paths name the backbone and the training size (300.0 as 300): -P backbone=vgg16 keeps its own
    assert "model/cifar10-alexnet.pt" in _artifacts(client, parent.info.run_id)
    assert (project / "caches" / "cifar10-alexnet-train-300" / "manifest.json").is_file()
    finetune = next(run for run in runs if run.data.tags.get("tl.stage") == "finetune")
    assert finetune.data.params["unfreeze"] == "0" and finetune.data.params["early_stop"] == "True"
    assert finetune.data.params["val_fraction"] == "0.2"
    assert len(client.get_metric_history(finetune.info.run_id, "curve/val_loss")) >= 1
    assert (project / "models" / "cifar10-alexnet.pt").is_file()


@pytest.mark.parametrize("given, unfreeze", [("all", "all"), ("2", 2), ("2.0", 2), (None, 0)])
def test_mlflow_runs_retrained_conv_layers_as_a_count_or_all(monkeypatch, given, unfreeze):
    """MLproject declared retrained_conv_layers a float, which MLflow documents as a number it checks: `all`
    (every conv layer) had no way in, and a count may come as 2.0. It is a string now, and the command the
    project builds (as `mlflow run -P retrained_conv_layers=...` builds it) gives finetune's unfreeze the count
    or all."""
    import shlex

    from mlflow.projects._project_spec import load_project

    from cli import ClickStages
    from pipeline.recipe import plan, read_recipe

    entry = load_project(str(REPO)).get_entry_point("main")
    assert entry.parameters["retrained_conv_layers"].type == "string"
    words = shlex.split(entry.compute_command({} if given is None else {"retrained_conv_layers": given}, None))
    assert words[:3] == ["tl", "run", "configs/cifar10_vgg16.yaml"]
    sets = tuple(word for before, word in zip(words, words[1:]) if before == "--set")
    assert f"finetune.unfreeze={given or 0}" in sets
    monkeypatch.chdir(REPO)  # the project's folder, where mlflow run runs the command
    recipe, runner = read_recipe(Path(words[2]), sets), ClickStages(quiet=True)
    finetune = next(step for step in plan(recipe, runner.options()) if step.stage == "finetune")
    assert runner.parse(recipe, finetune)["unfreeze"] == unfreeze


def test_an_mlflow_failure_is_one_line(run_tl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    write_code_cache(tmp_path / "c", *blobs(5, n=30, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text("fit-head: {cache: c, out: h.pt}\n")
    result = run_tl("run", "r.yaml", "--track", "mlflow")
    assert result.code == 2 and result.err.startswith("error: MLflow failed (") and result.err.count("\n") == 1, result
    assert "check MLFLOW_TRACKING_URI (bogus://nowhere)" in result.err and not (tmp_path / "h.pt").exists()


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:9", "the MLflow tracking server http://127.0.0.1:9 does not answer ("),
    ("sqlite:///{tmp}/missing/mlflow.db", "the MLflow store sqlite:///{tmp}/missing/mlflow.db cannot be written: "
                                          "its folder {tmp}/missing does not exist"),
])
def test_a_store_mlflow_would_retry_for_minutes_is_one_line_at_once(run_tl, tmp_path, monkeypatch, uri, message):
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    write_code_cache(tmp_path / "c", *blobs(5, n=30, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text("fit-head: {cache: c, out: h.pt}\n")
    started = time.monotonic()
    result = run_tl("run", "r.yaml", "--track", "mlflow")
    assert time.monotonic() - started < 30  # MLflow's own retries took 111 s
    assert result.code == 2 and result.err.startswith("error: " + message.format(tmp=tmp_path)), result
    assert result.err.count("\n") == 1 and not (tmp_path / "h.pt").exists()


def test_an_sqlite_store_that_is_a_folder_or_under_a_file_is_one_line_at_once(run_tl, tmp_path, monkeypatch):
    """A folder named like the database made MLflow retry for 108 s; a file as its folder was 'does not exist'."""
    monkeypatch.chdir(tmp_path)
    write_code_cache(tmp_path / "c", *blobs(5, n=30, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text("fit-head: {cache: c, out: h.pt}\n")
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "plain").write_text("a file")
    for database, said in ((tmp_path / "folder.db", f"{tmp_path / 'folder.db'}: it is a folder; correct"),
                           (tmp_path / "plain" / "x.db", f"its folder {tmp_path / 'plain'} is a file, not a folder")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
        result = run_tl("run", "r.yaml", "--track", "mlflow")
        assert result.code == 2 and result.err.count("\n") == 1 and said in result.err, result
    assert not (tmp_path / "h.pt").exists()
    from pipeline.tracking import check_store

    for uri in (f"sqlite:///{tmp_path / 'new.db'}", "sqlite:///:memory:", f"sqlite:///{tmp_path / 'q.db'}?timeout=30"):
        check_store(uri)  # tried, and nothing left behind: MLflow makes the database when it opens it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c", "folder.db", "plain", "r.yaml"]


@pytest.mark.parametrize("stop, status, code", [(KeyboardInterrupt, "KILLED", 130), (TLError, "FAILED", 2)])
def test_the_step_that_stops_a_tracked_run_is_a_run_of_its_own(run_tl, tmp_path, monkeypatch, stop, status, code):
    import pipeline.evaluate

    uri = _tracked_blobs(tmp_path, monkeypatch,
                         "fit-head: {cache: c, out: h.pt}\nevaluate: {head: h.pt, cache: c, out: r}\n")

    def stopping(config):
        raise stop("stopped in the middle")

    monkeypatch.setattr(pipeline.evaluate, "run_evaluate", stopping)
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == code
    _, parents, runs = _runs(uri)
    stopped = next(run for run in runs if run.data.tags.get("tl.stage") == "evaluate")
    assert stopped.info.status == status and stopped.data.tags["tl.status"] == "stopped: stopped in the middle"
    assert stopped.data.params["head"] == "h.pt" and parents[0].info.status == status


def test_a_run_that_would_stop_at_a_users_file_starts_no_tracked_run(run_tl, tmp_path, monkeypatch):
    """A run refused before any step (a step's out holds the user's own report) is no MLflow run: nothing ran."""
    uri = _tracked_blobs(tmp_path, monkeypatch,
                         "fit-head: {cache: c, out: h.pt}\nevaluate: {head: h.pt, cache: c, out: r}\n")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.md").write_text("my notes\n")
    refused = run_tl("run", "r.yaml", "--track", "mlflow", "--quiet")
    assert refused.code == 2 and "r/report.md holds a file that tl did not write as a report file" in refused.err
    assert _runs(uri)[2] == [] and not (tmp_path / "h.pt").exists()


def test_the_store_check_takes_any_answer_and_never_shows_a_password():
    import http.server
    import threading

    from pipeline.tracking import check_store

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to all
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_store(f"http://user:secret@127.0.0.1:{server.server_address[1]}")  # credentials as MLflow reads them
    finally:
        server.shutdown()
    with pytest.raises(TLError) as refused:
        check_store("http://user:secret@127.0.0.1:9")
    assert str(refused.value).startswith("the MLflow tracking server http://127.0.0.1:9 does not answer (")
    assert "secret" not in str(refused.value)


def test_under_mlflow_run_a_remedy_names_the_projects_parameter(run_tl, tmp_path, monkeypatch):
    """`mlflow run .` offline said `--set extract.1.weights=...`, which an mlflow run cannot take: the
    MLproject gives `--set weights={weights}`, so the user's way in is `-P weights=...`."""
    import torch
    import urllib.error

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "MLproject", tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "cifar10_vgg16.yaml", tmp_path / "configs")
    write_cifar10(tmp_path / "data" / "cifar10", per_batch=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    project_run = MlflowClient(tracking_uri=uri).create_run("0")  # what `mlflow run` makes and hands over
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    given = ["--set", "data=data/cifar10", "--set", "backbone=alexnet", "--set", "weights=imagenet"]
    result = run_tl("run", "configs/cifar10_vgg16.yaml", "--track", "mlflow", "--quiet", *given)
    assert result.code == 2 and result.err.endswith(
        "(in a recipe: --weights is --set weights=... or mlflow run's -P weights=...)\n"), result
    # outside mlflow run (no run handed over) the MLproject in the folder says nothing
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # (MLflow drops it when its run ends)
    alone = run_tl("run", "configs/cifar10_vgg16.yaml", "--track", "mlflow", "--quiet", *given)
    assert alone.code == 2 and alone.err.endswith("(in a recipe: --weights is --set weights=...)\n"), alone


def test_a_step_up_to_date_uploads_again_when_the_run_that_held_its_files_is_gone(run_tl, tmp_path, monkeypatch):
    """A skipped step was tagged `tl.artifacts = in run X` with X deleted (after `mlflow gc` its head and
    report were nowhere in the store); X deleted or not in the store at all, the step uploads them again."""
    import json

    uri = _tracked_blobs(tmp_path, monkeypatch, "fit-head: {cache: c, out: h.pt}\n")

    def fit_run():
        assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
        client, parents, runs = _runs(uri)
        return client, next(run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id)

    client, first = fit_run()
    client.delete_run(first.info.run_id)
    client, second = fit_run()
    assert second.data.tags["tl.skipped"] == "true" and "tl.artifacts" not in second.data.tags
    assert _artifacts(client, second.info.run_id) == {"h.pt"}
    client, third = fit_run()  # the step's files are in an active run again: not sent a third time
    assert third.data.tags["tl.artifacts"] == f"in run {second.info.run_id}" and not _artifacts(client, third.info.run_id)

    record_path = tmp_path / "h.pt.tl-run.json"
    record = json.loads(record_path.read_text())
    record["tracked"]["run"] = "0" * 32  # a run the store does not have (removed by mlflow gc)
    record_path.write_text(json.dumps(record))
    client, fourth = fit_run()
    assert "tl.artifacts" not in fourth.data.tags and _artifacts(client, fourth.info.run_id) == {"h.pt"}


def test_the_users_mlflow_experiment_is_the_runs(run_tl, tmp_path, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME (`mlflow run --experiment-name`, or exported) was passed over for the
    recipe's experiment; MLFLOW_EXPERIMENT_ID after an earlier run in the process, too."""
    uri = _tracked_blobs(tmp_path, monkeypatch, "experiment: blobs\nfit-head: {cache: c, out: h.pt}\n")

    def experiments_of_last_run():
        client, parents, runs = _runs(uri)
        parent = parents[-1].info.run_id
        latest = [run for run in runs if parent in (run.info.run_id, run.data.tags.get("mlflow.parentRunId"))]
        return {client.get_experiment(run.info.experiment_id).name for run in latest}

    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
    assert experiments_of_last_run() == {"blobs"}
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "chosen")  # a new name: made
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
    assert experiments_of_last_run() == {"chosen"}
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    picked = MlflowClient(tracking_uri=uri).create_experiment("picked")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", picked)
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
    assert experiments_of_last_run() == {"picked"} and os.environ["MLFLOW_EXPERIMENT_ID"] == picked

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "chosen")
    both = run_tl("run", "r.yaml", "--track", "mlflow", "--quiet")
    assert both.code == 2 and both.err.startswith("error: MLFLOW_EXPERIMENT_NAME=chosen is experiment ") and \
        both.err.endswith(f", but MLFLOW_EXPERIMENT_ID is {picked}; unset one of them\n"), both
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "4242")
    missing = run_tl("run", "r.yaml", "--track", "mlflow", "--quiet")
    assert missing.code == 2 and missing.err.startswith("error: MLFLOW_EXPERIMENT_ID=4242: ") and \
        missing.err.endswith("; name another experiment, or unset it to use the recipe's (blobs)\n"), missing


def test_the_final_model_goes_once_per_content_into_the_same_parent(run_tl, tmp_path, monkeypatch):
    """A parent run handed over again (`mlflow run --run-id`, MLFLOW_RUN_ID) took the final model again on
    every re-run, every step up to date (84 MB for VGG16); a new parent run takes it, as does a changed model."""
    uri = _tracked_blobs(tmp_path, monkeypatch, "fit-head: {cache: c, out: h.pt}\n")
    uploads = []
    logged = mlflow.log_artifact
    monkeypatch.setattr(mlflow, "log_artifact", lambda path, artifact_path=None, **kwargs: (
        uploads.append((os.path.basename(path), artifact_path)), logged(path, artifact_path, **kwargs)))
    parent = MlflowClient(tracking_uri=uri).create_run("0").info.run_id

    def run_into_parent(*sets):
        uploads.clear()
        monkeypatch.setenv("MLFLOW_RUN_ID", parent)  # MLflow drops it when the run ends
        assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet", *sets).code == 0
        return [path for path, folder in uploads if folder == "model"]

    assert run_into_parent() == ["h.pt"]
    assert run_into_parent() == []  # up to date, the same file: the parent holds it
    shutil.rmtree(tmp_path / "c")  # other codes, another model (the same --set: a parent's parameters stay)
    write_code_cache(tmp_path / "c", *blobs(6, n=30, classes=3, width=8), ["a", "b", "c"])
    assert run_into_parent() == ["h.pt"]
    assert _artifacts(MlflowClient(tracking_uri=uri), parent) == {"recipe/r.yaml", "model/h.pt"}
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uploads.clear()
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
    assert ("h.pt", "model") in uploads  # a new parent run is whole: its model is in it, up to date or not


def test_a_record_naming_other_files_never_uploads_them(run_tl, tmp_path, monkeypatch):
    """A step up to date uploads the files its record lists: only its own output's, whatever the record
    (handed over with the project, or edited) names, so a record cannot send ~/.ssh to a tracking server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_code_cache(tmp_path / "c", *blobs(4, n=60, classes=3, width=8), ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text("fit-head: {cache: c, out: h.pt}\n")
    assert run_tl("run", "r.yaml", "--quiet").code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("key")
    record_file = tmp_path / "h.pt.tl-run.json"
    record_file.write_text(record_file.read_text().replace('"artifacts": [', f'"artifacts": ["{secret}", '))
    result = run_tl("run", "r.yaml", "--quiet", "--track", "mlflow")
    assert result.code == 0 and "up to date" in result.out, result
    client, _, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    fit = next(run for run in runs if run.data.tags.get("tl.stage") == "fit-head")
    assert _artifacts(client, fit.info.run_id) == {"h.pt"}


def test_a_parent_run_handed_over_again_with_other_settings_is_refused_untouched(run_tl, tmp_path, monkeypatch):
    """A run handed over again (MLFLOW_RUN_ID, `mlflow run --run-id`) with another --set ended in MLflow's
    'Changing param values is not allowed' and the advice to check MLFLOW_TRACKING_URI; it says what changed
    and what to do, before the run is touched (its status stays)."""
    uri = _tracked_blobs(tmp_path, monkeypatch, "fit-head: {cache: c, out: h.pt}\n")
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)  # MLflow drops it when the run ends
    refused = run_tl("run", "r.yaml", "--track", "mlflow", "--quiet", "--set", "fit-head.C=0.5")
    assert refused.code == 2 and refused.err == (
        f"error: MLflow run {parent} was started with other settings (tl.set was '', now 'fit-head.C=0.5') and a "
        "run's parameters cannot change; give it the same recipe and --set values, or start a new run (without "
        "MLFLOW_RUN_ID or mlflow run's --run-id)\n"), refused
    assert client.get_run(parent).info.status == "FINISHED" and (tmp_path / "h.pt").is_file()
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    assert run_tl("run", "r.yaml", "--track", "mlflow", "--quiet").code == 0  # the same settings: resumed
