"""Stage one on real-looking photos: `tl extract` against the bare forward pass (the limit) and against
the plain torchvision loop a user would write instead, each a whole process of its own, in one run.

The photo set has the size mix of real collections (bench/photos.py; or your own with --photos DIR).
The bare forward pass runs the same tap model on pre-made channels_last tensors already on the device
(no decoding, no copying in, no writing): tl's graph (BatchNorm folded, pipeline/folding.py) and, in a
column of its own, the eager graph torchvision's create_feature_extractor gives, which a user's own
forward pass runs. The plain loop is ImageFolder + DataLoader (2 workers) +
torchvision's Resize/CenterCrop/ToTensor/Normalize + create_feature_extractor, codes kept in memory.
`tl extract` reports the share of its loop spent waiting for decoded batches, in the forward pass
and writing shards. Multiscale extraction (alexnet) is measured in patches/s against the bare rate.
On the CPU, decoding takes cores the forward pass would use, so the script also measures tl's decoding
alone and reports the shared-core bound: the rate if both ran at full speed on all cores in turn.
On CUDA the script also measures a finetune training step. Writes its table to bench/RESULTS.md.
Every measure runs --rounds times, back to back within a round; the table holds the medians.

    python bench/extract_throughput.py                    # CPU: alexnet, efficientnet_lite0
    python bench/extract_throughput.py --device cuda --precision float32,float16,bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.backbones import TapModel, get_backbone, load_model, prepare_model, resolve_weights  # noqa: E402
from pipeline.hardware import (autocast, grad_scaler, prepare_module, resolve_device,  # noqa: E402
                               resolve_precision, to_device)
from pipeline.allocator import reused_memory  # noqa: E402
from pipeline.multiscale import DEFAULT_SCALES  # noqa: E402
from photos import describe, write_photo_set  # noqa: E402
from results import publish, row_differences  # noqa: E402

SECTION = "## extract throughput"
DEFAULT_BACKBONES = {"cuda": "alexnet,vgg16,resnet50", "cpu": "alexnet,efficientnet_lite0"}


def _weights(name: str) -> str:
    return "imagenet" if name == "efficientnet_lite0" else "none"  # the offline weights; others random


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the measures, each run in its own process


def measure_bare(name: str, images: int, batch_size: int, device: torch.device, precision: str,
                 graph: str = "tl") -> dict:
    """Images/s of the frozen tap model on a batch already on the device, codes copied back, with host
    memory reused between batches as tl's stages run (allocator.reused_memory). `graph`: "tl", the model
    tl extract runs (prepare_model: BatchNorm folded, folding.py), or "eager", the tap model as
    torchvision's create_feature_extractor gives it (what a user's own forward pass runs)."""
    backbone = get_backbone(name)
    weights = resolve_weights(backbone, _weights(name))
    if graph == "tl":
        model = prepare_model(backbone, weights, [backbone.default_tap], device)
    else:
        model = prepare_module(TapModel(load_model(backbone, weights), backbone, [backbone.default_tap]), device)
    batch = to_device(torch.randn(batch_size, 3, backbone.input_size, backbone.input_size), device)
    batches = max(2, -(-images // batch_size))
    with torch.inference_mode(), autocast(device, precision), reused_memory(device):
        model(batch)  # warm-up: allocator, cudnn algorithm choice
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            model(batch)[backbone.default_tap].float().cpu()
        seconds = time.perf_counter() - started
    return {"rate": batches * batch_size / seconds}


def measure_plain_loop(name: str, photos: Path, batch_size: int, device: torch.device, workers: int) -> dict:
    """What a user writes in ten minutes: ImageFolder, DataLoader, torchvision transforms, a feature
    extractor on the backbone's tap, codes gathered in a list."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    backbone = get_backbone(name)
    model = TapModel(load_model(backbone, resolve_weights(backbone, _weights(name))), backbone,
                     [backbone.default_tap]).to(device).eval()
    transform = transforms.Compose([transforms.Resize(backbone.resize_size), transforms.CenterCrop(backbone.input_size),
                                    transforms.ToTensor(), transforms.Normalize(backbone.mean, backbone.std)])
    loader = DataLoader(datasets.ImageFolder(str(photos), transform), batch_size=batch_size, num_workers=workers)
    codes, count = [], 0
    started = time.perf_counter()
    with torch.inference_mode():
        for pixels, _ in loader:
            codes.append(model(pixels.to(device))[backbone.default_tap].cpu().numpy())
            count += len(pixels)
    return {"rate": count / (time.perf_counter() - started)}


