"""tl export: the file says what it takes (a JSON contract beside it, the same in the ONNX metadata),
raw uint8 pixels work as the contract says, and the export is kept only when it labels real images as
the model does."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from pipeline.backbones import get_backbone
from pipeline.decoding import normalize
from pipeline.errors import FinetuneError, TLError
from pipeline.export import export_model
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import FinetuneConfig, run_finetune
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.formats import open_source
from pipeline.model_files import load_model_file
from tests.conftest import disk_full_at, make_image_folder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_image_folder(root / "train", classes=("ant", "bee", "cow"), per_class=3)
    run_extract(ExtractConfig(data=root / "train", out=root / "cache", backbone="alexnet", weights="none",
                              layers=("pool5",), dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=root / "cache", out=root / "head.pt"))
    run_finetune(FinetuneConfig(data=root / "train", head=root / "head.pt", out=root / "model.pt", epochs=0,
                                workers=0, quiet=True), say=lambda text: None)
    return root


def _raw_crops(root, count=4):
    backbone = get_backbone("alexnet")
    source = open_source("imagefolder", root / "train")
    crop = backbone.crop_decoder("fast")
    return torch.stack([crop(source.read_image(i, crop.draft)) for i in range(count)]), backbone


def _load_torchscript(path):
    with warnings.catch_warnings():  # torch 2.14 marks torch.jit.load deprecated; TorchScript files still load
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def _model_probabilities(root, crops, backbone):
    model, _ = load_model_file(root / "model.pt")
    with torch.inference_mode():
        return torch.softmax(model(normalize(crops, backbone.mean, backbone.std)), dim=1).numpy()


def test_torchscript_takes_uint8_pixels_and_says_so_beside_it(model_file, tmp_path):
    result = export_model(model_file / "model.pt", "torchscript", tmp_path / "model.ts")
    contract = json.loads((tmp_path / "model.ts.json").read_text())
    assert result.contract_path == tmp_path / "model.ts.json" and contract == result.contract
    assert contract["input"]["dtype"] == "uint8" and contract["input"]["value_range"] == [0, 255]
    assert contract["input"]["shape"] == ["batch", 3, 224, 224] and contract["input"]["channel_order"] == "RGB"
    assert contract["output"]["classes"] == ["ant", "bee", "cow"] and contract["output"]["activation"] == "softmax"
    assert result.checked == 9 and result.agreeing == 9 and "images of" in result.checked_on
    crops, backbone = _raw_crops(model_file)
    exported = _load_torchscript(tmp_path / "model.ts")
    plain = exported(crops)  # a deployer who does not know torch.no_grad gets no autograd graph
    assert not plain.requires_grad and not any(parameter.requires_grad for parameter in exported.parameters())
    with torch.inference_mode():
        found = exported(crops).numpy()
    np.testing.assert_allclose(found, _model_probabilities(model_file, crops, backbone), atol=1e-5)


def test_normalized_input_export_takes_normalised_floats(model_file, tmp_path):
    result = export_model(model_file / "model.pt", "torchscript", tmp_path / "n.ts", raw_pixels=False)
    assert result.contract["input"]["dtype"] == "float32" and result.contract["input"]["value_range"] == "normalised"
    crops, backbone = _raw_crops(model_file)
    with torch.inference_mode():
        found = _load_torchscript(tmp_path / "n.ts")(normalize(crops, backbone.mean, backbone.std)).numpy()
    np.testing.assert_allclose(found, _model_probabilities(model_file, crops, backbone), atol=1e-5)


def test_onnx_carries_its_contract_in_the_metadata(model_file, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    result = export_model(model_file / "model.pt", "onnx", tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx"))
    properties = {prop.key: prop.value for prop in graph.metadata_props}
    assert json.loads(properties["tl_contract"]) == result.contract
    crops, backbone = _raw_crops(model_file)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    found = session.run(None, {"pixels": crops.numpy()})[0]
    np.testing.assert_allclose(found, _model_probabilities(model_file, crops, backbone), atol=1e-4)
    assert result.contract["opset"] == next(entry.version for entry in graph.opset_import if entry.domain == "")


def test_opset_writes_the_one_asked_for_or_is_refused_in_one_line(model_file, tmp_path, run_tl):
    """An older onnxruntime runs only older opsets; below 18 torch's exporter writes 18 without a word."""
    onnx = pytest.importorskip("onnx")
    result = export_model(model_file / "model.pt", "onnx", tmp_path / "m.onnx", opset=18)
    assert [entry.version for entry in onnx.load(str(tmp_path / "m.onnx")).opset_import if entry.domain == ""] == [18]
    assert result.contract["opset"] == 18
    for format, opset, said in (("onnx", "17", "--opset 17: an onnx export writes opsets 18 to 23; pass one of them (an "
                                                "older runtime runs the lower ones), or leave --opset out\n"),
                                ("torchscript", "18", "--opset 18: an onnx export writes opsets 18 to 23; a torchscript "
                                                      "file has none: leave --opset out\n")):
        refused = run_tl("export", "--model", model_file / "model.pt", "--format", format, "--out", tmp_path / "x",
                         "--opset", opset)
        assert refused.code == 2 and refused.err == f"error: {said}", refused
        assert not (tmp_path / "x").exists()


