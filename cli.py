"""The `tl` command line: parse flags (and --config files), call one pipeline function, print, exit.

User errors (TLError) print one `error: ...` line and exit 2; run as `tl ...` or `python -m cli ...`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from pathlib import Path

import click

from pipeline import DEVICES, PRECISIONS, stops
from pipeline.config import csv_list
from pipeline.errors import TLError, counted, install_extra, listed

UNSET = getattr(click.core, "UNSET", None)  # click >= 8.2 marks "no default given" with its own sentinel

# -------------------------------------------------------------- registries and stage defaults, read on first use
# `tl`, `tl --help` and `tl info` start without importing torch: a command's choices, help texts and
# defaults come from the pipeline's registries and stage configs only when that command parses its
# options or shows its help.


def _attribute(path: str):
    """`module:attribute` imported on demand."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


class RegistryChoice(click.Choice):
    """A click.Choice whose values are the names in a pipeline registry (`module:attribute`, a mapping,
    a sequence, or a function returning one), read when first needed."""

    def __init__(self, registry: str):
        self.registry = registry
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        names = _attribute(self.registry)
        return tuple(names() if callable(names) else names)


class StageDefault:
    """An option's default: the default of the field of the same name in a stage's config dataclass
    (`module:Class`), turned into the option's text form (tuples comma-separated); one place for it."""

    def __init__(self, configs: tuple[str, ...], field: str, fallback=None):
        self.configs, self.field, self.fallback = configs, field, fallback

    def value(self):
        for config in self.configs:
            for field in dataclasses.fields(_attribute(config)):
                if field.name == self.field:
                    if field.default is not dataclasses.MISSING:
                        value = field.default
                    elif field.default_factory is not dataclasses.MISSING:
                        value = field.default_factory()
                    else:  # a field the stage requires: the option has no default
                        return self.fallback
                    if isinstance(value, tuple):  # a tuple of layouts (sweep --hidden) as 512x256
                        return ",".join(f"{item:g}" if isinstance(item, float) else
                                        "x".join(map(str, item)) if isinstance(item, tuple) else str(item)
                                        for item in value)
                    return value
        return self.fallback  # an option of the CLI's own

    def __call__(self):
        return self.value()


