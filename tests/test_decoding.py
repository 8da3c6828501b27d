"""Decoding modes (#12): exact is torchvision's pixels; fast decodes JPEGs at reduced scale with the
same geometry and stays within a stated pixel tolerance; the mode is part of the cache key, and bad
JPEGs are skipped or decoded alike under both."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cache.reader import CacheReader
from pipeline.backbones import get_backbone
from pipeline.datasets import open_rgb
from pipeline.decoding import resize_geometry
from pipeline.errors import HeadError
from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.extract import ExtractConfig, ExtractResult, run_extract
from pipeline.fit_head import FitHeadConfig, fit_head
from tests.conftest import cache_document, make_image_folder, write_image

FAST = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc7", "--workers", "0", "--quiet"]
FAST_OPTIONS = dict(backbone="alexnet", weights="none", layers=("fc7",), workers=0, quiet=True)


def extract(data, out, **options) -> ExtractResult:
    return run_extract(ExtractConfig(data=data, out=out, **{**FAST_OPTIONS, **options}))


def photo_pixels(size, seed=0) -> np.ndarray:
    """(height, width, 3) uint8 with photo-like structure: smooth gradients, edges, grain."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    base = np.stack([128 + 100 * np.sin(7 * x + 3 * y), 128 + 90 * np.cos(5 * y), 255 * x * y], axis=-1)
    base[(x - 0.4) ** 2 + (y - 0.3) ** 2 < 0.02] = (240, 40, 30)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def photo(path, size, seed=0, quality=90):
    """A JPEG of photo_pixels, 4:2:0 like a camera's."""
    pixels = photo_pixels(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality, subsampling=2)
    return path


def crops(path, mode):
    backbone = get_backbone("alexnet")
    crop = backbone.crop_decoder(mode)
    return crop(open_rgb(str(path), crop.draft))


def test_exact_mode_is_torchvisions_transform_to_the_bit(tmp_path):
    backbone = get_backbone("alexnet")
    for size in ((640, 480), (375, 500), (48, 40)):
        path = photo(tmp_path / f"{size}.jpg", size)
        pixels = crops(path, "exact")
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
        reference = backbone.transform()(open_rgb(str(path)))  # Resize, CenterCrop, ToTensor, Normalize
        assert torch.equal(backbone.normalize(pixels[None])[0], reference)


