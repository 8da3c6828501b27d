"""The inference graph: folded BatchNorm and padding, ReLUs in place; the same codes as the eager graph
(float64 references, relative error 1e-10), and nothing rewritten where a tap or another reader needs it."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from cache.reader import CacheReader
from pipeline.backbones import (TapModel, for_inference, get_backbone, load_model, prepare_model, resolve_weights,
                                tap_model)
from pipeline.extract import ExtractConfig, run_extract
from pipeline.folding import fold_for_inference
from pipeline.model_files import FinetuneModel
from tests.test_backbones import RELATIVE_TOLERANCE, reference_inputs, relative_error

# float64 graphs differ only by the rounding of the folded weights
FOLDED_TOLERANCE = 1e-10


def modules_called(graph: fx.GraphModule) -> list[type]:
    return [type(graph.get_submodule(node.target)) for node in graph.graph.nodes if node.op == "call_module"]


def randomized_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm layers with statistics and affine parameters far from the identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            width = layer.num_features
            layer.running_mean.copy_(torch.randn(width, generator=generator))
            layer.running_var.copy_(torch.rand(width, generator=generator) * 2 + 0.1)
            layer.weight.data.copy_(torch.randn(width, generator=generator))
            layer.bias.data.copy_(torch.randn(width, generator=generator))
    return model


def folded_and_eager(model: TapModel, pixels: torch.Tensor) -> tuple[dict, dict, dict]:
    eager = copy.deepcopy(model).double()
    folded = model.double()
    counts = fold_for_inference(folded.extractor)
    with torch.no_grad():
        return counts, folded(pixels.double()), eager(pixels.double())


def test_efficientnet_lite0_folds_every_batch_norm_and_symmetric_pad_with_the_same_codes():
    backbone = get_backbone("efficientnet_lite0")
    model = TapModel(load_model(backbone, resolve_weights(backbone, "imagenet")), backbone, ["pool", "block12"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    counts, folded, eager = folded_and_eager(model, pixels)
    # 49 BatchNorms, 12 of its 17 "same" paddings are symmetric (the others pad right and bottom only)
    assert counts == {"batch_norm": 49, "zero_pad": 12, "relu_in_place": 33}
    called = modules_called(model.extractor)
    assert nn.BatchNorm2d not in called and nn.ReLU6 not in called and called.count(nn.ZeroPad2d) == 5
    for tap in ("pool", "block12"):
        assert relative_error(folded[tap].numpy(), eager[tap].numpy()) <= FOLDED_TOLERANCE, tap


def test_resnet50_folds_conv_modules_with_the_same_codes():
    backbone = get_backbone("resnet50")
    model = TapModel(randomized_statistics(load_model(backbone, resolve_weights(backbone, "none"))), backbone, ["pool"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counts, folded, eager = folded_and_eager(model, pixels)
    assert counts == {"batch_norm": 53, "zero_pad": 0, "relu_in_place": 49}
    assert nn.BatchNorm2d not in modules_called(model.extractor)
    assert relative_error(folded["pool"].numpy(), eager["pool"].numpy()) <= FOLDED_TOLERANCE


class Branchy(nn.Module):
    """Each layer a rewrite must leave alone: a conv output that is also returned, a shared conv module,
    a pad before a shared conv module, a BatchNorm after a conv of computed weights, a ReLU of a view
    and of a tensor read again later, an asymmetric pad, a BatchNorm in training."""

    def __init__(self):
        super().__init__()
        self.tapped_conv, self.tapped_norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared_conv, self.shared_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.asymmetric_pad, self.pad_conv = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 2)
        self.one_pad = nn.ZeroPad2d(1)
        self.symmetric_pad, self.padded_conv, self.norm = nn.ZeroPad2d((1, 1, 2, 2)), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.functional_pad, self.functional_norm = nn.ZeroPad2d((2, 2, 1, 1)), nn.BatchNorm2d(4)
        self.computed_norm = nn.BatchNorm2d(4)
        generator = torch.Generator().manual_seed(3)
        self.functional_weight = nn.Parameter(torch.randn(4, 4, 3, 3, generator=generator))
        self.functional_bias = nn.Parameter(torch.randn(4, generator=generator))
        self.relu, self.train_conv, self.training_norm = nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, images):
        tapped = self.tapped_conv(images)
        shared = self.shared_norm(self.shared_conv(self.tapped_norm(tapped)))
        again = self.shared_conv(self.one_pad(shared))
        padded = self.pad_conv(self.asymmetric_pad(again))
        folded = self.relu(self.norm(self.padded_conv(self.symmetric_pad(padded))))
        functional = self.functional_norm(nn.functional.conv2d(self.functional_pad(folded), self.functional_weight,
                                                               self.functional_bias))
        computed = self.computed_norm(nn.functional.conv2d(functional, self.functional_weight * 0.5, None, 1, 1))
        read_twice = self.relu(computed) + computed
        flat = self.relu(read_twice.flatten(1))
        return {"tapped": tapped, "flat": flat, "trained": self.training_norm(self.train_conv(flat.view_as(read_twice)))}


def test_rewrites_leave_taps_shared_modules_views_and_other_readers_alone():
    model = randomized_statistics(Branchy()).double().eval()
    model.training_norm.train()
    graph = fx.symbolic_trace(model)
    graph.training_norm.train()
    pixels = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = copy.deepcopy(model)(pixels)
        counts = fold_for_inference(graph)
        got = graph(pixels)
        untouched = model(pixels)  # the traced model keeps its own layers (a pad folded into a copy)
    # folded: norm and symmetric_pad into padded_conv, the ReLU after norm (a fresh conv output), and
    # functional_pad and functional_norm into the functional convolution between them
    assert counts == {"batch_norm": 2, "zero_pad": 2, "relu_in_place": 1}
    called = modules_called(graph)
    assert got["flat"].shape == expected["flat"].shape == (2, 4 * 13 * 13)
    assert called.count(nn.BatchNorm2d) == 4 and called.count(nn.ZeroPad2d) == 2 and called.count(nn.ReLU) == 2
    assert [node.kwargs for node in graph.graph.nodes if node.target is nn.functional.relu] == [{"inplace": True}]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=FOLDED_TOLERANCE, atol=FOLDED_TOLERANCE)
        torch.testing.assert_close(untouched[name], expected[name], rtol=0, atol=0)


class LeftAlone(nn.Module):
    """Layers none of the rewrites may touch, each feeding an output of its own."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.read_conv, self.read_norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.training_conv, self.training_conv_norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.computed_weight = nn.Parameter(torch.randn(4, 3, 1, 1, generator=generator))
        self.computed_bias, self.computed_norm = nn.Parameter(torch.randn(4, generator=generator)), nn.BatchNorm2d(4)
        self.lopsided_width, self.lopsided_height = nn.ZeroPad2d((1, 1, 0, 2)), nn.ZeroPad2d((0, 2, 1, 1))
        self.crop, self.already_padded, self.reflected = nn.ZeroPad2d(-1), nn.ZeroPad2d(1), nn.ZeroPad2d(1)
        self.twice_read_pad = nn.ZeroPad2d(1)
        self.width_conv, self.twice_read_conv = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.padded_conv = nn.Conv2d(3, 4, 3, padding=1)
        self.reflect_conv = nn.Conv2d(3, 4, 3, padding_mode="reflect")
        self.functional_weight = nn.Parameter(torch.randn(4, 3, 3, 3, generator=generator))
        self.relu = nn.ReLU()

    def forward(self, images):
        read_twice = self.twice_read_pad(images)
        return {
            # the conv's weight and bias are read again by another node
            "read": self.read_norm(self.read_conv(images)),
            "read again": nn.functional.conv2d(images, self.read_conv.weight, self.read_conv.bias, 1, 1),
            "training conv": self.training_conv_norm(self.training_conv(images)),
            "computed bias": self.computed_norm(nn.functional.conv2d(images, self.computed_weight,
                                                                     self.computed_bias * 2)),
            "lopsided width": self.width_conv(self.lopsided_width(images)),
            "lopsided height": nn.functional.conv2d(self.lopsided_height(images), self.functional_weight),
            "crop": nn.functional.conv2d(self.crop(images), self.functional_weight),
            "already padded": self.padded_conv(self.already_padded(images)),
            "functional already padded": nn.functional.conv2d(self.already_padded(images), self.functional_weight,
                                                              None, 1, 1),
            "reflect": self.reflect_conv(self.reflected(images)),
            "pad read twice": self.twice_read_conv(read_twice) + read_twice.sum(),
            "out": self.relu(torch.add(images, 1.0, out=torch.empty_like(images))),
        }


