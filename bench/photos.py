"""A photo set with the size mix of real collections, made offline from scikit-image's photographs.

70% near 500x375 or 375x500 (ImageNet, PASCAL VOC), 25% near 1024x768, 5% 4032x3024 (phone cameras);
JPEG quality 75 to 95 with 4:2:0 chroma subsampling, as cameras and web pipelines write them. Each
image is a random crop of one of the bundled photographs, scaled to its size, with a little sensor
grain so upscaled crops are not unnaturally smooth (which would make them cheap to decode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "stereo_motorcycle")
SIZE_MIX = ((0.70, (500, 375)), (0.25, (1024, 768)), (0.05, (4032, 3024)))


def _photographs() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in PHOTOGRAPHS:
        photo = getattr(skimage.data, name)()
        photos.append(np.asarray(photo[0] if isinstance(photo, tuple) else photo)[..., :3])
    return photos


def photo_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of each image: the size mix, each size jittered by up to 8%, half of the
    ImageNet-sized ones in portrait."""
    rng = np.random.default_rng(seed)
    shares = np.array([share for share, _ in SIZE_MIX])
    counts = np.floor(shares * count).astype(int)
    counts[0] += count - counts.sum()
    sizes = []
    for (share, (width, height)), number in zip(SIZE_MIX, counts):
        for _ in range(number):
            jitter = rng.uniform(0.92, 1.0) if width < 4000 else 1.0
            w, h = int(width * jitter), int(height * jitter)
            sizes.append((h, w) if width == 500 and rng.random() < 0.5 else (w, h))
    order = rng.permutation(len(sizes))
    return [sizes[i] for i in order]


def write_photo_set(folder: Path, count: int, seed: int = 0, classes: int = 4) -> dict:
    """Write `count` JPEGs as an ImageFolder (`folder/classK/photoNNNNN.jpg`); returns a summary of the
    set (pixel counts, bytes, size mix) for the benchmark header."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    photos = _photographs()
    pixels, total_bytes = [], 0
    for index, (width, height) in enumerate(photo_sizes(count, seed)):
        photo = photos[index % len(photos)]
        rows, cols = photo.shape[:2]
        aspect = width / height
        crop_h = int(rng.uniform(0.6, 1.0) * min(rows, cols / aspect))
        crop_w = int(crop_h * aspect)
        top, left = rng.integers(0, rows - crop_h + 1), rng.integers(0, cols - crop_w + 1)
        crop = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
        image = np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 2.5, image.shape[:2])[..., None]
        image = Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))
        path = folder / f"class{index % classes}" / f"photo{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=int(rng.integers(75, 96)), subsampling=2)
        pixels.append(width * height)
        total_bytes += path.stat().st_size
    pixels = np.array(pixels)
    return {"count": count, "median_pixels": int(np.median(pixels)), "megapixels": float(pixels.sum() / 1e6),
            "bytes": total_bytes}


def describe(folder: Path) -> dict:
    """The same summary for a folder of photos given with --photos (any nesting, JPEG or not)."""
    files = [p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    pixels = []
    for path in files:
        with Image.open(path) as image:
            pixels.append(image.size[0] * image.size[1])
    pixels = np.array(pixels or [0])
    return {"count": len(files), "median_pixels": int(np.median(pixels)), "megapixels": float(pixels.sum() / 1e6),
            "bytes": sum(p.stat().st_size for p in files)}
