"""`tl run`: every step of a recipe in stage order, each skipped when its output is up to date.

A step's record (`OUT.tl-run.json`, beside its output) holds a digest of its settings and of what it
read (a data set's listing fingerprint, or the record of the step that made an input), the output's
size and time as written, and what the step measured. A step whose record matches is skipped and
says so; one that changed runs again, and everything downstream of it follows through the digests.
A record is written as "started" before a step runs, so a re-run after a crash resumes a finetune
from its checkpoint, and a record of other settings lets extract and finetune start over.

The click layer parses and runs the stages (`StageRunner`); this module plans, decides and records.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.errors import CacheError, ConfigError, Occupied, TLError
from pipeline.files import in_input, same_file
from pipeline.recipe import (INPUTS, OUTPUT, STAGES, StageOptions, Step, check, check_values, input_from, plan,
                             read_recipe, section_items, select)
from pipeline.run_records import (epochs_grown, foreign_output, output_state, read_record, record_path, rewrite_record,
                                  step_digest, stop_ahead, up_to_date, why_stale, write_record)


def _refuse_outputs_in_image_folders(path: Path, steps: list[Step]) -> None:
    """An output inside an image folder that a step reads would be images of it, or a class (its folder),
    when the recipe runs again: an evaluate's plots became a class 'report' of the test images. An output
    naming the recipe itself is refused too."""
    from pipeline.formats import DEFAULT_FORMAT

    for step in (step for step in steps if step.path(OUTPUT) is not None):
        written = [key for key in (OUTPUT, "save_predictions")
                   if step.path(key) is not None and same_file(step.path(key), path)]
        if written:  # refused once the step ran, with 'delete R.yaml and run again': the recipe itself
            raise ConfigError(f"recipe {path}: {step.label} {written[0]} {step.path(written[0])} is this recipe; "
                              f"give the step another {written[0]}")
        reader, how = next(((s, how) for s in steps if s.path("data") is not None
                            and (s.params.get("format_") or DEFAULT_FORMAT) == DEFAULT_FORMAT
                            and (how := in_input(step.path(OUTPUT), s.path("data"))) is not None), (None, None))
        if reader is not None:
            raise ConfigError(f"recipe {path}: {step.label} out {step.path(OUTPUT)} lies inside the image folder "
                              f"{reader.path('data')}{how} that {reader.label} reads; give the step an out outside it")


class StageRunner(Protocol):
    def options(self) -> dict[str, StageOptions]: ...

    def parse(self, recipe, step: Step) -> dict: ...

    def check(self, step: Step) -> None: ...  # the stage's settings checks, on the config its command builds

    def execute(self, step: Step, extra: dict): ...


@dataclass
class RunConfig:
    recipe: Path
    sets: tuple[str, ...] = ()
    only: str | None = None
    start: str | None = None
    rerun: bool = False
    track: str | None = None
    dry_run: bool = False  # say what would run and why; run and write nothing


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # the last evaluate step's
    model: Path | None = None
    where: str | None = None  # how to look at the tracked run


def run_recipe(config: RunConfig, runner: StageRunner, say=print) -> RunResult:
    """Read, plan, parse and check the whole recipe (nothing starts on a bad one), then run its steps."""
    from pipeline.tracking import open_tracker, project_parameters

    started = time.perf_counter()
    recipe = read_recipe(config.recipe, config.sets)
    stages = runner.options()
    steps = plan(recipe, stages)
    for step in steps:
        step.params = runner.parse(recipe, step)
    chosen = select(steps, config.only, config.start)
    notes = check(recipe, steps, chosen)
    _refuse_outputs_in_image_folders(recipe.path, steps)
    project = project_parameters(recipe.sets) if (config.track or recipe.track) == "mlflow" else {}
    for step in chosen:  # the stages' settings checks too, before any step runs (hours of extraction)
        try:
            check_values(step, steps, chosen)
            runner.check(step)
        except TLError as exc:
            raise ConfigError(f"recipe {recipe.path}: {step.label}: "
                              f"{_in_recipe_terms(exc, step, stages[step.stage], recipe, project)}") from None
    if not config.dry_run:  # before the tracker starts a run of it
        _refuse_stops_ahead(chosen, config.rerun, recipe)
    tracker = open_tracker(config.track or recipe.track, recipe)
    result = RunResult()
    for note in notes:
        say(f"note: {note}")
    for step in chosen:  # a section's key that its head does not read (top-level keys reach every stage)
        if step.stage == "fit-head":
            from pipeline.fit_head import unread_options

            given = {name: f"key '{key}'" for name, key in step.own.items() if step.params.get(name) is not False}
            # a recipe's patience waits for its early_stop to be turned on (mlflow run -P use_early_stop=0): no warning
            for warning in unread_options((step.params["head"],), step.params["solver"], given, early_stop=True):
                say(f"warning: {step.label} {warning}")
    if config.dry_run:
        return _preview(chosen, config.rerun, result, say)
    with tracker:
        for step in chosen:
            out = step.path(OUTPUT)
            digest = step_digest(step)
            record = read_record(out)
            if not config.rerun and up_to_date(record, digest, out, step):
                say(f"== {step.label}: {out} is up to date, skipped")
                result.skipped.append(step.label)
            else:
                extra = _restart(step, record, digest, out, say, config.rerun)
                say(f"== {step.label}" + (f" -> {out}" if out else ""))
                existed = out is not None and out.exists()
                before = output_state(step, out)
                started_record = write_record(out, step, digest, "started")
                try:
                    if step.stage == "evaluate" and extra.get("overwrite"):  # for the report the recipe made only
                        _refuse_foreign_predictions(step)
                    outcome = runner.execute(step, extra)
                except BaseException as exc:  # Ctrl-C and SIGTERM too: the tracked run shows where it stopped
                    if record is not None and output_state(step, out) == before:  # refused, or stopped before any write:
                        rewrite_record(out, record)  # the earlier record holds
                    translated = _in_recipe_terms(_damaged_input(exc, step), step, stages[step.stage], recipe, project)
                    error = _stopped(step, recipe, record, existed, translated, extra)
                    tracker.stopped(step, started_record, error)
                    if error is exc:
                        raise
                    raise error from None
                summary = summarize(step, outcome)
                # read again: data a step downloaded (or wrote) is its input from now on
                record = write_record(out, step, step_digest(step), "done", summary)
                result.ran.append(step.label)
            tracked = tracker.stage(step, record, skipped=step.label in result.skipped)
            if tracked and out is not None:  # where the step's files went: a re-run up to date need not send them
                record = {**record, "tracked": tracked}
                rewrite_record(out, record)
            if step.stage == "evaluate":
                result.metrics = record.get("metrics", {})
            if step.stage in ("fit-head", "finetune"):
                result.model = out
        result.where = tracker.finish(result.model, result.metrics)
    result.seconds = time.perf_counter() - started
    return result


def _preview(chosen: list[Step], rerun: bool, result: RunResult, say) -> RunResult:
    """Each step as a run would take it, and why it would run (tl run --dry-run): nothing is run or written."""
    for step, out, _, why, _ in _plan(chosen, rerun):
        if why is None:
            say(f"== {step.label}: {out} is up to date")
            result.skipped.append(step.label)
        else:
            say(f"== {step.label}" + (f" -> {out}" if out else "") + f": would run ({why})")
            result.ran.append(step.label)
    return result


def _plan(chosen: list[Step], rerun: bool):
    """(step, out, record, why it would run (None: up to date, skipped), where it would stop (run_records.stop_ahead))
    of each step as a run would take it now. A step that reads what a running step makes runs after it, as its
    digest would tell then."""
    running: list[Step] = []
    for step in chosen:
        out = step.path(OUTPUT)
        record, digest = read_record(out), step_digest(step)
        after = next((maker for maker in running if input_from(step, maker)), None)
        if after is None and not rerun and up_to_date(record, digest, out, step):
            yield step, out, record, None, None
            continue
        ahead = stop_ahead(step, record, out, None if after else digest)  # what it reads is made again: starts over
        why = (ahead[1] if ahead else "--rerun" if rerun
               else f"after {after.label}, which makes its {input_from(step, after)}" if after
               else why_stale(step, record, digest, out))
        running.append(step)
        yield step, out, record, why, ahead


def _refuse_stops_ahead(chosen: list[Step], rerun: bool, recipe) -> None:
    """A run that would stop at a step's output (a file its stage refuses to replace) stops before any step,
    with that step's line: not after hours of the steps before it. The steps' digests are read only when
    one may stop (a data set's fingerprint lists it)."""
    if not any(stop_ahead(step, record, step.path(OUTPUT), (record or {}).get("digest"))
               for step in chosen for record in [read_record(step.path(OUTPUT))]):
        return
    for step, out, record, _, ahead in _plan(chosen, rerun):
        if ahead is not None:
            resuming = step.stage == "finetune" and record is not None  # refused by the model file it resumes into
            raise _stopped(step, recipe, record, False, ahead[0], {"resume": True} if resuming else None)


def _restart(step: Step, record: dict | None, digest: str, out: Path, say, rerun: bool = False) -> dict:
    """Flags a step needs to pick up after an earlier run: finetune resumes its own crashed run and
    starts over after a run of other settings; fit-head, finetune and evaluate replace the file (a report's
    files) their record says they made once it is no longer tl's (a file tl did not write is refused where
    the recipe made nothing); extract goes on with a cache this recipe made, which keeps it where its key
    is the step's (a stopped extract resumes) and replaces it otherwise."""
    if record is None or not out.exists() and step.stage != "finetune":
        return {}
    same = record.get("digest") == digest
    if step.stage == "finetune":
        from pipeline.model_files import checkpoint_paths

        if checkpoint_paths(out)[0].exists():
            grown = not rerun and epochs_grown(step, record, out)  # only epochs went up: it goes on
            if same and record.get("status") == "started" or grown:
                say(f"== {step.label}: " + (f"epochs {grown} -> {step.params['epochs']}: going on from its run"
                    if grown else "resuming the run that stopped") + f" (checkpoint {checkpoint_paths(out)[0].name})")
                return {"resume": True}
            why = (f"settings or inputs changed since {out} was made" if not same
                   else "--rerun" if rerun else f"{out} is not as this recipe wrote it")
            say(f"== {step.label}: {why}: starting over")
            return {"overwrite": True}
    if foreign_output(step.stage, out) is not None:  # its own head, model or report, no longer tl's
        say(f"== {step.label}: {out} is not as this recipe wrote it: "
            + ("starting over" if step.stage == "finetune" else "making it again"))
        return {"overwrite": True}
    if step.stage != "extract":
        return {}
    found = _cache_found(record, out)
    if found:
        say(f"== {step.label}: {out} {found}: extracting again")
    elif not same:
        say(f"== {step.label}: settings or inputs changed since {out} was made: extracting again")
    # a record of this recipe at `out` (any status, any tl): the writer's --overwrite resumes a cache
    # whose key is the step's and replaces any other (made again by hand, or by an earlier tl)
    return {"overwrite": True}


def _refuse_foreign_predictions(step: Step) -> None:
    """Refused as evaluate refuses it without --overwrite: a save_predictions file swapped for the user's own since
    the recipe made it, which the overwrite _restart passes for a report edited by hand would replace too."""
    from pipeline.ownership import refuse_foreign
    from pipeline.report import tl_predictions

    if step.path("save_predictions") is not None:
        refuse_foreign(step.path("save_predictions"), "predictions file", "move it away", ours=tl_predictions)


def _in_recipe_terms(exc: BaseException, step: Step, options: StageOptions, recipe, project: dict) -> BaseException:
    """A stage's error whose remedy names its flags (`pass --download`), with the recipe key of each:
    tl run and mlflow run take keys, not flags (`project`: the -P that sets a key under mlflow run)."""
    if not isinstance(exc, TLError) or isinstance(exc, Occupied):
        return exc
    remedy = str(exc).rsplit("; ", 1)[-1]  # the flags of what to do; not a flag the error is about
    if any(name != step.stage for name in re.findall(r"\btl ([a-z-]+)", remedy)) or "leave it out" in remedy:
        return exc  # another command's flags; or drop the key
    keys = [key for key in dict.fromkeys(re.findall(r"--([a-z][a-z0-9-]*)", remedy))
            if key.replace("-", "_") in options.keys and key not in ("overwrite", "resume")]  # tl run's own business
    if not keys:
        return exc
    said = ", ".join(f"--{key} is " + _set_where_given(step, options, recipe, key.replace("-", "_"), project)
                     for key in keys)
    try:
        return type(exc)(f"{exc} (in a recipe: {said})")
    except TypeError:  # an error class of other arguments
        return exc


def _damaged_input(exc: BaseException, step: Step) -> BaseException:
    """An input of this recipe's making that a step found damaged, with the remedy of making it again (a
    cache's shard, a head file, cut short or changed in place: a cache's manifest, which dates it, or the file's
    size and time unchanged) was skipped as up to date by every later run, which stopped here again. The record
    of the step that made it now says so: the next tl run that includes that step makes it again (a resumed
    extract checks every shard and rewrites what is damaged), and the error says that."""
    if not isinstance(exc, TLError) or isinstance(exc, Occupied):
        return exc
    said = str(exc)
    for given in filter(None, (step.path(key) for key in INPUTS[step.stage])):
        # a cache's problems all send to tl extract; a tl file's damage is read_payload's (not other refusals)
        damaged = (f"{given} " in said and isinstance(exc, CacheError) and "tl extract" in said
                   or f"{given} is damaged" in said or f"{given} is not a tl " in said)
        record = read_record(given) if damaged else None
        if record is not None and record.get("status") in ("done", "damaged"):
            rewrite_record(given, {**record, "status": "damaged"})
            return type(exc)(f"{exc} (in a recipe: run it again with its {record['stage']} step, which now makes "
                             f"{given} again)")
    return exc


def _set_where_given(step: Step, options: StageOptions, recipe, name: str, project: dict) -> str:
    """The --set of `name` where the recipe gives it: the step's own key; else a top-level key, which the
    other steps read too (changing this step's alone, the next one stopped the same way); else the
    section's, for each of its steps (a test extraction downloads as the train one does)."""
    shadowed = any(isinstance(item, dict) and {name, name.replace("_", "-")} & set(item)
                   for section in STAGES for item in section_items(recipe.document.get(section, [])))
    if options.keys[name] in step.own:
        key = f"{step.stage}.{step.number}.{name}" if step.count > 1 else f"{step.stage}.{name}"
    elif name in step.keys and not shadowed:  # a top-level key a section also sets cannot be --set alone
        key = name
    else:
        key = f"{step.stage}.{name}"
    switch = options.keys[name] in options.flags
    said = f"--set {key}={'true' if switch else '...'}"
    return said + (f" or mlflow run's -P {project[key]}={'1' if switch else '...'}" if key in project else "")


def _stopped(step: Step, recipe, record: dict | None, existed: bool, exc: BaseException,
             extra: dict | None = None) -> BaseException:
    """What a step that stopped on `exc` raises. A step refused by an output this recipe did not make
    (no earlier record) gets the recipe's remedy, not the stage's --overwrite, which tl run has not;
    its started record withdraws the claim on that output, as does a stopped extract's whose out
    `existed` before it with no record (the next run starts as this one did: a cache of the step's
    key resumes). An extract that made its out keeps its claim: the next run goes on with it. A step
    of this recipe refused all the same keeps its record: a finetune resuming its stopped run (`extra`) whose
    model file now holds what tl did not write is told to move the file away; any other (an evaluate whose
    save_predictions now names a user's file) is told the key too."""
    occupied = isinstance(exc, Occupied)
    # the key that names the refused file: out, or another file the step writes (evaluate's save_predictions)
    key = next((key for key, value in step.params.items() if isinstance(value, (str, Path)) and value != ""
                and same_file(value, exc.path)), OUTPUT) if occupied else OUTPUT
    if record is not None:
        if not occupied:
            return exc
        if (extra or {}).get("resume"):  # another out would start over
            from pipeline.model_files import checkpoint_paths

            return ConfigError(f"{step.label}: {exc.path} {exc.state}; move it away (or delete it), then run again: "
                               f"the step resumes from its checkpoint {checkpoint_paths(step.path(OUTPUT))[0].name}")
        return ConfigError(f"{step.label}: {exc.path} {exc.state}; give the step another {key} in {recipe.path}, or "
                           "move it away (or delete it) and run again")
    if occupied or (step.stage == "extract" and existed):
        record_path(step.path(OUTPUT)).unlink(missing_ok=True)
    if not occupied:
        return exc
    return ConfigError(f"{step.label}: {exc.path} {exc.state}, and this recipe did not make it; give the step "
                       f"another {key} in {recipe.path}, or delete {exc.path} and run again")


def _cache_found(record: dict, out: Path) -> str | None:
    """What the recipe's cache folder `out` holds that extract will replace rather than resume, said
    before it does: a cache made again there with another key (another `tl extract --overwrite`), a
    manifest that cannot be read, an earlier tl's cache, shards without a manifest. None: nothing."""
    from cache.manifest import LEGACY_FORMAT, MANIFEST, ForeignManifest, load_manifest

    if not (out / MANIFEST).exists():
        return "holds shard files but no manifest" if any(out.glob("shard-*.h5")) else None
    try:
        manifest = load_manifest(out, records=False)  # the header says it all; the writer reads the records
    except ForeignManifest:  # extract refuses it
        return None
    except TLError as exc:
        return f"has a manifest that cannot be used ({str(exc).split(';')[0]})"
    if manifest.format == LEGACY_FORMAT and manifest.shards:
        return f"was written by an earlier tl ({LEGACY_FORMAT}) whose shards carry no input digests"
    recorded = (record.get("facts") or {}).get("cache_key") if record.get("status") == "done" else None
    if recorded is not None and json.loads(json.dumps(manifest.key, default=str)) != recorded:
        return "was made again with other settings since this recipe made it"
    return None


# ---------------------------------------------------------------- what a step measured


def summarize(step: Step, result) -> dict:
    """{"metrics": {name: number}, "history": {name: [[epoch, value], ...]}, "facts": {...},
    "artifacts": [paths]} of a finished step, from its result and its output files."""
    out = step.path(OUTPUT)
    metrics, history, facts, artifacts = {}, {}, {}, []
    if step.stage == "extract":
        from cache.manifest import load_manifest

        metrics = {"rows": result.rows, "shards_written": result.shards_written, "shards_reused": result.shards_reused,
                   "images_skipped": len(result.skipped), "seconds": result.seconds}
        facts = {"cache_key": load_manifest(out).key}
        artifacts = [out / "manifest.json"]
    elif step.stage == "fit-head":
        from pipeline.model_files import load_head

        head, metadata = load_head(out)
        metrics = {f"train_{result.metric}": result.train_score, "train_rows": result.train_rows}
        if result.val_score is not None:
            metrics.update({f"val_{result.metric}": result.val_score, "val_rows": result.val_rows})
        history = _curves(head.curve_ or [])
        facts = {"codes_key": metadata["codes_key"], "chosen": result.chosen}
        artifacts = [out]
    elif step.stage == "finetune":
        metrics = {"epochs_run": result.epochs_run, **(result.val or {})}
        if result.best_epoch:
            metrics["best_epoch"] = result.best_epoch
        history = _curves(result.history)
        artifacts = [out]
    elif step.stage == "evaluate":
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        metrics = {key: value for key, value in report.items() if _number(value)}
        if report.get("multilabel"):  # every label of an image right: named as the report names it
            metrics["exact_match_accuracy"] = metrics.pop("accuracy")
        artifacts = [path for path in result.files if Path(path).parent == out]
    return {"metrics": {k: v for k, v in metrics.items() if _number(v)}, "history": history, "facts": facts,
            "artifacts": [str(path) for path in artifacts]}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curves(points: list[dict]) -> dict:
    """{metric: [[epoch, value], ...]} of a training curve's numbers (loss, lr, validation metrics)."""
    curves: dict[str, list] = {}
    for point in points:
        for name, value in point.items():
            if name != "epoch" and _number(value):
                curves.setdefault(name, []).append([point["epoch"], value])
    return curves
