"""Recipes: one YAML file naming the stages of one experiment, read with its `--set` overrides, checked
whole and planned into steps before any stage starts (`tl run`). Free of torch.

A recipe is the `--config` file every command reads (top-level keys for every stage that has such an
option, a section per stage), where a section may also be a list of mappings: one step each (two
extractions, train and test). Steps run in stage order: extract, fit-head, finetune, evaluate. The
keys of `tl run` itself (`track`, `experiment`) sit at the top level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import as_flag_value, close_names, read_config, resolve_references
from pipeline.errors import ConfigError, TLError

STAGES = ("extract", "fit-head", "finetune", "evaluate")
OTHER_COMMANDS = ("predict", "export", "quickstart", "info", "example-data", "run")
RUN_KEYS = {"track": "where to log the run: mlflow", "experiment": "the MLflow experiment's name"}
TRACKERS = ("mlflow",)

# the options of each stage that name what it reads: a path made by an earlier step, or data on disk
INPUTS = {"extract": ("data", "weights"), "fit-head": ("cache", "val_cache"),
          "finetune": ("data", "head", "val_data", "weights"), "evaluate": ("head", "cache", "model", "data")}
OUTPUT = "out"


@dataclass
class StageOptions:
    """A stage's recipe keys (long flags, `-` as `_`) -> the parameters they set, and its on/off switches."""

    keys: dict[str, str]
    flags: set[str]


@dataclass
class Step:
    """One stage run of a recipe: its parameter defaults (as the flags would give them), the recipe keys
    that set them, and once parsed, every parameter's value."""

    stage: str
    number: int  # 1-based within its section
    count: int  # steps of its section
    defaults: dict
    keys: dict  # recipe key -> value given
    params: dict = field(default_factory=dict)
    own: dict = field(default_factory=dict)  # parameter -> recipe key, of the keys its section gives (not top-level)

    @property
    def label(self) -> str:
        split = self.params.get("split") if self.stage == "extract" else None
        return self.stage + (f" {self.number}/{self.count}" if self.count > 1 else "") + (f" ({split})" if split else "")

    def path(self, key: str) -> Path | None:
        value = self.params.get(key)
        return None if value in (None, "") else Path(value)


@dataclass
class Recipe:
    path: Path
    document: dict
    sets: tuple[str, ...] = ()

    @property
    def track(self) -> str | None:
        return self.document.get("track")

    @property
    def experiment(self) -> str:
        return str(self.document.get("experiment") or self.path.stem)


def read_recipe(path: Path, sets: tuple[str, ...] = ()) -> Recipe:
    """The recipe at `path` with each `key=value` of `sets` applied (`key`, `section.key` or
    `section.N.key` for the N-th step of a list section, from 1); values read as YAML (`true`, `[256, 128]`)."""
    path = Path(path)
    document = read_config(path)
    for assignment in sets:
        key, equals, text = assignment.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"--set takes key=value (e.g. --set samples_per_class=100 --set finetune.unfreeze=2), "
                              f"got '{assignment}'")
        _assign(document, key.strip().split("."), _set_value(text), path, assignment)
    document = resolve_references(document, path)  # after --set: -P backbone=... names the caches too
    track = document.get("track")
    if track is not None and track not in TRACKERS:
        raise ConfigError(f"recipe {path}: track '{track}' is not one of: {', '.join(TRACKERS)}")
    return Recipe(path, document, tuple(sets))


def _set_value(text: str):
    """A `--set` value read as YAML where that means what it says (`true`, `3`, `0.5`, `[256, 128]`); as
    the text itself where YAML 1.1 would surprise (`no` as false, `010` as 8); empty text as empty."""
    import yaml

    if not text.strip():
        return ""  # `--set fit-head.hidden=`: empty, as on the command line
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    if isinstance(value, int) and not isinstance(value, bool) and text.strip().lstrip("+-").startswith("0") \
            and text.strip().lstrip("+-") != "0":
        return text
    return value


