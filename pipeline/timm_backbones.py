"""timm's catalogue as backbones: `--backbone timm:MODEL` (`timm:resnet50.a1_in1k`, `timm:convnext_tiny`)
for any model `timm.create_model` builds, made on first use (the `timm` extra; never imported otherwise).

Taps: `pool`, the pooled pre-logits features (`forward_head(..., pre_logits=True)`), and `stageN`, the
N-th feature map timm exposes (`feature_info`), averaged over its positions. The pixels (input size,
resize from crop_pct, interpolation, mean, std) come from the model's pretrained config; the timm
version and the pretrained tag enter the cache key. `--weights imagenet` loads timm's pretrained file
from the Hugging Face cache (nothing is downloaded), through timm's own loader.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.backbone_spec import Backbone, Tap
from pipeline.errors import BackboneError, install_extra

TIMM_PREFIX = "timm:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm():
    try:
        import timm
    except ImportError:
        raise BackboneError(f"timm backbones need the timm package: {install_extra('timm')}") from None
    return timm


def _create(model: str, **options) -> nn.Module:
    """timm.create_model for a name of timm's catalogue (MODEL or MODEL.TAG); never a hub or a local
    path (nothing is fetched). Anything timm cannot build is one BackboneError."""
    timm = _timm()
    architecture = model.split(".")[0]
    if not model or ":" in model or "/" in model or model.endswith(".") or not timm.is_model(architecture):
        names = timm.list_models() + timm.list_models(pretrained=True)
        close = difflib.get_close_matches(model.lower(), names, n=4)
        raise BackboneError(f"timm has no model '{model}'" + (f"; close names: {', '.join(close)}" if close else "")
                            + " (timm.list_models() lists them)")
    if "." in model and model not in timm.list_models(pretrained=True):
        tags = timm.list_pretrained(f"{architecture}.*")
        raise BackboneError(f"timm has no pretrained tag '{model}'; tags of {architecture}: {', '.join(tags) or 'none'}")
    try:
        return timm.create_model(model, **options)
    except Exception as exc:  # timm raises many kinds for a model it cannot build here
        raise BackboneError(f"timm cannot build {model} here ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _load_imagenet(model: str, path: Path) -> nn.Module:
    try:
        return _create(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except BackboneError as exc:
        raise BackboneError(f"timm cannot load its pretrained file {path} into {model}: {exc}; fetch it again "
                            "or pass --weights PATH") from None


def timm_backbone(name: str) -> Backbone:
    """The registry entry of `timm:MODEL`, read from the model's pretrained config."""
    timm = _timm()
    model_name = name[len(TIMM_PREFIX):]
    try:  # the config and shapes without the weights' memory or init time
        with torch.device("meta"):
            probe = _create(model_name, pretrained=False)
    except BackboneError:
        probe = _create(model_name, pretrained=False)
    config = probe.pretrained_cfg
    refusal = _refusal(config)
    if refusal:
        raise BackboneError(f"{name} was trained on {refusal}; tl resizes the shorter side and crops a centre square: "
                            "choose a model whose crop_mode is center and whose input is square")
    _, height, width = config["input_size"]
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic"):
        interpolation = "bicubic" if interpolation == "random" else "bilinear"
    taps = {"pool": Tap("pool", int(getattr(probe, "head_hidden_size", None) or probe.num_features))}
    taps.update({f"stage{index}": Tap(f"stage{index}", int(info["num_chs"]))
                 for index, info in enumerate(getattr(probe, "feature_info", []) or [])})
    return Backbone(
        name=name,
        build=lambda: _create(model_name, pretrained=False),
        imagenet_weights=lambda: _cached_weights(model_name, config),
        taps=taps,
        default_tap="pool",
        input_size=int(height),
        resize_size=int(math.floor(height / config.get("crop_pct", 0.875))),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=interpolation,
        facts={"timm": timm.__version__, "pretrained_tag": config.get("tag"), "crop_mode": "center"},
        make_taps=TimmTaps,
        load_imagenet=lambda path: _load_imagenet(model_name, path),
        unused_keys=tuple(f"{name}." for name in _classifiers(config)),
    )


def _refusal(config: dict) -> str | None:
    """What a model was trained on that tl's pixels (a centre square crop) are not, from its pretrained
    config: images prepared by another crop_mode, or inputs that are not square; None when tl can run it."""
    if config.get("crop_mode", "center") != "center":
        return f"images prepared by crop_mode '{config['crop_mode']}'"
    _, height, width = config["input_size"]
    return f"{width}x{height} inputs" if height != width else None


