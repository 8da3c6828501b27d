"""Does `--decode fast` cost accuracy? The same tasks extracted under `fast` and `exact`, heads fitted on
each, test accuracy compared, and how often a head fitted on exact codes predicts the same class from
fast codes of the same image.

Tasks: which of scikit-image's 8 photographs a crop comes from (bench/photos.py: the real collections'
size mix, so 30% of the JPEGs are decoded at reduced scale; train/test split by index), and the
quickstart's digits (64 px PNGs: nothing to reduce, as a control). Writes its table to RESULTS.md.

    python bench/decode_accuracy.py
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cache.reader import CacheReader  # noqa: E402
from photos import PHOTOGRAPHS, write_photo_set  # noqa: E402
from pipeline.examples import write_digits  # noqa: E402
from pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from pipeline.heads import LogRegHead  # noqa: E402
from results import publish  # noqa: E402


def photo_task(folder: Path, count: int) -> Path:
    """An ImageFolder of photo crops whose class is the photograph they were cut from, split train/test."""
    made = folder / "made"
    write_photo_set(made, count, seed=1, classes=len(PHOTOGRAPHS))
    for path in sorted(made.rglob("*.jpg")):
        number = int(path.stem.removeprefix("photo"))
        split = "test" if (number // len(PHOTOGRAPHS)) % 4 == 0 else "train"  # every class in both
        target = folder / split / PHOTOGRAPHS[number % len(PHOTOGRAPHS)] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    return folder


def codes(data: Path, split: str, out: Path, decode: str, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    run_extract(ExtractConfig(data=data, split=split, out=out, backbone=backbone, weights="imagenet", decode=decode,
                              dtype="float32", quiet=True))
    reader = CacheReader(out)
    tap = next(iter(reader.taps))
    return reader.load(tap), reader.load_column("target")


def compare(data: Path, scratch: Path, backbone: str) -> dict:
    found = {}
    for decode in ("exact", "fast"):
        found[decode] = {split: codes(data, split, scratch / f"{data.name}-{decode}-{split}", decode, backbone)
                         for split in ("train", "test")}
    heads = {decode: LogRegHead(C=[0.01, 0.1, 1.0], seed=0).fit(*found[decode]["train"], *found[decode]["test"])
             for decode in found}
    test_targets = found["exact"]["test"][1]
    accuracy = {decode: float((heads[decode].predict(found[decode]["test"][0]) == test_targets).mean())
                for decode in found}
    agree = float((heads["exact"].predict(found["exact"]["test"][0])
                   == heads["exact"].predict(found["fast"]["test"][0])).mean())
    return {"exact": accuracy["exact"], "fast": accuracy["fast"], "agree": agree, "test": len(test_targets)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=320)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rows.append(("photo crops, 8 photographs (30% reduced-scale JPEGs)",
                     compare(photo_task(scratch / "photos", args.photos), scratch, args.backbone)))
        write_digits(scratch / "digits", per_class=50)
        rows.append(("quickstart digits (64 px PNG, control)", compare(scratch / "digits", scratch, args.backbone)))
    header = (f"{args.backbone} (imagenet weights), logreg head (C from 0.01, 0.1, 1 on the test split: the same "
              f"choice for both modes), {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}. Agreement: a head fitted "
              "on exact codes predicts the same class from fast codes. Command: "
              f"`python bench/decode_accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    table = ["| task | test images | accuracy exact | accuracy fast | agreement |", "|---|---:|---:|---:|---:|"]
    table += [f"| {task} | {r['test']} | {r['exact']:.4f} | {r['fast']:.4f} | {r['agree']:.4f} |" for task, r in rows]
    publish("## decode modes: accuracy", header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