def _assign(document: dict, parts: list[str], value, path: Path, assignment: str) -> None:
    if len(parts) == 1:
        name = parts[0].replace("-", "_")  # as the stages read keys: max-epochs is max_epochs
        shadowing = [f"{section}" + (f".{number}" if isinstance(document[section], list) else "")
                     for section in STAGES if section in document
                     for number, item in enumerate(section_items(document[section]), 1)
                     if isinstance(item, dict) and name in {str(key).replace("-", "_") for key in item}]
        if shadowing:  # silently losing to a section's own value would do nothing
            raise ConfigError(f"--set {assignment}: {', '.join(shadowing)} of {path} set{'s' if len(shadowing) == 1 else ''} "
                              f"{parts[0]} itself; set it there: --set {shadowing[0]}.{parts[0]}=...")
        document[parts[0]] = value
        return
    section, rest = parts[0], parts[1:]
    if section not in STAGES:
        raise ConfigError(f"--set {assignment}: '{section}' is not a stage; name one of {', '.join(STAGES)} "
                          "(or a top-level key alone)")
    current = document.get(section)
    if current is None:
        raise ConfigError(f"--set {assignment}: {path} has no {section} section")
    items = section_items(current)
    if rest[0].isdecimal():
        number = int(rest[0])
        if not 1 <= number <= len(items) or len(rest) != 2 or not isinstance(items[number - 1], dict):
            raise ConfigError(f"--set {assignment}: section {section} of {path} has {len(items)} step(s); "
                              f"use {section}.N.key with N from 1 to {len(items)}")
        items[number - 1][rest[1]] = value
        return
    if len(rest) != 1:
        raise ConfigError(f"--set {assignment}: use key, {section}.key or {section}.N.key")
    for item in items:  # every step of the section
        if isinstance(item, dict):
            item[rest[0]] = value


def section_items(section) -> list:
    """A section's steps: its list, or the one mapping it is."""
    return section if isinstance(section, list) else [section]


def plan(recipe: Recipe, stages: dict[str, StageOptions]) -> list[Step]:
    """The steps of `recipe`, in stage order; unknown keys, misplaced keys, sections of commands that are
    not stages and values of the wrong shape are one ConfigError naming the key and the file."""
    path, document = recipe.path, recipe.document
    known = {key for options in stages.values() for key in options.keys}
    top: dict = {}
    for raw_key, value in document.items():
        key = str(raw_key)
        if key in STAGES:
            continue
        if key in OTHER_COMMANDS:
            raise ConfigError(f"recipe {path}: section {key} is not a stage tl run runs "
                              f"({', '.join(STAGES)}); remove it or run tl {key} by itself")
        if key in RUN_KEYS:
            continue
        if key.replace("-", "_") not in known:
            raise ConfigError(f"recipe {path}: unknown key '{key}'; top-level keys are stage options (such as "
                              f"data, backbone, seed) or {', '.join(RUN_KEYS)}")
        top[key.replace("-", "_")] = value
    steps: list[Step] = []
    for stage in STAGES:
        section = document.get(stage)
        if section is None:
            continue
        items = section if isinstance(section, list) else [section]
        if not items or not all(isinstance(item, dict) for item in items):
            raise ConfigError(f"recipe {path}: section {stage} must be a mapping of option: value, or a list of them")
        options = stages[stage]
        for number, item in enumerate(items, 1):
            keys = {k: v for k, v in top.items() if k in options.keys}
            for raw_key, value in item.items():
                key = str(raw_key).replace("-", "_")
                if key not in options.keys:
                    owners = [name for name in STAGES if key in stages[name].keys]
                    close = close_names(key, options.keys)
                    where = f" (an option of {', '.join(owners)})" if owners else f"; {close}" if close else ""
                    raise ConfigError(f"recipe {path}: {stage} has no option '{raw_key}'{where}")
                keys[key] = value
            defaults = {}
            for key, value in keys.items():
                parameter = options.keys[key]
                if isinstance(value, bool) and parameter not in options.flags:
                    raise ConfigError(f"recipe {path}: {stage} key '{key}' takes a value, not {str(value).lower()}")
                if parameter in options.flags:
                    if value in (0, 1) and not isinstance(value, bool):
                        value = bool(value)  # `mlflow run -P use_early_stop=1`
                    elif not isinstance(value, bool):
                        raise ConfigError(f"recipe {path}: {stage} key '{key}' is a switch: true or false (1 or 0), "
                                          f"not '{value}'")
                defaults[parameter] = as_flag_value(f"recipe {path}: {stage}", parameter, value)
            own = {options.keys[str(key).replace("-", "_")]: str(key) for key in item}
            steps.append(Step(stage, number, len(items), defaults, keys, own=own))
    if not steps:
        raise ConfigError(f"recipe {path} names no stage; add sections such as extract, fit-head, evaluate")
    return steps


