"""`tl export`: a finetuned model as one deployable file (TorchScript, or ONNX with the onnx extra),
pixels -> class probabilities, with its input contract beside it (and inside the file), kept only
when it gives the model's probabilities and top-1 labels on real images.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cache.manifest import decode_of
from pipeline import __version__
from pipeline.backbones import Backbone, fold_taps, get_backbone
from pipeline.datasets import DECODE_ERRORS
from pipeline.decoding import normalize
from pipeline.errors import FinetuneError, TLError, install_extra
from pipeline.files import check_folders, refuse_overwriting_inputs, write_together
from pipeline.ownership import onnx_metadata, refuse_foreign, zip_member_holds
from pipeline.formats import DEFAULT_CLASSES, open_source
from pipeline.model_files import load_model_file
from pipeline.training import output_activation

EXPORT_FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": "model.ts", "onnx": "model.onnx"}  # file names the messages suggest
# --opset: torch's ONNX exporter writes opset 18 and later (asked for less, it writes 18 without a word);
# 23 is the highest its operators are written for
OPSETS = range(18, 24)
CONTRACT_FORMAT = "tl-export/1"
CONTRACT_NAME = "tl_contract"  # the contract inside the export: an ONNX metadata key, a TorchScript extra file (.json)
CHECK_IMAGES = 16  # images the export is checked on
# the start of a TorchScript file's pickle (protocol 2, then its root object's class) when a traced Deployed is
# its root: tl's class, which no other program's file has at its root (a second trace in one process mangles it)
DEPLOYED_ROOT = re.compile(rb"\x80\x02c__torch__\.pipeline\.export(\.___torch_mangle_\d+)?\nDeployed\n")


@dataclass
class ExportResult:
    out: Path
    contract_path: Path  # the JSON contract beside the exported file
    contract: dict
    difference: float  # largest probability difference from the model on the check images
    agreeing: int  # check images whose top-1 label the export and the model agree on
    checked: int
    checked_on: str  # what the check images were


class Deployed(nn.Module):
    """The model with its input handling and output activation: uint8 RGB 0..255 (`raw_pixels`, scaled
    and normalised inside) or already-normalised float input -> probabilities."""

    def __init__(self, model: nn.Module, backbone: Backbone, multilabel: bool, raw_pixels: bool):
        super().__init__()
        self.model, self.activation, self.raw_pixels = model, output_activation(multilabel), raw_pixels
        self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.raw_pixels:
            pixels = (pixels.float() / 255.0 - self.mean) / self.std
        return self.activation(self.model(pixels))


def contract_of(metadata: dict, backbone: Backbone, raw_pixels: bool) -> dict:
    """What the exported file takes and gives, in words and numbers a deployment can follow."""
    size = backbone.input_size
    decode = decode_of(metadata["codes_key"]["preprocessing"])
    multilabel = metadata["head"]["state"]["multilabel"]
    return {
        "format": CONTRACT_FORMAT,
        "tl_version": __version__,
        "input": {
            "name": "pixels", "shape": ["batch", 3, size, size], "layout": "NCHW", "channel_order": "RGB",
            "dtype": "uint8" if raw_pixels else "float32",
            "value_range": [0, 255] if raw_pixels else "normalised",
            "normalization": ("inside the model: x / 255, then (x - mean) / std per channel" if raw_pixels else
                              "before the model: x / 255 for 0..255 values, then (x - mean) / std per channel"),
            "mean": list(backbone.mean), "std": list(backbone.std),
            "resize": backbone.resize_size, "crop": size, "interpolation": backbone.interpolation,
            "preparation": _preparation(backbone, decode),
            "decode": decode,
        },
        "output": {"name": "probabilities", "shape": ["batch", len(metadata["classes"])],
                   "activation": "sigmoid per class" if multilabel else "softmax", "classes": metadata["classes"]},
        "backbone": metadata["codes_key"]["backbone"], "layer": metadata["layer"],
    }


def _preparation(backbone: Backbone, decode: str) -> str:
    """How tl turns an image file into the crop, in steps a deployment can repeat to get tl's numbers."""
    resize, size = backbone.resize_size, backbone.input_size
    how = (f"by torch.nn.functional.interpolate(x, size=(h, w), mode='{backbone.interpolation}', antialias=True, "
           "align_corners=False) on the uint8 (1, 3, H, W) tensor (torch's uint8 kernel)" if decode == "fast" else
           f"by Pillow's resize ({backbone.interpolation}), as torchvision's Resize does on a PIL image")
    # as rgb.to_rgb makes them; Pillow itself reads a 16-bit colour PNG as 8-bit, keeping the high bytes
    steps = ["8-bit RGB (transparency composited over white; 16-bit grayscale scaled as floor(v / 65535 * 255 + 0.5), "
             "16-bit colour cut to each value's high byte, floor(v / 256), as Pillow reads it; 32-bit integer and "
             "floating-point grayscale as min(255, floor(max(0, v) / top * 255 + 0.5)), top 65535 for integers when "
             "one exceeds 255, 1 for floats when none exceeds 1, else 255; EXIF orientation is not applied)",
             f"resize the shorter side to {resize} and the longer to int({resize} * longer / shorter), the sides "
             f"those of the file as stored, {how}",
             f"centre-crop {size}x{size} at offset int(round((side - {size}) / 2)) per axis (Python's round: halves to "
             "even), as torchvision's CenterCrop does"]
    if decode == "fast":  # what --decode fast adds; its pixels differ slightly from the full-size decode's
        steps.insert(0, "a JPEG is decoded at reduced scale: Pillow's Image.draft('RGB', (w, h)) with (w, h) the "
                        "resized size below (the resize still starts from the file's own size, not the drafted one)")
    return "; ".join(steps)