def test_fast_mode_decodes_large_jpegs_smaller_with_the_same_geometry(tmp_path):
    small = photo(tmp_path / "small.jpg", (500, 375))
    large = photo(tmp_path / "large.jpg", (2400, 1800))
    odd = photo(tmp_path / "odd.jpg", (1001, 750))  # decoded at 501x375: not the original's aspect ratio
    crop = get_backbone("alexnet").crop_decoder("fast")
    assert open_rgb(str(large), crop.draft).size == (600, 450)  # 1/4 scale: still >= the 341x256 resize
    assert open_rgb(str(small), crop.draft).size == (500, 375)  # 1/2 would be below 256: full size
    assert open_rgb(str(odd), crop.draft).size == (501, 375)
    # mean absolute difference, in 0..255 levels (odd: 0.38; 0.89 with the decoded size's geometry)
    for path, tolerance in ((small, 0.5), (large, 2.5), (odd, 0.6)):
        difference = (crops(path, "fast").float() - crops(path, "exact").float()).abs().mean().item()
        assert difference <= tolerance, (path.name, difference)
    # not reduced: torch's uint8 resize against Pillow's rounds a few pixels the other way, by one level
    fast, exact = crops(small, "fast").int(), crops(small, "exact").int()
    assert (fast - exact).abs().max() <= 1 and (fast != exact).float().mean() < 0.01


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_device_path_resizes_as_the_fast_mode_does(tmp_path, interpolation):
    """A JPEG decoded by the device path (decode_jpeg, run here on the CPU) and one decoded in a worker
    in fast mode give the same crop, bicubic (timm's backbones) as well as bilinear."""
    from pipeline.decoding import crop_decoder, device_crops

    path = photo(tmp_path / "photo.jpg", (500, 375))
    item = (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), None, 7, "")
    pixels, indices, errors, refused = device_crops([item], torch.device("cpu"), 256, 224, fallback=None,
                                                    interpolation=interpolation)
    fast = crop_decoder("fast", 256, 224, interpolation)
    assert indices == [7] and errors == [] and refused == 0
    assert torch.equal(pixels[0], fast(open_rgb(str(path), fast.draft)))
    other = crop_decoder("fast", 256, 224, "bicubic" if interpolation == "bilinear" else "bilinear")
    assert not torch.equal(pixels[0], other(open_rgb(str(path), other.draft)))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_and_crop_is_torchvisions_resize_and_centre_crop(interpolation):
    """In float32 (the CUDA path) the pixels of torchvision's Resize + CenterCrop on a float tensor, for
    any shape; torch's uint8 kernel (the CPU path) within a level of it on a photo (bilinear); the crop
    holds memory of its own, in channels-last order."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from pipeline.decoding import resize_and_crop

    generator = torch.Generator().manual_seed(0)
    mode = InterpolationMode[interpolation.upper()]
    for width, height in ((500, 375), (375, 500), (257, 255), (48, 40), (40, 300), (999, 257), (224, 224), (3, 2)):
        image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
        reference = F.center_crop(F.resize(image.float(), [256], mode, antialias=True), [224])
        reference = reference.clamp(0, 255).round().to(torch.uint8)
        assert torch.equal(resize_and_crop(image, (width, height), 256, 224, interpolation, native_uint8=False),
                           reference), (width, height)
        native = resize_and_crop(image, (width, height), 256, 224, interpolation)
        assert native.shape == (3, 224, 224) and native.permute(1, 2, 0).is_contiguous()
        assert native.untyped_storage().nbytes() == 3 * 224 * 224
    if interpolation == "bilinear":  # bicubic's uint8 kernel clamps between its passes: a few levels at edges
        pixels = torch.from_numpy(photo_pixels((500, 375))).permute(2, 0, 1)
        native, in_float = (resize_and_crop(pixels, (500, 375), 256, 224, native_uint8=flag) for flag in (True, False))
        assert (native.int() - in_float.int()).abs().max() <= 1


def test_resize_geometry_is_torchvisions():
    assert resize_geometry(500, 375, 256, 224) == (341, 256, 58, 16)
    assert resize_geometry(375, 500, 256, 224) == (256, 341, 16, 58)
    assert resize_geometry(48, 40, 256, 224) == (307, 256, 42, 16)


def test_the_mode_is_in_the_cache_key_and_heads_refuse_the_other(tmp_path):
    folder = tmp_path / "images"
    for label in ("a", "b"):
        for i in range(3):
            photo(folder / label / f"{i}.jpg", (900, 700), seed=10 * ord(label) + i)
    for mode in ("fast", "exact"):
        extract(folder, tmp_path / mode, decode=mode, dtype="float32")
    keys = {mode: json.loads((tmp_path / mode / "manifest.json").read_text())["key"] for mode in ("fast", "exact")}
    assert keys["fast"]["preprocessing"]["decode"] == "fast" and "decode" not in keys["exact"]["preprocessing"]
    fast, exact = CacheReader(tmp_path / "fast").load("fc7"), CacheReader(tmp_path / "exact").load("fc7")
    relative = np.linalg.norm(fast - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert 0 < np.median(relative) < 0.05  # measured ~0.01 for 900x700 photos decoded at 1/2 scale
    fit_head(FitHeadConfig(cache=tmp_path / "fast", out=tmp_path / "h.pt"))
    with pytest.raises(HeadError, match=r"preprocessing\.decode: fast -> exact") as refused:
        run_evaluate(EvaluateConfig(head=tmp_path / "h.pt", cache=tmp_path / "exact", out=tmp_path / "r"))
    assert "\n" not in str(refused.value)  # one `error:` line in the CLI


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_bad_jpegs_are_skipped_or_decoded_alike_in_both_modes(tmp_path, mode):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
    Image.open(photo(tmp_path / "rgb.jpg", (1200, 900))).convert("CMYK").save(folder / "a" / "cmyk.jpg", "JPEG")
    cut = photo(folder / "b" / "cut.jpg", (1200, 900))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (folder / "b" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = extract(folder, tmp_path / "c", decode=mode)
    assert sorted(item["sample_id"] for item in result.skipped) == ["b/cut.jpg", "b/junk.jpg"]
    skipped = cache_document(tmp_path / "c")["skipped"]
    assert sorted(item["sample_id"] for item in skipped) == ["b/cut.jpg", "b/junk.jpg"]
    assert "a/cmyk.jpg" in list(CacheReader(tmp_path / "c").load_column("sample_id"))
    assert crops(folder / "a" / "cmyk.jpg", mode).shape == (3, 224, 224)


def test_cli_decode_flag_reaches_the_cache_key(run_tl, tmp_path):
    """--decode is part of the cache key: the same mode reuses a cache, the other is refused in one line."""
    folder = tmp_path / "images"
    for label in ("a", "b"):
        photo(folder / label / "0.jpg", (900, 700), seed=ord(label))
    run = lambda mode: run_tl("extract", "--data", folder, "--out", tmp_path / "c", "--decode", mode,  # noqa: E731
                              *FAST)
    assert run("fast").code == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["key"]["preprocessing"]["decode"] == "fast"
    again = run("fast")
    assert again.code == 0 and "0 shards new, 1 reused" in again.out, again
    other = run("exact")
    assert other.code == 2 and "preprocessing.decode" in other.err and "--overwrite" in other.err, other
    assert "or pass --decode fast to add to it" in other.err  # only the mode differs: the cheap way out
    assert len(other.err.strip().splitlines()) == 1


def test_jpegs_are_decoded_on_cuda_and_in_workers_on_the_cpu():
    from pipeline.decoding import decodes_on_device

    assert decodes_on_device(torch.device("cuda")) and not decodes_on_device(torch.device("cpu"))
    assert decodes_on_device(torch.device("cuda"), "fast") and not decodes_on_device(torch.device("cuda"), "exact")
    assert decodes_on_device(torch.device("cpu"), "exact", "on")  # the tests' and benches' way onto the path
    assert not decodes_on_device(torch.device("cuda"), "fast", "off")


def test_an_image_the_device_cannot_resize_takes_the_cpu_path(tmp_path, monkeypatch):
    """CUDA's antialiased kernel refuses large shrinks: that image is cropped by the CPU path instead of
    failing the batch; the others keep the device's crops."""
    import pipeline.decoding as decoding

    paths = [photo(tmp_path / f"{i}.jpg", (500, 375), seed=i) for i in range(3)]
    items = [(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), None, i, "")
             for i, path in enumerate(paths)]
    fast = decoding.crop_decoder("fast", 256, 224)
    resize_and_crop, calls, fallen_back = decoding.resize_and_crop, [], []

    def refusing_the_second(pixels, *args, **options):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("Too much shared memory required")
        return resize_and_crop(pixels, *args, **options)

    def fallback(index):
        fallen_back.append(index)
        return fast(open_rgb(str(paths[index]), fast.draft))

    monkeypatch.setattr(decoding, "resize_and_crop", refusing_the_second)
    pixels, indices, errors, refused = decoding.device_crops(items, torch.device("cpu"), 256, 224, fallback)
    assert indices == [0, 1, 2] and errors == [] and fallen_back == [1] and refused == 1
    for i, path in enumerate(paths):
        assert torch.equal(pixels[i], fast(open_rgb(str(path), fast.draft)))


