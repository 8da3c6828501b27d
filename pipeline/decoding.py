"""Decoding modes: how an image becomes the uint8 centre crop a backbone sees (in DataLoader workers),
and the normalisation that turns a batch of such crops into the backbone's input (once per batch).

`exact` is torchvision's Resize (the backbone's interpolation, bilinear or bicubic; antialiased) +
CenterCrop on the fully decoded PIL image. `fast` keeps exactly that geometry but decodes a JPEG at the
smallest DCT scale still at least the resized size, and resizes with torch's uint8 kernel (as
torchvision's Resize does on uint8 tensors): for photos that cannot be reduced (most near 500x375) a
pixel value differs by at most one level (bicubic: two) and about one in 600 (bicubic: 350) differs; for
larger ones the mean difference is about one level. Decoding is several times faster on those, and
decoding and cropping the photo mix 1.08x (bilinear) to 1.33x (bicubic) faster than with Pillow's
resize (`bench/crop_resize.py`).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch
from PIL import Image

from pipeline.datasets import DECODE_ERRORS
from pipeline.errors import TLError, unreadable
from pipeline.stops import RESUME_HINT

DECODE_MODES: dict[str, type] = {}  # --decode values, filled by register_decode
DEFAULT_DECODE = "fast"  # measured to cost no accuracy (bench/RESULTS.md)


def register_decode(mode: type) -> type:
    """Class decorator: make a decoding mode (a PIL image -> uint8 crop transform built from (resize,
    crop), with `mode`, `help` and `draft`) available under its `mode` name; a second of one name is refused."""
    if not mode.mode or mode.mode in DECODE_MODES:
        raise TLError(f"a decoding mode named '{mode.mode}' is already registered; choose another name")
    DECODE_MODES[mode.mode] = mode
    return mode


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
    """(3, H, W) uint8 from an RGB image, without a float copy (channels-last memory)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def resize_and_crop(pixels: torch.Tensor, original: tuple[int, int], resize: int, crop: int,
                    interpolation: str = "bilinear", native_uint8: bool | None = None) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, crop, crop) uint8 (channels-last memory of its own) with torchvision's Resize
    (antialiased) + CenterCrop geometry for an image `original` (width, height) pixels large, of which
    `pixels` may be a reduced decoding. `native_uint8` (default: on the CPU) resizes with torch's uint8
    kernel, the same pixels with or without SIMD; otherwise (CUDA has no uint8 kernel) in float32, clamped
    and rounded, as torchvision's Resize does there."""
    resized_width, resized_height, left, top = resize_geometry(*original, resize, crop)
    batch = pixels[None]
    if batch.is_contiguous(memory_format=torch.channels_last):
        # a single image's (1, C, H, W) strides are ambiguous: made plainly channels_last, interpolate
        # keeps the layout instead of repacking its output (torchvision does the same)
        batch = batch.as_strided(batch.shape, (batch.numel(), *batch.stride()[1:]))
    native = pixels.device.type == "cpu" if native_uint8 is None else native_uint8
    options = dict(size=(resized_height, resized_width), mode=interpolation, antialias=True, align_corners=False)
    if native:
        resized = torch.nn.functional.interpolate(batch, **options)[0]
    else:
        resized = torch.nn.functional.interpolate(batch.float(), **options)[0].clamp_(0, 255).round_().to(torch.uint8)
    # the crop in memory of its own: not a view keeping the whole resized image alive
    return resized[:, top:top + crop, left:left + crop].permute(1, 2, 0).contiguous().permute(2, 0, 1)


@register_decode
class ExactCrop:
    """torchvision's Resize + CenterCrop on the fully decoded image: the reference pixels."""

    mode = "exact"
    help = "torchvision's Resize + CenterCrop on the full image"
    draft = None  # decode at full size

    def __init__(self, resize: int, crop: int, interpolation: str = "bilinear"):
        from torchvision import transforms

        self.transform = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode[interpolation.upper()], antialias=True),
            transforms.CenterCrop(crop)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _as_tensor(self.transform(image))


@register_decode
class FastCrop:
    """The same crop from a JPEG decoded at reduced scale, resized by torch's uint8 kernel."""

    mode = "fast"
    help = ("JPEGs decoded at reduced scale (DCT domain) to the smallest size still at least the resize target, "
            "resized by torch's uint8 kernel")

    def __init__(self, resize: int, crop: int, interpolation: str = "bilinear"):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def draft(self, width: int, height: int) -> tuple[int, int]:
        """The size to decode at least: the image resized as ExactCrop would resize it."""
        return resize_geometry(width, height, self.resize, self.crop)[:2]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # the image as decoded may be 1/2, 1/4 or 1/8 of its original size: resized to what the original
        # resizes to, so the crop is the same
        return resize_and_crop(_as_tensor(image), image.info.get("original_size", image.size), self.resize, self.crop,
                               self.interpolation)


INTERPOLATIONS = ("bilinear", "bicubic")


