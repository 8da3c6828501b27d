"""`tl export`: a finetuned model as one deployable file (TorchScript, or ONNX with the onnx extra),
pixels -> class probabilities, kept only when it computes what the model computes.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.backbones import get_backbone
from pipeline.errors import FinetuneError
from pipeline.files import refuse_overwriting_inputs, write_bytes
from pipeline.model_files import load_model_file
from pipeline.training import output_activation

EXPORT_FORMATS = ("torchscript", "onnx")


def export_model(model_path: Path, format: str, out: Path, tolerance: float = 1e-4) -> float:
    """Write a deployable file (pixels -> class probabilities) and check it against the model on a seeded
    sample batch; returns the largest difference. ONNX needs the onnx and onnxruntime packages."""
    if format not in EXPORT_FORMATS:
        raise FinetuneError(f"unknown export format {format}; valid: {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    refuse_overwriting_inputs({"--out": out}, {"--model": model_path})
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder; name a file such as {out / ('model.' + format)}")
    model, metadata = load_model_file(model_path)
    module = nn.Sequential(model, output_activation(metadata["head"]["state"]["multilabel"])).eval()
    size = get_backbone(metadata["codes_key"]["backbone"]).input_size
    sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(sample).numpy()
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise FinetuneError("ONNX export needs the onnx and onnxruntime packages: "
                                "pip install onnx onnxruntime") from None
    # exported in memory and written (atomically) only when it computes what the model computes
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices; the check below is what counts
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(module, sample), exported)
            exported.seek(0)
            with torch.inference_mode():
                found = torch.jit.load(exported)(sample).numpy()
        else:
            torch.onnx.export(module, (sample,), exported, input_names=["pixels"], output_names=["probabilities"],
                              dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
            session = onnxruntime.InferenceSession(exported.getvalue(), providers=["CPUExecutionProvider"])
            found = session.run(None, {"pixels": sample.numpy()})[0]
    difference = float(np.abs(found - expected).max())
    if difference > tolerance:
        raise FinetuneError(f"the {format} export differs from the model by {difference:.2e} (> {tolerance:g}); "
                            "it was not kept")
    write_bytes(out, exported.getbuffer(), f"{format} export")
    return difference