def measure_decoding(name: str, photos: Path, batch_size: int, device: torch.device, workers: int | None,
                     decode: str) -> dict:
    """Images/s of tl extract's decoding alone: its loader (workers, decoding mode, uint8 crops in
    channels_last), every batch taken and dropped, no forward pass."""
    from pipeline.formats import DEFAULT_FORMAT, open_source
    from pipeline.image_sets import image_loader

    backbone = get_backbone(name)
    source = open_source(DEFAULT_FORMAT, photos)
    batches = [list(range(start, min(start + batch_size, len(source)))) for start in range(0, len(source), batch_size)]
    count = 0
    started = time.perf_counter()
    for pixels, indices, errors in image_loader(source, backbone, batches, workers, device, decode):
        count += len(indices) + len(errors)
    return {"rate": count / (time.perf_counter() - started)}


def measure_tl(name: str, photos: Path, out: Path, batch_size: int, device: str, precision: str,
               workers: int | None, decode: str, multiscale: bool, device_decode: str = "auto",
               scales: str = "") -> dict:
    from pipeline.extract import ExtractConfig, run_extract
    from pipeline.multiscale import PatchSettings

    options = {}
    if multiscale:
        options = {"format": "voc", "split": "test", "classes": "auto", "multiscale": True,
                   "patches": PatchSettings(_scales(scales))}
    result = run_extract(ExtractConfig(data=photos, out=out, backbone=name, weights=_weights(name),
                                       batch_size=batch_size, workers=workers, device=device, precision=precision,
                                       decode=decode, shard_rows=8 if multiscale else 128, quiet=True,
                                       device_decode=device_decode, **options))
    loop = result.loop_seconds
    count = result.patches if multiscale else result.images_processed
    return {"rate": count / loop, "wait": result.wait_seconds / loop, "forward": result.forward_seconds / loop,
            "write": result.write_seconds / loop, "rows": result.rows}


def _scales(text: str) -> tuple[float, ...]:
    return tuple(float(scale) for scale in text.split(","))


def train_step_rate(name: str, batch_size: int, steps: int, device: torch.device, precision: str) -> float:
    """Images/s of `tl finetune`'s training step through the whole backbone and a 10-class linear head."""
    from pipeline.model_files import FinetuneModel
    from pipeline.finetune import training_step

    backbone = get_backbone(name)
    features = TapModel(load_model(backbone, resolve_weights(backbone, "none")), backbone, [backbone.default_tap])
    head = torch.nn.Linear(backbone.taps[backbone.default_tap].width, 10)
    model = prepare_module(FinetuneModel(features, backbone.default_tap, head), device)
    images = to_device(torch.randn(batch_size, 3, backbone.input_size, backbone.input_size), device)
    targets = torch.randint(0, 10, (batch_size,), device=device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler, loss_function = grad_scaler(device, precision), torch.nn.CrossEntropyLoss()
    training_step(model, images, targets, loss_function, optimizer, scaler, device, precision)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, images, targets, loss_function, optimizer, scaler, device, precision)
    return steps * batch_size / (time.perf_counter() - started)


def _measure_main(args) -> None:
    """One measure in this process; prints its JSON result as the last line."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if args.measure in ("bare", "bare-eager"):
        result = measure_bare(args.backbones, args.images, args.batch_size, device, precision,
                              "eager" if args.measure == "bare-eager" else "tl")
    elif args.measure == "loop":
        result = measure_plain_loop(args.backbones, Path(args.photos), args.batch_size, device, args.loop_workers)
    elif args.measure == "decoding":
        result = measure_decoding(args.backbones, Path(args.photos), args.batch_size, device, args.workers,
                                  args.decode)
    elif args.measure == "train":
        result = {"rate": train_step_rate(args.backbones, args.batch_size, args.train_steps, device, precision)}
    else:
        result = measure_tl(args.backbones, Path(args.photos), Path(args.out), args.batch_size, args.device,
                            precision, args.workers, args.decode, args.measure == "tl-multiscale", args.device_decode,
                            args.multiscale_scales)
    print(json.dumps(result))


def code_difference(fast: Path, exact: Path) -> tuple[float, float, float]:
    """(median, 95th percentile, max) of the row-wise relative difference of two caches' codes."""
    from cache.reader import CacheReader

    first, second = CacheReader(fast), CacheReader(exact)
    tap = next(iter(first.taps))
    a, b = first.load(tap).astype(np.float64), second.load(tap).astype(np.float64)
    relative = row_differences(a, b)
    return float(np.median(relative)), float(np.percentile(relative, 95)), float(relative.max())