def decoding_mode(mode: str) -> type:
    """The registered decoding mode of that name; one line naming the valid ones if there is none (a
    typo, or a head or cache from a newer tl)."""
    if mode not in DECODE_MODES:
        raise TLError(f"unknown --decode {mode}; valid: {', '.join(DECODE_MODES)}")
    return DECODE_MODES[mode]


def crop_decoder(mode: str, resize: int, crop: int, interpolation: str = "bilinear"):
    """The PIL image -> (3, crop, crop) uint8 transform of a decoding mode; its `draft` goes to
    Source.read_image."""
    decoder = decoding_mode(mode)
    if interpolation not in INTERPOLATIONS:
        raise TLError(f"resizing by {interpolation} is not supported; tl resizes by {', '.join(INTERPOLATIONS)}")
    return decoder(resize, crop, interpolation)


class NormalizedCrop:
    """A decoding mode's crop, normalised per image, then `after` (tensor transforms: a random flip): for
    loaders that hand over float items (stage three sees images as stage one decoded them)."""

    def __init__(self, crop, mean, std, after=()):
        self.crop, self.mean, self.std, self.after = crop, mean, std, list(after)
        self.draft = crop.draft

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = normalize(self.crop(image)[None], self.mean, self.std)[0]
        for step in self.after:
            pixels = step(pixels)
        return pixels


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 scaled to [0, 1] and normalised, on the batch's device; the same
    float32 operations as torchvision's ToTensor + Normalize, so the values are identical."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    if pixels.ndim == 4 and not pixels.is_contiguous() and pixels.is_contiguous(memory_format=torch.channels_last):
        # a (1, C, 1, 1) operand over channels_last memory is broadcast element by element; one of the
        # batch's own (1, C, H, W) layout runs as a single contiguous loop: 2.3x faster, the same values
        mean, std = (value.expand(1, -1, *pixels.shape[2:]).contiguous(memory_format=torch.channels_last)
                     for value in (mean, std))
    return pixels.float().div_(255.0).sub_(mean).div_(std)


# ---------------------------------------------------------------- decoding on the device (CUDA: nvjpeg)

JPEG_START = b"\xff\xd8\xff"
_DEVICE_FRAMES = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman-coded frames
_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # every SOFn marker
_RGB_IDS = bytes((82, 71, 66))  # component ids 'R', 'G', 'B': libjpeg then reads the frame as RGB


def device_decodable(data: bytes) -> bool:
    """Whether the device's decoder gets this JPEG: an 8-bit, 1- or 3-component Huffman-coded frame of at
    most Image.MAX_IMAGE_PIXELS pixels, stored as YCbCr (no Adobe colour transform marker, no R, G, B
    component ids without a JFIF marker), whose scans end in an end-of-image marker. Everything else (a
    file cut short, CMYK and YCCK, RGB, 12-bit, lossless or arithmetic-coded frames, images Pillow refuses
    as decompression bombs) takes the CPU path, which decodes or skips it exactly as worker decoding
    does: which files a cache keeps, and their colours, never depend on what nvjpeg makes of them."""
    if not data.startswith(JPEG_START):
        return False
    at, frame, jfif = 2, None, False
    while at + 4 <= len(data):  # the segments before the first scan
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        segment = data[at + 4:at + 2 + length]
        if length < 2:
            return False
        if marker == 0xDA:  # the first scan: the frame and its markers are all known
            # an entropy-coded segment holds no FFD9 (an FF in it is followed by 00 or a restart number), so
            # the end marker after the scan tells a whole file from one cut short; bytes after it are ignored
            return frame is not None and data.find(b"\xff\xd9", at + 2 + length) >= 0 \
                and (frame != _RGB_IDS or jfif)
        if marker == 0xEE and segment.startswith(b"Adobe"):  # RGB or YCCK as Adobe stores them
            return False
        if marker == 0xE0 and segment.startswith(b"JFIF\0"):
            jfif = True
        if marker in _FRAMES:
            if frame is not None or len(segment) < 6 or marker not in _DEVICE_FRAMES:
                return False
            precision, components = segment[0], segment[5]
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            limit = Image.MAX_IMAGE_PIXELS
            if (precision != 8 or components not in (1, 3) or height == 0
                    or (limit is not None and width * height > limit)):
                return False
            frame = bytes(segment[6:6 + 3 * components:3])  # the component ids
        at += 2 + length
    return False


def decodes_on_device(device: torch.device, decode: str = DEFAULT_DECODE, asked: str = "auto") -> bool:
    """Whether extraction decodes JPEGs on `device` (batched nvjpeg on CUDA) instead of in workers: by
    default (`asked` auto) on CUDA in `fast` mode; `exact` keeps Pillow's pixels, decoded in workers."""
    if asked != "auto":
        return asked == "on"
    return device.type == "cuda" and decode != "exact"


