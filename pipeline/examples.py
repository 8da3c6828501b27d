"""Small image sets made offline, for demos, benchmarks and tests: scikit-learn's handwritten digits
(1,797 8x8 scans, upscaled) as an ImageFolder, and drawn shapes in the PASCAL VOC devkit layout.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.files import write_bytes


def digits_split(test_fraction: float = 0.25, seed: int = 0, per_class: int | None = None) -> dict[str, list[int]]:
    """{"train": [...], "test": [...]}: indices into scikit-learn's digits, split per class with a seed;
    `per_class` keeps only that many of each digit (before the split)."""
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    if per_class is not None and (per_class < 0 or per_class == 1):  # [:-1] would drop one of each
        raise DataError(f"--per-class must be 0 (all) or at least 2 (one test and one training image of each "
                        f"digit), got {per_class}")
    targets = load_digits().target
    rng = np.random.default_rng(seed)
    split: dict[str, list[int]] = {"train": [], "test": []}
    for label in range(10):
        members = rng.permutation(np.flatnonzero(targets == label))[: per_class or None]
        test_count = max(1, int(round(len(members) * test_fraction)))
        split["test"] += [int(index) for index in members[:test_count]]
        split["train"] += [int(index) for index in members[test_count:]]
    return split


def write_digits(out: Path, test_fraction: float = 0.25, seed: int = 0, size: int = 64,
                 per_class: int | None = None) -> dict[str, int]:
    """Write `out/train/<digit>/*.png` and `out/test/<digit>/*.png`, split per class with a seed.

    `per_class` keeps only that many images of each digit (before the split), for quick runs.
    Returns the number of images written to each split. Existing identical files are left alone (a
    cache of them stays fresh); digit files an earlier call with other settings wrote there are
    removed, so the splits never mix.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {"train": 0, "test": 0}
    out = Path(out)
    written = set()
    try:
        for split, indices in digits_split(test_fraction, seed, per_class).items():
            for index in indices:
                folder = out / split / str(digits.target[index])
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                path = folder / f"digit-{index:04d}.png"
                encoded = io.BytesIO()
                image.save(encoded, format="PNG")
                if not path.is_file() or path.read_bytes() != encoded.getvalue():  # another --size wrote it
                    write_bytes(path, encoded.getbuffer(), "example image")  # atomic: never half an image
                written.add(path)
                counts[split] += 1
        for split in counts:  # only this function's own files: other files in the folder are the user's
            for path in (out / split).glob("[0-9]/digit-[0-9][0-9][0-9][0-9].png"):
                if path not in written:
                    path.unlink()
    except OSError as exc:
        raise DataError(f"cannot write example images to {out}: {exc.strerror}; choose another folder") from None
    return counts


SHAPES = {"square": (220, 40, 40), "disc": (40, 200, 60), "bar": (50, 80, 230)}


def write_shapes_voc(root: Path, splits: dict[str, int], size=(120, 90), seed=0, with_size=True) -> Path:
    """A VOC devkit year folder of drawn shapes: each image holds one or two objects (a red square, a
    green disc or a blue bar, 30-50 px) on a noisy grey ground, with Annotations/*.xml (1-based boxes)
    and ImageSets/Main/<split>.txt, `splits` giving the image count of each. Returns the folder
    (ROOT/VOCdevkit/VOC2007). A stand-in for PASCAL VOC that needs no download."""
    from PIL import ImageDraw

    base = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    number = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            number += 1
            image_id = f"{number:06d}"
            ids.append(image_id)
            pixels = rng.normal(128, 20, (height, width, 3)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            objects = []
            for name in rng.choice(list(SHAPES), size=rng.integers(1, 3), replace=False):
                side = int(rng.integers(30, 51))
                x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
                box = (x0, y0, x0 + side - 1, y0 + side - 1)
                if name == "disc":
                    draw.ellipse(box, fill=SHAPES[name])
                elif name == "bar":
                    box = (x0, y0 + side // 3, x0 + side - 1, y0 + 2 * side // 3)
                    draw.rectangle(box, fill=SHAPES[name])
                else:
                    draw.rectangle(box, fill=SHAPES[name])
                objects.append((name, box))
            image.save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_voc_annotation(base, image_id, objects, size if with_size else None)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


def write_voc_annotation(base: Path, image_id: str, objects, size=None, difficult=()) -> None:
    """objects: (name, (x0, y0, x1, y1)) with 0-based inclusive pixels, written 1-based as VOC does."""
    parts = [f"<annotation><filename>{image_id}.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for number, (name, (x0, y0, x1, y1)) in enumerate(objects):
        parts.append(f"<object><name>{name}</name><difficult>{int(number in difficult)}</difficult><bndbox>"
                     f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax>"
                     "</bndbox></object>")
    (base / "Annotations" / f"{image_id}.xml").write_text("".join(parts) + "</annotation>\n")