def _in_process(measure: str, name: str, args, **extra) -> dict:
    """Run one measure as a whole process of its own; its wall time is recorded beside its rate."""
    command = [sys.executable, __file__, "--measure", measure, "--backbones", name, "--device", args.device,
               "--batch-size", str(args.batch_size), "--images", str(args.images), "--train-steps",
               str(args.train_steps or 1), "--loop-workers", str(args.loop_workers)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    if "out" in extra:  # every run extracts afresh (the last run's cache stays, for code_difference)
        shutil.rmtree(extra["out"], ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{measure} {name} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - started}


def shared_core_bound(forward_rate: float, decoding_rate: float) -> float:
    """Images/s of a pipeline whose decoding and forward pass share the same cores, each at its full
    rate on all of them and nothing lost to switching: per image, 1/forward + 1/decoding seconds of the
    whole machine. On the CPU this, not the bare forward pass, is the limit of any extraction that decodes."""
    return 1.0 / (1.0 / forward_rate + 1.0 / decoding_rate)


def in_rounds(measures: dict, rounds: int) -> dict:
    """{label: the median of each figure over `rounds` runs, figure by figure (a row's rate, shares and
    wall may come from different runs)}: the measures run back to back, round after round, so that a
    slow minute of this shared machine touches every measure of one round alike."""
    if rounds < 1:
        raise SystemExit(f"--rounds must be 1 or more, got {rounds}")
    runs: dict[str, list[dict]] = {label: [] for label in measures}
    for _ in range(rounds):
        for label, measure in measures.items():
            runs[label].append(measure())
    return {label: {key: float(np.median([run[key] for run in results])) for key in results[0]
                    if isinstance(results[0][key], (int, float))} for label, results in runs.items()}


# ------------------------------------------------------------------ the run


def _voc_of(photos: Path, root: Path) -> Path:
    """The photo set as a VOC devkit split `test` (one box per image), for the multiscale measure."""
    from PIL import Image

    base = root / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for number, path in enumerate(sorted(photos.rglob("*.jpg"))):
        image_id = f"{number:06d}"
        (base / "JPEGImages" / f"{image_id}.jpg").symlink_to(path.resolve())
        with Image.open(path) as image:
            width, height = image.size
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height></size><object><name>thing</name>"
            f"<bndbox><xmin>{width // 4}</xmin><ymin>{height // 4}</ymin><xmax>{3 * width // 4}</xmax>"
            f"<ymax>{3 * height // 4}</ymax></bndbox></object></annotation>")
        ids.append(image_id)
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return base


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=960, help="photos to make (ignored with --photos)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every measure; the table holds medians")
    parser.add_argument("--photos", default=None, help="an ImageFolder of your own photos instead")
    parser.add_argument("--backbones", default=None, help="comma list [default: per device, see above]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="tl extract's decoding workers [default: tl's]")
    parser.add_argument("--loop-workers", type=int, default=2, help="the plain loop's DataLoader workers")
    parser.add_argument("--decode", default="fast,exact", help="tl extract decoding modes to measure")
    parser.add_argument("--multiscale-images", type=int, default=12, help="photos for the multiscale row (0: none)")
    parser.add_argument("--multiscale-scales", default=",".join(f"{scale:g}" for scale in DEFAULT_SCALES),
                        help="patch scales of the multiscale row [default: tl's, the paper's 13]")
    parser.add_argument("--train-steps", type=int, default=None, help="[default: 20 on CUDA, none on the CPU]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="comma list: rows per precision")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--device-decode", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.measure:
        return _measure_main(args)
    device = resolve_device(args.device)
    names = (args.backbones or DEFAULT_BACKBONES[device.type]).split(",")
    steps = args.train_steps if args.train_steps is not None else (20 if device.type == "cuda" else 0)
    rows, multiscale_rows, differences = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photos = Path(args.photos) if args.photos else scratch / "photos"
        summary = describe(photos) if args.photos else write_photo_set(photos, args.images)
        for name in names:
            for asked in args.precision.split(","):
                precision = resolve_precision(asked, device)
                common = {"precision": precision, "images": summary["count"]}
                measures = {"bare": lambda: _in_process("bare", name, args, **common),
                            "bare eager": lambda: _in_process("bare-eager", name, args, **common),
                            "loop": lambda: _in_process("loop", name, args, photos=photos, **common)}
                labels = []
                for decode in args.decode.split(","):
                    variants = [(decode, "auto")]
                    if device.type == "cuda":  # the same, with JPEGs decoded in workers instead of on the GPU
                        variants.append((f"{decode}, workers", "off"))
                    if device.type == "cpu":  # decoding alone, on the cores the forward pass also needs
                        measures[f"decoding {decode}"] = (lambda decode=decode: _in_process(
                            "decoding", name, args, photos=photos, decode=decode, **common))
                    for label, device_decode in variants:
                        out = scratch / f"c-{name}-{precision}-{label.replace(', ', '-')}"
                        measures[label] = (lambda decode=decode, device_decode=device_decode, out=out: _in_process(
                            "tl", name, args, photos=photos, out=out, decode=decode, device_decode=device_decode,
                            **common))
                        labels.append(label)
                medians = in_rounds(measures, args.rounds)
                for label in labels:
                    rows.append((name, precision, label, medians[label], medians["bare"], medians["bare eager"],
                                 medians["loop"], medians.get(f"decoding {label}")))
                train = _in_process("train", name, args, train_steps=steps, **common)["rate"] if steps else None
                rows[-1] = rows[-1] + (train,)
                modes = args.decode.split(",")
                if {"fast", "exact"} <= set(modes):
                    differences.append((name, precision, code_difference(scratch / f"c-{name}-{precision}-fast",
                                                                         scratch / f"c-{name}-{precision}-exact")))
            if args.multiscale_images and name == "alexnet":
                voc = _voc_of(photos, scratch / f"voc-{name}")
                kept = sorted((voc / "ImageSets" / "Main" / "test.txt").read_text().split())[:args.multiscale_images]
                (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(kept) + "\n")
                precision = resolve_precision("auto", device)
                measures = {"bare": lambda: _in_process("bare", name, args, precision=precision, images=512)}
                for decode in args.decode.split(","):
                    measures[decode] = (lambda decode=decode: _in_process(
                        "tl-multiscale", name, args, photos=voc, out=scratch / f"m-{name}-{decode}", decode=decode,
                        precision=precision, images=0, multiscale_scales=args.multiscale_scales))
                medians = in_rounds(measures, args.rounds)
                multiscale_rows += [(name, len(kept), decode, medians[decode], medians["bare"])
                                    for decode in args.decode.split(",")]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{summary['count']} JPEG photos ({'--photos' if args.photos else 'bench/photos.py'}: median "
              f"{summary['median_pixels'] / 1e3:.0f} kpx, {summary['megapixels']:.0f} Mpx in all, "
              f"{summary['bytes'] / 2**20:.0f} MiB), batch {args.batch_size}, device {where}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
              f"Each figure is the median of {args.rounds} whole processes (figure by figure), the measures run back "
              "to back in each round; rates count the loop, walls the whole process. "
              f"Command: `python bench/extract_throughput.py {command}`")
    table = ["| backbone | precision | decode (on CUDA: JPEGs on the GPU unless 'workers') | tl extract img/s "
             "| bare forward img/s | bare forward, eager graph img/s | plain loop img/s | decoding alone img/s "
             "| shared-core bound img/s | tl / bare | tl / bare eager | tl / bound | tl / loop | waiting for decoding "
             "| forward | writing | walls tl / bare / loop (s) | finetune step img/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, precision, decode, tl, bare, eager, loop, decoding, *train in rows:
        step = f"{train[0]:.1f}" if train and train[0] else "–"
        alone, bound, share = "–", "–", "–"
        if decoding:
            limit = shared_core_bound(bare["rate"], decoding["rate"])
            alone, bound, share = f"{decoding['rate']:.1f}", f"{limit:.1f}", f"{tl['rate'] / limit:.2f}"
        table.append(f"| {name} | {precision} | {decode} | {tl['rate']:.1f} | {bare['rate']:.1f} | {eager['rate']:.1f} "
                     f"| {loop['rate']:.1f} | {alone} | {bound} | {tl['rate'] / bare['rate']:.2f} "
                     f"| {tl['rate'] / eager['rate']:.2f} | {share} | {tl['rate'] / loop['rate']:.2f} "
                     f"| {tl['wait']:.0%} | {tl['forward']:.0%} | {tl['write']:.1%} | {tl['wall']:.0f} / "
                     f"{bare['wall']:.0f} / {loop['wall']:.0f} | {step} |")
    if differences:
        table += ["", "Codes of `--decode fast` against `--decode exact` on the same photos (row-wise relative "
                  "difference ||fast - exact|| / ||exact||):", "",
                  "| backbone | precision | median | 95th percentile | max |", "|---|---|---:|---:|---:|"]
        table += [f"| {n} | {p} | {d[0]:.4f} | {d[1]:.4f} | {d[2]:.4f} |" for n, p, d in differences]
    if multiscale_rows:
        table += ["", f"Multiscale (scales {args.multiscale_scales}, every patch kept):", "",
                  "| backbone | photos | decode | tl extract patches/s | bare forward img/s | tl / bare "
                  "| waiting for decoding |", "|---|---:|---|---:|---:|---:|---:|"]
        table += [f"| {n} | {count} | {decode} | {tl['rate']:.1f} | {bare['rate']:.1f} "
                  f"| {tl['rate'] / bare['rate']:.2f} | {tl['wait']:.0%} |" for n, count, decode, tl, bare in multiscale_rows]
    publish(f"{SECTION} ({where})", header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
