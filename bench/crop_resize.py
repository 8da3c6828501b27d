"""`--decode fast`'s resize: torch's uint8 kernel (torchvision's Resize on uint8 tensors, what tl uses)
against Pillow's resize of the crop's box (what tl used before), on the photo mix, one core.

Each photo is decoded as `--decode fast` decodes it (at reduced DCT scale where that loses nothing),
then cropped by each resize; the per-image time covers decoding and cropping, rounds alternate
which of the two goes first, and the table holds the fastest round of each. Pixels are compared with
`--decode exact` (Pillow's full decode and Resize + CenterCrop). Writes its table to RESULTS.md.

    python bench/crop_resize.py                  # builds 960 photos (bench/photos.py)
    python bench/crop_resize.py --photos DIR     # or your own
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from photos import describe, write_photo_set  # noqa: E402
from pipeline.datasets import open_rgb  # noqa: E402
from pipeline.decoding import _as_tensor, crop_decoder, resize_and_crop, resize_geometry  # noqa: E402
from results import publish  # noqa: E402

SECTION = "## fast decoding: the crop's resize"
TURBO = "simplejpeg M/8 scaled decode, torch uint8 resize"


class PillowBoxCrop:
    """The fast mode's crop before: Pillow resizes only the crop's box of the decoded image."""

    def __init__(self, resize: int, crop: int, interpolation: str):
        self.resize, self.crop = resize, crop
        self.resample = Image.Resampling[interpolation.upper()]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.info.get("original_size", image.size)
        resized_width, resized_height, left, top = resize_geometry(width, height, self.resize, self.crop)
        scale_x, scale_y = image.size[0] / resized_width, image.size[1] / resized_height
        box = (left * scale_x, top * scale_y, (left + self.crop) * scale_x, (top + self.crop) * scale_y)
        return _as_tensor(image.resize((self.crop, self.crop), self.resample, box=box, reducing_gap=3.0))


class TurboScaledCrop:
    """A lever measured and not taken: libjpeg-turbo's decoding at any scale M/8 (simplejpeg, where Pillow's
    draft has 1/2, 1/4, 1/8), to the smallest size still at least the resize, then torch's uint8 resize."""

    def __init__(self, resize: int, crop: int, interpolation: str):
        import simplejpeg

        self.decode_jpeg, self.header = simplejpeg.decode_jpeg, simplejpeg.decode_jpeg_header
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __call__(self, path: Path) -> torch.Tensor:
        data = path.read_bytes()
        height, width = self.header(data)[:2]
        least_width, least_height = resize_geometry(width, height, self.resize, self.crop)[:2]
        pixels = self.decode_jpeg(data, "RGB", min_height=least_height, min_width=least_width)
        return resize_and_crop(torch.from_numpy(pixels).permute(2, 0, 1), (width, height), self.resize, self.crop,
                               self.interpolation)


def decoders(interpolation: str) -> dict:
    """name -> path -> (3, 224, 224) uint8 crop: Pillow's draft decode with each resize, and libjpeg-turbo's
    M/8 scaled decode where simplejpeg is installed (pip install simplejpeg; not a dependency of tl)."""
    fast = crop_decoder("fast", 256, 224, interpolation)
    box = PillowBoxCrop(256, 224, interpolation)
    found = {"Pillow draft, Pillow resize of the crop's box": lambda path: box(open_rgb(str(path), fast.draft)),
             "Pillow draft, torch uint8 resize (tl)": lambda path: fast(open_rgb(str(path), fast.draft))}
    if importlib.util.find_spec("simplejpeg") is not None:
        found[TURBO] = TurboScaledCrop(256, 224, interpolation)
    return found


def measure(files: list[Path], interpolation: str, rounds: int) -> list[dict]:
    """Per decoder: fastest ms per image (decode + crop), and how its pixels compare with exact's."""
    crops = decoders(interpolation)
    fast = crop_decoder("fast", 256, 224, interpolation)
    seconds = {name: [] for name in crops}
    for crop in crops.values():  # imports and first calls out of the timing
        crop(files[0])
    for round_ in range(rounds):
        for name, crop in (list(crops.items()) if round_ % 2 == 0 else reversed(crops.items())):
            started = time.perf_counter()
            for path in files:
                crop(path)
            seconds[name].append(time.perf_counter() - started)
    exact = crop_decoder("exact", 256, 224, interpolation)
    reference = [exact(open_rgb(str(path))).int() for path in files]
    reduced = np.array([open_rgb(str(path), fast.draft).size != open_rgb(str(path)).size for path in files])
    rows = []
    for name, crop in crops.items():
        pixels = [crop(path).int() for path in files]
        kept = [(p, r) for p, r, small in zip(pixels, reference, reduced) if not small]  # Pillow: decoded at full size
        smaller = [(p, r) for p, r, small in zip(pixels, reference, reduced) if small]
        rows.append({"resize": name, "ms": 1000 * min(seconds[name]) / len(files),
                     "differing": np.mean([(p != r).float().mean().item() for p, r in kept]) if kept else 0.0,
                     "worst": max((int((p - r).abs().max()) for p, r in kept), default=0),
                     "mean reduced": np.mean([(p - r).abs().float().mean().item() for p, r in smaller]) if smaller
                     else 0.0})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=None, help="a folder of photos [default: 960 built by bench/photos.py]")
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--interpolations", default="bilinear,bicubic")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a decoding worker
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.photos) if args.photos else Path(scratch) / "photos"
        summary = describe(folder) if args.photos else write_photo_set(folder, args.images)
        files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in (".jpg", ".jpeg"))
        table = ["| interpolation | decode, resize | decode + crop, ms per image | share of pixels differing from exact, "
                 "photos Pillow does not reduce | largest difference there (levels) | mean difference, reduced photos (levels) |",
                 "|---|---|---:|---:|---:|---:|"]
        for interpolation in args.interpolations.split(","):
            for row in measure(files, interpolation, args.rounds):
                table.append(f"| {interpolation} | {row['resize']} | {row['ms']:.2f} | {row['differing']:.4f} | "
                             f"{row['worst']} | {row['mean reduced']:.3f} |")
    header = (f"{summary['count']} photos (median {summary['median_pixels']:,} pixels), resized to 256 and cropped "
              f"to 224, one thread, {platform.machine()} CPU, fastest of {args.rounds} alternating rounds. Command: "
              f"`python bench/crop_resize.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
              + ("" if importlib.util.find_spec("simplejpeg") else f" (simplejpeg is not installed: no row '{TURBO}')"))
    publish(SECTION, header, table, write=not args.no_write)


if __name__ == "__main__":
    main()
