"""`tl run`'s step records: `OUT.tl-run.json` beside each step's output, the digest of a step's settings
and inputs, and the stamp of what it wrote, by which a step is found up to date or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from pipeline.errors import ConfigError, Occupied, TLError
from pipeline.files import write_bytes
from pipeline.ownership import foreign, foreign_state
from pipeline.recipe import INPUTS, Step

RECORD_FORMAT = "tl-run-record/1"
RECORD_SUFFIX = ".tl-run.json"
# settings that change how a stage runs, never what it writes: left out of a step's digest (a re-run
# with more workers or on another device is up to date), kept in its record and its tracked parameters
HOW_NOT_WHAT = {"quiet", "workers", "overwrite", "resume", "download", "device"}
# inference batches give the same numbers; fit-head's block_rows orders its streamed mini-batches: kept;
# where extract decodes JPEGs is no part of the cache key, as its device is not
HOW_NOT_WHAT_OF = {"extract": {"batch_size", "device_decode"}, "evaluate": {"batch_size", "block_rows"}}
STOPS_THERE = "tl run stops there"  # worded for tl run by run._stopped
MAIN_FILES = ("manifest.json", "report.json")  # the file that stands for a cache or a report folder


def record_path(out: Path) -> Path:
    return out.with_name(out.name + RECORD_SUFFIX)


def read_record(out: Path | None) -> dict | None:
    if out is None or not record_path(out).is_file():
        return None
    try:
        record = json.loads(record_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged record only costs a re-run
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def output_state(step: Step, out: Path | None) -> list:
    """Every file of a step's output as (name, size, mtime): a folder's, or a file's and, for finetune, its
    checkpoints'. A step that failed and left it so changed nothing, and its earlier record still holds."""
    if out is None:
        return []
    from pipeline.model_files import checkpoint_paths

    try:
        files = sorted(out.iterdir()) if out.is_dir() else [out, *(checkpoint_paths(out) if step.stage == "finetune" else ())]
    except OSError:  # a folder that cannot be listed: unknown, so never "unchanged"
        return [object()]
    return [[path.name, stat.st_size, stat.st_mtime_ns] for path in files if (stat := _stat(path)) is not None]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # not there (yet, or any more)
        return None


def stamp(out: Path) -> list | None:
    """(size, mtime) of the output's main file: a head or model file, a cache's manifest, a report's json."""
    main = out
    if out.is_dir():
        main = next((out / name for name in MAIN_FILES if (out / name).is_file()), None)
    if main is None or not main.is_file():
        return None
    stat = main.stat()
    return [stat.st_size, stat.st_mtime_ns]


def up_to_date(record: dict | None, digest: str, out: Path | None, step: Step | None = None) -> bool:
    """`step`: an evaluate step is not, once its save_predictions file is gone (its report alone is kept)."""
    predictions = predictions_of(step)
    return (record is not None and record.get("status") == "done" and record.get("digest") == digest
            and out is not None and record.get("output") is not None and record.get("output") == stamp(out)
            and (predictions is None or os.path.lexists(predictions)))


def predictions_of(step: Step | None) -> Path | None:
    return step.path("save_predictions") if step is not None and step.stage == "evaluate" else None


def write_record(out: Path | None, step: Step, digest: str, status: str, summary: dict | None = None) -> dict:
    record = {"format": RECORD_FORMAT, "stage": step.stage, "status": status, "digest": digest,
              "settings": settings(step), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "output": stamp(out) if out is not None and status == "done" else None, **(summary or {})}
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the folder of {step.label}'s out {out}: {exc.strerror}; "
                              "choose another out") from None
        rewrite_record(out, record)
    return record


def rewrite_record(out: Path, record: dict) -> None:
    """The record of the step whose output is `out`, as it is given."""
    write_bytes(record_path(out), json.dumps(record, indent=1, default=str).encode(), "run record",
                follow=False)