class EncodedImages(torch.utils.data.Dataset):
    """Per sample, for decoding on the device: (JPEG bytes, None, index, "") for a JPEG the device decodes
    (device_decodable; a file, or a tar member), and for anything else (other formats, in-memory images)
    the worker's own uint8 crop (None, crop, index, "") or the reason it is unreadable (None, None,
    index, reason). Workers only read bytes for JPEGs."""

    def __init__(self, source, crop):
        self.source, self.crop = source, crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            data = self.source.encoded(index)
        except OSError:  # unreadable: the CPU path below says why
            data = None
        if data is not None and device_decodable(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, index, ""
        try:
            return None, self.crop(self.source.read_image(index, self.crop.draft)), index, ""
        except DECODE_ERRORS as exc:
            return None, None, index, unreadable(exc)


# a CUDA error (torch's AcceleratorError, or its words where nvjpeg's decoder rewraps it or gives only a
# cudaError_t number): no refusal of a file; it leaves the device unusable to this process
_CUDA_FAILURE = re.compile(r"\bCUDA (driver )?error\b|Failed to synchronize CUDA stream")


def _device_failure(exc: RuntimeError) -> TLError | None:
    """The one line for a CUDA error met while decoding (an illegal memory access), else None."""
    said = str(exc)
    if not (isinstance(exc, getattr(torch, "AcceleratorError", ())) or _CUDA_FAILURE.search(said)):
        return None
    line = (said.strip().splitlines() or [type(exc).__name__])[0][:160]
    return TLError(f"the GPU failed while decoding JPEGs ({line}) and cannot go on in this process; {RESUME_HINT}; "
                   "if it happens again, add --device-decode off (JPEGs decoded in workers, into the same cache) and "
                   "report it")


def _unless_refused(call, *args, **options):
    """call(*args, **options), or None where the device refuses it (a RuntimeError). Running out of device
    memory is no refusal: it is raised, so that a batch too large never quietly takes the CPU path. The
    nvjpeg decoder rewraps every error of its own, torch's OutOfMemoryError included, as a plain one
    ("Error while decoding JPEG images: CUDA out of memory. ..."): by its words, that is one too. Nor is a
    CUDA error (_device_failure): the CPU path's copy of the crop to the device failed in a traceback."""
    try:
        return call(*args, **options)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise torch.OutOfMemoryError(str(exc)) from exc
        failure = _device_failure(exc)
        if failure is not None:
            raise failure from None
        return None


def collate_encoded(items):
    return list(items)


def device_crops(items: list, device: torch.device, resize: int, crop: int, fallback,
                 interpolation: str = "bilinear") -> tuple:
    """(uint8 crops on `device` in item order, their indices, [(index, reason)] of unreadable ones, how
    many JPEGs the device refused) for a batch of EncodedImages items. JPEG bytes are decoded together on
    the device, resized (`interpolation`, antialiased) and cropped with torchvision's geometry; a JPEG the
    device refuses (a corrupt file) goes to `fallback(index) -> crop`, the CPU path, which may raise a
    decoding error. Running out of device memory is no refusal: it is raised."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg

    from pipeline.hardware import stack_channels_last

    def decode_jpeg(data, **options):
        # torchvision 0.29 marks its decoders deprecated in favour of torchcodec, which has no batched
        # nvjpeg decoding of in-memory JPEGs yet: keep the call, without a warning per batch
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
            return torchvision_decode_jpeg(data, **options)

    jpegs = [(position, item[0]) for position, item in enumerate(items) if item[0] is not None]
    decoded: dict[int, torch.Tensor | None] = {}  # None: the device refused the file
    if jpegs:
        if device.type == "cuda":
            # torchvision's batched decoder writes its outputs on a stream of its own that does not wait for
            # ours (pytorch/vision#9606): nothing of ours may still run on memory it is handed
            try:
                torch.cuda.current_stream(device).synchronize()
            except RuntimeError as exc:  # an error of earlier work shows here too
                failure = _device_failure(exc)
                if failure is None:
                    raise
                raise failure from None
        images = _unless_refused(decode_jpeg, [data for _, data in jpegs], mode=ImageReadMode.RGB, device=device)
        if images is not None:
            decoded = dict(zip([position for position, _ in jpegs], images))
        else:  # one bad file fails the batch: decode one by one
            for position, data in jpegs:
                decoded[position] = _unless_refused(decode_jpeg, data, mode=ImageReadMode.RGB, device=device)
    resized: dict[int, torch.Tensor] = {}
    for position, image in decoded.items():  # (3, height, width), at full size
        # CUDA's antialiased kernel refuses shrinking ~50x and more: that image takes the CPU path too
        cropped = None if image is None else _unless_refused(resize_and_crop, image, (image.shape[2], image.shape[1]),
                                                              resize, crop, interpolation)
        if cropped is not None:
            resized[position] = cropped
    refused = [position for position in decoded if position not in resized]  # they take the CPU path below
    crops, indices, errors = [], [], []
    for position, (data, cpu_crop, index, reason) in enumerate(items):
        if position in resized:
            crops.append(resized[position])
        elif position in refused:
            try:
                crops.append(fallback(index).to(device))
            except DECODE_ERRORS as exc:
                errors.append((index, unreadable(exc)))
                continue
        elif cpu_crop is not None:
            crops.append(cpu_crop.to(device))
        else:
            errors.append((index, reason))
            continue
        indices.append(index)
    return (stack_channels_last(crops) if crops else None), indices, errors, len(refused)

