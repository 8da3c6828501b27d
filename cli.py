"""The `tl` command line: parse flags (and --config files), call one pipeline function, print, exit.

User errors (TLError) print one `error: ...` line and exit 2; run as `tl ...` or `python -m cli ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline import DATA_FORMATS, DECODE_MODES, DEFAULT_DECODE, DEVICES, PRECISIONS
from pipeline.errors import TLError

# -------------------------------------------------------------- options several commands share



def device_option(default: str = "auto", help: str = "auto: CUDA when present (under torchrun, each rank's own GPU)."):
    return click.option("--device", default=default, show_default=True, type=click.Choice(DEVICES), help=help)


def precision_option(help: str):
    return click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help=help)


def workers_option():
    return click.option("--workers", default=None, type=int,
                        help="Decoding processes [default: the cores shared among this machine's ranks, at most 16].")


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
    defaults = command_defaults(
        Path(value), ctx.info_name, _option_keys(ctx.command),
        known={key for command in commands for key in _option_keys(command)},
        sections={command.name for command in commands},
        flags={param.name for param in ctx.command.params if getattr(param, "is_flag", False)})
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
    help="YAML file of option: value pairs; flags given on the command line win.",
)


def _csv_list(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


# -------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tl", message="tl %(version)s")
def tl():
    """tl: transfer learning for image classification, in stages.

    \b
    1. tl extract    run a frozen ImageNet backbone over images, cache its codes (HDF5 shards)
    2. tl fit-head   train logistic regression / MLP / SVM heads on cached codes
    3. tl finetune   unfreeze the last conv layers and train end to end
    4. tl evaluate   accuracy, confusion matrix, per-class AP and mAP, with a report
    """


@tl.command()
@config_option
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Image folder, CSV file (path,label rows) or data set root.")
@click.option("--format", "format_", default="imagefolder", show_default=True,
              type=click.Choice(DATA_FORMATS), help="How --data is laid out.")
@click.option("--split", default="train", show_default=True,
              help="Split to read (imagefolder: DATA/SPLIT when that folder exists).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="alexnet, vgg16, resnet50 or efficientnet_lite0.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (published weights), none (seeded random init) or a state dict PATH.")
@click.option("--layers", default=None, help="Comma-separated taps, e.g. fc6,fc7 [default: the backbone's last].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Cache folder to write.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--shard-rows", default=None, type=int,
              help="Images per shard file [default: 4096; 32 with --multiscale].")
@click.option("--compression", default="none", show_default=True, type=click.Choice(["none", "lzf", "gzip"]))
@click.option("--batch-size", default=64, show_default=True, type=int)
@workers_option()
@device_option()
@precision_option("Autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
@click.option("--samples-per-class", default=None, type=int, help="Seeded, stratified subset of N per class.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--decode", default=DEFAULT_DECODE, show_default=True, type=click.Choice(DECODE_MODES),
              help="fast: JPEGs decoded at reduced scale (DCT domain) to the smallest size still at least the "
                   "resize target, only the crop resampled; exact: torchvision's Resize + CenterCrop on the full "
                   "image. Part of the cache key: heads refuse codes of the other mode.")
@click.option("--on-error", default="skip", show_default=True, type=click.Choice(["skip", "fail"]),
              help="Unreadable image: skip it (recorded in the manifest) or stop.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with other settings.")
@click.option("--download", is_flag=True, help="Download cifar10/gtsrb when missing.")
@click.option("--classes", default="voc", show_default=True,
              help="voc data: voc (the 20 classes), auto (names found in the annotations), or a comma list.")
@click.option("--multiscale", is_flag=True, help="Oquab et al. patches at many scales instead of one centre crop.")
@click.option("--scales", default=None,
              help="--multiscale: comma-separated; the patch side is (min(H, W) - 1) / scale "
                   "[default: the paper's 13, 1.0 1.3 1.6 2.0 ... 4.6 5.0].")
@click.option("--patch-overlap", default=0.2, show_default=True, type=float,
              help="--multiscale: a box labels a patch when it covers this share of the patch...")
@click.option("--box-overlap", default=0.6, show_default=True, type=float,
              help="...and the patch this share of the box.")
@click.option("--background-fraction", default=0.1, show_default=True, type=float,
              help="--multiscale, train/trainval splits: share of background patches kept (seeded).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(format_, layers, scales, patch_overlap, box_overlap, background_fraction, **options):
    """Run a frozen backbone over every image and cache the codes of chosen layers.

    Re-running the same command resumes: finished shards are kept, the rest are written.
    """
    from pipeline.extract import ExtractConfig, run_extract

    from pipeline.multiscale import PatchSettings

    patches = PatchSettings(_numbers(scales, float, "--scales") if scales else PatchSettings.scales, patch_overlap,
                            box_overlap, background_fraction)
    from pipeline.distributed import world

    config = ExtractConfig(format=format_, layers=_csv_list(layers), patches=patches, **options)
    result = run_extract(config)
    if not world().is_main:  # under torchrun, rank 0 reports for all
        return
    rate = result.images_processed / result.loop_seconds if result.loop_seconds else 0.0
    click.echo(f"wrote {result.out}: {result.rows} rows, {result.shards_written} shards new, "
               f"{result.shards_reused} reused, {len(result.skipped)} images skipped")
    for tap, width in result.taps.items():
        click.echo(f"  {tap:<8} width {width:<6} {config.dtype}")
    click.echo(f"  size on disk {_human_bytes(result.bytes_on_disk)}, time {result.seconds:.1f} s"
               + (f" ({rate:.1f} img/s)" if result.images_processed else ""))
    if result.patches:
        click.echo(f"  {result.patches} patches from {result.images_processed} images")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.skipped:
        first = result.skipped[0]
        click.echo(f"warning: skipped {len(result.skipped)} unreadable images (listed in the manifest's "
                   f"'skipped'), e.g. {first['sample_id']}: {first['reason']}", err=True)


@tl.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every shard's checksum and columns.")
def info(cache, verify):
    """Describe a cache: backbone, taps, classes, rows, shards; --verify checks every shard."""
    from cache.manifest import load_manifest
    from cache.reader import CacheReader

    manifest = load_manifest(cache)
    key = manifest["key"]
    shards = manifest["shards"]
    classes = manifest["classes"]
    state = "complete" if manifest["complete"] else "INCOMPLETE (re-run tl extract to finish)"
    click.echo(f"cache      {cache} ({state})")
    click.echo(f"backbone   {key['backbone']}   weights {key['weights']}   precision {key['precision']}")
    pre = key["preprocessing"]
    rounded = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
    click.echo(f"input      resize {pre['resize']}, crop {pre['crop']}, mean {rounded(pre['mean'])}, "
               f"std {rounded(pre['std'])}")
    data = key["dataset"]
    click.echo(f"data       {data.get('format')} split {data.get('split')}, fingerprint "
               f"{str(data.get('fingerprint'))[:12]}"
               + (f", {data['samples_per_class']} per class" if data.get("samples_per_class") else ""))
    if key["patches"]:
        patches = key["patches"]
        kept = data.get("background_fraction")
        click.echo(f"patches    scales {', '.join(f'{s:g}' for s in patches['scales'])}; a box labels a patch "
                   f"covering {patches['patch_overlap']:g} of it and {patches['box_overlap']:g} of the box; "
                   + (f"{kept:g} of background kept" if kept is not None else "every patch kept"))
    for tap, spec in manifest["taps"].items():
        click.echo(f"layer      {tap:<8} width {spec['width']:<6} {spec['dtype']}")
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    click.echo(f"classes    {len(classes)}: {shown}")
    size = sum(s["bytes"] for s in shards)
    click.echo(f"rows       {sum(s['rows'] for s in shards)} of {manifest['num_samples']} samples in "
               f"{len(shards)}/{manifest['num_shards']} shards, {_human_bytes(size)}")
    if manifest["skipped"]:
        click.echo(f"skipped    {len(manifest['skipped'])} unreadable images, e.g. "
                   f"{manifest['skipped'][0]['sample_id']}: {manifest['skipped'][0]['reason']}")
    click.echo(f"written    by tl {manifest['tl_version']}, {manifest['created']} .. {manifest.get('updated', '')}")
    if verify:
        problems = CacheReader(cache, verify=False, allow_partial=True).verify_all()
        if problems:
            for problem in problems[:-1]:
                click.echo(f"problem    {problem}", err=True)
            raise TLError(f"{len(problems)} problems in {cache}: {problems[-1]}")
        click.echo(f"verified   {len(shards)} shards, checksums match")


@tl.command("example-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--per-class", default=None, type=int, help="Keep only N images of each digit.")
@click.option("--seed", default=0, show_default=True, type=int)
def example_data(out, per_class, seed):
    """Write scikit-learn's handwritten digits as an ImageFolder (OUT/train, OUT/test); offline."""
    from pipeline.examples import write_digits

    counts = write_digits(out, seed=seed, per_class=per_class)
    click.echo(f"wrote {counts['train']} train and {counts['test']} test images to {out}")