def test_without_the_training_images_the_check_uses_drawn_photos(model_file, tmp_path):
    moved = tmp_path / "copy"
    shutil.copytree(model_file, moved)
    shutil.rmtree(moved / "train")  # the model file still names the original folder: point it nowhere
    (model_file / "train").rename(model_file / "train-away")
    try:
        result = export_model(moved / "model.pt", "torchscript", tmp_path / "m.ts")
    finally:
        (model_file / "train-away").rename(model_file / "train")
    assert "drawn photo-like images (the training images were not found: " in result.checked_on
    assert "does not exist)" in result.checked_on and "--data" not in result.checked_on  # export has no --data
    assert result.agreeing == result.checked == 16


def test_the_training_images_are_found_from_another_working_folder(model_file, tmp_path, monkeypatch):
    """The model file records its data given relative to the folder finetune ran in; export elsewhere."""
    monkeypatch.chdir(model_file)
    run_finetune(FinetuneConfig(data="train", head="head.pt", out=tmp_path / "m.pt", epochs=0, workers=0, quiet=True),
                 say=lambda text: None)
    monkeypatch.chdir(tmp_path)
    result = export_model(tmp_path / "m.pt", "torchscript", tmp_path / "m.ts")
    assert result.checked_on == f"9 images of {model_file / 'train'}"


def test_an_export_that_disagrees_is_not_kept(model_file, tmp_path):
    with pytest.raises(FinetuneError, match=r"top-1 agrees on \d+/9.*it was not kept"):
        export_model(model_file / "model.pt", "torchscript", tmp_path / "m.ts", tolerance=-1.0)
    assert not (tmp_path / "m.ts").exists() and not (tmp_path / "m.ts.json").exists()


def test_tl_export_prints_the_contract(model_file, tmp_path, run_tl):
    result = run_tl("export", "--model", model_file / "model.pt", "--format", "torchscript", "--out",
                    tmp_path / "m.ts")
    assert result.code == 0, result
    assert "uint8 RGB NCHW (batch, 3, 224, 224), values 0..255" in result.out
    assert "resize the shorter side to 256" in result.out and "softmax probabilities of 3 classes" in result.out
    # what tl does before the resize, so that a deployment gets tl's numbers: alpha, and the reduced-scale JPEG decode
    assert "transparency composited over white" in result.out and "Image.draft('RGB', (w, h))" in result.out
    assert "top-1 agrees on 9/9" in result.out
    # the resampler itself, named: a deployment using another resize (torchvision's on PIL) got other pixels
    contract = json.loads((tmp_path / "m.ts.json").read_text())
    assert contract["input"]["interpolation"] == "bilinear"
    assert ("torch.nn.functional.interpolate(x, size=(h, w), mode='bilinear', antialias=True, align_corners=False) "
            "on the uint8 (1, 3, H, W) tensor") in contract["input"]["preparation"]