def select(steps: list[Step], only: str | None, start: str | None) -> list[Step]:
    """The steps `--only STAGE` or `--from STAGE` keep (each must name a stage the recipe has)."""
    if only and start:
        raise ConfigError("--only and --from choose steps two ways; pass one of them")
    for option, stage in (("--only", only), ("--from", start)):
        if stage is not None and not any(step.stage == stage for step in steps):
            raise ConfigError(f"{option} {stage}: the recipe has no {stage} section; it has "
                              f"{', '.join(dict.fromkeys(step.stage for step in steps))}")
    if only:
        return [step for step in steps if step.stage == only]
    if start:
        return [step for step in steps if STAGES.index(step.stage) >= STAGES.index(start)]
    return steps


def _same(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def input_from(step: Step, maker: Step) -> str | None:
    """The key of `step`'s input that `maker`'s output is (a fit-head's `cache`), or None."""
    return next((key for key in INPUTS[step.stage] if _same(step.path(key), maker.path(OUTPUT))), None)


def check(recipe: Recipe, steps: list[Step], chosen: list[Step]) -> list[str]:
    """Cross-step checks on parsed steps, before any runs: every output has a name of its own, every
    input of a chosen step exists or is made by an earlier step, and no validation data is test data.
    Returns notes worth a line (training data scored as test)."""
    from pipeline.formats import DEFAULT_FORMAT, downloading_formats  # the formats registry, only when checked

    path = recipe.path
    made: list[tuple[Path, Step]] = []
    for step in steps:
        if step.stage == "extract" and step.params.get("download") and step.path("data") is not None:
            made.append((step.path("data"), step))  # the data this step downloads
        for key in INPUTS[step.stage]:
            given = step.path(key)
            if step not in chosen or given is None or (key == "weights" and str(given) in ("imagenet", "none")):
                continue  # a step that will not run reads nothing
            maker = next((earlier for out, earlier in made if _same(out, given)), None)
            if maker is None and not given.exists():
                fetched = (step.params.get("format_") or DEFAULT_FORMAT) in downloading_formats()
                remedy = "fetch it with --set extract.download=true" if fetched else "put it there, or --set data=PATH"
                raise ConfigError(f"recipe {path}: {step.label} {key} {given} does not exist"
                                  + (f"; {remedy}" if key == "data" else ""))
            elif maker is not None and maker not in chosen and not given.exists():
                raise ConfigError(f"recipe {path}: {step.label} needs {key} {given}, which {maker.label} makes; "
                                  "run that stage too (drop --only/--from)")
        out = step.path(OUTPUT)
        if out is not None:
            if not out.name or out.name in (".", ".."):
                raise ConfigError(f"recipe {path}: {step.label} out '{out}' names no file or folder of its own")
            twin = next((earlier for earlier_out, earlier in made if _same(earlier_out, out)), None)
            if twin is not None:
                raise ConfigError(f"recipe {path}: {twin.label} and {step.label} both write {out}; give each "
                                  "its own out")
            made.append((out, step))
    _refuse_peeking(path, steps)
    _refuse_early_stop_unwatched(path, chosen)
    notes = []
    for evaluate in (step for step in steps if step.stage == "evaluate" and step.path("cache")):
        scored = _images_of(evaluate, "cache", "split", steps)
        for fit in (step for step in steps if step.stage == "fit-head"):
            if _same(fit.path("cache"), evaluate.path("cache")):
                notes.append(f"{evaluate.label} scores {evaluate.path('cache')}, the cache {fit.label} trained on: "
                             "its numbers are training numbers, not a test")
            elif scored is not None and scored == _images_of(fit, "cache", "split", steps):
                # two caches of the same images (extract.1.split=test) score what was trained on as well
                notes.append(f"{evaluate.label} scores {evaluate.path('cache')}, codes of the images {fit.label} "
                             f"trained on ({fit.path('cache')}): its numbers are training numbers, not a test")
    return notes


def _images_of(step: Step, key: str, split_key: str, steps: list[Step]) -> tuple[str, str | None] | None:
    """(folder, split) of the images that `key` of `step` names, directly or through the extract step
    that makes that cache. An image folder read through a split subfolder (`images`, split `test`) is
    the same as that subfolder named directly (`images/test`)."""
    from pipeline.formats import DEFAULT_FORMAT  # the formats registry, only when a recipe is checked

    given = step.path(key)
    if given is None:
        return None
    if key in ("cache", "val_cache"):
        maker = _cache_maker(given, steps)
        return None if maker is None else _images_of(maker, "data", "split", steps)
    split = str(step.params.get(split_key) or step.params.get("split"))
    if (step.params.get("format_") or DEFAULT_FORMAT) == DEFAULT_FORMAT:
        return (os.path.realpath(given / split), None) if (given / split).is_dir() else (os.path.realpath(given), None)
    return os.path.realpath(given), split


def check_values(step: Step, steps: list[Step], chosen: list[Step]) -> None:
    """What a stage itself checks only once the steps before it have run (hours of extraction), checked
    before any step: an extract step's layers against its backbone (-P backbone=... with the recipe's
    layers) and its patch settings (a scale twice, an overlap or background share out of range, patches
    without --multiscale); a fit-head step's layer against those the extract step making its cache
    writes, when that step runs; a finetune step's unfreeze against the conv layers before its head's tap;
    an evaluate step's pooling exponent. (tl run makes fit-head's and finetune's settings checks through
    the runner too: see StageRunner.check.)"""
    params = step.params
    if step.stage == "extract":
        from pipeline.extract_settings import ExtractConfig
        from pipeline.multiscale import check_patches

        config = ExtractConfig.of_options(**params)  # as tl extract builds it
        check_patches(config.multiscale, config.patches, _written(step)[0], config.format)
    elif step.stage == "fit-head" and params.get("layer"):
        maker = _cache_maker(step.path("cache"), steps)
        if maker is not None and maker in chosen:  # else the cache on disk is read (--only fit-head): the stage checks it
            backbone, written = _written(maker)
            if backbone.aliases.get(params["layer"], params["layer"]) not in written:
                raise ConfigError(f"layer '{params['layer']}' is not one that {maker.label} caches "
                                  f"({', '.join(written)}); set the layer to one of them, or add it to its layers")
    elif step.stage == "finetune" and params.get("unfreeze"):
        from pipeline.model_files import check_unfreeze, tap_conv_layers

        tapped = _head_tap(step, steps, chosen)
        if tapped is not None:
            check_unfreeze(params["unfreeze"], *tap_conv_layers(*tapped))
    elif step.stage == "evaluate" and params.get("exponent") is not None:
        from pipeline.multiscale import check_exponent

        check_exponent(params["exponent"])


def _head_tap(step: Step, steps: list[Step], chosen: list[Step]):
    """(backbone entry, tap) of the head a finetune step starts from: as the fit-head step that makes it
    will fit it (from the extract step that makes its cache, or the cache's manifest), else as the head
    file on disk records it; None where neither says (a cache of several layers and no layer named, or a
    layer the cache lacks: fit-head refuses those itself)."""
    from pipeline.backbones import get_backbone

    fit = next((s for s in chosen if s.stage == "fit-head" and _same(s.path(OUTPUT), step.path("head"))), None)
    if fit is None:
        if step.path("head") is None or not step.path("head").is_file():
            return None
        from pipeline.model_files import load_head

        metadata = load_head(step.path("head"))[1]
        return get_backbone(metadata["codes_key"]["backbone"]), metadata["layer"]
    maker = _cache_maker(fit.path("cache"), steps)
    if maker is not None and maker in chosen:
        backbone, written = _written(maker)
    else:  # fit-head reads the cache on disk (no step makes it, or --from fit-head): its manifest says
        from cache.manifest import load_manifest

        try:
            key = load_manifest(fit.path("cache"), records=False).key
        except TLError:
            return None  # fit-head says what is wrong with it
        backbone, written = get_backbone(key["backbone"]), list(key["taps"])
    layer = backbone.aliases.get(fit.params["layer"], fit.params["layer"]) if fit.params.get("layer") else None
    if layer is None:
        return (backbone, written[0]) if len(written) == 1 else None
    return (backbone, layer) if layer in written else None


def _cache_maker(cache: Path | None, steps: list[Step]) -> Step | None:
    """The extract step whose output is `cache`, if any."""
    return next((s for s in steps if s.stage == "extract" and _same(s.path(OUTPUT), cache)), None)


def _written(extract: Step):
    """(backbone entry, canonical taps) an extract step writes; its layers checked against its backbone."""
    from pipeline.backbones import get_backbone

    backbone = get_backbone(extract.params["backbone"])
    written = extract.params.get("layers")  # as written: an empty name is refused, as extract refuses it
    layers = [tap.strip() for tap in str(written).split(",")] if written else []
    return backbone, backbone.resolve_taps(layers or [backbone.default_tap])


def _refuse_early_stop_unwatched(path: Path, chosen: list[Step]) -> None:
    """A step whose early stopping has no validation to watch is refused by its stage; here, before the
    steps ahead of it (an extraction of hours) run. A fit-head head that does not read early_stop
    (lbfgs logreg, svm: it only warns) is not refused."""
    from pipeline.heads import HEAD_KINDS

    for step in chosen:
        params, validation = step.params, {"fit-head": "val_cache", "finetune": "val_data"}.get(step.stage)
        if not validation or not params.get("early_stop") or params.get("val_fraction") is not None \
                or step.path(validation) is not None:
            continue
        kind = HEAD_KINDS.get(params.get("head")) if step.stage == "fit-head" else None
        if kind is not None and "early_stop" not in (kind.reads(params.get("solver")) or ("early_stop",)):
            continue
        raise ConfigError(f"recipe {path}: {step.label} has early_stop but nothing to validate on; give it "
                          f"val_fraction (above 0) or {validation}, or early_stop: false (mlflow run: -P use_early_stop=0)")


def _refuse_peeking(path: Path, steps: list[Step]) -> None:
    tests = {}
    for step in steps:
        if step.stage == "evaluate":
            for key in ("cache", "data"):
                images = _images_of(step, key, "split", steps)
                if images and (key == "cache" or step.path("model")):
                    tests[images] = step
    for step in steps:
        validation = {"fit-head": ("val_cache", "val_cache"), "finetune": ("val_data", "val_split")}.get(step.stage)
        if validation is None:
            continue
        images = _images_of(step, validation[0], validation[1], steps)
        test = tests.get(images) if images else None
        if test is not None or (step.stage == "fit-head" and any(
                _same(step.path("val_cache"), s.path("cache")) for s in steps if s.stage == "evaluate")):
            raise ConfigError(f"recipe {path}: {step.label} validates on the test data of "
                              f"{(test or step).label} ({validation[0]} {step.path(validation[0])}); early stopping "
                              "and C selection must not see the test set: use val_fraction (held out of the "
                              "training data) or a separate validation set")