@tl.command("fit-head")
@config_option
@click.option("--cache", type=click.Path(path_type=Path), required=True, help="Cache folder written by tl extract.")
@click.option("--layer", default=None, help="Layer of the cache to train on [default: its only layer].")
@click.option("--head", default="logreg", show_default=True, type=click.Choice(["logreg", "mlp", "svm"]),
              help="logreg: logistic regression; mlp: softmax MLP (torch); svm: linear SVMs one-vs-rest.")
@click.option("--C", "c_values", default="1.0", show_default=True,
              help="logreg/svm inverse regularization; a comma-separated list picks the best on validation "
                   "(svm: per class, by AP).")
@click.option("--solver", default="lbfgs", show_default=True, type=click.Choice(["lbfgs", "sgd"]),
              help="logreg: lbfgs loads the layer in memory; sgd streams it in mini-batches.")
@click.option("--hidden", default="4096", show_default=True,
              help="mlp: comma-separated hidden widths (ReLU + dropout after each); empty for none.")
@click.option("--dropout", default=0.5, show_default=True, type=float, help="mlp: dropout after each hidden layer.")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]),
              help="mlp and logreg --solver sgd.")
@click.option("--lr", default=None, type=float, help="Learning rate [default: 0.05 sgd, 0.001 adam].")
@click.option("--lr-steps", default="", help="Epochs after which the lr drops by --lr-factor (e.g. 10,20); "
                                               "none: cosine decay to zero over --max-epochs.")