@pytest.mark.parametrize("decode,interpolation", [("fast", "bilinear"), ("fast", "bicubic"), ("exact", "bicubic")])
def test_the_contracts_preparation_followed_word_for_word_gives_tls_crops(tmp_path, decode, interpolation):
    """Each step of `preparation`, done as written, on JPEGs whose reduced-scale decode (1001x750) and
    odd crop offset (640x427: Python's round, not floor) both matter: tl's crop, pixel for pixel. Read
    loosely (the resize from the drafted size, a floored offset), pixels differed by up to 127 levels."""
    from PIL import Image
    from skimage import data

    from pipeline.datasets import open_rgb
    from pipeline.decoding import crop_decoder
    from pipeline.export import _preparation

    backbone = get_backbone("alexnet")
    text = _preparation(type("Backbone", (), {"resize_size": 256, "input_size": 224,
                                              "interpolation": interpolation})(), decode)
    assert "int(round((side - 224) / 2))" in text  # the steps this test follows
    assert ("the file's own size, not the drafted one" in text) == (decode == "fast")
    assert (f"mode='{interpolation}'" if decode == "fast" else f"Pillow's resize ({interpolation})") in text
    assert backbone.resize_size == 256 and backbone.input_size == 224
    for width, height in ((1001, 750), (640, 427), (427, 640)):
        path = tmp_path / f"{width}x{height}.jpg"
        Image.fromarray(data.chelsea()).resize((width, height)).save(path, quality=90)
        resized = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
        image = Image.open(path)
        if decode == "fast":
            image.draft("RGB", resized)
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
            pixels = torch.nn.functional.interpolate(pixels, size=resized[::-1], mode=interpolation, antialias=True,
                                                     align_corners=False)[0]
        else:
            method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
            pixels = torch.from_numpy(np.array(image.convert("RGB").resize(resized, method))).permute(2, 0, 1)
        left, top = int(round((resized[0] - 224) / 2)), int(round((resized[1] - 224) / 2))
        literal = pixels[:, top:top + 224, left:left + 224]
        decoder = crop_decoder(decode, 256, 224, interpolation)
        ours = decoder(open_rgb(str(path), decoder.draft))
        assert torch.equal(literal, ours), (decode, interpolation, width, height, (literal.int() - ours.int()).abs().max())