def check_batch(metadata: dict, backbone: Backbone) -> tuple[torch.Tensor, str]:
    """(uint8 crops, what they are) to check an export on: the training images recorded in the model
    file when they are still there, else a deterministic photo-like batch (smooth colour fields with
    edges), its description saying why the training images were not used."""
    settings = metadata.get("settings", {})
    crop = backbone.crop_decoder(decode_of(metadata["codes_key"]["preprocessing"]))
    try:
        source = open_source(settings["format"], Path(settings["data"]), settings["split"],
                             classes=settings.get("classes", DEFAULT_CLASSES),
                             label_key=settings.get("label_key"))
        crops = []
        for index in np.linspace(0, len(source) - 1, min(CHECK_IMAGES, len(source))).astype(int):
            try:
                crops.append(crop(source.read_image(int(index), crop.draft)))
            except DECODE_ERRORS:
                continue  # an unreadable image is left out; the readable ones still check the export
        if crops:
            return torch.stack(crops), f"{len(crops)} images of {settings['data']}"
        why = f"none of the images of {settings['data']} could be read"
    except KeyError:
        why = "the model file records no training data"
    except (TypeError, OSError, TLError) as exc:  # moved, unlistable or no longer of its format
        said = str(exc).splitlines()[0].split("; ")[0] if str(exc) else type(exc).__name__  # not the stage's remedy
        why = f"the training images were not found: {said}"
    return _drawn_batch(backbone, crop), f"{CHECK_IMAGES} drawn photo-like images ({why})"