@click.option("--lr-factor", default=0.1, show_default=True, type=float)
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum.")
@click.option("--weight-decay", default=5e-4, show_default=True, type=float,
              help="mlp: L2 on weights (logreg --solver sgd takes it from --C).")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--max-epochs", default=20, show_default=True, type=int)
@click.option("--early-stop/--no-early-stop", default=False, show_default=True,
              help="Stop when the validation loss has not improved for --patience epochs; keep the best epoch.")
@click.option("--patience", default=3, show_default=True, type=int)
@device_option("cpu", "Where mlp and sgd heads train; cuda reads the cache in pinned batches.")
@click.option("--val-cache", type=click.Path(path_type=Path), default=None, help="Validation cache of the same classes.")
@click.option("--val-fraction", type=float, default=None,
              help="Hold out this seeded fraction instead (stratified by class).")
@click.option("--max-iter", default=1000, show_default=True, type=int, help="logreg lbfgs and svm iterations.")
@click.option("--block-rows", default=4096, show_default=True, type=int,
              help="Rows read from the cache at a time: bounds memory when streaming.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Head file to write (.pt).")
def fit_head(c_values, hidden, optimizer, lr, lr_steps, lr_factor, momentum, weight_decay, batch_size, max_epochs,
             early_stop, patience, device, quiet, **options):
    """Train a head on the codes of one cached layer and save it as one file."""
    from pipeline.fit_head import FitHeadConfig, fit_head as run_fit_head
    from pipeline.training import TrainingOptions

    grid = _numbers(c_values, float, "--C")
    widths = _numbers(hidden, int, "--hidden")
    training = TrainingOptions(optimizer, lr, _numbers(lr_steps, int, "--lr-steps"), lr_factor, momentum, weight_decay,
                               batch_size, max_epochs, early_stop, patience, device, quiet)
    result = run_fit_head(FitHeadConfig(C=grid or (1.0,), hidden=widths, training=training, **options))
    click.echo(f"wrote {result.out}: {options['head']} on {result.layer}, {result.train_rows} training rows"
               + (f", chosen {result.chosen}" if result.chosen else ""))
    click.echo(f"  train {result.metric} {result.train_score:.4f}"
               + (f", validation {result.metric} {result.val_score:.4f} ({result.val_rows} rows)"
                  if result.val_score is not None else ""))


def _numbers(text: str | None, kind, flag: str) -> tuple:
    try:
        return tuple(kind(value) for value in _csv_list(text))
    except ValueError:
        raise TLError(f"{flag} takes {kind.__name__} numbers separated by commas, got '{text}'") from None


@tl.command()
@config_option
@click.option("--head", type=click.Path(path_type=Path), default=None, help="Head file written by tl fit-head.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Cache of the data to evaluate on (same backbone, weights and layer as the head's).")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Model file written by tl finetune (instead of --head/--cache).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="With --model: the images to evaluate on.")
@click.option("--format", "format_", default="imagefolder", show_default=True,
              type=click.Choice(DATA_FORMATS), help="With --model.")