def test_the_contracts_8_bit_rule_gives_tls_pixels_for_deep_images(tmp_path):
    """The contract's rule for images of more than 8 bits, applied to the values stored in the file, gives
    tl's pixels: a 16-bit colour PNG, which Pillow reads by its high bytes (the contract's 16-bit rounding
    differed by one level in 28% of the pixels of such a photo), and 16-bit, 32-bit and float grayscale."""
    import struct
    import zlib

    from PIL import Image

    from pipeline.datasets import open_rgb
    from pipeline.export import _preparation

    text = _preparation(get_backbone("alexnet"), "exact")
    assert "16-bit grayscale scaled as floor(v / 65535 * 255 + 0.5)" in text
    assert "16-bit colour cut to each value's high byte, floor(v / 256)" in text
    assert ("32-bit integer and floating-point grayscale as min(255, floor(max(0, v) / top * 255 + 0.5)), top 65535 "
            "for integers when one exceeds 255, 1 for floats when none exceeds 1, else 255") in text
    values = np.random.default_rng(0).integers(0, 65536, (6, 5, 3))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)  # filter 0: the values as they are
    header = struct.pack(">IIBBBBB", 5, 6, 16, 2, 0, 0, 0)  # 5x6, 16-bit RGB
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert np.array_equal(np.asarray(open_rgb(str(tmp_path / "rgb16.png"))), values // 256)
    gray = values[..., 0]
    for name, stored, top in (("gray16.png", gray.astype(np.uint16), 65535),
                              ("dim16.png", gray.astype(np.uint16) // 512, 65535),  # 16-bit, however dim
                              ("int32.tif", gray.astype(np.int32), 65535),
                              ("int8.tif", gray.astype(np.int32) // 512, 255),
                              ("unit.tif", gray.astype(np.float32) / 65535, 1),
                              ("float.tif", gray.astype(np.float32) / 200 - 10, 255)):  # negatives too
        Image.fromarray(stored).save(tmp_path / name)
        expected = np.minimum(255, np.floor(np.maximum(0, stored.astype(np.float64)) / top * 255 + 0.5))
        assert np.array_equal(np.asarray(open_rgb(str(tmp_path / name)))[..., 0], expected), name


def test_a_failed_export_keeps_the_earlier_export_and_its_contract(model_file, tmp_path, monkeypatch):
    """A contract that could not be written took the export written before it, and the earlier one too;
    now both are written and synced before either replaces its file."""
    (tmp_path / "m.ts").write_bytes(b"earlier export")
    (tmp_path / "m.ts.json").mkdir()  # the contract's name is taken by a folder: refused before any work
    with pytest.raises(TLError, match=r"m.ts.json, where the contract of --out .*m.ts goes, is a folder; remove it"):
        export_model(model_file / "model.pt", "torchscript", tmp_path / "m.ts")
    assert (tmp_path / "m.ts").read_bytes() == b"earlier export"
    (tmp_path / "m.ts.json").rmdir()
    (tmp_path / "m.ts.json").write_text("earlier contract")
    for full_at in (1, 2):  # the disk fills while the export, then while the contract, is written
        monkeypatch.undo()
        disk_full_at(monkeypatch, full_at)
        with pytest.raises(TLError, match="no space left on the device"):  # (stand-ins for tl's: --overwrite)
            export_model(model_file / "model.pt", "torchscript", tmp_path / "m.ts", overwrite=True)
        assert (tmp_path / "m.ts").read_bytes() == b"earlier export"
        assert (tmp_path / "m.ts.json").read_text() == "earlier contract"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.ts", "m.ts.json"]  # no temporaries left


def test_an_export_replaces_only_tls_own_files_unless_told(model_file, tmp_path, run_tl):
    """`tl export --out notes.txt` replaced the notes (and a notes.txt.json beside them) with an export without a
    word. A file at --out or OUT.json that tl did not write as an export and its contract is refused in one line
    before any work, and kept; an export of tl's (either format: its contract inside it) is replaced, so a re-run
    works; --overwrite replaces any file."""
    export = ["export", "--model", model_file / "model.pt", "--format", "torchscript"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    refused = run_tl(*export, "--out", notes)
    assert refused.code == 2 and refused.err == (f"error: {notes} holds a file that tl did not write as a model "
                                                 "export; choose another --out, or pass --overwrite to replace it\n")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "notes.txt.json").exists()
    out = tmp_path / "m.ts"
    assert run_tl(*export, "--out", out).code == 0
    contract = json.loads((tmp_path / "m.ts.json").read_text())
    inside = {"tl_contract.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(out), _extra_files=inside)
    assert json.loads(inside["tl_contract.json"]) == contract  # the contract travels inside the file too
    again = run_tl(*export, "--out", out)  # its own export and contract: replaced
    assert again.code == 0, again
    onnx = run_tl("export", "--model", model_file / "model.pt", "--format", "onnx", "--out", out)
    assert onnx.code == 0 and not zipfile.is_zipfile(out), onnx  # a tl export of the other format: replaced too
    assert run_tl(*export, "--out", out).code == 0 and zipfile.is_zipfile(out)  # and back
    (tmp_path / "m.ts.json").write_text("my contract notes\n")
    beside = run_tl(*export, "--out", out)
    assert beside.code == 2 and beside.err == (f"error: {tmp_path / 'm.ts.json'} holds a file that tl did not write "
                                               "as a JSON contract; choose another --out, or pass --overwrite to "
                                               "replace it\n"), beside
    assert (tmp_path / "m.ts.json").read_text() == "my contract notes\n"
    head = run_tl(*export, "--out", model_file / "head.pt")  # a tl file of another kind is not an export
    assert head.code == 2 and "holds a file that tl did not write as a model export" in head.err, head
    told = run_tl(*export, "--out", notes, "--overwrite")
    assert told.code == 0 and zipfile.is_zipfile(notes), told


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protocol buffer field (key and length are varints)."""
    def varint(value):
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_an_onnx_files_metadata_is_read_without_reading_its_weights(model_file, tmp_path, monkeypatch):
    """Whether an ONNX file at --out is tl's export was known by onnx.load of the whole model (every weight read,
    a VGG16's 500 MB, to find a few hundred bytes of metadata; a user's video at --out read whole), and only with
    the onnx extra. The metadata is now read by a walk of the top-level fields that skips the graph: the same
    properties as onnx reads, found past a graph that is no protocol buffer at all (so never parsed), without the
    onnx package; a text file, random bytes, a truncated export and an empty file hold none."""
    from pipeline.export import tl_export
    from pipeline.ownership import onnx_metadata

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    export_model(model_file / "model.pt", "onnx", out)
    read = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert onnx_metadata(out) == read and "tl_contract" in read
    entry = _field(1, b"tl_contract") + _field(2, read["tl_contract"].encode())
    crafted = tmp_path / "crafted.onnx"  # ir_version, a 3 MB "graph" of random bytes, then the metadata
    crafted.write_bytes(b"\x08\x08" + _field(7, np.random.default_rng(0).bytes(3 << 20)) + _field(14, entry))
    assert onnx_metadata(crafted) == {"tl_contract": read["tl_contract"]}
    with pytest.raises(Exception):
        onnx.load(str(crafted))  # onnx parses the graph, and fails on it
    monkeypatch.setitem(sys.modules, "onnx", None)  # the extra gone: tl's export is still known as tl's
    assert tl_export(out) and tl_export(crafted)
    whole = out.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[:len(whole) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n" * 100_000)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(1).bytes(1 << 20))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (cut, text, noise, empty):
        assert not tl_export(path), path
    assert onnx_metadata(text) is None and onnx_metadata(noise) is None and onnx_metadata(empty) == {}


def test_only_an_onnx_files_metadata_is_read_not_its_other_fields(tmp_path, monkeypatch):
    """The walk read every top-level field up to 1 MiB whole, whatever its number: a file of 1 MiB fields (a
    protocol buffer of other kinds, or any file that parses as one) was read up to 4,096 MiB to find the
    metadata. Now only the metadata's fields are read; the others are skipped by a seek."""
    import builtins

    from pipeline import ownership

    crafted = tmp_path / "fields.onnx"
    entry = _field(1, b"tl_contract") + _field(2, b'{"format": "x"}')
    crafted.write_bytes(b"".join(_field(7, bytes(1 << 20)) for _ in range(40)) + _field(14, entry))
    read = []

    class Counted:
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, n=-1):
            data = self.file.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(ownership, "open", lambda *a, **k: Counted(builtins.open(*a, **k)), raising=False)
    assert ownership.onnx_metadata(crafted) == {"tl_contract": '{"format": "x"}'}
    assert sum(read) < 1000, sum(read)


def test_a_torchscript_export_from_before_its_contract_went_inside_is_tls_own(model_file, tmp_path, run_tl,
                                                                               monkeypatch):
    """A TorchScript export written before tl put its contract inside the file (tl_contract.json) was refused as
    foreign by `tl export --out` of the same path after the upgrade. Such a file is known by tl's Deployed at its
    root together with tl's contract beside it, as tl wrote the two: the re-run replaces the pair. Either alone
    is not enough (the contract holds nothing of the file's): a user's own TorchScript file beside a tl contract,
    and an old export whose contract is gone, are refused and kept."""
    export = ["export", "--model", model_file / "model.pt", "--format", "torchscript"]
    out = tmp_path / "old.ts"
    save = torch.jit.save
    with monkeypatch.context() as before:  # what run_export wrote then: the same file, no extra file
        before.setattr(torch.jit, "save", lambda module, file, _extra_files=None: save(module, file))
        for _ in range(2):  # the second replaces the first, and is of a second trace in this process
            assert run_tl(*export, "--out", out).code == 0
    with zipfile.ZipFile(out) as archive:
        assert not any(name.endswith("tl_contract.json") for name in archive.namelist())
        root = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    assert root.startswith(b"\x80\x02c__torch__.pipeline.export.___torch_mangle_"), root[:80]  # its class renamed
    older = out.read_bytes()
    again = run_tl(*export, "--out", out)
    assert again.code == 0, again
    with zipfile.ZipFile(out) as archive:
        assert any(name.endswith("tl_contract.json") for name in archive.namelist())

    refused = "holds a file that tl did not write as a model export; choose another --out, or pass --overwrite"
    out.write_bytes(older)
    contract = (tmp_path / "old.ts.json").read_bytes()
    (tmp_path / "old.ts.json").unlink()
    alone = run_tl(*export, "--out", out)
    assert alone.code == 2 and refused in alone.err and out.read_bytes() == older, alone
    own = tmp_path / "own.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(own))
    kept = own.read_bytes()
    (tmp_path / "own.ts.json").write_bytes(contract)
    beside = run_tl(*export, "--out", own)
    assert beside.code == 2 and refused in beside.err and own.read_bytes() == kept, beside


def test_an_out_that_names_no_file_and_a_multiscale_model_are_one_line(model_file, tmp_path, run_tl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dot = run_tl("export", "--model", model_file / "model.pt", "--format", "onnx", "--out", ".")
    assert dot.code == 2 and dot.err == "error: --out . is a folder; name a file such as model.onnx\n", dot
    import pipeline.export

    def reached(path):
        raise AssertionError("the export's work began")

    (tmp_path / "plain").write_text("a file")
    with monkeypatch.context() as patched:  # a folder of --out that is a file is found before any work
        patched.setattr(pipeline.export, "load_model_file", reached)
        under = run_tl("export", "--model", model_file / "model.pt", "--format", "onnx", "--out", "plain/x.onnx")
    assert under.code == 2 and under.err == ("error: cannot write onnx export plain/x.onnx: plain is a file, not a "
                                             "folder; choose another path\n"), under
    (tmp_path / "x.onnx.json").symlink_to(model_file / "model.pt")  # the contract would land on the model
    linked = run_tl("export", "--model", model_file / "model.pt", "--format", "onnx", "--out", "x.onnx")
    assert linked.code == 2 and linked.err.endswith("is the same file as --model; writing it would destroy the input: "
                                                    "choose another --out\n"), linked

    model, metadata = load_model_file(model_file / "model.pt")
    patches = {**metadata, "codes_key": {**metadata["codes_key"], "patches": {"scales": [1.0, 2.0]}}}
    monkeypatch.setattr(pipeline.export, "load_model_file", lambda path: (model, patches))
    multiscale = run_tl("export", "--model", model_file / "model.pt", "--format", "torchscript", "--out", "m.ts")
    assert multiscale.code == 2 and "by pooling its patches at many scales (--multiscale)" in multiscale.err, multiscale
    assert not (tmp_path / "m.ts").exists()


def test_exports_run_the_folded_graph_with_the_models_outputs(tmp_path):
    """efficientnet_lite0 (BatchNorm after every conv): the exported graphs have none left, and label
    images as the model file, unfolded, does."""
    root = tmp_path
    make_image_folder(root / "train", classes=("ant", "bee"), per_class=2)
    run_extract(ExtractConfig(data=root / "train", out=root / "cache", backbone="efficientnet_lite0", workers=0,
                              dtype="float32", quiet=True))
    fit_head(FitHeadConfig(cache=root / "cache", out=root / "head.pt"))
    run_finetune(FinetuneConfig(data=root / "train", head=root / "head.pt", out=root / "model.pt", epochs=0,
                                workers=0, quiet=True), say=lambda text: None)
    backbone = get_backbone("efficientnet_lite0")
    source = open_source("imagefolder", root / "train")
    crop = backbone.crop_decoder("fast")
    crops = torch.stack([crop(source.read_image(i, crop.draft)) for i in range(len(source))])
    expected = _model_probabilities(root, crops, backbone)
    export_model(root / "model.pt", "torchscript", root / "m.ts")
    loaded = _load_torchscript(root / "m.ts")
    assert "batch_norm" not in str(loaded.inlined_graph)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(crops).numpy(), expected, atol=1e-5)
    onnx = pytest.importorskip("onnx")
    export_model(root / "model.pt", "onnx", root / "m.onnx")
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(root / "m.onnx")).graph.node}


