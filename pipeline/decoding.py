"""Decoding modes: how an image becomes the uint8 centre crop a backbone sees (in DataLoader workers),
and the normalisation that turns a batch of such crops into the backbone's input (once per batch).

`exact` is torchvision's Resize (bilinear, antialiased) + CenterCrop on the fully decoded image. `fast`
keeps exactly that geometry but decodes a JPEG at the smallest DCT scale still at least the resized
size and resamples only the cropped region: pixel-identical for photos that cannot be reduced (most
near 500x375), a mean difference of about 1/255 for larger ones, and several times faster on those.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline import DECODE_MODES, DEFAULT_DECODE  # noqa: F401  (the CLI lists them without torch)


def resize_geometry(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) as torchvision's Resize(resize) and
    CenterCrop(crop) compute them, in pixels of the resized image."""
    if width <= height:
        resized = (resize, int(resize * height / width))
    else:
        resized = (int(resize * width / height), resize)
    left, top = int(round((resized[0] - crop) / 2.0)), int(round((resized[1] - crop) / 2.0))
    return resized[0], resized[1], left, top


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 from an RGB image, without a float copy."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class ExactCrop:
    """torchvision's Resize + CenterCrop on the fully decoded image: the reference pixels."""

    draft = None  # decode at full size

    def __init__(self, resize: int, crop: int):
        from torchvision import transforms

        self.transform = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(crop)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _as_tensor(self.transform(image))


class FastCrop:
    """The same crop from a JPEG decoded at reduced scale, resampling only the cropped region."""

    def __init__(self, resize: int, crop: int):
        self.resize, self.crop = resize, crop

    def draft(self, width: int, height: int) -> tuple[int, int]:
        """The size to decode at least: the image resized as ExactCrop would resize it."""
        return resize_geometry(width, height, self.resize, self.crop)[:2]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.info.get("original_size", image.size)
        resized_width, resized_height, left, top = resize_geometry(width, height, self.resize, self.crop)
        # the crop's box in the pixels of the image as decoded (which may be 1/2, 1/4 or 1/8 scale)
        scale_x, scale_y = image.size[0] / resized_width, image.size[1] / resized_height
        box = (left * scale_x, top * scale_y, (left + self.crop) * scale_x, (top + self.crop) * scale_y)
        return _as_tensor(image.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=box,
                                       reducing_gap=3.0))


def crop_decoder(mode: str, resize: int, crop: int):
    """The PIL image -> (3, crop, crop) uint8 transform of a decoding mode; its `draft` goes to
    Source.read_image."""
    from pipeline.errors import TLError

    if mode not in DECODE_MODES:
        raise TLError(f"unknown --decode {mode}; valid: {', '.join(DECODE_MODES)}")
    return (FastCrop if mode == "fast" else ExactCrop)(resize, crop)


def decode_of(preprocessing: dict) -> str:
    """The decoding mode recorded in a cache key's preprocessing (absent: exact)."""
    return preprocessing.get("decode", "exact")


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 scaled to [0, 1] and normalised, on the batch's device; the same
    float32 operations as torchvision's ToTensor + Normalize, so the values are identical."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return pixels.float().div_(255.0).sub_(mean).div_(std)
