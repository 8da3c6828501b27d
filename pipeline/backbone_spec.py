"""What a backbone is: its taps (named activations and their widths) and every fact that decides the
pixels it sees (input size, resize, interpolation, mean, std), with the transforms built from them.
The registry and the weights live in pipeline.backbones; families built on demand (timm) here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.decoding import crop_decoder, normalize
from pipeline.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tap:
    """A named activation: the FX graph node that produces it and its width once flattened."""

    node: str
    width: int


@dataclass(frozen=True)
class Backbone:
    """One registry entry. `build()` makes the architecture with freshly initialised weights."""

    name: str
    build: Callable[[], nn.Module]
    imagenet_weights: Callable[[], Path]
    taps: dict[str, Tap]
    default_tap: str
    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aliases: dict[str, str] = field(default_factory=dict)
    interpolation: str = "bilinear"  # of the resize: bilinear, or bicubic (many timm models)
    facts: dict = field(default_factory=dict)  # more of what decides the codes (timm: its version, the tag)
    # (full model, backbone, taps) -> a module returning {tap: (batch, width)}; None: FX nodes (TapModel)
    make_taps: Callable | None = None
    # weights file -> full model, for published weights that need their family's own loader (timm)
    load_imagenet: Callable[[Path], nn.Module] | None = None
    unused_keys: tuple[str, ...] = ()  # state-dict prefixes a tap never uses (a timm classifier): not compared

    def preprocessing(self, decode: str = "exact") -> dict:
        """The facts that decide the pixels a model sees; part of every cache key. The decoding mode
        is named only when it is not `exact`, so caches and heads made before modes existed still
        match their exact-mode equals."""
        facts = {
            "resize": self.resize_size,
            "crop": self.input_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.facts,
        }
        return facts if decode == "exact" else {**facts, "decode": decode}

    def crop_decoder(self, decode: str):
        """PIL image -> (3, input, input) uint8 centre crop in decoding mode `decode` (see decoding)."""
        return crop_decoder(decode, self.resize_size, self.input_size, self.interpolation)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """A uint8 batch of crops -> the float input the weights expect, on the batch's device."""
        return normalize(pixels, self.mean, self.std)

    def transform(self):
        """PIL image -> normalised float tensor, as the weights were trained to expect: resize, centre
        crop, scale and normalise (torchvision's own transforms; the reference the decoding modes are
        tested against)."""
        from torchvision import transforms

        resize = transforms.Resize(self.resize_size, interpolation=transforms.InterpolationMode[self.interpolation.upper()],
                                   antialias=True)
        return transforms.Compose([resize, transforms.CenterCrop(self.input_size), *self.normalization()])

    def normalization(self) -> list:
        """PIL image -> float tensor scaled to [0, 1] and normalised by the weights' mean and std."""
        from torchvision import transforms

        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]

    def resolve_taps(self, names: list[str]) -> list[str]:
        """Canonical tap names for user-given names (aliases such as relu6 -> fc6), in the order given."""
        if not names:
            raise BackboneError(f"no layer given; {self.name} has layers: {self.layer_list()}")
        resolved = []
        for name in names:
            if not name.strip():  # `--layers ,` or `fc7,,fc6`: not the default layer, silently
                raise BackboneError(f"--layers has an empty layer name (a comma too many?); valid layers of "
                                    f"{self.name}: {self.layer_list()}; give --layers one of them")
            canonical = self.aliases.get(name, name)
            if canonical not in self.taps:
                raise BackboneError(
                    f"unknown layer '{name}' for backbone {self.name}; valid layers: {self.layer_list()}; "
                    "give --layers one of them"
                )
            if canonical not in resolved:
                resolved.append(canonical)
        return resolved

    def layer_list(self) -> str:
        names = [f"{tap} ({spec.width})" for tap, spec in self.taps.items()]
        names += [f"{alias} (= {target})" for alias, target in self.aliases.items()]
        return ", ".join(names)

    @staticmethod
    def conv_layers(model: nn.Module) -> list[str]:
        """The layers --unfreeze counts, in the order they were registered (input to output): convolutions,
        and transformer blocks (a module with an attention module among its children and no convolution in
        it; a ViT's layers are its blocks, and its one conv, the patch embedding, comes first)."""
        return [name for name, module in model.named_modules()
                if isinstance(module, nn.Conv2d) or (_attends(module) and not any(
                    isinstance(inner, nn.Conv2d) for inner in module.modules()))]


def _attends(module: nn.Module) -> bool:
    """Whether a child of `module` is an attention module: torch's, or one named so (timm's Attention,
    WindowAttention, CaiT's TalkingHeadAttn and ClassAttn, MaxViT's channels-last AttentionCl, ...) that is
    no block holding one (CaiT's LayerScaleBlockClassAttn, MaxViT's PartitionAttentionCl)."""
    return any(isinstance(child, nn.MultiheadAttention)
               or (type(child).__name__.endswith(("Attention", "Attn", "AttentionCl")) and not _attends(child))
               for child in module.children())


def layer_words(model: nn.Module, names: list[str]) -> str:
    """What Backbone.conv_layers counted in `model`, in words: conv layers, and transformer blocks if any."""
    modules = dict(model.named_modules())  # a traced graph may keep a conv only as a holder of its weights
    blocks = any(_attends(modules[name]) for name in names)
    return "conv layers and transformer blocks" if blocks else "conv layers"
