"""Run tracking for `tl run --track mlflow`: one parent MLflow run per `tl run`, one nested run per step.

Each step's run holds its settings as parameters (a cache key's contents flattened to `cache_key.*`),
its training curves as metric histories (`curve/train_loss`, `curve/val_loss`, ...: one value per
epoch), its final numbers as metrics, and its files as artifacts (report.md, report.json, the plots, the head or model file). The parent holds the
recipe file, the `--set` overrides, the last evaluation's numbers and the final model under `model/`.
MLflow is imported here only, and only when tracking is asked for; its tracking URI is its own
(MLFLOW_TRACKING_URI, else its local default), as is a user's experiment (MLFLOW_EXPERIMENT_NAME or
_ID, before the recipe's), and a run started by `mlflow run` (MLFLOW_RUN_ID) is the parent.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from pathlib import Path

from pipeline.errors import ConfigError, TLError, install_extra

MAX_PARAM = 500  # characters of a parameter's value shown in MLflow; longer values are cut with a mark


class NoTracking(contextlib.nullcontext):
    def stage(self, step, record: dict, skipped: bool) -> None:
        """Nothing is logged without --track (so nothing for the record: see MlflowTracking.stage)."""

    def stopped(self, step, record: dict, error: BaseException) -> None:
        """Nothing is logged without --track."""

    def finish(self, model, metrics: dict) -> None:
        return None


def open_tracker(track: str | None, recipe):
    if track is None:
        return NoTracking()
    if track != "mlflow":
        raise ConfigError(f"unknown tracker '{track}'; the one tl knows is mlflow")
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"--track mlflow needs the mlflow package: {install_extra('mlflow')}") from None
    return MlflowTracking(mlflow, recipe)


def project_parameters(sets: tuple[str, ...]) -> dict[str, str]:
    """{recipe key: parameter} of each `--set KEY={parameter}` of the MLproject that `mlflow run` started
    this tl run from (it sets MLFLOW_RUN_ID and runs the command in the project's folder), for the keys
    this run was given: a remedy then names the -P its user types. {} outside `mlflow run`."""
    import re

    import yaml

    if not os.environ.get("MLFLOW_RUN_ID") or not Path("MLproject").is_file():
        return {}
    try:
        project = yaml.safe_load(Path("MLproject").read_text(encoding="utf-8"))
        commands = [str(entry.get("command", "")) for entry in project["entry_points"].values()]
    except (OSError, UnicodeError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}  # not a project tl can read: the remedy names the --set, which is right too
    given = {assignment.partition("=")[0].strip() for assignment in sets}
    mapped = {}
    for command in commands:
        for key, parameter in re.findall(r"--set\s+([A-Za-z0-9_.-]+)=\{(\w+)\}", command):
            if key in given:  # named as tl run names keys: the last part with '_' for '-'
                section, dot, name = key.rpartition(".")
                mapped.setdefault(section + dot + name.replace("-", "_"), parameter)
    return mapped


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """{"a.b": "1"} of nested mappings, every leaf as text (lists as JSON-like text), cut to MAX_PARAM."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
            continue
        text = "" if value is None else str(value)
        flat[name] = text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 3] + "..."
    return flat