class TlOption(click.Option):
    """A click option whose help may end with a registry's descriptions (`describe`, `module:function`
    returning text) and whose default may be a StageDefault, both shown in --help once resolved."""

    def __init__(self, *args, describe: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.describe = describe

    def get_help_record(self, ctx: click.Context):
        saved = self.help, self.default, self.show_default
        try:
            if self.describe:
                self.help = " ".join(part for part in (self.help, _attribute(self.describe)() + ".") if part)
            if isinstance(self.default, StageDefault):
                self.default = self.default.value()
                shown = not (self.default is None or self.default is False or self.default == "") \
                    or bool(self.secondary_opts)
                self.show_default = shown if self.show_default is None else self.show_default and shown
            return super().get_help_record(ctx)
        finally:
            self.help, self.default, self.show_default = saved


def option(*args, **kwargs):
    return click.option(*args, cls=TlOption, **kwargs)


class Listed(click.ParamType):
    """A comma-separated list option, checked (`parse(text, flag)` raises) when click parses the command
    line, so that `tl run` refuses a recipe's bad value before any step starts. The value stays text,
    as tl run's records and digests hold it; the command parses it again."""

    name = "text"

    def __init__(self, parse):
        self.parse = parse

    def convert(self, value, param, ctx):
        self.parse(value, param.opts[0] if param else "value")
        return value


def _named(value, param, ctx, kind: click.ParamType):
    if isinstance(value, str) and not value.strip():  # not read as the working folder
        kind.fail("is empty; name a path (is a shell variable not set?)", param, ctx)


class NamedPath(click.Path):
    """A path option: an empty value (a shell variable not set) is refused."""

    def convert(self, value, param, ctx):
        _named(value, param, ctx, self)
        return super().convert(value, param, ctx)


class NamedText(click.types.StringParamType):
    """A text option that may be a path (--weights imagenet, none or PATH): an empty value is refused."""

    def convert(self, value, param, ctx):
        _named(value, param, ctx, self)
        return super().convert(value, param, ctx)


PATH = NamedPath(path_type=Path)
SEED = click.IntRange(min=0, max=2**32 - 1)  # what numpy, torch and scikit-learn all take (a larger one was a traceback)


class Count(click.IntRange):
    """A count, checked when click parses the command (tl run refuses a recipe's before any step starts);
    a whole number written as a float (`5.0`, as `mlflow run` passes a float parameter) is that number."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer() and not value.strip().lstrip("+-").isdigit():
                value = str(int(number))
        return super().convert(value, param, ctx)


COUNT, AMOUNT = Count(min=1), Count(min=0)  # at least one; zero allowed (0: all, or none)


class Unfreeze(Count):
    """finetune's --unfreeze: a count of layers, or `all`, every one whatever the backbone (a recipe's
    count of AlexNet's 5 conv layers trained 5 of VGG16's 13 under --set backbone=vgg16)."""

    name = "count or all"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "all":
            return "all"
        return super().convert(value, param, ctx)


class Share(click.FloatRange):
    """A fraction of the training data held out for validation, checked when click parses the command;
    with `none_at_zero`, 0 holds out nothing (as Keras's validation_split=0): a recipe's `val_fraction: 0`
    trains on every image."""

    name = "fraction"

    def __init__(self, none_at_zero: bool):
        super().__init__(min=0, max=1, min_open=not none_at_zero, max_open=True)
        self.none_at_zero = none_at_zero

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a fraction between 0 and 1", param, ctx)
        return None if number == 0 and self.none_at_zero else number


HELD_OUT, SHARE = Share(none_at_zero=True), Share(none_at_zero=False)  # fit-head and finetune; sweep ranks on validation
FLOATS = Listed(lambda text, flag: _numbers(text, float, flag))
INTS = Listed(lambda text, flag: _numbers(text, int, flag))
LAYOUTS = Listed(lambda text, flag: _layouts(text))


def stage_defaults(*configs: str, own: tuple[str, ...] = ()):
    """Command decorator (above @tl.command): every option declared without a default takes the default of
    the config field of its name, read when needed; `own` names options that are the CLI's alone."""

    def bind(command: click.Command) -> click.Command:
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in own and param.name != "config" \
                    and not param.required and (param.default is None or param.default is False or param.default is UNSET):
                param.default = StageDefault(configs, param.name.rstrip("_"), False if param.is_flag else None)
        return command

    return bind


# -------------------------------------------------------------- options several commands share


def device_option(help: str = "auto: CUDA when present (under torchrun, each rank's own GPU)."):
    return option("--device", type=click.Choice(DEVICES), help=help)


def precision_option(help: str):
    return option("--precision", type=click.Choice(PRECISIONS), help=help)


def workers_option():
    return option("--workers", type=AMOUNT, describe="cli:workers_help", help="Decoding processes")


def format_option(help: str = "How --data is laid out:"):
    return option("--format", "format_", type=RegistryChoice("pipeline.formats:format_names"),
                  describe="pipeline.formats:formats_help", help=help)


def workers_help() -> str:
    return f"[default: the cores shared among this machine's ranks, at most {_attribute('pipeline.hardware:MAX_WORKERS')}]"


def shard_rows_help() -> str:
    rows = _attribute("pipeline.extract_settings:SHARD_ROWS")
    patches = _attribute("pipeline.extract_settings:PATCH_SHARD_ROWS")
    return f"[default: {rows}; {patches} with --multiscale]"


def head_names_help() -> str:
    return ", ".join(_attribute("pipeline.heads:HEAD_KINDS"))


def backbones_help() -> str:
    return ", ".join(_attribute("pipeline.backbones:list_backbones")()) + ", or timm:MODEL (any model of timm; the timm extra)"


def head_kinds_help() -> str:
    return "; ".join(f"{name}: {kind.help}" for name, kind in _attribute("pipeline.heads:HEAD_KINDS").items())


def download_help() -> str:
    return f"{'/'.join(_attribute('pipeline.formats:downloading_formats')())} data when missing"


def decode_help() -> str:
    return "; ".join(f"{name}: {mode.help}" for name, mode in _attribute("pipeline.decoding:DECODE_MODES").items())


def head_lr_help() -> str:
    defaults = _attribute("pipeline.training:DEFAULT_LR")
    return "[default: " + ", ".join(f"{value:g} {name}" for name, value in defaults.items()) + "]"


# -------------------------------------------------------------- config files


def _option_keys(command: click.Command) -> dict[str, str]:
    """Config key (the long flag without dashes, `-` as `_`) -> the parameter it sets."""
    return {
        flag[2:].replace("-", "_"): param.name
        for param in command.params
        if param.name and param.name != "config"
        for flag in getattr(param, "opts", [])
        if flag.startswith("--")
    }


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """Eager: a YAML file becomes this command's defaults (pipeline.config), so flags still win."""
    if value is None:
        return value
    from pipeline.config import command_defaults

    group = ctx.parent.command if ctx.parent else None
    commands = list(group.commands.values()) if isinstance(group, click.Group) else [ctx.command]
    # the command line as given (parsed already, so parsed again without a fault): values as typed
    given, _, _ = ctx.command.make_parser(ctx).parse_args(args=list(ctx.meta.get("tl.args", [])))
    defaults = command_defaults(
        Path(value), ctx.info_name, _option_keys(ctx.command),
        known={key for command in commands for key in _option_keys(command)},
        sections={command.name for command in commands},
        flags={param.name for param in ctx.command.params if getattr(param, "is_flag", False)}, given=given)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


config_option = click.option(
    "--config", type=NamedPath(dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
    help="YAML file of option: value pairs; flags given on the command line win.",
)


def _images(count: int) -> str:
    return f"{count} image{'s' * (count != 1)}"


class SaidWarnings:
    """The warnings the steps of one `tl run` said, each with the data set its step read. Extract and finetune
    that open one data set both warn of it (a class short of --samples-per-class, an empty class folder): a
    later step does not say again what an earlier step said of the same data (the manifest keeps it, tl info
    shows it); a step's own repeats (one per epoch) are its own, and said."""

    DATA = ("format_", "data", "split", "samples_per_class", "seed", "classes", "label_key")

    def __init__(self):
        self.earlier: set[tuple] = set()
        self.now: set[tuple] = set()
        self.data: tuple = ()

    def begin(self, params: dict) -> None:
        self.earlier |= self.now
        self.now, self.data = set(), tuple(str(params.get(name)) for name in self.DATA)

    def new(self, line: str) -> bool:
        self.now.add((self.data, line))
        return (self.data, line) not in self.earlier


def _warn(line: str) -> None:
    """A warning line on stderr, said even with --quiet; in `tl run`, once per data set (SaidWarnings)."""
    context = click.get_current_context(silent=True)
    said = context.find_object(SaidWarnings) if context is not None else None
    if said is None or said.new(line):
        click.echo(line, err=True)


# -------------------------------------------------------------- commands


RANKED = ("extract", "finetune")  # the commands that share their work over torchrun's ranks


class TlCommand(click.Command):
    """click's command, whose extra arguments are refused in a line that counts them (_counted_extras): click
    joins them with spaces into its message, where a path holding a space could not be told from two."""

    def parse_args(self, ctx, args):
        ctx.meta["tl.args"] = list(args)  # for --config: the flags given, which its ${KEY} references take
        allowed, ctx.allow_extra_args = ctx.allow_extra_args, True
        extras = super().parse_args(ctx, args)
        if extras and not allowed and not ctx.resilient_parsing:
            ctx.fail(_counted_extras([str(extra) for extra in extras]))
        return extras


class TlGroup(click.Group):
    """click's group, with Ctrl-C reaching main() as stops.Interrupted: click's own handling of
    KeyboardInterrupt printed an empty line above tl's one line."""

    command_class = TlCommand

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            stops.STOPPING.set()
            raise stops.Interrupted() from None


@click.group(cls=TlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tl", message="tl %(version)s")
@click.pass_context
def tl(ctx):
    """tl: transfer learning for image classification, in stages.

    \b
    1. tl extract    run a frozen ImageNet backbone over images, cache its codes (HDF5 shards)
    2. tl fit-head   train logistic regression / MLP / SVM heads on cached codes
    3. tl finetune   unfreeze the last conv layers and train end to end
    4. tl evaluate   accuracy, confusion matrix, per-class AP and mAP, with a report
    """
    ranks = stops.launched_ranks()
    if ctx.invoked_subcommand not in (None, *RANKED) and ranks > 1:  # each rank would do it all
        raise TLError(f"tl {ctx.invoked_subcommand} runs in one process, but WORLD_SIZE={ranks} says torchrun started "
                      f"it in several: under torchrun start {' or '.join(RANKED)}; run tl {ctx.invoked_subcommand} "
                      "without torchrun (and without WORLD_SIZE in its environment)")


@stage_defaults("pipeline.extract:ExtractConfig", "pipeline.multiscale:PatchSettings")
@tl.command()
@config_option
@option("--data", type=PATH, required=True,
        help="Image folder, CSV file (path,label rows) or data set root.")
@format_option()
@option("--split", help="Split to read (imagefolder: DATA/SPLIT when that folder exists).")
@option("--backbone", describe="cli:backbones_help", help="The frozen ImageNet network:")
@option("--weights", type=NamedText(), help="imagenet (published weights), none (seeded random init) or a state dict PATH.")
@option("--layers", help="Comma-separated taps, e.g. fc6,fc7 [default: the backbone's last].")
@option("--out", type=PATH, required=True, help="Cache folder to write.")
@option("--dtype", type=click.Choice(["float16", "float32"]))
@option("--shard-rows", type=COUNT, describe="cli:shard_rows_help", help="Images per shard file")
@option("--compression", type=RegistryChoice("cache.writer:COMPRESSIONS"))
@option("--batch-size", type=COUNT)
@workers_option()
@device_option()
@precision_option("Autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
@option("--samples-per-class", type=AMOUNT, help="Seeded, stratified subset of N per class (0: every image).")
@option("--seed", type=SEED)
@option("--decode", type=RegistryChoice("pipeline.decoding:DECODE_MODES"), describe="cli:decode_help",
        help="How an image becomes the centre crop; part of the cache key (heads refuse codes of the other mode).")
@option("--device-decode", type=click.Choice(["auto", "on", "off"]),
        help="JPEGs decoded on the device (nvjpeg) or in workers; auto: on CUDA with --decode fast. Not part of the "
             "cache key: a cache goes on either way.")
@option("--on-error", type=RegistryChoice("pipeline.extract_settings:ON_ERROR"),
        help="Unreadable image: skip it (recorded with its shard in shards.jsonl; tl info lists them) or stop.")
@option("--overwrite", is_flag=True, help="Replace a cache made with other settings.")
@option("--download", is_flag=True, describe="cli:download_help", help="Download")
@option("--classes", help="voc data: voc (the 20 classes), auto (names found in the annotations), or a comma list; "
        "webdataset data: a comma list of names the labels index or name (default there: found in the labels).")
@option("--label-key", help="webdataset data: the label file of a sample: cls, txt, json or json:FIELD [default: cls].")
@option("--multiscale", is_flag=True, help="Oquab et al. patches at many scales instead of one centre crop.")
@option("--scales", type=FLOATS, help="--multiscale: comma-separated; the patch side is (min(H, W) - 1) / scale (the paper's 13).")
@option("--patch-overlap", type=float, help="--multiscale: a box labels a patch when it covers this share of the patch...")
@option("--box-overlap", type=float, help="...and the patch this share of the box.")
@option("--background-fraction", type=float,
        help="--multiscale, train/trainval splits: share of background patches kept (seeded).")
@option("--quiet", is_flag=True, help="No progress bar.")
def extract(**options):
    """Run a frozen backbone over every image and cache the codes of chosen layers.

    Re-running the same command resumes: finished shards are kept, the rest are written.
    """
    from cache.manifest import human_bytes
    from pipeline.distributed import world
    from pipeline.extract import ExtractConfig, run_extract

    config = ExtractConfig.of_options(**options)
    result = run_extract(config)
    if not world().is_main:  # under torchrun, rank 0 reports for all
        return
    rate = result.images_processed / result.loop_seconds if result.loop_seconds else 0.0
    dropped = result.shards_dropped
    dropped = f", {dropped} dropped ({'its' if dropped == 1 else 'their'} inputs changed or went)" if dropped else ""
    click.echo(f"wrote {result.out}: {counted(result.rows, 'row')}, {counted(result.shards_written, 'shard')} new, "
               f"{result.shards_reused} reused{dropped}, {_images(len(result.skipped))} skipped")
    for tap, width in result.taps.items():
        click.echo(f"  {tap:<8} width {width:<6} {config.dtype}")
    click.echo(f"  size on disk {human_bytes(result.bytes_on_disk)}, time {result.seconds:.1f} s"
               + (f" ({rate:.1f} img/s)" if result.images_processed else ""))
    if result.patches:
        click.echo(f"  {result.patches} patches from {result.images_processed} images" + (
            f"; {result.background_dropped} background patches left out (--background-fraction "
            f"{config.patches.background_fraction:g}, seed {config.seed})" if result.background_dropped else ""))
    if result.device_refused:
        click.echo(f"  {result.device_refused} JPEG{'s' * (result.device_refused != 1)} refused by the device's "
                   "decoder went to the CPU path")
    for warning in result.warnings:
        _warn(f"warning: {warning}")
    if result.skipped:
        first = result.skipped[0]
        click.echo(f"warning: skipped {_images(len(result.skipped))} that could not be read or labelled (tl info "
                   f"{result.out} lists them), "
                   f"e.g. {first['sample_id']}: {first['reason']}", err=True)
    return result


@tl.command()
@click.argument("cache", type=PATH)
@click.option("--verify", is_flag=True, help="Check every shard's checksum, columns and codes (no NaN or Inf).")
def info(cache, verify):
    """Describe a cache: backbone, taps, classes, rows, shards; --verify checks every shard."""
    from cache.manifest import load_manifest
    from cache.reader import CacheReader

    manifest = load_manifest(cache)
    for line in manifest.describe(cache):
        click.echo(line)
        if line.startswith("skipped "):  # each with its reason: the warning at the end of extract sends users here
            _first_of([f"{item['sample_id']}: {item['reason']}" for item in manifest.skipped], " " * 11, "shards.jsonl")
    _first_of(manifest.warnings, "warning    ", "manifest.json's warnings")  # a damaged tar, an empty class
    # a stat per shard (--verify reads them whole): a cache whose shard files went or were cut short was shown
    # as complete, exit 0
    gone = [] if verify else [shard.file for shard in manifest.shards
                              if not (path := Path(cache) / shard.file).is_file() or path.stat().st_size != shard.bytes]
    if gone:
        raise TLError(f"{counted(len(gone), 'shard file')} of {cache} missing or changed in size "
                      f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}); re-run the tl extract that made "
                      "the cache: it writes them again")
    if verify:
        problems = CacheReader(cache, verify=False, allow_partial=True).verify_all()
        if problems:
            for problem in problems[:-1]:
                click.echo(f"problem    {problem}", err=True)
            raise TLError(f"{counted(len(problems), 'problem')} in {cache}: {problems[-1]}")
        click.echo(f"verified   {len(manifest.shards)} shards, checksums match")


def _first_of(items: list[str], label: str, where: str) -> None:
    """Up to six lines of `items`; past six, the first five and how many more `where` holds."""
    first = 5 if len(items) > 6 else 6  # "and 1 more" would take the line the sixth needs
    for item in items[:first]:
        click.echo(f"{label}{item}")
    if len(items) > first:
        click.echo(f"{label}... and {len(items) - first} more ({where})")


@tl.command("backbones")
@click.option("--timm", "pattern", help="Also the timm models with pretrained weights matching this pattern "
                                        "(e.g. 'convnext_*'; one model's full name lists its taps).")
def backbones_command(pattern):
    """List the backbones: input size, taps and widths, and whether the ImageNet weights are here (offline)."""
    from pipeline.backbones import describe_backbones

    rows = describe_backbones(pattern)
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        taps = ", ".join(f"{tap} ({size})" for tap, size in row["taps"].items()) if row["taps"] else "pool, stageN"
        taps = f"refused: trained on {row['refused']}; tl crops centre squares" if row.get("refused") else taps
        click.echo(f"{row['name']:<{width}}  {row['input']:>3} px {row['interpolation'] or '':<8}  weights "
                   f"{'here   ' if row['weights_here'] else 'missing'}  {taps}")
    if not pattern:
        click.echo("timm:MODEL  any model of timm (the timm extra); tl backbones --timm PATTERN lists them")


@tl.command("example-data")
@click.argument("out", type=PATH)
@click.option("--per-class", default=None, type=click.IntRange(min=0),
              help="Keep only N images of each digit (0: all); a quarter of them, at least one, is the test split.")
@click.option("--seed", default=0, show_default=True, type=SEED)
def example_data(out, per_class, seed):
    """Write scikit-learn's handwritten digits as an ImageFolder (OUT/train, OUT/test); offline."""
    from pipeline.examples import write_digits

    counts = write_digits(out, seed=seed, per_class=per_class)
    click.echo(f"wrote {counts['train']} train and {counts['test']} test images to {out}")


@stage_defaults("pipeline.fit_head:FitHeadConfig", "pipeline.training:TrainingOptions", own=("quiet",))
@tl.command("fit-head")
@config_option
@option("--cache", type=PATH, required=True, help="Cache folder written by tl extract.")
@option("--layer", help="Layer of the cache to train on [default: its only layer].")
@option("--head", type=RegistryChoice("pipeline.heads:HEAD_KINDS"), describe="cli:head_kinds_help",
        help="The kind of head:")
@option("--C", "C", type=FLOATS, help="logreg/svm inverse regularization; a comma-separated list picks the best on validation "
                         "(svm: per class, by AP).")
@option("--solver", type=RegistryChoice("pipeline.heads:SOLVERS"),
        help="logreg: lbfgs loads the layer in memory; sgd streams it in mini-batches.")
@option("--hidden", type=INTS, help="mlp: comma-separated hidden widths (ReLU + dropout after each); empty for none.")
@option("--dropout", type=float, help="mlp: dropout after each hidden layer.")
@option("--optimizer", type=RegistryChoice("pipeline.training:OPTIMIZERS"), help="mlp and logreg --solver sgd.")
@option("--lr", type=float, describe="cli:head_lr_help", help="Learning rate")
@option("--lr-steps", type=INTS, help="Epochs after which the lr drops by --lr-factors (e.g. 10,20); "
                           "none: cosine decay to zero over --max-epochs.")
@option("--lr-factors", "--lr-factor", "lr_factors", type=FLOATS, help="Factor of each drop (one value: the same for every step).")
@option("--momentum", type=float, help="SGD momentum.")
@option("--weight-decay", type=float, help="mlp: L2 on weights (logreg --solver sgd takes it from --C).")
@option("--batch-size", type=COUNT)
@option("--max-epochs", type=COUNT)
@option("--early-stop/--no-early-stop",
        help="Stop when the validation loss has not improved for --patience epochs; keep the best epoch.")
@option("--patience", type=COUNT)
@device_option("Where mlp and sgd heads train; cuda reads the cache in pinned batches.")
@option("--val-cache", type=PATH, help="Validation cache of the same classes.")
@option("--val-fraction", type=HELD_OUT, help="Hold out this seeded fraction instead (stratified by class; 0: none).")
@option("--max-iter", type=COUNT, help="logreg lbfgs and svm iterations.")
@option("--block-rows", type=COUNT, help="Rows read from the cache at a time: bounds memory when streaming.")
@option("--seed", type=SEED)
@option("--quiet", is_flag=True, help="No progress bar.")
@option("--out", type=PATH, required=True, help="Head file to write (.pt).")
@option("--overwrite", is_flag=True, help="Replace a file at --out that tl did not write.")
def fit_head(**options):
    """Train a head on the codes of one cached layer and save it as one file."""
    from pipeline.fit_head import fit_head as run_fit_head

    _warn_unread((options["head"],), options["solver"], options["early_stop"])
    result = run_fit_head(_fit_head_config(**options))
    click.echo(f"wrote {result.out}: {options['head']} on {result.layer}, {counted(result.train_rows, 'training row')}"
               + "".join(f", {part}" for part in _chosen_parts(result.chosen, result.epochs)))
    click.echo(f"  train {result.metric} {result.train_score:.4f}"
               + (f", validation {result.metric} {result.val_score:.4f} ({result.val_rows} rows)"
                  if result.val_score is not None else ""))
    return result


def _fit_head_config(C, hidden, optimizer, lr, lr_steps, lr_factors, momentum, weight_decay, batch_size, max_epochs,
                     early_stop, patience, device, quiet, **options):
    """fit-head's options as its config: for the command, and for tl run's check of a step before any runs."""
    from pipeline.fit_head import FitHeadConfig
    from pipeline.training import TrainingOptions

    training = TrainingOptions(optimizer=optimizer, lr=lr, lr_steps=_numbers(lr_steps, int, "--lr-steps"),
                               lr_factors=_numbers(lr_factors, float, "--lr-factors"), momentum=momentum, weight_decay=weight_decay,
                               batch_size=batch_size, max_epochs=max_epochs, early_stop=early_stop, patience=patience,
                               device=device, quiet=quiet)
    return FitHeadConfig(C=_numbers(C, float, "--C"), hidden=_numbers(hidden, int, "--hidden"), training=training,
                         **options)


def _warn_unread(kinds: tuple[str, ...], solver: str, early_stop: bool, heads_flag: str = "--head") -> None:
    """Warn of the options typed on this command line (a config's or recipe's keys reach every stage that
    has them, so not those) that the chosen heads do not read."""
    from click.core import ParameterSource
    from pipeline.fit_head import unread_options

    context = click.get_current_context()
    given = {param.name: param.opts[0] for param in context.command.params
             if context.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
             and context.params.get(param.name) is not False}  # --no-early-stop asks for nothing
    for warning in unread_options(kinds, solver, given, early_stop, heads_flag):
        click.echo(f"warning: {warning}", err=True)


def _chosen_parts(chosen: dict, epochs: int | None) -> list[str]:
    """What validation chose, as words: 'C 0.1', 'C per class 0.1 (7 classes), 1 (3 classes)',
    'trained 5 epochs, kept epoch 2'."""
    parts = []
    if isinstance(chosen.get("C"), list):
        costs = chosen["C"]
        parts.append("C per class " + ", ".join(f"{c:g} ({counted(costs.count(c), 'class', 'classes')})"
                                                 for c in sorted(set(costs))))
    elif "C" in chosen:
        parts.append(f"C {chosen['C']:g}")
    if epochs:
        kept = chosen.get("epoch", epochs)
        parts.append(f"trained {counted(epochs, 'epoch')}" + (f", kept epoch {kept}" if kept != epochs else ""))
    return parts


def _numbers(text: str | None, kind, flag: str) -> tuple:
    try:
        return tuple(kind(value) for value in csv_list(text))
    except ValueError:
        raise TLError(f"{flag} takes {kind.__name__} numbers separated by commas, got '{text}'") from None


@stage_defaults("pipeline.sweep:SweepConfig", "pipeline.training:TrainingOptions", own=("quiet",))
@tl.command()
@option("--cache", type=PATH, required=True, help="Cache folder written by tl extract.")
@option("--layers", help="Comma-separated cached layers to try [default: every layer of the cache].")
@option("--heads", describe="cli:head_names_help", help="Comma-separated head kinds to try:")
@option("--C", "C", type=FLOATS, help="logreg/svm: comma-separated costs, one head each.")
@option("--lr", type=FLOATS, help="mlp and logreg --solver sgd: comma-separated learning rates, one head each [default: the "
                     "optimizer's].")
@option("--hidden", type=LAYOUTS, help="mlp: comma-separated hidden layouts, one head each; 512x256 is two layers, 0 none.")
@option("--solver", type=RegistryChoice("pipeline.heads:SOLVERS"),
        help="logreg: lbfgs (codes in memory, shared by the layer's lbfgs and svm heads) or sgd (streamed with "
             "the mlp heads).")
@option("--dropout", type=float, help="mlp: dropout after each hidden layer.")
@option("--optimizer", type=RegistryChoice("pipeline.training:OPTIMIZERS"))
@option("--momentum", type=float)
@option("--weight-decay", type=float, help="mlp: L2 on weights (logreg --solver sgd takes it from --C).")
@option("--batch-size", type=COUNT)
@option("--max-epochs", type=COUNT)
@option("--early-stop/--no-early-stop", help="Each mini-batch head stops on its own validation loss.")
@option("--patience", type=COUNT)
@option("--val-cache", type=PATH, help="Validation cache of the same classes.")
@option("--val-fraction", type=SHARE, help="Else hold out this seeded fraction of the cache (stratified by class) "
                                            "[default: 0.2].")
@option("--keep", type=RegistryChoice("pipeline.sweep:KEEP"), help="Head files kept under OUT/heads: the best only, or all.")
@option("--max-iter", type=COUNT, help="logreg lbfgs and svm iterations.")
@option("--block-rows", type=COUNT, help="Rows read from the cache at a time.")
@device_option("Where mini-batch heads train.")
@option("--seed", type=SEED)
@option("--quiet", is_flag=True, help="No progress bars.")
@option("--out", type=PATH, required=True,
        help="Folder for sweep.md, sweep.json, sweep.png, best.pt and heads/.")
@option("--overwrite", is_flag=True, help="Replace best.pt, sweep.json, sweep.md, sweep.png in --out that tl did not write.")
def sweep(layers, heads, C, lr, hidden, optimizer, momentum, weight_decay, batch_size, max_epochs, early_stop,
          patience, device, quiet, **options):
    """Train a grid of heads on one cache (layers x kinds x C x lr x hidden) and rank them on validation.

    Mini-batch heads of a layer train together in one pass over the codes; a sweep run again skips
    the heads it finished. The best is saved as OUT/best.pt, a head file for evaluate, predict, finetune.
    """
    from pipeline.sweep import SweepConfig, run_sweep
    from pipeline.training import TrainingOptions

    _warn_unread(csv_list(heads), options["solver"], early_stop, "--heads")
    training = TrainingOptions(optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
                               max_epochs=max_epochs, early_stop=early_stop, patience=patience, device=device,
                               quiet=quiet)
    result = run_sweep(SweepConfig(layers=csv_list(layers), heads=csv_list(heads), C=_numbers(C, float, "--C"),
                                   lr=_numbers(lr, float, "--lr"), hidden=_layouts(hidden), training=training,
                                   **options), say=(lambda text: None) if quiet else click.echo)
    click.echo(f"wrote {result.out}: {counted(len(result.rows), 'head')} ranked by {result.rows[0]['on']} "
               f"{result.metric} ({result.trained} trained, {result.reused} finished before), {result.seconds:.1f} s")
    for rank, row in enumerate(result.rows[:10], 1):
        click.echo(f"  {rank:>3}. {row['name']:<40} {row['val_score']:.4f}  {row['train_seconds']:.2f} s"
                   + (f"  diverged in epoch {row['diverged']}" if row.get("diverged") else ""))
    if len(result.rows) > 10:
        click.echo(f"  ... {len(result.rows) - 10} more in {result.out / 'sweep.md'}")
    click.echo(f"best: {result.best} ({result.rows[0]['name']}); leaderboard {result.out / 'sweep.md'}")
    return result


def _layouts(text: str | None) -> tuple[tuple[int, ...], ...]:
    """--hidden 0,256,512x256 -> ((), (256,), (512, 256)): 0 alone is an mlp without a hidden layer."""
    try:
        return tuple(() if part.strip() == "0" else tuple(int(width) for width in part.split("x"))
                     for part in csv_list(text))
    except ValueError:
        raise TLError(f"--hidden takes widths such as 256,1024 or 512x256, got '{text}'") from None


@stage_defaults("pipeline.evaluate:EvaluateConfig")
@tl.command()
@config_option
@option("--head", type=PATH, help="Head file written by tl fit-head.")
@option("--cache", type=PATH,
        help="Cache of the data to evaluate on (same backbone, weights and layer as the head's).")
@option("--model", type=PATH, help="Model file written by tl finetune (instead of --head/--cache).")
@option("--data", type=PATH, help="With --model: the images to evaluate on.")
@format_option("With --model:")
@option("--split", help="With --model.")
@option("--classes", help="With --model and voc data.")
@option("--label-key", help="With --model and webdataset data: cls, txt, json or json:FIELD [default: cls].")
@device_option()
@precision_option("With --model: autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
@workers_option()
@option("--batch-size", type=COUNT, help="With --model: images per batch.")
@option("--out", type=PATH, required=True, help="Folder for report.json, report.md, plots.")
@option("--ap", type=RegistryChoice("pipeline.metrics:AP_METHODS"),
        help="AP: VOC 2007 11-point interpolation, or area under the precision envelope.")
@option("--top-k", type=COUNT, help="Also report top-k accuracy (more classes than k).")
@option("--save-predictions", type=PATH,
        help="CSV of every row: sample id, true label(s), every class score.")
@option("--overwrite", is_flag=True, help="Replace report files in --out and a file at --save-predictions that tl did not "
        "write.")
@option("--block-rows", type=COUNT, help="Rows read from the cache at a time.")
@option("--exponent", type=float,
        help="Patch caches: an image's class score is the sum of its patch scores to this power.")
@option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(format_, **options):
    """Accuracy, top-k, per-class precision/recall/F1 and AP, mAP, confusion matrix; a report with plots.

    Either a head on a cache (--head, --cache) or a finetuned model on images (--model, --data).
    """
    from pipeline.evaluate import EvaluateConfig, run_evaluate
    from pipeline.report import summary_table

    result = run_evaluate(EvaluateConfig(format=format_, **options))
    for warning in result.report["source"].get("warnings", []):  # --model's data: a damaged tar, ...
        _warn(f"warning: {warning}")
    if result.skipped:
        first = result.skipped[0]
        click.echo(f"warning: skipped {_images(len(result.skipped))} that could not be read or labelled (listed in "
                   f"report.json's source.skipped), e.g. {first['sample_id']}: {first['reason']}", err=True)
    click.echo(summary_table(result.report))
    named = options.get("save_predictions")  # said on its own line below, wherever it is
    beside = [path.name for path in result.files[2:] if path.parent == Path(result.out)
              and (named is None or path != Path(named))]
    click.echo(f"\nreport: {result.out / 'report.md'}" + (f" (+ {', '.join(beside)})" if beside else ""))
    if options.get("save_predictions"):
        click.echo(f"predictions: {options['save_predictions']}")
    return result


@stage_defaults("pipeline.predict:PredictConfig")
@tl.command()
@click.argument("paths", nargs=-1, required=True, type=PATH)
@option("--head", type=PATH, help="Head file written by tl fit-head.")
@option("--model", type=PATH, help="Or a model file from tl finetune.")
@option("--top-k", type=COUNT, help="Labels per image, best first.")
@option("--weights", type=NamedText(), help="The backbone's state dict file, when the head's cache was made from one.")
@option("--batch-size", type=COUNT)
@workers_option()
@device_option()
@precision_option("Autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
@option("--exponent", type=float,
        help="Multiscale heads: an image's class score is the sum of its patch scores to this power.")
@option("--quiet", is_flag=True, help="No progress bar (on stderr; the rows go to stdout).")
def predict(paths, **options):
    """Label image files and folders: CSV rows path,label,prob (top-k per image) on stdout.

    The backbone and its preprocessing come from the head. Unreadable files are skipped with a warning.
    A multiscale head scores every patch and pools them as tl evaluate does; prob is a class's share.
    """
    import csv

    from pipeline.predict import PredictConfig, run_predict

    rows = csv.writer(sys.stdout, lineterminator="\n")  # main() made it keep non-UTF-8 names as bytes
    labelled, skipped = 0, 0
    warn = lambda text: click.echo(f"warning: {text}", err=True)  # noqa: E731
    for prediction in run_predict(PredictConfig(paths=paths, **options), warn):
        if prediction.error:
            skipped += 1
            click.echo(f"warning: skipped {prediction.path}: {prediction.error}", err=True)
            continue
        if not labelled:  # the header only once something will follow it
            rows.writerow(["path", "label", "prob"])
        labelled += 1
        for label, probability in prediction.labels:
            rows.writerow([prediction.path, label, f"{probability:.6f}"])
    if not labelled:
        raise TLError(f"none of the {skipped} files could be read as an image; pass image files or folders")


@stage_defaults("pipeline.export:ExportConfig")
@tl.command()
@option("--model", type=PATH, required=True, help="Model file written by tl finetune.")
@option("--format", "format_", required=True, type=RegistryChoice("pipeline.export:EXPORT_FORMATS"),
        help=f"onnx needs the onnx extra: {install_extra('onnx')}.")
@option("--out", type=PATH, required=True,
        help="File to write; its input contract goes beside it as OUT.json.")
@option("--raw-pixels/--normalized-input",
        help="Input uint8 RGB 0..255, scaled and normalised inside the model; or float input already "
             "normalised with the backbone's mean and std.")
@option("--opset", type=int, help="onnx: the ONNX opset to write, 18 to 23, for an older runtime [default: the "
        "exporter's].")
@option("--overwrite", is_flag=True, help="Replace files at --out and OUT.json that tl did not write as an export.")
def export(model, format_, out, raw_pixels, opset, overwrite):
    """Write a finetuned model as TorchScript or ONNX (pixels -> probabilities) with its input contract,
    checked against the model on real images (top-1 labels and probabilities)."""
    from pipeline.export import ExportConfig, run_export

    result = run_export(ExportConfig(model, format_, out, raw_pixels=raw_pixels, opset=opset, overwrite=overwrite))
    given, taken = result.contract["input"], result.contract["output"]
    click.echo(f"wrote {result.out} ({format_}) and its contract {result.contract_path}")
    click.echo(f"  input   {given['dtype']} {given['channel_order']} {given['layout']} "
               f"(batch, 3, {given['crop']}, {given['crop']}), "
               + ("values 0..255, normalised inside the model" if raw_pixels else
                  f"normalised: (x / 255 - mean) / std, mean {listed(given['mean'])}, std {listed(given['std'])}"))
    click.echo(f"  prepare {given['preparation']}")
    click.echo(f"  output  {taken['activation']} probabilities of {counted(len(taken['classes']), 'class', 'classes')}")
    click.echo(f"  checked on {result.checked_on}: top-1 agrees on {result.agreeing}/{result.checked}, "
               f"probabilities differ by at most {result.difference:.1e}")


@stage_defaults("pipeline.quickstart:QuickstartConfig")
@tl.command()
@option("--out", type=PATH, help="Folder for the data, caches, head and report.")
@option("--per-class", type=int, help="Digit images per class (before the 75/25 train/test split); 0 for all 1,797.")
@option("--seed", type=SEED)
@option("--quiet", is_flag=True, help="No progress bars.")
def quickstart(out, per_class, seed, quiet):
    """Offline tour: digits -> extract (efficientnet_lite0, real ImageNet weights) -> logreg -> evaluate.

    Re-running reuses the caches already extracted.
    """
    from pipeline.quickstart import QuickstartConfig, run_quickstart

    result = run_quickstart(QuickstartConfig(out=out, per_class=per_class or None, seed=seed, quiet=quiet),
                            say=click.echo)
    click.echo(f"\ndone in {result.seconds:.0f} s: test accuracy {result.accuracy:.3f} (raw pixels: {result.baseline:.3f}). "
               f"Report: {result.report}")
    click.echo(f"next: tl predict --head {result.head} IMAGE...")


@stage_defaults("pipeline.finetune:FinetuneConfig")
@tl.command()
@config_option
@option("--data", type=PATH, required=True, help="Training images (as for tl extract).")
@format_option()
@option("--split")
@option("--classes", help="voc data: voc, auto or a comma list.")
@option("--label-key", help="webdataset data: cls, txt, json or json:FIELD [default: cls].")
@option("--samples-per-class", type=AMOUNT, help="Seeded, stratified subset of N per class (0: every image).")
@option("--head", type=PATH, required=True,
        help="Stage-two head: the model is its backbone up to its layer, then the head.")
@option("--unfreeze", type=Unfreeze(min=0), metavar="N|all",
        help="Also train the last N conv layers (a ViT's: transformer blocks) and every layer after them (0: the "
             "head only; all: every layer).")
@option("--epochs", type=AMOUNT, help="0: only evaluate (and write the model).")
@option("--batch-size", type=COUNT)
@option("--optimizer", type=RegistryChoice("pipeline.training:OPTIMIZERS"))
@option("--lr", type=float, help="Learning rate of the head (small: it starts trained).")
@option("--momentum", type=float)
@option("--weight-decay", type=float, help="L2 on weights (not on biases or BatchNorm scales).")
@option("--lr-steps", type=INTS, help="Epochs after which the lr drops (e.g. 10,20).")
@option("--lr-factors", type=FLOATS, help="Factor of each drop (one value: the same for every step).")
@option("--backbone-lr-scale", type=float, help="Backbone layers learn at lr times this.")
@option("--bn-stats/--no-bn-stats",
        help="Trainable BatchNorm layers update their running statistics (for big batches); by default "
             "they keep ImageNet's and only their scale and shift learn.")
@option("--crop-scale", type=float,
        help="Training crops cover at least this fraction of the image (1: the backbone's centre crop).")
@option("--flip/--no-flip", help="Random horizontal flips in training (off for digits, text, traffic signs).")
@option("--background-fraction", type=float,
        help="Multiscale heads: share of background patches trained on (seeded, as in tl extract).")
@option("--val-data", type=PATH, help="Validation images, same format.")
@option("--val-split", help="Split of --val-data [default: --split].")
@option("--val-fraction", type=HELD_OUT,
        help="Or hold out this seeded fraction of the training images (stratified by class) for validation (0: none).")
@option("--early-stop/--no-early-stop",
        help="Stop after --patience epochs without a lower validation loss; keep the best epoch.")
@option("--patience", type=COUNT)
@option("--backbone", help="Refuse a head made from another backbone.")
@option("--weights", type=NamedText(), help="The backbone's weights file, when the head's codes came from one.")
@option("--resume", is_flag=True, help="Continue from the last checkpoint (OUT.last.ckpt).")
@option("--overwrite", is_flag=True, help="Start over even though a checkpoint exists; replace a file at --out "
                                       "that tl did not write.")
@workers_option()
@device_option()
@precision_option("Autocast dtype of training and validation; auto: float16 with loss scaling on CUDA, "
                  "float32 on the CPU.")
@option("--seed", type=SEED)
@option("--quiet", is_flag=True, help="Only the summary.")
@option("--out", type=PATH, required=True, help="Model file to write (.pt).")
def finetune(**options):
    """Train the head with the last conv layers end to end; a checkpoint every epoch, --resume after a stop."""
    from pipeline.distributed import world
    from pipeline.finetune import run_finetune
    from pipeline.model_files import checkpoint_paths

    config, quiet = _finetune_config(**options), options["quiet"]

    result = run_finetune(config, say=(lambda text: None) if quiet else click.echo,
                          warn=_warn)  # a damaged tar: said even with --quiet
    if not world().is_main:  # under torchrun, rank 0 reports for all
        return
    written = [path.name for path in checkpoint_paths(config.out) if path.exists()]  # --epochs 0 writes none
    click.echo(f"wrote {result.out}: {counted(result.epochs_run, 'epoch')} run"
               + (f" (resumed after epoch {result.resumed_from})" if result.resumed_from else "")
               + (", stopped early" if result.stopped_early else "")
               + (f", kept epoch {result.best_epoch}" if config.early_stop and result.best_epoch else "")
               + (f"; checkpoints {', '.join(written)}" if written else ""))
    if not result.val and not config.epochs:  # --epochs 0 evaluates the validation images: none were given
        click.echo(f"  nothing evaluated (no --val-data or --val-fraction); score it with tl evaluate --model "
                   f"{result.out} --data DIR")
    if result.val:
        click.echo("  validation " + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" if isinstance(v, float)
                                               else f"{k.removeprefix('val_').replace('_', ' ')} {v}"  # skipped images
                                               for k, v in result.val.items()))
    return result


def _finetune_config(format_, lr_steps, lr_factors, **options):
    """finetune's options as its config: for the command, and for tl run's check of a step before any runs."""
    from pipeline.finetune import FinetuneConfig

    return FinetuneConfig(format=format_, lr_steps=_numbers(lr_steps, int, "--lr-steps"),
                          lr_factors=_numbers(lr_factors, float, "--lr-factors"), **options)


class ClickStages:
    """What `tl run` (pipeline.run) needs of the click layer: each stage command's recipe keys, a step
    parsed and type-checked as its command would (nothing runs), and a step run as its command."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.said = SaidWarnings()

    def options(self) -> dict:
        from pipeline.recipe import STAGES, StageOptions

        return {stage: StageOptions(_option_keys(tl.commands[stage]),
                                    {p.name for p in tl.commands[stage].params if getattr(p, "is_flag", False)})
                for stage in STAGES}

    def _context(self, step, defaults: dict) -> click.Context:
        return tl.commands[step.stage].make_context(step.stage, [], default_map=defaults)

    def parse(self, recipe, step) -> dict:
        from pipeline.errors import ConfigError

        keys = {name: key for key, name in _option_keys(tl.commands[step.stage]).items()}
        try:
            return dict(self._context(step, step.defaults).params)
        except click.BadParameter as exc:  # MissingParameter included
            key = keys.get(exc.param.name, exc.param.name) if exc.param is not None else "?"
            if isinstance(exc, click.MissingParameter):
                raise ConfigError(f"recipe {recipe.path}: {step.label} needs '{key}' (its --{key.replace('_', '-')}"
                                  " option)") from None
            raise ConfigError(f"recipe {recipe.path}: {step.label} key '{key}': {exc.message}") from None
        except click.UsageError as exc:
            raise ConfigError(f"recipe {recipe.path}: {step.label}: {exc.format_message()}") from None
        except TLError as exc:  # a list option's value (FLOATS, INTS, LAYOUTS)
            raise ConfigError(f"recipe {recipe.path}: {step.label}: {exc}") from None

    def check(self, step) -> None:
        """fit-head's and finetune's settings checks, on the config their command would build (nothing runs)."""
        if step.stage == "fit-head":
            from pipeline.fit_head import check_config

            check_config(_fit_head_config(**step.params))
        elif step.stage == "finetune":
            from pipeline.finetune import check_config

            check_config(_finetune_config(**step.params), inputs=False)  # recipe.check: made, or on disk

    def execute(self, step, extra: dict):
        defaults = {**step.defaults, **extra, **({"quiet": True} if self.quiet else {})}
        context = self._context(step, defaults)
        context.obj = self.said
        self.said.begin(context.params)
        with context:
            return context.command.invoke(context)


@tl.command("run")
@click.argument("recipe", type=PATH)
@click.option("-s", "--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value: key (every stage), section.key, or section.N.key (N-th step of a "
                   "list section); values read as YAML. Repeatable.")
@click.option("--only", type=RegistryChoice("pipeline.recipe:STAGES"),
              help="Run only this stage's steps.")
@click.option("--from", "start", type=RegistryChoice("pipeline.recipe:STAGES"),
              help="Run this stage's steps and those after them.")
@click.option("--rerun", is_flag=True, help="Run the chosen steps even when their outputs are up to date.")
@click.option("--track", type=click.Choice(("mlflow",)),
              help=f"Log every step as a nested MLflow run (needs the mlflow extra: {install_extra('mlflow')}).")
@click.option("--dry-run", is_flag=True, help="Check the recipe and say which steps would run and why; run and "
                                                "write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(recipe, sets, only, start, rerun, track, dry_run, quiet):
    """Run every stage a recipe names, in order, skipping steps whose outputs are up to date.

    The whole recipe is checked first (keys, types, ranges, paths, layers, no validation on test data); a re-run
    after a crash or a changed setting redoes only what changed.
    """
    from pipeline.run import RunConfig, run_recipe

    result = run_recipe(RunConfig(recipe, tuple(sets), only, start, rerun, track, dry_run), ClickStages(quiet),
                        say=click.echo)
    if dry_run:
        click.echo(f"\ndry run: {counted(len(result.ran), 'step')} would run, {len(result.skipped)} up to date; "
                   "nothing was run or written")
        return result
    click.echo(f"\ndone in {result.seconds:.0f} s: {counted(len(result.ran), 'step')} ran, "
               f"{len(result.skipped)} up to date"
               + "".join(f", {name.replace('_', ' ').replace('exact match', 'exact-match')} {value:.4f}"
                         for name, value in result.metrics.items()
                         if name in ("accuracy", "exact_match_accuracy", "mAP")))
    if result.where:
        click.echo(f"tracked: {result.where}")
    return result


def _invoke(argv: list[str] | None):
    """The command line run by click; a decoding worker's death that torch reports from its SIGCHLD handler,
    wherever the command was, becomes what it is (the stop that took it down, or the one-line TLError) for
    main's handlers below."""
    try:
        code = tl.main(args=argv, prog_name="tl", standalone_mode=False)
        sys.stdout.flush()  # rows still buffered meet a full disk here, for main's one line, not at Python's exit
        return code
    except RuntimeError as exc:
        lost = importlib.import_module("pipeline.hardware").lost_worker(exc) if "torch" in sys.modules else None
        if lost is None:
            raise
        raise (stops.Interrupted() if isinstance(lost, KeyboardInterrupt) else lost) from None


def _counted_extras(extras: list[str]) -> str:
    """click's line for extra arguments, counted rather than listed when there are many: a shell that
    expanded an unquoted `--data 'laion/{00000..99999}.tar'` (or `data/*.tar`) gives one per tar, and the
    line would list them all. Counted from the arguments themselves: a path with a space is one."""
    if len(extras) <= 3:
        return f"Got unexpected extra argument{'s' if len(extras) > 1 else ''} ({' '.join(extras)})"
    hint = ("; the shell expanded a pattern into one argument per tar: quote it (--data 'data/{00000..00099}.tar') "
            "or pass their folder" if any(extra.lower().endswith(".tar") for extra in extras) else "")
    return f"Got {len(extras):,} unexpected extra arguments ({extras[0]} {extras[1]} ...){hint}"


def main(argv: list[str] | None = None) -> None:
    stops.install()
    for stream in (sys.stdout, sys.stderr):
        # file names that are not UTF-8 are printed as their own bytes, not a UnicodeEncodeError
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="surrogateescape")
    try:
        code = _invoke(argv)
    except TLError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a path the system refuses (too long, a loop, no permission) where no stage expected it
        from pipeline.files import FULL, disk_full

        if exc.filename is None and exc.errno in FULL:
            # the one output written without a name (tl's files go through pipeline.files, which names them):
            # `tl predict > rows.csv` on a full disk. What stdout still buffers is dropped, or Python's flush at
            # exit would fail again and add its own report
            sys.stdout = open(os.devnull, "w")
            click.echo(f"error: {disk_full(exc.errno, 'the standard output', ', then run the command again')}",
                       err=True)
            sys.exit(2)
        if exc.filename is None:
            raise
        if exc.errno in FULL:
            click.echo(f"error: {disk_full(exc.errno, exc.filename, '').resumed(f', then {stops.RESUME_HINT}')}", err=True)
        else:
            click.echo(f"error: {exc.strerror or type(exc).__name__}: {exc.filename}; choose another path, or fix "
                       "this one, and run the command again", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, stops.Interrupted):
        stops.STOPPING.set()
        click.echo(f"error: interrupted; {stops.RESUME_HINT}", err=True)
        sys.exit(130)
    except stops.Terminated:
        click.echo(f"error: {stops.terminated_line()}", err=True)
        sys.exit(143)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `tl`: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line like every other error, with where to look
        command = f"tl {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent else "tl --help"
        message = " ".join(exc.format_message().split())  # click lists a choice's values a line each
        click.echo(f"error: {message} (see {command})", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RuntimeError as exc:
        torch = sys.modules.get("torch")  # imported by whatever ran out of its memory; not before
        if torch is None or not isinstance(exc, torch.OutOfMemoryError):
            raise
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        click.echo(f"error: the device ran out of memory ({said}); nothing finished was lost: run the command again "
                   f"with a lower --batch-size ({stops.RESUMES})", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
