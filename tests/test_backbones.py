"""The registry: taps mean what the literature means, weights load as asked, errors say what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from cache.reader import CacheReader
from pipeline.backbones import TapModel, get_backbone, list_backbones, load_model, resolve_weights
from pipeline.datasets import open_rgb
from pipeline.errors import BackboneError
from pipeline.extract import ExtractConfig, run_extract

# Row-wise relative error ||codes - reference|| / ||reference|| against a float64 reference.
RELATIVE_TOLERANCE = 1e-4


def relative_error(codes: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(codes - reference, axis=1) / np.linalg.norm(reference, axis=1)))


def extract_float32(folder, out, backbone, layers):
    run_extract(ExtractConfig(data=folder, out=out, backbone=backbone, weights="none", layers=tuple(layers),
                              dtype="float32", workers=0, batch_size=4, quiet=True, decode="exact"))
    return CacheReader(out)


def reference_inputs(reader: CacheReader, folder, backbone_name):
    transform = get_backbone(backbone_name).transform()
    ids = reader.load_column("sample_id")
    return torch.stack([transform(open_rgb(str(folder / i))) for i in ids]).double()


def test_registry_lists_the_four_backbones():
    assert list_backbones() == ["alexnet", "efficientnet_lite0", "resnet50", "vgg16"]


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg19'.*alexnet, efficientnet_lite0, resnet50, vgg16, "
                                            r"or timm:MODEL for any model of timm \(timm:vgg19 if it is one of timm's; "):
        get_backbone("vgg19")


def test_unknown_layer_lists_valid_layers():
    with pytest.raises(BackboneError, match=r"unknown layer 'fc8'.*pool5 \(9216\), fc6 \(4096\), fc7 \(4096\).*; give --layers one of them$"):
        get_backbone("alexnet").resolve_taps(["fc8"])


def test_relu6_is_an_alias_of_fc6():
    assert get_backbone("vgg16").resolve_taps(["relu6", "fc7", "fc6"]) == ["fc6", "fc7"]


@pytest.mark.parametrize("name", ["alexnet", "resnet50", "efficientnet_lite0", "vgg16"])
def test_tap_widths_match_the_registry(name):
    backbone = get_backbone(name)
    model = TapModel(load_model(backbone, resolve_weights(backbone, "none")), backbone, list(backbone.taps))
    with torch.inference_mode():
        codes = model(torch.zeros(1, 3, backbone.input_size, backbone.input_size))
    assert {tap: c.shape[1] for tap, c in codes.items()} == {tap: t.width for tap, t in backbone.taps.items()}


def test_alexnet_codes_equal_float64_reference(image_folder, tmp_path):
    reader = extract_float32(image_folder, tmp_path / "cache", "alexnet", ["pool5", "fc6", "fc7"])
    torch.manual_seed(0)  # --weights none --seed 0 is torchvision's own init under this seed
    model = torchvision.models.alexnet(weights=None).double().eval()
    with torch.no_grad():
        features = model.features(reference_inputs(reader, image_folder, "alexnet"))
        fc6 = torch.relu(model.classifier[1](model.avgpool(features).flatten(1)))
        fc7 = torch.relu(model.classifier[4](fc6))
    for tap, reference in (("pool5", features.flatten(1)), ("fc6", fc6), ("fc7", fc7)):
        assert relative_error(reader.load(tap), reference.numpy()) <= RELATIVE_TOLERANCE, tap


def test_vgg16_fc7_equals_float64_reference(tmp_path):
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=1)
    reader = extract_float32(folder, tmp_path / "cache", "vgg16", ["fc7"])
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).double().eval()
    with torch.no_grad():
        pooled = model.avgpool(model.features(reference_inputs(reader, folder, "vgg16"))).flatten(1)
        fc7 = torch.relu(model.classifier[3](torch.relu(model.classifier[0](pooled))))
    assert relative_error(reader.load("fc7"), fc7.numpy()) <= RELATIVE_TOLERANCE


def test_efficientnet_lite0_real_weights_see_a_cat(tmp_path):
    """skimage's chelsea through `tl extract` (pool codes), then the model's own classifier."""
    from PIL import Image
    from skimage import data as skimage_data

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "photos" / "cat" / "chelsea.png")
    run_extract(ExtractConfig(data=tmp_path / "photos", out=tmp_path / "cache", backbone="efficientnet_lite0",
                              weights="imagenet", dtype="float32", workers=0, quiet=True))
    codes = torch.from_numpy(CacheReader(tmp_path / "cache").load("pool"))
    backbone = get_backbone("efficientnet_lite0")
    model = load_model(backbone, resolve_weights(backbone, "imagenet"))
    with torch.no_grad():
        top5 = model._fc(codes).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5


def test_imagenet_weights_offline_error_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(BackboneError) as error:
        resolve_weights(get_backbone("alexnet"), "imagenet")
    message = str(error.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message


def test_imagenet_weights_are_taken_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(7)
    state = torchvision.models.alexnet(weights=None).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    backbone = get_backbone("alexnet")
    choice = resolve_weights(backbone, "imagenet")
    assert choice.digest == "imagenet:alexnet-owt-7be5be79.pth"
    loaded = load_model(backbone, choice).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_path_loads_a_state_dict(tmp_path):
    backbone = get_backbone("alexnet")
    torch.manual_seed(3)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    choice = resolve_weights(backbone, str(tmp_path / "w.pt"))
    assert choice.digest.startswith("file:sha256=")
    assert torch.equal(load_model(backbone, choice).state_dict()["features.0.weight"], state["features.0.weight"])


def test_weights_path_shape_mismatch_lists_the_tensors(tmp_path):
    backbone = get_backbone("alexnet")
    state = torchvision.models.alexnet(weights=None, num_classes=10).state_dict()
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(BackboneError, match=r"classifier\.6\.weight: file \(10, 4096\) vs model \(1000, 4096\)"):
        load_model(backbone, resolve_weights(backbone, str(tmp_path / "w.pt")))


def test_weights_path_that_is_no_state_dict(tmp_path):
    (tmp_path / "w.pt").write_text("not a checkpoint")
    backbone = get_backbone("alexnet")
    with pytest.raises(BackboneError, match="cannot load weights from"):
        load_model(backbone, resolve_weights(backbone, str(tmp_path / "w.pt")))


def test_missing_weights_path(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_weights(get_backbone("alexnet"), str(tmp_path / "nope.pt"))


def test_conv_layers_in_forward_order():
    backbone = get_backbone("alexnet")
    model = load_model(backbone, resolve_weights(backbone, "none"))
    assert backbone.conv_layers(model) == ["features.0", "features.3", "features.6", "features.8", "features.10"]


def test_a_tap_model_in_train_mode_runs_the_eval_graph():
    """efficientnet_lite0 branches on `self.training` (drop-connect): a traced train graph would apply it
    in frozen blocks too. With every layer left in eval, train() must change nothing; a BatchNorm set
    to train still does."""
    backbone = get_backbone("efficientnet_lite0")
    model = TapModel(load_model(backbone, resolve_weights(backbone, "imagenet")), backbone, [backbone.default_tap])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(images)[backbone.default_tap]
        model.train()
        for module in model.modules():
            module.training = False  # every layer frozen, as finetune --unfreeze 0 keeps them
        model.training = True
        assert torch.equal(model(images)[backbone.default_tap], expected)
        model.extractor.get_submodule("_bn1").train()
        assert not torch.allclose(model(images)[backbone.default_tap], expected)


def test_registering_a_second_backbone_of_a_name_is_refused():
    from pipeline.backbones import register

    with pytest.raises(BackboneError, match="'alexnet' is already registered"):
        register(get_backbone("alexnet"))
    assert list_backbones() == ["alexnet", "efficientnet_lite0", "resnet50", "vgg16"]


def test_efficientnet_block12_tap_is_the_flattened_7x7_map_of_block_12():
    from torchvision.models.feature_extraction import create_feature_extractor

    backbone = get_backbone("efficientnet_lite0")
    assert backbone.taps["block12"].width == 192 * 7 * 7
    model = load_model(backbone, resolve_weights(backbone, "none"))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        codes = TapModel(model, backbone, ["block12"])(pixels)["block12"]
        extractor = create_feature_extractor(model.eval(), {"_blocks.12.add": "map"}, suppress_diff_warning=True)
        reference = extractor(pixels)["map"]
    assert reference.shape == (2, 192, 7, 7) and codes.shape == (2, 9408)
    torch.testing.assert_close(codes, reference.flatten(1))