def _one_line(method):
    """An MLflow failure (a bad tracking URI, a deleted experiment, a store that stops answering) is one
    line that says where to look, not MLflow's traceback."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except TLError:
            raise
        except Exception as exc:  # MlflowException and whatever its stores raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TLError(f"MLflow failed ({type(exc).__name__}: {text}); check MLFLOW_TRACKING_URI "
                          f"({os.environ.get('MLFLOW_TRACKING_URI') or 'unset: its local default'}) or run "
                          "without --track") from None

    return guarded


PREFLIGHT_SECONDS = 10  # how long a tracking server may take to answer before any stage starts


def check_store(uri: str) -> None:
    """Refuse, in seconds and in one line, a tracking store MLflow would retry for minutes before it
    failed: a server that does not answer, an SQLite file whose folder is missing or not writable."""
    from urllib.parse import urlparse

    parts = urlparse(uri)
    if parts.scheme in ("http", "https"):
        import requests  # what MLflow itself speaks HTTP with: credentials in the URI, its CA bundle

        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
        verify = False if insecure else os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
        shown = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=PREFLIGHT_SECONDS, verify=verify)
        except requests.RequestException as exc:  # any answer will do: a status is the server's business
            reason = str(exc).replace(uri, shown).splitlines()[0][:200]
            if parts.password:
                reason = reason.replace(parts.password, "***")
            raise TLError(f"the MLflow tracking server {shown} does not answer ({type(exc).__name__}: {reason}); "
                          "start it, correct MLFLOW_TRACKING_URI, or run without --track") from None
    elif parts.scheme == "sqlite" and uri.startswith("sqlite:///"):
        name = uri[len("sqlite:///"):].split("?")[0]  # relative after three slashes, absolute after four
        if name in ("", ":memory:"):
            return
        _check_database(uri, Path(name))


def _check_database(uri: str, database: Path) -> None:
    """An SQLite file MLflow can open read-write, or create; tried without leaving a file behind."""
    folder = database.parent
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise TLError(f"the MLflow store {uri} cannot be written: its folder {folder} {state}; make it, correct "
                      "MLFLOW_TRACKING_URI, or run without --track")
    existed = database.exists()
    try:
        if database.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        open(database, "r+b" if existed else "xb").close()  # a folder, /proc, a read-only file or folder
    except OSError as exc:
        raise TLError(f"the MLflow store {uri} cannot be written: {database}: {exc.strerror}; correct "
                      "MLFLOW_TRACKING_URI, or run without --track") from None
    if not existed:
        database.unlink(missing_ok=True)


def _owned(path, step) -> bool:
    """Whether a file a record lists is the step's output or lies in its output folder: a record is read from
    disk (handed over with a project, or edited), and only the step's own files may be uploaded."""
    from pipeline.files import inside, same_file
    from pipeline.recipe import OUTPUT

    out = step.path(OUTPUT)
    return isinstance(path, str) and out is not None and Path(path).is_file() \
        and (same_file(path, out) or inside(path, out))


