"""Fixtures that write tiny data sets in real formats, and a helper that runs the `tl` CLI in-process."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    """A small picture with structure (a gradient and a block), not plain noise, in any PIL mode."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    base[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 256, 3)
    image = Image.fromarray(base)
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=4, size=(48, 40)) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i:02d}.png", seed=100 * c + i, size=size)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def write_cifar10(root: Path, per_batch=6, seed=0) -> Path:
    """The CIFAR-10 python layout: pickled dicts with uint8 `data` rows (3x32x32) and `labels`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, handle)
    return root


def write_gtsrb(root: Path, classes=(0, 2, 42)) -> Path:
    """torchvision's GTSRB layout: Training/<class>/*.ppm, Final_Test/Images/*.ppm + GT-final_test.csv."""
    base = root / "gtsrb" / "GTSRB"
    for class_id in classes:
        for i in range(2):
            write_image(base / "Training" / f"{class_id:05d}" / f"{class_id:05d}_{i:05d}.ppm", seed=class_id * 10 + i)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, class_id in enumerate((5, 42, 0)):
        name = f"{i:05d}.ppm"
        write_image(base / "Final_Test" / "Images" / name, seed=500 + i)
        rows.append(f"{name};48;40;1;1;47;39;{class_id}")
    (root / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def run_tl(capsys):
    """Run `tl ARGS...` in this process; returns exit code, stdout and stderr."""
    from cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


STAGE_IN_A_CHILD = ("import importlib, pickle, sys; module, name = sys.argv[1].split(':'); "
                    "getattr(importlib.import_module(module), name)(pickle.load(sys.stdin.buffer))")


def start_stage(stage: str, config, **popen) -> subprocess.Popen:
    """Run a stage function (`module:function`) on a config object in a child Python process, so that a test
    can kill it mid-run; the config travels pickled on stdin."""
    process = subprocess.Popen([sys.executable, "-c", STAGE_IN_A_CHILD, stage], cwd=REPO, stdin=subprocess.PIPE,
                               **popen)
    process.stdin.write(pickle.dumps(config))
    process.stdin.close()
    return process


def blobs(seed=0, n=300, classes=4, width=32, spread=2.5, draw=0):
    """Gaussian classes: `seed` fixes the class centres, `draw` the samples drawn around them."""
    centres = np.random.default_rng(seed).normal(0, 1, (classes, width)) * 3
    rng = np.random.default_rng([seed, draw])
    targets = rng.integers(0, classes, n)
    return centres[targets] + rng.normal(0, spread, (n, width)), targets


def multi_label_blobs(seed=0, n=400, classes=3, width=24, draw=0):
    """Multi-hot targets: class c is present when a fixed random direction c scores above a threshold."""
    directions = np.random.default_rng(seed).normal(0, 1, (classes, width))
    rng = np.random.default_rng([seed, draw])
    codes = rng.normal(0, 1, (n, width))
    margins = codes @ directions.T / np.sqrt(width) + rng.normal(0, 0.2, (n, classes))
    return codes, (margins > 0.3).astype(np.int64)


def write_code_cache(root: Path, codes: np.ndarray, targets: np.ndarray, classes, shard_rows=64, layer="feat",
                     backbone="synthetic", dtype="float32") -> Path:
    """A finished cache of given codes (no images behind it), written through the real CacheWriter."""
    from cache.writer import CacheWriter

    key = {"backbone": backbone, "weights": "synthetic", "taps": [layer], "precision": "float32",
           "preprocessing": {"resize": 0, "crop": 0, "mean": [0, 0, 0], "std": [1, 1, 1]},
           "dataset": {"format": "synthetic", "rows": len(codes)},
           "layout": {"dtype": dtype, "shard_rows": shard_rows}, "patches": None}
    kind = "multi-hot" if np.ndim(targets) == 2 else "class"
    with CacheWriter(root, key, list(classes), {layer: codes.shape[1]}, dtype, shard_rows, len(codes),
                     target_kind=kind) as writer:
        for index, start in enumerate(range(0, len(codes), shard_rows)):
            stop = min(start + shard_rows, len(codes))
            writer.write_shard(index, {layer: codes[start:stop]}, np.asarray(targets[start:stop]),
                               [f"row{i:05d}" for i in range(start, stop)], [])
        writer.finish()
    return root



def cache_document(cache: Path) -> dict:
    """A cache's manifest.json with its shard records folded in (`shards` without their skipped samples,
    `skipped` with their shard; a later record of a shard supersedes an earlier one), the shape tests read and edit; `write_cache_document` writes one back."""
    import json

    document = json.loads((Path(cache) / "manifest.json").read_text())
    records_file = Path(cache) / "shards.jsonl"
    records = [json.loads(line) for line in records_file.read_text().splitlines()] if records_file.exists() else []
    records = sorted({record["index"]: record for record in records}.values(), key=lambda record: record["index"])
    document["shards"] = [{k: v for k, v in record.items() if k != "skipped"} for record in records]
    document["skipped"] = [dict(item, shard=record["index"]) for record in records for item in record["skipped"]]
    return document


def write_cache_document(cache: Path, document: dict) -> None:
    """Write a (possibly edited) `cache_document` back as manifest.json and shards.jsonl."""
    import json

    document = dict(document)
    shards, skipped = document.pop("shards", []), document.pop("skipped", [])
    lines = []
    for shard in shards:
        items = [{k: v for k, v in item.items() if k != "shard"} for item in skipped
                 if isinstance(shard, dict) and item.get("shard") == shard.get("index")]
        lines.append(json.dumps({**shard, "skipped": items}) + "\n")
    (Path(cache) / "manifest.json").write_text(json.dumps(document))
    (Path(cache) / "shards.jsonl").write_text("".join(lines))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) members in the given order, as webdataset and img2dataset write them."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def write_webdataset(folder: Path, tars=3, per_tar=5, classes=3, size=(48, 40)) -> Path:
    """`tars` tars of `per_tar` PNG images each with a `.cls` label (sample k of all has class k % classes)
    and the same pictures as an imagefolder beside them (`folder/images/CLASS/TAR_KEY.png`)."""
    for t in range(tars):
        members = []
        for i in range(per_tar):
            k = t * per_tar + i
            image = write_image(folder / "images" / f"c{k % classes}" / f"{t:05d}_{k:06d}.png", seed=k, size=size)
            members += [(f"{k:06d}.png", image.read_bytes()), (f"{k:06d}.cls", str(k % classes).encode())]
        write_tar(folder / "tars" / f"{t:05d}.tar", members)
    return folder / "tars"


def disk_full_at(monkeypatch, call: int, error_number: int | None = None) -> None:
    """The disk fills at the `call`-th fsync of tl's writers (pipeline.files): a write that fails midway, with
    ENOSPC, or the `error_number` given (EFBIG: a file past its size limit)."""
    import errno
    import os

    import pipeline.files

    fsync, calls = pipeline.files.os.fsync, []
    error_number = errno.ENOSPC if error_number is None else error_number

    def filling(handle):
        calls.append(handle)
        if len(calls) == call:
            raise OSError(error_number, os.strerror(error_number))
        return fsync(handle)

    monkeypatch.setattr(pipeline.files.os, "fsync", filling)
