"""Small real image sets that install offline, written as ImageFolders for demos and tests.

scikit-learn's handwritten digits: 1,797 8x8 scans, upscaled so a backbone sees more than a few pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError


def write_digits(out: Path, test_fraction: float = 0.25, seed: int = 0, size: int = 64,
                 per_class: int | None = None) -> dict[str, int]:
    """Write `out/train/<digit>/*.png` and `out/test/<digit>/*.png`, split per class with a seed.

    `per_class` keeps only that many images of each digit (before the split), for quick runs.
    Returns the number of images written to each split. Existing identical files are left alone.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    out = Path(out)
    try:
        for label in range(10):
            members = np.flatnonzero(digits.target == label)
            members = rng.permutation(members)[: per_class or len(members)]
            test_count = max(1, int(round(len(members) * test_fraction)))
            for rank, index in enumerate(members):
                split = "test" if rank < test_count else "train"
                folder = out / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                path = folder / f"digit-{index:04d}.png"
                if not path.exists():
                    image.save(path)
                counts[split] += 1
    except OSError as exc:
        raise DataError(f"cannot write example images to {out}: {exc.strerror}; choose another folder") from None
    return counts