def test_rewrites_leave_layers_whose_fold_would_change_the_codes_alone():
    model = randomized_statistics(LeftAlone()).double().eval()
    model.training_conv.train()
    graph = fx.symbolic_trace(model)
    pixels = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = copy.deepcopy(model)(pixels)
        counts = fold_for_inference(graph)
        got = graph(pixels)
    assert counts == {"batch_norm": 0, "zero_pad": 0, "relu_in_place": 0} == graph.meta["folded_for_inference"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_extract_runs_the_folded_graph_and_finetune_keeps_batch_norm(image_folder, tmp_path):
    backbone = get_backbone("efficientnet_lite0")
    weights = resolve_weights(backbone, "imagenet")
    assert nn.BatchNorm2d not in modules_called(prepare_model(backbone, weights, ["pool"], torch.device("cpu")).extractor)
    assert nn.BatchNorm2d in modules_called(tap_model(load_model(backbone, weights), backbone, ["pool"]).extractor)

    run_extract(ExtractConfig(data=image_folder, out=tmp_path / "cache", backbone="efficientnet_lite0",
                              weights="imagenet", layers=("pool", "block12"), dtype="float32", workers=0,
                              batch_size=4, quiet=True, decode="exact"))
    reader = CacheReader(tmp_path / "cache")
    eager = TapModel(load_model(backbone, weights), backbone, ["pool", "block12"]).double()
    with torch.no_grad():
        reference = eager(reference_inputs(reader, image_folder, "efficientnet_lite0"))
    for tap in ("pool", "block12"):
        assert relative_error(reader.load(tap), reference[tap].numpy()) <= RELATIVE_TOLERANCE, tap


def test_a_finetuned_model_runs_folded_with_the_same_logits():
    """evaluate and predict --model: the tap model inside a finetuned model is folded, its head kept."""
    backbone = get_backbone("efficientnet_lite0")
    features = TapModel(randomized_statistics(load_model(backbone, resolve_weights(backbone, "imagenet"))), backbone,
                        ["pool"])
    head = nn.Linear(1280, 3)
    model = FinetuneModel(features, "pool", head).double().eval()
    eager = copy.deepcopy(model)
    pixels = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    folded = for_inference(model, torch.device("cpu"))
    assert nn.BatchNorm2d not in modules_called(folded.features.extractor) and folded.head is head
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels), eager(pixels), rtol=FOLDED_TOLERANCE, atol=FOLDED_TOLERANCE)