def test_an_opset_the_exporter_did_not_write_and_a_runtime_that_cannot_run_it_are_one_line(model_file, tmp_path,
                                                                                              monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    import torch.onnx

    export = torch.onnx.export

    def writes_18(*args, **kwargs):  # as torch does when asked for an opset below 18
        return export(*args, **{**kwargs, "opset_version": 18})

    monkeypatch.setattr(torch.onnx, "export", writes_18)
    with pytest.raises(FinetuneError, match=r"^--opset 19: torch's exporter wrote opset 18 instead; leave --opset out"):
        export_model(model_file / "model.pt", "onnx", tmp_path / "m.onnx", opset=19)
    monkeypatch.setattr(torch.onnx, "export", export)

    def refuses(*args, **kwargs):
        raise RuntimeError("Opset 20 is under development and support for this is limited")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuses)
    for opset, remedy in ((None, "pass --opset 18 to 19, or update onnxruntime"), (18, "; update onnxruntime")):
        with pytest.raises(FinetuneError, match=r"cannot run the export \(opset \d+\): Opset 20 is under development"):
            try:
                export_model(model_file / "model.pt", "onnx", tmp_path / "m.onnx", opset=opset)
            except FinetuneError as exc:
                assert remedy in str(exc) and str(exc).endswith("or export --format torchscript"), exc
                raise
    assert not (tmp_path / "m.onnx").exists()