def _classifiers(config: dict) -> tuple[str, ...]:
    """The modules of the ImageNet classifier (pretrained_cfg's `classifier`): never part of a tap."""
    classifier = config.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _cached_weights(model_name: str, config: dict) -> Path:
    """timm's pretrained file in the Hugging Face cache; never a download."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo = config.get("hf_hub_id")
    if repo:
        for filename in WEIGHT_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
    raise BackboneError(f"timm's pretrained weights of {model_name} ({repo or 'no Hugging Face id'}) are not in the "
                        f"Hugging Face cache {constants.HF_HUB_CACHE}; fetch them where there is a network "
                        f"(timm.create_model('{model_name}', pretrained=True)) and copy that cache here, or pass "
                        "--weights PATH or none")


class TimmTaps(nn.Module):
    """A timm model cut to its taps: {tap: (batch, width)} codes. Stage taps only: the layers after the
    deepest stage are pruned (timm's prune_intermediate_layers), so finetune counts conv layers up to it."""

    def __init__(self, model: nn.Module, backbone: Backbone, taps: list[str]):
        super().__init__()
        self.taps = list(taps)
        self.stages = sorted(int(tap.removeprefix("stage")) for tap in self.taps if tap.startswith("stage"))
        if self.stages and "pool" not in self.taps and hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers(self.stages, prune_norm=False, prune_head=True)
        elif hasattr(model, "reset_classifier"):
            model.reset_classifier(0)  # the ImageNet classifier is never used: pre-logits are the tap
        self.extractor = model.eval()
        self.traced = False  # True once fold_for_inference made `extractor` this module's folded FX graph

    def fold_for_inference(self) -> dict:
        """For frozen runs only: this module's forward traced into an FX graph (timm's no-trace modules and
        functions stay calls), BatchNorm folded (BatchNormAct2d too, folding.py), and run from then on as
        `extractor`; what was folded. A model FX cannot trace, with nothing to fold (LayerNorm families),
        or whose folded graph does not give the eager codes on a probe batch, stays eager: {}."""
        from torch import fx

        from pipeline.folding import fold_for_inference

        if self.traced:
            return self.extractor.meta["folded_for_inference"]
        try:
            from timm.layers import BatchNormAct2d, get_notrace_functions, get_notrace_modules
        except ImportError:  # a timm without FX helpers: eager
            return {}
        leaves = tuple(get_notrace_modules())

        class Tracer(fx.Tracer):
            def is_leaf_module(self, module, name):
                return isinstance(module, leaves) or super().is_leaf_module(module, name)

        functions = tuple(function for function in get_notrace_functions() if callable(function))
        try:
            graph = fx.GraphModule(self, Tracer(autowrap_functions=functions).trace(self), class_name="TimmTaps")
        except Exception:  # noqa: BLE001 - FX refuses models in many ways (data-dependent shapes, ...)
            return {}
        folded = fold_for_inference(graph, norm_act=(BatchNormAct2d,))
        if not any(folded.values()) or not self._same_codes(graph):  # nothing gained, or not the same codes
            return {}
        self.extractor, self.traced = graph.eval(), True
        return folded

    def _same_codes(self, graph: nn.Module) -> bool:
        """Whether `graph` gives this module's codes, to float32 rounding, on a seeded probe batch."""
        parameter = next(self.extractor.parameters(), torch.empty(0))
        size = getattr(self.extractor, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        probe = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
        with torch.inference_mode():
            expected, folded = self(probe), graph(probe)
        if not all(torch.isfinite(expected[tap]).all() for tap in self.taps):
            return False  # weights that give NaN or Inf: eager, and extract's check of the codes names the file
        return all(torch.allclose(folded[tap].float(), expected[tap].float(), rtol=1e-3,
                                  atol=1e-3 * float(expected[tap].abs().max()) + 1e-6) for tap in self.taps)

    def forward(self, images):
        if self.traced:
            return self.extractor(images)
        outputs, features = {}, None
        if self.stages:  # with the pool tap too, one pass: its final features are forward_features'
            if "pool" in self.taps:  # to the last stage, whichever the deepest tap (Hiera stops early by default)
                features, maps = self.extractor.forward_intermediates(images, indices=self.stages, stop_early=False,
                                                                      intermediates_only=False)
            else:
                maps = self.extractor.forward_intermediates(images, indices=self.stages, intermediates_only=True)
            outputs.update({f"stage{index}": feature.mean(dim=(2, 3)) for index, feature in zip(self.stages, maps)})
        if "pool" in self.taps:
            features = self.extractor.forward_features(images) if features is None else features
            outputs["pool"] = self.extractor.forward_head(features, pre_logits=True)
        return {tap: outputs[tap].flatten(1) for tap in self.taps}


def timm_models(pattern: str) -> list[dict]:
    """The timm models (with pretrained weights) matching `pattern`, as `tl backbones` shows them: input size
    and interpolation from their pretrained config, whether their weights are in the Hugging Face cache,
    why tl refuses one (`refused`, else None); the taps too (which means building the model) when the
    pattern names one usable model."""
    timm = _timm()
    from huggingface_hub import try_to_load_from_cache

    names = timm.list_models(pattern, pretrained=True)
    if not names:
        raise BackboneError(f"no timm model with pretrained weights matches '{pattern}'; try a wider pattern "
                            "such as 'convnext*'")
    rows = []
    for name in names:
        config = timm.models.get_pretrained_cfg(name).to_dict()
        repo = config.get("hf_hub_id")
        here = bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str) for f in WEIGHT_FILES)
        refusal = _refusal(config)  # listed as refused: among the usable ones it read as a backbone extract takes
        taps = None
        if len(names) == 1 and not refusal:
            taps = {tap: spec.width for tap, spec in timm_backbone(TIMM_PREFIX + name).taps.items()}
        rows.append({"name": TIMM_PREFIX + name, "input": config["input_size"][-1],
                     "interpolation": config.get("interpolation"), "taps": taps, "weights_here": here,
                     "refused": refusal})
    return rows