def _drawn_batch(backbone: Backbone, crop) -> torch.Tensor:
    """A deterministic photo-like batch: smooth random colour fields, each with one hard-edged block."""
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(CHECK_IMAGES):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((backbone.resize_size,) * 2, Image.Resampling.BICUBIC)
        pixels = np.array(field)
        top, left = rng.integers(0, backbone.resize_size // 2, 2)
        pixels[top:top + 40, left:left + 60] = rng.integers(0, 256, 3)  # an object's hard edges
        crops.append(crop(Image.fromarray(pixels)))
    return torch.stack(crops)


@dataclass
class ExportConfig:
    """What `run_export` reads and writes: the finetuned `model` file as a `format` file (torchscript or
    onnx) at `out`, its input contract beside it as OUT.json. `raw_pixels`: the export takes uint8 RGB
    0..255 and normalises inside (else float input already normalised with the backbone's mean and std).
    `tolerance`: the largest probability difference from the model the check on real images allows.
    Each field is the `tl export` option of the same name."""

    model: Path
    format: str
    out: Path
    raw_pixels: bool = True
    tolerance: float = 1e-4
    opset: int | None = None  # onnx: the ONNX opset to write (None: the exporter's default)
    overwrite: bool = False  # replace files at `out` and OUT.json that tl did not write as an export and its contract


def export_model(model_path: Path, format: str, out: Path, **options) -> ExportResult:
    """`run_export` of an ExportConfig built from these arguments."""
    return run_export(ExportConfig(Path(model_path), format, Path(out), **options))


def run_export(config: ExportConfig) -> ExportResult:
    """Write a deployable file and its contract (OUT.json) and check the export against the model on real
    images: it is kept only when every top-1 label agrees and no probability differs by more than
    `tolerance`. ONNX needs the onnx extra."""
    model_path, format, out = config.model, config.format, config.out
    raw_pixels, tolerance = config.raw_pixels, config.tolerance
    if format not in EXPORT_FORMATS:
        raise FinetuneError(f"unknown export format {format}; valid: {', '.join(EXPORT_FORMATS)}")
    if config.opset is not None and (format != "onnx" or config.opset not in OPSETS):
        raise FinetuneError(f"--opset {config.opset}: an onnx export writes opsets {OPSETS[0]} to {OPSETS[-1]}; "
                            + ("pass one of them (an older runtime runs the lower ones), or leave --opset out"
                               if format == "onnx" else "a torchscript file has none: leave --opset out"))
    out = Path(out)
    if out.is_dir() or not out.name:  # `--out .` names no file
        raise FinetuneError(f"--out {out} is a folder; name a file such as {out / SUFFIXES[format]}")
    contract_path = out.with_name(out.name + ".json")
    if contract_path.is_dir():  # found before anything is written, not after the export
        raise FinetuneError(f"{contract_path}, where the contract of --out {out} goes, is a folder; remove it or "
                            "choose another --out")
    refuse_overwriting_inputs({"--out": out, "--out's contract": contract_path}, {"--model": model_path})
    check_folders(out, f"{format} export")  # before the export's work, not after it
    if not config.overwrite:  # an export of tl's (either format) and its contract are replaced: a re-run works
        remedy = "choose another --out, or pass --overwrite to replace it"
        refuse_foreign(out, "model export", remedy, ours=tl_export)
        refuse_foreign(contract_path, "JSON contract", remedy, ours=tl_contract)
    if format == "onnx":
        try:
            import onnx
            import onnxruntime
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise FinetuneError(f"ONNX export needs the onnx extra (onnx, onnxruntime, onnxscript): "
                                f"{install_extra('onnx')}") from None
    model, metadata = load_model_file(model_path)
    if metadata["codes_key"].get("patches"):
        raise FinetuneError(f"model {model_path} scores an image by pooling its patches at many scales (--multiscale), "
                            "which one exported network does not do; score images with tl predict --model, or export a "
                            "model finetuned from a head of centre-crop codes")
    backbone = get_backbone(metadata["codes_key"]["backbone"])
    # a deployed graph computes no gradients: a TorchScript file run outside torch.no_grad() would otherwise
    # return probabilities that carry them (and keep every activation for a backward pass that never comes)
    deployed = Deployed(model, backbone, metadata["head"]["state"]["multilabel"], raw_pixels).eval()
    deployed.requires_grad_(False)
    crops, checked_on = check_batch(metadata, backbone)
    inputs = crops if raw_pixels else normalize(crops, backbone.mean, backbone.std)
    with torch.inference_mode():
        expected = deployed(inputs).numpy()  # the model as it was trained
    # the file runs the folded graph (BatchNorm in the convolutions), as tl's own inference does
    fold_taps(deployed)
    contract = contract_of(metadata, backbone, raw_pixels)
    # exported in memory and written (atomically) only when it computes what the model computes
    exported = io.BytesIO()
    if format == "torchscript":
        with warnings.catch_warnings():
            # torch 2.14 marks TorchScript itself (jit.trace, jit.save) as deprecated for torch.export; the
            # format is what the user asked for, and the check below is what counts
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            torch.jit.save(torch.jit.trace(deployed, inputs[:2]), exported,
                           _extra_files={f"{CONTRACT_NAME}.json": json.dumps(contract)})
            exported.seek(0)
            with torch.inference_mode():
                found = torch.jit.load(exported)(inputs).numpy()
    else:
        program = torch.onnx.export(deployed, (inputs[:2],), input_names=["pixels"],
                                    output_names=["probabilities"], dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=config.opset)
        graph = program.model_proto
        written = next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
        if config.opset is not None and written != config.opset:
            raise FinetuneError(f"--opset {config.opset}: torch's exporter wrote opset {written} instead; leave "
                                "--opset out, or pass the opset it wrote")
        contract["opset"] = written
        onnx.helper.set_model_props(graph, {CONTRACT_NAME: json.dumps(contract)})
        exported = io.BytesIO(graph.SerializeToString())
        try:
            session = onnxruntime.InferenceSession(exported.getvalue(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types (an opset newer than it runs): nothing written
            lower = f"pass --opset {OPSETS[0]}" + (f" to {written - 1}" if written - 1 > OPSETS[0] else "") + \
                ", or " if written > OPSETS[0] else ""
            raise FinetuneError(f"onnxruntime {onnxruntime.__version__} cannot run the export (opset {written}): "
                                f"{(str(exc).splitlines() or [type(exc).__name__])[0][:160]}; {lower}update "
                                "onnxruntime, or export --format torchscript") from None
        found = session.run(None, {"pixels": inputs.numpy()})[0]
    difference = float(np.abs(found - expected).max())
    # a near tie (the model's two best within `tolerance`) may flip without either being wrong
    ranked = np.sort(expected, axis=1)
    tie = (ranked[:, -1] - ranked[:, -2]) <= tolerance if expected.shape[1] > 1 else np.zeros(len(expected), bool)
    agreeing = int(((found.argmax(axis=1) == expected.argmax(axis=1)) | tie).sum())
    if difference > tolerance or agreeing < len(expected):
        raise FinetuneError(f"the {format} export differs from the model on {checked_on} (top-1 agrees on "
                            f"{agreeing}/{len(expected)}, probabilities differ by up to {difference:.2e}, "
                            f"allowed {tolerance:g}); it was not kept")
    # both written before either replaces its file: a failed write (a full disk) keeps the earlier pair whole
    write_together([(out, exported.getbuffer(), f"{format} export"),
                    (contract_path, (json.dumps(contract, indent=1) + "\n").encode(), "export contract")])
    return ExportResult(out, contract_path, contract, difference, agreeing, len(expected), checked_on)


def tl_export(path: Path) -> bool:
    """Whether `path` is an export of tl's, in either format: its contract inside it (see run_export), or for a
    TorchScript file written before the contract went inside (tl 0.1.0 of 2026-11-29/30), the pair tl wrote
    together: tl's Deployed as the file's root object and tl's contract beside it (the contract holds no digest
    of the file, nor the file its contract: neither alone says tl wrote it). An ONNX file's contract is in its
    metadata, read without reading the weights (and without the onnx extra)."""
    mark = f'"format": "{CONTRACT_FORMAT}"'
    if zipfile.is_zipfile(path):  # TorchScript
        beside = Path(path).with_name(Path(path).name + ".json")
        return zip_member_holds(path, f"{CONTRACT_NAME}.json", mark.encode()) or (
            zip_member_holds(path, "data.pkl", DEPLOYED_ROOT) and tl_contract(beside))
    props = onnx_metadata(path)  # an ONNX file: its metadata read by a walk of its top-level fields
    return props is not None and mark in props.get(CONTRACT_NAME, "")


def tl_contract(path: Path) -> bool:
    """Whether `path` is an export's contract (OUT.json) of tl's."""
    contract = json.loads(Path(path).read_text(encoding="utf-8"))
    return isinstance(contract, dict) and contract.get("format") == CONTRACT_FORMAT