def stop_ahead(step: Step, record: dict | None, out: Path | None, digest: str | None = None
               ) -> tuple[Occupied, str] | None:
    """Where a run of `step` would stop: a file its stage refuses to replace (tl did not write it, or an earlier
    run's checkpoint this recipe did not make), as (the stage's refusal, which run._stopped words for tl run;
    how --dry-run says it). None: nothing stops it. `digest`: the step's now, which tells a finetune resuming
    its stopped run (refused by a model file that is not tl's) from one starting over (None: it changes, as the
    step reads what a step running before it makes: it starts over)."""
    from pipeline.report import tl_predictions

    predictions = predictions_of(step)
    if predictions is not None and foreign(predictions, tl_predictions):  # never replaced: the stage refuses it
        state = foreign_state("predictions file")
        return Occupied(predictions, state, STOPS_THERE), f"and stop: {predictions} {state}"
    if out is None:
        return None
    if record is None:  # an output this recipe did not make: a run takes it over, or stops there (run._stopped)
        refused = foreign_output(step.stage, out) if out.exists() else None  # refused first, as the stage does
        if refused is not None:
            state = foreign_state(refused[1])
            return (Occupied(refused[0], state, STOPS_THERE),
                    f"and stop: {refused[0]} {state}, and this recipe did not make it")
        if step.stage == "extract" and out.is_dir():  # a cache of other settings, as far as they tell ahead
            from pipeline.extract_settings import ExtractConfig, settings_stop

            state = settings_stop(ExtractConfig.of_options(**step.params))
            if state is not None:
                return Occupied(out, state, STOPS_THERE), f"and stop: {out} {state}, and this recipe did not make it"
        if step.stage == "finetune":
            from pipeline.model_files import checkpoint_paths

            earlier = next((path for path in checkpoint_paths(out) if path.exists()), None)
            if earlier is not None:
                return (Occupied(earlier, "holds an earlier run", STOPS_THERE),
                        f"and stop: {earlier} holds an earlier run, and this recipe did not make it")
        return None
    if (step.stage == "finetune" and record.get("status") == "started" and digest is not None
            and digest == record.get("digest") and foreign(out)):
        from pipeline.model_files import checkpoint_paths

        if checkpoint_paths(out)[0].exists():  # the resume refuses the file (run._stopped)
            state = foreign_state("model file")
            return Occupied(out, state, STOPS_THERE), f"its last run stopped, and stop: {out} {state}"
    return None


def epochs_grown(step: Step, record: dict | None, out: Path | None) -> int | None:
    """The epochs a finetune step's last run was given, where only its epochs went up since (its other
    settings and its inputs as they were) and its checkpoint and model file are tl's (after a done run: as it
    left them): its last checkpoint goes on to the new epochs and trains as a run of them from the start would
    (the lr steps count epochs from the start, each epoch is seeded by its number). None: it starts over."""
    from dataclasses import replace

    from pipeline.model_files import checkpoint_paths

    before, now = ((record or {}).get("settings") or {}).get("epochs"), step.params.get("epochs")
    if (step.stage != "finetune" or out is None or (record or {}).get("status") not in ("done", "started")
            or not (isinstance(before, int) and isinstance(now, int) and 0 < before < now)):
        return None
    if not checkpoint_paths(out)[0].is_file() or foreign_output(step.stage, out) is not None:
        return None
    # a done run wrote its last checkpoint, then the model file: a run by hand since (another lr: no part of the
    # checkpoint's identity) left another model file, or a checkpoint newer than the model file
    last, model = _stat(checkpoint_paths(out)[0]), _stat(out)
    if record.get("status") == "done" and (record.get("output") != stamp(out) or None in (last, model)
                                           or last.st_mtime_ns > model.st_mtime_ns):
        return None
    then = replace(step, params={**step.params, "epochs": before})
    return before if step_digest(then) == record.get("digest") else None