class MlflowTracking:
    def __init__(self, mlflow, recipe):
        self.mlflow, self.recipe, self.parent = mlflow, recipe, None

    @_one_line
    def __enter__(self) -> "MlflowTracking":
        mlflow = self.mlflow
        check_store(mlflow.get_tracking_uri())
        # set_experiment exports MLFLOW_EXPERIMENT_ID; unless the user had, a later run in this process chooses its own
        self.exported = "MLFLOW_EXPERIMENT_ID" not in os.environ
        if not os.environ.get("MLFLOW_RUN_ID"):  # else the run handed over (mlflow run) is in its experiment
            self._choose_experiment()
        # under its own names: `mlflow run` has logged the project's parameters (`recipe` among them)
        ours = {"tl.recipe": str(self.recipe.path), "tl.set": " ".join(self.recipe.sets)}
        if os.environ.get("MLFLOW_RUN_ID"):  # a run handed over again keeps its parameters: MLflow refuses new values
            self._check_unchanged(os.environ["MLFLOW_RUN_ID"], ours)
        self.parent = mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else self.recipe.path.stem)
        mlflow.set_tags({"tl.recipe": str(self.recipe.path), "tl.command": "tl run"})
        self._params(ours)
        mlflow.log_artifact(str(self.recipe.path), artifact_path="recipe")
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self.mlflow.end_run(status="FINISHED" if kind is None else "KILLED" if not issubclass(kind, Exception)
                                else "FAILED")
        except Exception as exc:
            failed = f"; {value}" if isinstance(value, TLError) else ""
            raise TLError(f"MLflow could not close the run ({type(exc).__name__}: {exc}){failed}") from None
        if self.exported:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)

    def _choose_experiment(self) -> None:
        """The experiment the user named for MLflow (MLFLOW_EXPERIMENT_NAME, made if new, or
        MLFLOW_EXPERIMENT_ID, as any MLflow program takes them), else the recipe's."""
        from mlflow.exceptions import MlflowException

        named, numbered = os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not named and not numbered:
            self.mlflow.set_experiment(self.recipe.experiment)
            return
        if named and numbered:  # MLflow refuses two that disagree; checked before set_experiment exports one
            found = self.mlflow.MlflowClient().get_experiment_by_name(named)
            if found is None or found.experiment_id != numbered:
                named_is = "no experiment yet" if found is None else f"experiment {found.experiment_id}"
                raise ConfigError(f"MLFLOW_EXPERIMENT_NAME={named} is {named_is}, but MLFLOW_EXPERIMENT_ID is "
                                  f"{numbered}; unset one of them")
        variable = f"MLFLOW_EXPERIMENT_NAME={named}" if named else f"MLFLOW_EXPERIMENT_ID={numbered}"
        try:
            self.mlflow.set_experiment(experiment_name=named or None, experiment_id=None if named else numbered)
        except MlflowException as exc:  # no such id, a deleted experiment
            raise ConfigError(f"{variable}: {exc.message.strip()}; name another experiment, or unset it to use the "
                              f"recipe's ({self.recipe.experiment})") from None

    def _check_unchanged(self, run_id: str, ours: dict) -> None:
        """Refused before the run is touched: the recipe or --set values differ from those the run holds."""
        held = self.mlflow.MlflowClient().get_run(run_id).data.params
        changed = [name for name, value in ours.items() if name in held and held[name] != value]
        if changed:
            said = "; ".join(f"{name} was '{held[name]}', now '{ours[name]}'" for name in changed)
            raise ConfigError(f"MLflow run {run_id} was started with other settings ({said}) and a run's parameters "
                              "cannot change; give it the same recipe and --set values, or start a new run (without "
                              "MLFLOW_RUN_ID or mlflow run's --run-id)")

    def _params(self, values: dict) -> None:
        items = list(flatten(values).items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self.mlflow.log_params(dict(items[start:start + 100]))

    @_one_line
    def stage(self, step, record: dict, skipped: bool) -> dict | None:
        """The step as a nested run. Its files are uploaded once per store: a step up to date whose record
        names an active run of this store that holds them is tagged with that run. Returns, for the step's record,
        where its files went (None: nothing uploaded)."""
        mlflow = self.mlflow
        store, earlier = mlflow.get_tracking_uri(), record.get("tracked") or {}
        # a nested run goes to the environment's experiment, not its parent's: a run handed over can be elsewhere
        with mlflow.start_run(run_name=step.label, nested=True, experiment_id=self.parent.info.experiment_id) as run:
            mlflow.set_tags({"tl.stage": step.stage, "tl.skipped": str(skipped).lower(),
                             "tl.status": "up to date, skipped" if skipped else "ran"})
            self._params({**record.get("settings", {}), **record.get("facts", {})})
            metrics = record.get("metrics") or {}
            if metrics:
                mlflow.log_metrics(metrics)
            for name, points in (record.get("history") or {}).items():
                for epoch, value in points:
                    mlflow.log_metric(f"curve/{name}", value, step=int(epoch))
            if skipped and earlier.get("store") == store and earlier.get("run") and self._holds(earlier["run"]):
                mlflow.set_tag("tl.artifacts", f"in run {earlier['run']}")  # not again on every re-run
                return None
            files = [path for path in record.get("artifacts") or [] if _owned(path, step)]
            for path in files:
                mlflow.log_artifact(path)
            return {"store": store, "run": run.info.run_id} if files else None

    def _holds(self, run_id: str) -> bool:
        """Whether the run that took a step's files still keeps them: a deleted run's go with `mlflow gc`,
        and a run gone from the store (gc'd, or another store at the same URI) has none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:  # no such run
            return False

    def stopped(self, step, record: dict, error: BaseException) -> None:
        """The step that stopped the run (an error, Ctrl-C, SIGTERM) as a nested run of its own, KILLED or
        FAILED, with its settings and why. Never in the way of that error: a tracking failure here is
        dropped, as the run is ending and its own error is the one to show."""
        mlflow = self.mlflow
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        status = "FAILED" if isinstance(error, Exception) else "KILLED"  # KeyboardInterrupt, SIGTERM
        with contextlib.suppress(Exception):
            mlflow.start_run(run_name=step.label, nested=True, experiment_id=self.parent.info.experiment_id)
            try:
                mlflow.set_tags({"tl.stage": step.stage, "tl.skipped": "false", "tl.status": f"stopped: {reason}"})
                self._params(record.get("settings", {}))
            finally:
                mlflow.end_run(status=status)

    def _model(self, model: Path) -> None:
        """The final model under the parent's model/, in every new parent (the run a user opens for it, whole
        without the earlier runs, which may be deleted), but once per content into the same parent: a run
        handed over again (mlflow run --run-id, MLFLOW_RUN_ID) after an up-to-date re-run already holds it."""
        from pipeline.files import file_digest

        held = f"{model.name} sha256:{file_digest(model)}"
        if self.parent.data.tags.get("tl.model") == held:  # its tags as it was handed over, before this run
            return
        self.mlflow.log_artifact(str(model), artifact_path="model")
        self.mlflow.set_tag("tl.model", held)

    @_one_line
    def finish(self, model, metrics: dict) -> str:
        mlflow = self.mlflow
        if metrics:
            mlflow.log_metrics(metrics)
        if model is not None and Path(model).is_file():
            self._model(Path(model))
        run = self.parent.info
        uri = mlflow.get_tracking_uri()
        return (f"MLflow run {run.run_id} (experiment {run.experiment_id}) in {uri}; "
                f"look with: mlflow ui --backend-store-uri {uri}")