def broken_tables(path):
    """The JPEG at `path` with its first Huffman table overwritten: whole and well framed, yet no decoder
    (nvjpeg, libjpeg, Pillow) can decode it."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xc4")
    data[at + 4:at + 24] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


def test_only_whole_8_bit_rgb_or_gray_jpegs_within_pillows_limit_go_to_the_device(tmp_path, monkeypatch):
    """What nvjpeg would make of other files is unknown here (it may fill in a truncated file, or read CMYK
    as YCbCr), so they take the CPU path, which decodes or skips them as worker decoding does."""
    from pipeline.decoding import EncodedImages, crop_decoder, device_decodable

    base = photo(tmp_path / "base.jpg", (500, 375))
    Image.open(base).save(tmp_path / "progressive.jpg", "JPEG", progressive=True)
    Image.open(base).convert("L").save(tmp_path / "gray.jpg", "JPEG")
    Image.open(base).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    Image.open(base).save(tmp_path / "flat.png")
    data = base.read_bytes()
    cases = {"base.jpg": True, "progressive.jpg": True, "gray.jpg": True, "cmyk.jpg": False, "flat.png": False}
    assert {name: device_decodable((tmp_path / name).read_bytes()) for name in cases} == cases
    assert device_decodable(data + b"\0" * 4096)  # bytes after the end marker (a motion photo's video): ignored
    assert not device_decodable(data[: len(data) // 2])  # cut short
    assert not device_decodable(data[:-2])  # only the end marker missing
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # transform 0: the three channels are RGB
    rgb = data.replace(b"\xff\xd8", b"\xff\xd8" + adobe, 1)
    assert Image.open(io.BytesIO(rgb)).size == (500, 375) and not device_decodable(rgb)
    late = data.replace(b"\xff\xda", adobe + b"\xff\xda", 1)  # after the frame header, before the scan
    assert Image.open(io.BytesIO(late)).size == (500, 375) and not device_decodable(late)
    keep_rgb = io.BytesIO()
    Image.open(base).save(keep_rgb, "JPEG", keep_rgb=True)  # R, G, B component ids (and Pillow's Adobe marker)
    assert not device_decodable(keep_rgb.getvalue())
    ids = data.index(b"\xff\xc0") + 10  # the frame's first component id: 1, 2, 3 become R, G, B
    no_jfif = bytearray(data[:2] + data[data.index(b"\xff", 2 + 2 + int.from_bytes(data[4:6], "big")):])
    frame = no_jfif.index(b"\xff\xc0") + 10
    for k, letter in enumerate(b"RGB"):
        no_jfif[frame + 3 * k] = letter
    assert data[2:4] == b"\xff\xe0" and ids > 0 and not device_decodable(bytes(no_jfif))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500 * 375 - 1)
    assert not device_decodable(data)  # a decompression bomb to Pillow: the CPU path refuses it as it should

    class Files:  # a source's two ways to a sample
        names = ["base.jpg", "cmyk.jpg"]

        def encoded(self, index):
            return (tmp_path / self.names[index]).read_bytes()

        def read_image(self, index, draft=None):
            return open_rgb(str(tmp_path / self.names[index]), draft)

        def __len__(self):
            return 2

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 ** 8)
    images = EncodedImages(Files(), crop_decoder("fast", 256, 224))
    assert images[0][0] is not None and images[0][1] is None  # bytes for the device
    assert images[1][0] is None and images[1][1].shape == (3, 224, 224)  # the worker's own crop


def test_running_out_of_device_memory_while_decoding_is_raised_not_taken_for_a_refusal(tmp_path, monkeypatch):
    import torchvision.io

    from pipeline.decoding import device_crops

    def out_of_memory(*args, **options):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    path = photo(tmp_path / "photo.jpg", (500, 375))
    item = (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), None, 0, "")
    with pytest.raises(torch.OutOfMemoryError):
        device_crops([item], torch.device("cpu"), 256, 224, fallback=lambda index: pytest.fail("fell back"))


def test_running_out_of_device_memory_in_nvjpeg_is_raised_though_it_rewraps_the_error(tmp_path, monkeypatch):
    import torchvision.io

    from pipeline.decoding import device_crops

    def rewrapped(*args, **options):  # what torchvision's decode_jpegs_cuda makes of torch's OutOfMemoryError
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB. "
                           "GPU 0 has a total capacity of 139.80 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", rewrapped)
    path = photo(tmp_path / "photo.jpg", (500, 375))
    item = (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), None, 0, "")
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory. Tried to allocate 2.00 GiB"):
        device_crops([item], torch.device("cpu"), 256, 224, fallback=lambda index: pytest.fail("fell back"))

    def refused(*args, **options):  # a file nvjpeg cannot read is still a refusal: the CPU path takes it
        raise RuntimeError("Error while decoding JPEG images: Failed to get image info: 2")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refused)
    crops, indices, errors, refusals = device_crops([item], torch.device("cpu"), 256, 224,
                                                    fallback=lambda index: torch.zeros(3, 224, 224, dtype=torch.uint8))
    assert crops.shape == (1, 3, 224, 224) and indices == [0] and errors == [] and refusals == 1


@pytest.mark.parametrize("error", [
    # torch.AcceleratorError is torch 2.8's (setup.cfg takes 2.1): its words alone stand for it before
    getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: an illegal memory access was encountered\nCUDA "
                                                     "kernel errors might be asynchronously reported"),
    RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was encountered"),
    RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 700")],
    ids=["torch", "rewrapped", "cuda-status"])
def test_a_cuda_error_while_decoding_is_one_line_not_a_refused_jpeg(run_tl, tmp_path, monkeypatch, error):
    """A sticky CUDA error (torch's AcceleratorError, or as torchvision's nvjpeg decoder rewraps it) was taken
    for a JPEG the device refuses: the CPU path decoded it, and its copy to the broken device failed in a
    traceback. It stops the extraction in one line that says what to do; a refusal still takes the CPU path,
    and --device-decode off decodes in workers, into the same cache."""
    import torchvision.io

    from pipeline.decoding import device_crops
    from pipeline.errors import TLError

    def failing(*args, **options):
        raise error

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    path = photo(tmp_path / "images" / "a" / "photo.jpg", (500, 375))
    item = (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), None, 0, "")
    with pytest.raises(TLError, match=r"^the GPU failed while decoding JPEGs \(.*CUDA (error: an illegal memory access "
                                      r"was encountered|stream: 700)\) and cannot go on in this process; nothing "
                                      r"finished was lost"):
        device_crops([item], torch.device("cpu"), 256, 224, fallback=lambda index: pytest.fail("fell back"))
    photo(tmp_path / "images" / "b" / "photo.jpg", (400, 300))
    extract = ["extract", "--data", tmp_path / "images", "--out", tmp_path / "cache", "--backbone", "alexnet",
               "--weights", "none", "--layers", "fc7", "--workers", "0", "--quiet"]
    failed = run_tl(*extract, "--device-decode", "on")  # the CUDA path, on the CPU
    assert failed.code == 2 and failed.err.count("\n") == 1 and "Traceback" not in failed.err, failed
    assert failed.err.startswith(f"error: the GPU failed while decoding JPEGs ({str(error).splitlines()[0]}) ")
    assert "if it happens again, add --device-decode off (JPEGs decoded in workers, into the same cache)" in failed.err
    assert run_tl(*extract, "--device-decode", "off").code == 0
    assert len(CacheReader(tmp_path / "cache").load_column("sample_id")) == 2


def test_running_out_of_device_memory_is_one_line_that_says_what_to_do(run_tl, tmp_path, monkeypatch):
    import pipeline.extract

    def out_of_memory(config):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139 GiB total)\nmore")

    monkeypatch.setattr(pipeline.extract, "run_extract", out_of_memory)
    result = run_tl("extract", "--data", tmp_path, "--out", tmp_path / "cache")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.startswith("error: the device ran out of memory (CUDA out of memory. Tried to allocate 2.00")
    assert "run the command again with a lower --batch-size (tl extract resumes its shards" in result.err
    assert len(result.err.strip().splitlines()) == 1

    def silent(config):
        raise torch.OutOfMemoryError()

    monkeypatch.setattr(pipeline.extract, "run_extract", silent)
    result = run_tl("extract", "--data", tmp_path, "--out", tmp_path / "cache")
    assert result.code == 2 and result.err.startswith("error: the device ran out of memory (OutOfMemoryError)")


def test_extract_says_how_many_jpegs_the_device_refused(run_tl, tmp_path, monkeypatch):
    import pipeline.extract

    monkeypatch.setattr(pipeline.extract, "decodes_on_device", lambda *args: True)  # the CUDA path, on the CPU
    photo(tmp_path / "images" / "a" / "whole.jpg", (500, 375))
    broken_tables(photo(tmp_path / "images" / "b" / "tables.jpg", (500, 375)))
    result = run_tl("extract", "--data", tmp_path / "images", "--out", tmp_path / "cache", "--backbone", "alexnet",
                    "--weights", "none", "--layers", "fc7", "--workers", "0", "--quiet")
    assert result.code == 0, result.err
    assert "1 JPEG refused by the device's decoder went to the CPU path" in result.out
    assert "skipped 1 image that could not be read or labelled" in result.err and "b/tables.jpg" in result.err


def test_device_decoding_path_with_its_fallbacks_gives_the_cpu_codes(tmp_path):
    """The CUDA path (batched decode_jpeg, tensor resize and crop) run on the CPU: JPEGs through the
    device decoder, a PNG and a CMYK JPEG through the CPU path, a truncated JPEG skipped and recorded.
    Codes agree with the worker path within float16 tolerance (different resampling code)."""
    from pipeline.extract import ExtractConfig, run_extract

    folder = tmp_path / "images"
    for label in ("a", "b"):
        for i in range(3):
            photo(folder / label / f"{i}.jpg", (640, 480) if i else (480, 640), seed=10 * ord(label) + i)
    write_image(folder / "a" / "flat.png", seed=1, size=(300, 200))
    Image.open(photo(tmp_path / "rgb.jpg", (500, 400))).convert("CMYK").save(folder / "b" / "cmyk.jpg", "JPEG")
    cut = photo(folder / "b" / "cut.jpg", (600, 450))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    broken_tables(photo(folder / "b" / "tables.jpg", (600, 450)))  # reaches the device's decoder, which refuses it
    results = {}
    for mode in ("on", "off"):
        result = run_extract(ExtractConfig(data=folder, out=tmp_path / mode, backbone="alexnet", weights="none",
                                           layers=("fc7",), dtype="float32", workers=0, quiet=True, decode="exact",
                                           device="cpu", device_decode=mode))
        results[mode] = CacheReader(tmp_path / mode)
        assert [item["sample_id"] for item in result.skipped] == ["b/cut.jpg", "b/tables.jpg"]
        assert result.device_refused == (1 if mode == "on" else 0)
    assert list(results["on"].load_column("sample_id")) == list(results["off"].load_column("sample_id"))
    on, off = results["on"].load("fc7"), results["off"].load("fc7")
    relative = np.linalg.norm(on - off, axis=1) / np.linalg.norm(off, axis=1)
    print("device vs worker decoding, max relative code difference", relative.max())
    assert relative.max() < 1e-2, relative  # measured 1.8e-3: the two resampling implementations differ slightly


def test_a_finetuned_model_sees_images_decoded_as_its_heads_codes_were(tmp_path):
    """Stage three scores (validation, evaluate --model, the epoch-0 model) in the head's decoding mode:
    with fast codes of photos large enough to be reduced, the epoch-0 model equals the head."""
    from pipeline.finetune import FinetuneConfig, run_finetune
    from pipeline.formats import open_source
    from pipeline.image_sets import DecodedImages, score_images, image_set
    from pipeline.model_files import load_model_file
    from pipeline.model_files import load_head

    folder = tmp_path / "images"
    for label in ("a", "b"):
        for i in range(3):
            photo(folder / label / f"{i}.jpg", (1100, 800), seed=10 * ord(label) + i)
    extract(folder, tmp_path / "c", layers=("pool5",), dtype="float32", decode="fast")
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    run_finetune(FinetuneConfig(data=folder, head=tmp_path / "h.pt", out=tmp_path / "m.pt", epochs=0, workers=0,
                                quiet=True), say=lambda text: None)
    model, metadata = load_model_file(tmp_path / "m.pt")
    head, _ = load_head(tmp_path / "h.pt")
    source = open_source("imagefolder", folder)
    dataset, _ = image_set(source, get_backbone("alexnet"), metadata, None, 0, None, "data", "head")
    assert isinstance(dataset, DecodedImages) and dataset.draft is not None  # the fast crop, with its draft
    through_model = score_images(model, dataset, 3, 0, torch.device("cpu"), multilabel=False)
    on_codes = head.predict_proba(CacheReader(tmp_path / "c").load("pool5"))
    np.testing.assert_allclose(through_model, on_codes, atol=1e-4)


def test_a_channels_last_batch_normalizes_to_the_same_values_in_its_own_layout():
    backbone = get_backbone("alexnet")
    pixels = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = backbone.normalize(pixels)  # NCHW: a (1, C, 1, 1) mean and std broadcast
    assert reference.is_contiguous()
    normalized = backbone.normalize(pixels.contiguous(memory_format=torch.channels_last))
    assert normalized.is_contiguous(memory_format=torch.channels_last) and torch.equal(normalized, reference)
    expected = (pixels.double() / 255 - torch.tensor(backbone.mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(backbone.std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(normalized.double(), expected, rtol=0, atol=1e-6)  # float32 rounding of the float64 values


def test_a_jpeg_over_pillows_bomb_limit_is_read_at_reduced_scale_and_refused_at_full_size(tmp_path, monkeypatch,
                                                                                          run_tl):
    """A 200-megapixel phone photo (16320x12240) is over Pillow's limit against decompression bombs (179 million
    pixels): fast extraction skipped it as unreadable, though it decodes at 1/8 scale to 2040x1530. The limit
    now counts the pixels decoded; 89 to 179 million pixels, which Pillow decodes, printed a raw Python warning.
    Scaled down here: the limit is lowered so that a 400x300 photo stands for the phone's."""
    import warnings

    phone = photo(tmp_path / "phone.jpg", (400, 300))
    photo(tmp_path / "data" / "a" / "phone.jpg", (2400, 1800))  # alexnet's fast mode decodes it at 600x450
    write_image(tmp_path / "data" / "b" / "small.jpg", 1)
    Image.fromarray(photo_pixels((400, 300))).save(tmp_path / "big.png")
    expected = open_rgb(phone, lambda width, height: (50, 37))  # within the limit: 1/8 scale
    assert expected.size == (50, 38)  # 37.5 rounded up
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # bombs from 40,001 pixels
    found = open_rgb(phone, lambda width, height: (50, 37))
    assert found.info["original_size"] == (400, 300) and np.array_equal(np.asarray(found), np.asarray(expected))
    with pytest.raises(Image.DecompressionBombError, match=r"^400x300 pixels decoded at full size exceed Pillow's "
                       r"limit of 40,000 against decompression bombs; downscale the file \(tl extract's --decode fast "
                       r"reads a JPEG this large"):
        open_rgb(phone)
    with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 40000 pixels"):  # Pillow's, not a JPEG
        open_rgb(tmp_path / "big.png", lambda width, height: (50, 37))
    with pytest.raises(Image.DecompressionBombError, match=r"^100x75 pixels decoded at reduced scale exceed"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)  # still over at the smallest scale, 1/4 here
        open_rgb(phone, lambda width, height: (100, 75))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80_000)  # 120,000 pixels: Pillow decodes them, with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_rgb(phone).size == (400, 300)
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    fast = run_tl("extract", "--data", tmp_path / "data", "--out", tmp_path / "fast", *FAST)
    assert fast.code == 0 and "skipped" not in fast.err, fast
    exact = run_tl("extract", "--data", tmp_path / "data", "--out", tmp_path / "exact", *FAST, "--decode", "exact")
    assert exact.code == 0 and "a/phone.jpg: DecompressionBombError: 2400x1800 pixels decoded at full size" in exact.err


def test_a_jpeg_with_a_preview_image_is_read_at_reduced_scale_as_any_jpeg(tmp_path, monkeypatch):
    """Pillow opens a JPEG carrying a second, preview image (the MP format many phones and cameras write) as
    format "MPO", and fast decoding drafted only format "JPEG": such photos were decoded at full size, and
    one over Pillow's limit against decompression bombs was skipped as "decoded at reduced scale" though it
    never was. It is decoded as the same photo without its preview is."""
    plain = photo(tmp_path / "plain.jpg", (400, 300))
    phone, pixels = tmp_path / "phone.jpg", Image.fromarray(photo_pixels((400, 300)))  # the pixels of `plain`
    pixels.save(phone, "MPO", save_all=True, append_images=[pixels.resize((100, 75))], quality=90, subsampling=2)
    assert Image.open(phone).format == "MPO"
    half = lambda width, height: (200, 150)  # noqa: E731
    expected = open_rgb(plain, half)
    assert expected.size == (200, 150)
    for limit in (None, 20_000):  # Pillow's own, and one the photo is over (but not its half: 30,000 pixels)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        found = open_rgb(phone, half)
        assert found.info["original_size"] == (400, 300) and np.array_equal(np.asarray(found), np.asarray(expected))