def why_stale(step: Step, record: dict | None, digest: str, out: Path | None) -> str:
    """Why a step is not up to date (tl run --dry-run), in a few words: not run, the settings that changed
    (old -> new), its inputs, a stopped run (of the same settings: a finetune resumes it), or its output
    since it was written; first, where a run of it would stop."""
    ahead = stop_ahead(step, record, out, digest)
    if ahead is not None:
        return ahead[1]
    if record is None:
        if out is None or not out.exists():
            return "not run yet"
        taken = ": a cache of the step's settings is taken up, any other stops the run" if step.stage == "extract" \
            else ""
        return f"{out} has no record of this recipe{taken}"
    ignored = HOW_NOT_WHAT | HOW_NOT_WHAT_OF.get(step.stage, set())
    before, now = record.get("settings") or {}, json.loads(json.dumps(settings(step), default=str))
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if key not in ignored and before.get(key) != now.get(key)]
    if changed and epochs_grown(step, record, out):
        return f"changed: {changed[0]}: goes on from its checkpoint"
    if changed:
        return "changed: " + ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if record.get("digest") != digest:
        return "its inputs changed since it ran"
    if record.get("status") == "damaged":  # run._damaged_input
        return f"a later step found {out} damaged"
    if record.get("status") != "done":  # after the changes: a run of other settings starts over, not resumes
        return "its last run stopped"
    predictions = predictions_of(step)
    if predictions is not None and not os.path.lexists(predictions) and out is not None and stamp(out) == \
            record.get("output"):
        return f"{predictions} is gone"
    return f"{out} changed since it was written" if out is not None and out.exists() else f"{out} is gone"


def foreign_output(stage: str, out: Path) -> tuple[Path, str] | None:
    """(the file, what it is refused as) at or in a step's `out` that the stage refuses to replace, as tl did not
    write it (see each stage's refuse_foreign): where a run stops when this recipe did not make `out`."""
    from pipeline.report import REPORT_FILES, report_set

    files = {"fit-head": [(out, "head file", None, True)], "finetune": [(out, "model file", None, True)],
             "evaluate": [(out / name, "report file", report_set(out), False) for name in REPORT_FILES]}
    return next(((path, what) for path, what, *how in files.get(stage, []) if foreign(path, *how)), None)


def settings(step: Step) -> dict:
    """Every parameter of the step, as JSON values under its recipe key."""
    return {key.rstrip("_"): (str(value) if isinstance(value, Path) else value)
            for key, value in sorted(step.params.items())}


def step_digest(step: Step) -> str:
    """Digest of the step's settings and of what it reads: an input made by a recorded step stands as
    that record's digest and output stamp; a data set as the fingerprint of its listing."""
    inputs = {}
    for key in INPUTS[step.stage]:
        given = step.path(key)
        if given is None:
            continue
        record = read_record(given)
        if record is not None:  # the output as it is now: one rewritten by hand is a changed input
            inputs[key] = [record.get("digest"), stamp(given)]
        elif key in ("data", "val_data"):
            inputs[key] = _data_fingerprint(step, key)
        elif given.exists():
            inputs[key] = stamp(given) if given.is_file() or given.is_dir() else None
        else:
            inputs[key] = str(given)  # "imagenet", "none"
    ignored = HOW_NOT_WHAT | HOW_NOT_WHAT_OF.get(step.stage, set())
    deciding = {key: value for key, value in settings(step).items() if key not in ignored}
    text = json.dumps({"stage": step.stage, "settings": deciding, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_fingerprint(step: Step, key: str) -> str | None:
    from pipeline.formats import DEFAULT_CLASSES, DEFAULT_FORMAT, open_source

    split = step.params.get("val_split") if key == "val_data" else None
    try:
        source = open_source(step.params.get("format_") or DEFAULT_FORMAT, step.path(key),
                             split or step.params.get("split") or "train",
                             classes=step.params.get("classes") or DEFAULT_CLASSES,
                             label_key=step.params.get("label_key"))
    except TLError:
        return None  # not there yet (--download) or unreadable: the stage itself says so
    return source.fingerprint()