@click.option("--split", default="test", show_default=True, help="With --model.")
@click.option("--classes", default="voc", show_default=True, help="With --model and voc data.")
@device_option()
@precision_option("With --model: autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
@workers_option()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for report.json, report.md, plots.")
@click.option("--ap", default="voc07", show_default=True, type=click.Choice(["voc07", "area"]),
              help="AP: VOC 2007 11-point interpolation, or area under the precision envelope.")
@click.option("--top-k", default=5, show_default=True, type=int, help="Also report top-k accuracy (more classes than k).")
@click.option("--save-predictions", type=click.Path(path_type=Path), default=None,
              help="CSV of every row: sample id, true label(s), every class score.")
@click.option("--block-rows", default=4096, show_default=True, type=int, help="Rows read from the cache at a time.")
@click.option("--exponent", default=5.0, show_default=True, type=float,
              help="Patch caches: an image's class score is the sum of its patch scores to this power.")
def evaluate(format_, **options):
    """Accuracy, top-k, per-class precision/recall/F1 and AP, mAP, confusion matrix; a report with plots.

    Either a head on a cache (--head, --cache) or a finetuned model on images (--model, --data).
    """
    from pipeline.evaluate import EvaluateConfig, run_evaluate
    from pipeline.report import summary_table

    result = run_evaluate(EvaluateConfig(format=format_, **options))
    click.echo(summary_table(result.report))
    click.echo(f"\nreport: {result.out / 'report.md'} (+ {', '.join(p.name for p in result.files[2:])})")


@tl.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--head", type=click.Path(path_type=Path), default=None, help="Head file written by tl fit-head.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Or a model file from tl finetune.")
@click.option("--top-k", default=5, show_default=True, type=int, help="Labels per image, best first.")
@click.option("--weights", default=None, help="The backbone's state dict file, when the head's cache was made from one.")
@click.option("--batch-size", default=32, show_default=True, type=int)
@workers_option()
@device_option()
@precision_option("Autocast dtype; auto is float16 on CUDA, float32 on the CPU.")
def predict(paths, **options):
    """Label image files and folders: CSV rows path,label,prob (top-k per image) on stdout.

    The backbone and its preprocessing come from the head. Unreadable files are skipped with a warning.
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


@tl.command()
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Model file written by tl finetune.")
@click.option("--format", "format_", required=True, type=click.Choice(["torchscript", "onnx"]))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File to write.")
def export(model, format_, out):
    """Write a finetuned model as TorchScript or ONNX (pixels -> probabilities), checked on a sample batch."""
    from pipeline.export import export_model

    difference = export_model(model, format_, out)
    click.echo(f"wrote {out} ({format_}); largest difference from the model on a sample batch {difference:.1e}")


@tl.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("tl-quickstart"), show_default=True,
              help="Folder for the data, caches, head and report.")
@click.option("--per-class", default=50, show_default=True, type=int,
              help="Digit images per class (before the 75/25 train/test split); 0 for all 1,797.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quickstart(out, per_class, seed, quiet):
    """Offline tour: digits -> extract (efficientnet_lite0, real ImageNet weights) -> logreg -> evaluate.

    Re-running reuses the caches already extracted.
    """
    from pipeline.quickstart import QuickstartConfig, run_quickstart

    result = run_quickstart(QuickstartConfig(out, per_class or None, seed=seed, quiet=quiet), say=click.echo)
    click.echo(f"\ndone in {result.seconds:.0f} s: test accuracy {result.accuracy:.3f}. Report: {result.report}")
    click.echo(f"next: tl predict --head {result.head} IMAGE...")


@tl.command()
@config_option
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Training images (as for tl extract).")
@click.option("--format", "format_", default="imagefolder", show_default=True,
              type=click.Choice(DATA_FORMATS))
@click.option("--split", default="train", show_default=True)
@click.option("--classes", default="voc", show_default=True, help="voc data: voc, auto or a comma list.")
@click.option("--samples-per-class", default=None, type=int, help="Seeded, stratified subset of N per class.")
@click.option("--head", type=click.Path(path_type=Path), required=True,
              help="Stage-two head: the model is its backbone up to its layer, then the head.")
@click.option("--unfreeze", default=0, show_default=True, type=int,
              help="Also train the last N conv layers and every layer after them (0: the head only).")
@click.option("--epochs", default=10, show_default=True, type=int, help="0: only evaluate (and write the model).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]))
@click.option("--lr", default=1e-4, show_default=True, type=float,
              help="Learning rate of the head (small: it starts trained).")
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--lr-steps", default="", help="Epochs after which the lr drops (e.g. 10,20).")
@click.option("--lr-factors", default="0.1", show_default=True,
              help="Factor of each drop (one value: the same for every step).")
@click.option("--backbone-lr-scale", default=0.1, show_default=True, type=float,
              help="Backbone layers learn at lr times this.")
@click.option("--bn-stats/--no-bn-stats", default=False, show_default=True,
              help="Trainable BatchNorm layers update their running statistics (for big batches); by default "
                   "they keep ImageNet's and only their scale and shift learn.")
@click.option("--crop-scale", default=0.5, show_default=True, type=float,
              help="Training crops cover at least this fraction of the image (1: the backbone's centre crop).")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Random horizontal flips in training (off for digits, text, traffic signs).")
@click.option("--background-fraction", default=0.1, show_default=True, type=float,
              help="Multiscale heads: share of background patches trained on (seeded, as in tl extract).")
@click.option("--val-data", type=click.Path(path_type=Path), default=None, help="Validation images, same format.")
@click.option("--val-split", default=None, help="Split of --val-data [default: --split].")
@click.option("--early-stop/--no-early-stop", default=False, show_default=True,
              help="Stop after --patience epochs without a lower validation loss; keep the best epoch.")
@click.option("--patience", default=3, show_default=True, type=int)
@click.option("--backbone", default=None, help="Refuse a head made from another backbone.")
@click.option("--weights", default=None, help="The backbone's weights file, when the head's codes came from one.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint (OUT.last.ckpt).")
@click.option("--overwrite", is_flag=True, help="Start over even though a checkpoint exists.")
@workers_option()
@device_option()
@precision_option("Autocast dtype of training and validation; auto: float16 with loss scaling on CUDA, "
                  "float32 on the CPU.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="Only the summary.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model file to write (.pt).")
def finetune(format_, lr_steps, lr_factors, quiet, **options):
    """Train the head with the last conv layers end to end; a checkpoint every epoch, --resume after a stop."""
    from pipeline.finetune import FinetuneConfig, run_finetune
    from pipeline.model_files import checkpoint_paths

    config = FinetuneConfig(format=format_, lr_steps=_numbers(lr_steps, int, "--lr-steps"),
                            lr_factors=_numbers(lr_factors, float, "--lr-factors"), quiet=quiet, **options)
    from pipeline.distributed import world

    result = run_finetune(config, say=(lambda text: None) if quiet else click.echo)
    if not world().is_main:  # under torchrun, rank 0 reports for all
        return
    last, best = checkpoint_paths(config.out)
    click.echo(f"wrote {result.out}: {result.epochs_run} epochs run"
               + (f" (resumed after epoch {result.resumed_from})" if result.resumed_from else "")
               + (", stopped early" if result.stopped_early else "")
               + (f", kept epoch {result.best_epoch}" if config.early_stop and result.best_epoch else "")
               + f"; checkpoints {last.name}" + (f", {best.name}" if best.exists() else ""))
    if result.val:
        click.echo("  validation " + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" if isinstance(v, float)
                                               else f"{k.removeprefix('val_')} {v}" for k, v in result.val.items()))




class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `finally` and atomic write cleans up as for Ctrl-C."""


def _terminated(signum, frame):
    raise Terminated()


RESUME_HINT = ("nothing finished was lost: run the same command again (tl extract resumes its shards; "
               "tl finetune: add --resume)")


def main(argv: list[str] | None = None) -> None:
    import signal

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminated)
    for stream in (sys.stdout, sys.stderr):
        # file names that are not UTF-8 are printed as their own bytes, not a UnicodeEncodeError
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="surrogateescape")
    try:
        code = tl.main(args=argv, prog_name="tl", standalone_mode=False)
    except TLError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo(f"error: interrupted; {RESUME_HINT}", err=True)
        sys.exit(130)
    except Terminated:
        click.echo(f"error: stopped by SIGTERM; {RESUME_HINT}", err=True)
        sys.exit(143)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `tl`: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line like every other error, with where to look
        command = f"tl {exc.ctx.info_name} --help" if exc.ctx is not None and exc.ctx.parent else "tl --help"
        click.echo(f"error: {exc.format_message()} (see {command})", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
