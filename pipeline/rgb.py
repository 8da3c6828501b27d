"""Image files to 8-bit RGB, as every data format decodes them: a file opened only when it is a regular one,
Pillow's decompression-bomb limit on the pixels decoded, JPEGs drafted, any mode and depth made RGB.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

# Decoding errors PIL raises for corrupt, truncated or unsupported files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled (not clipped), transparency over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if pixels.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if pixels.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if isinstance(image.info.get("transparency"), int):  # a 16-bit gray PNG's colour key, in its 16-bit values
            scaled[pixels == image.info["transparency"]] = 255  # over white
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in ("P", "1", "L", "RGB") and "transparency" in image.info:
        # a palette entry or, in gray and RGB PNGs, a colour key (tRNS) marks the transparent pixels: composited
        # too, not left in the key's colour (the export contract says transparency is composited over white)
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def open_rgb(path: str, draft=None) -> Image.Image:
    """Decode a file fully (so truncation shows here, not later) and return it as RGB.

    `draft(width, height)` gives the smallest size the caller needs: a JPEG is then decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) still at least that large, several times faster for a photo
    larger than needed; `info["original_size"]` keeps the size before that reduction."""
    named = isinstance(path, (str, os.PathLike))
    with open_regular(path) if named else contextlib.nullcontext(path) as handle:
        try:
            image = _open_within_limit(handle, draft is not None)
        except UnidentifiedImageError:
            if not named:
                raise
            # named by its path, as Pillow names a file it opens itself (not by its file object)
            raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None
        with image:
            original = image.size
            # an MPO is a JPEG too (Pillow's name for one carrying a preview, as many phones and cameras write)
            if draft is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                image.draft(image.mode, draft(*original))
            _refuse_bomb(image.size, "at reduced scale" if image.size != original else "at full size")
            layout = image.tile[0][3] if image.format == "PNG" and image.tile else None  # gone once loaded
            image.load()
            if "transparency" in image.info and layout in ("L;2", "L;4", "RGB;16B"):
                image = _colour_key_as_alpha(image, layout, handle)
            rgb = to_rgb(image)
            rgb.info["original_size"] = original
            return rgb


def _colour_key_as_alpha(image: Image.Image, layout: str, handle: BinaryIO) -> Image.Image:
    """A PNG's transparent colour (tRNS) is in the file's own values, but Pillow decodes 2- and 4-bit gray scaled
    to 0..255 and 16-bit colour as each value's high byte: the gray key is scaled as its pixels are, and a 16-bit
    colour key is matched on whole values (the low bytes decoded again from the file), not on high bytes that other
    colours share (it turned those white and left the key's own pixels as they were)."""
    key = image.info.pop("transparency")
    if layout != "RGB;16B":
        image.info["transparency"] = key * (255 // (2 ** int(layout[-1]) - 1))  # 2 bits: 85 a step, 4 bits: 17
        return image
    handle.seek(0)
    with _open_within_limit(handle, False) as low:
        low.tile = [(*low.tile[0][:3], "RGB;16L")]  # the same rows read little-endian: each value's low byte
        low.load()
        values = np.asarray(image, np.uint16) << 8 | np.asarray(low, np.uint16)
    alpha = np.where((values == np.asarray(key, np.uint16)).all(axis=-1), 0, 255).astype(np.uint8)
    return Image.merge("RGBA", (*image.split(), Image.fromarray(alpha, mode="L")))


def _open_within_limit(handle: BinaryIO, reduced: bool) -> Image.Image:
    """Image.open, with Pillow's limit against decompression bombs (179 million pixels) applied to the pixels
    decoded: a JPEG decoded at `reduced` scale is opened whatever its size (a 200-megapixel phone photo is read),
    and images of 89 to 179 million pixels, which Pillow decodes, without its DecompressionBombWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(handle)
        except Image.DecompressionBombError:
            handle.seek(0)
            if handle.read(3) != b"\xff\xd8\xff":
                raise
    handle.seek(0)
    image = JpegImagePlugin.jpeg_factory(handle)  # the header only: the size it decodes to is checked once drafted
    if not reduced:
        image.close()
        _refuse_bomb(image.size, "at full size", " (tl extract's --decode fast reads a JPEG this large at "
                     "reduced scale)")
    return image


def _refuse_bomb(size: tuple[int, int], decoded: str, remedy: str = "") -> None:
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is not None else None
    if limit is not None and size[0] * size[1] > limit:
        raise Image.DecompressionBombError(f"{size[0]}x{size[1]} pixels decoded {decoded} exceed Pillow's limit of "
                                           f"{limit:,} against decompression bombs; downscale the file{remedy}")


def open_regular(path) -> BinaryIO:
    """`path` opened for reading once its descriptor is a regular file (through links): a FIFO named like an image
    blocks its reader, a device (a link to /dev/zero) is never read to its end. Else an OSError, which callers
    record and skip. Opened without blocking (a FIFO's open waits for a writer), checked on the open file: no
    stat beside the open, a metadata round trip per image on a network file system."""
    handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise OSError("not a regular file (a FIFO, socket or device)")
    return handle
