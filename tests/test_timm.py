"""`--backbone timm:MODEL`: codes equal timm's own forward (pooled pre-logits, pooled feature stages)
with seeded weights and with a saved state dict; the pixels come from the model's pretrained config
and enter the cache key with the timm version and tag; a head on timm codes finetunes; bad names are
one line. timm is imported only when a timm backbone is asked for. Frozen runs trace and fold the
graph (BatchNormAct2d too) with the same codes, or stay eager; stage and pool taps take one pass."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from cache.reader import CacheReader
from pipeline.backbones import get_backbone
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import FinetuneConfig, run_finetune
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.formats import open_source
from pipeline.model_files import load_model_file
from tests.conftest import REPO, make_image_folder

timm = pytest.importorskip("timm", reason="the test extra installs timm")

MODEL = "resnet18"  # bicubic, crop_pct 0.95 in its pretrained config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("timm") / "images", classes=("a", "b"), per_class=3)


def _reference_codes(model, images) -> dict:
    """timm's own forward on the backbone's own preprocessing of every image."""
    backbone = get_backbone(f"timm:{MODEL}")
    source = open_source("imagefolder", images)
    batch = torch.stack([backbone.transform()(source.read_image(i)) for i in range(len(source))])
    with torch.no_grad():
        pool = model.forward_head(model.forward_features(batch), pre_logits=True)
        stage = model.forward_intermediates(batch, indices=[3], intermediates_only=True)[0].mean(dim=(2, 3))
    return {"pool": pool.numpy(), "stage3": stage.numpy()}


def _extract(images, out, weights, seed=0):
    run_extract(ExtractConfig(data=images, out=out, backbone=f"timm:{MODEL}", weights=weights, seed=seed,
                              layers=("pool", "stage3"), dtype="float32", decode="exact", workers=0, quiet=True))
    reader = CacheReader(out)
    return reader, {tap: reader.load(tap) for tap in ("pool", "stage3")}


def test_codes_equal_timms_forward_with_seeded_and_saved_weights(images, tmp_path):
    reader, codes = _extract(images, tmp_path / "seeded", "none", seed=3)
    torch.manual_seed(3)
    reference = _reference_codes(timm.create_model(MODEL, pretrained=False).eval(), images)
    for tap in codes:
        np.testing.assert_allclose(codes[tap], reference[tap], atol=1e-4, rtol=1e-4)
    preprocessing = reader.manifest.key["preprocessing"]
    assert preprocessing["interpolation"] == "bicubic" and preprocessing["resize"] == 235
    assert preprocessing["timm"] == timm.__version__ and preprocessing["pretrained_tag"] == "a1_in1k"
    assert reader.taps == {"pool": 512, "stage3": 256}

    torch.manual_seed(11)
    saved = timm.create_model(MODEL, pretrained=False).eval()
    torch.save(saved.state_dict(), tmp_path / "weights.pt")
    _, from_file = _extract(images, tmp_path / "saved", str(tmp_path / "weights.pt"))
    reference = _reference_codes(saved, images)
    for tap in from_file:
        np.testing.assert_allclose(from_file[tap], reference[tap], atol=1e-4, rtol=1e-4)


def test_a_head_on_timm_codes_finetunes_its_last_conv_layers(images, tmp_path):
    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone=f"timm:{MODEL}", weights="none",
                              layers=("stage3",), dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    result = run_finetune(FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / "m.pt", unfreeze=1,
                                         epochs=1, batch_size=3, workers=0, quiet=True), say=lambda text: None)
    assert result.epochs_run == 1 and result.trainable["conv_layers"] == ["layer3.1.conv2"]  # stage3 = layer3


def _finetuned_before_and_after(images, tmp_path, backbone):
    """A head on `backbone`'s default tap finetuned with --unfreeze 1 for 0 and for 1 epoch: the last run's
    result and the state dict of each model, by epochs."""
    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone=backbone, weights="none", dtype="float32",
                              workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    saved = {}
    for epochs in (0, 1):
        result = run_finetune(FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / f"m{epochs}.pt",
                                             unfreeze=1, epochs=epochs, batch_size=3, workers=0, quiet=True, lr=0.1),
                              say=lambda text: None)
        saved[epochs] = load_model_file(tmp_path / f"m{epochs}.pt")[0].state_dict()
    return result, saved


def test_a_blocks_own_parameters_train_with_the_layers_it_holds(images, tmp_path):
    """ConvNeXt's layer scale `gamma` is a parameter of the block itself, applied after the block's last
    conv: --unfreeze 1 trained that conv and the final norm but left `gamma` frozen between them."""
    result, saved = _finetuned_before_and_after(images, tmp_path, "timm:convnext_atto")
    assert result.trainable["backbone_layers"] == ["stages.3.blocks.1.gamma", "stages.3.blocks.1.mlp.fc2", "head.norm"]
    gamma = "features.extractor.stages.3.blocks.1.gamma"
    assert not torch.equal(saved[0][gamma], saved[1][gamma])
    assert torch.equal(saved[0][gamma.replace("blocks.1", "blocks.0")], saved[1][gamma.replace("blocks.1", "blocks.0")])


def test_a_vits_unfreeze_counts_its_transformer_blocks(images, tmp_path, run_tl):
    """A ViT has one conv, its patch embedding, first: --unfreeze counted only it, so 1 trained the whole
    network and nothing between was possible. Its blocks count now: --unfreeze 1 trains the last block and
    the final norm; the class token and position embedding, which feed every block, train only with every
    layer, and without weight decay, as timm's recipes leave them."""
    from pipeline.training import parameter_groups
    from pipeline.model_files import build_model, freeze, load_head
    from pipeline.training import decay_groups

    result, saved = _finetuned_before_and_after(images, tmp_path, "timm:vit_tiny_patch16_224")
    assert result.trainable["conv_layers"] == ["blocks.11"]
    assert result.trainable["backbone_layers"][0].startswith("blocks.11.") and "norm" in result.trainable["backbone_layers"]
    changed = {name.removeprefix("features.extractor.").split(".")[0] + ("" if ".blocks." not in name else
               "." + name.split(".blocks.")[1].split(".")[0]) for name in saved[0]
               if name.startswith("features.") and not torch.equal(saved[0][name], saved[1][name])}
    assert changed == {"blocks.11", "norm"}, changed
    head, metadata = load_head(tmp_path / "h.pt")
    model, _, convs = build_model(metadata, head, None)
    assert convs == ["patch_embed.proj", *(f"blocks.{i}" for i in range(12))]
    config = FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / "x.pt", weight_decay=0.01)
    for unfreeze, tokens_train in ((12, False), (13, True)):
        freeze(model, convs, unfreeze)
        assert model.features.extractor.pos_embed.requires_grad is tokens_train, unfreeze
    groups = decay_groups(parameter_groups(model, config.lr, config.backbone_lr_scale), 0.01)
    decays = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    extractor = model.features.extractor
    assert decays[id(extractor.pos_embed)] == decays[id(extractor.cls_token)] == 0.0
    assert decays[id(extractor.blocks[0].attn.qkv.weight)] == 0.01 and decays[id(extractor.patch_embed.proj.weight)] == 0.01
    refused = run_tl("finetune", "--data", images, "--head", tmp_path / "h.pt", "--out", tmp_path / "r.pt",
                     "--unfreeze", "14", "--workers", "0")
    assert refused.code == 2 and refused.err == ("error: --unfreeze 14 is more than the 13 conv layers and transformer "
                                                 "blocks of this backbone before the tap; pass --unfreeze 13 or less\n")


def test_blocks_whose_attention_is_named_attn_count_and_so_does_no_list_of_them():
    """CaiT's blocks hold a TalkingHeadAttn, its class-attention blocks a ClassAttn: not named "...Attention",
    they were not counted, so --unfreeze 1 trained the whole network (its patch embedding was the one layer
    counted) and 2 was refused. Each block counts once: the list of class-attention blocks, whose children
    (LayerScaleBlockClassAttn) are named like attention, is no block itself. Built on the meta device."""
    from pipeline.model_files import tap_conv_layers

    convs, words = tap_conv_layers(get_backbone("timm:cait_xxs24_224"), "pool")
    assert convs == ["patch_embed.proj", *(f"blocks.{i}" for i in range(24)), "blocks_token_only.0",
                     "blocks_token_only.1"] and words == "conv layers and transformer blocks"


def test_maxvits_attention_partitions_count_and_a_checkpoint_that_did_not_count_them_is_refused(images, tmp_path,
                                                                                                  monkeypatch):
    """A MaxViT block is an MBConv then two attention partitions (PartitionAttentionCl, whose AttentionCl
    was not named like attention): only the convs counted, so --unfreeze 1 trained the last block's last
    conv with both partitions and no partition could train alone. Each partition is a transformer block
    now; a run stopped by the earlier tl (--unfreeze 1 trained more) is refused in one line."""
    import dataclasses

    import pipeline.finetune
    from pipeline.errors import FinetuneError
    from pipeline.model_files import freeze, tap_conv_layers

    backbone = "timm:maxvit_nano_rw_256"
    convs, words = tap_conv_layers(get_backbone(backbone), "pool")
    assert convs[-3:] == ["stages.3.blocks.0.conv.conv3_1x1", "stages.3.blocks.0.attn_block",
                          "stages.3.blocks.0.attn_grid"] and words == "conv layers and transformer blocks"
    assert len(convs) == 40 + 2 * 7  # every conv, and two partitions in each of the 1 + 2 + 3 + 1 blocks
    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone=backbone, weights="none", dtype="float32",
                              workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))

    def earlier_freeze(model, convs, *args, **options):  # the earlier tl: the convs alone counted
        return freeze(model, [name for name in convs if not name.endswith(("attn_block", "attn_grid"))],
                      *args, **options)

    config = FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / "m.pt", unfreeze=1, epochs=1,
                            batch_size=3, workers=0, quiet=True, lr=0.01)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.finetune, "freeze", earlier_freeze)
        earlier = run_finetune(config, say=lambda text: None)
    assert earlier.trainable["conv_layers"] == ["stages.3.blocks.0.conv.conv3_1x1"]
    with pytest.raises(FinetuneError, match=r"holds another optimizer layout .*; pass --overwrite to start over$"):
        run_finetune(dataclasses.replace(config, epochs=2, resume=True), say=lambda text: None)
    now = run_finetune(dataclasses.replace(config, overwrite=True), say=lambda text: None)
    assert now.trainable["conv_layers"] == ["stages.3.blocks.0.attn_grid"]
    assert now.trainable["backbone_layers"][0].startswith("stages.3.blocks.0.attn_grid.")
    assert not any("attn_block" in name or "conv" in name for name in now.trainable["backbone_layers"])


def test_caits_class_token_trains_with_the_class_attention_blocks_it_joins(images, tmp_path, monkeypatch):
    """CaiT's class token joins the patch tokens only in its two class-attention blocks, yet it trained only
    when every layer did, as a ViT's (which feeds the first block); the position embedding, added before
    the first block, still does. A run stopped by the earlier tl (its class token frozen) resumes."""
    from pipeline.model_files import build_model, freeze, load_head

    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone="timm:cait_xxs24_224", weights="none",
                              dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    head, metadata = load_head(tmp_path / "h.pt")
    model, _, convs = build_model(metadata, head, None)
    extractor = model.features.extractor
    for unfreeze, token, position in ((1, False, False), (2, True, False), (3, True, False), (27, True, True)):
        trainable = freeze(model, convs, unfreeze)
        assert (extractor.cls_token.requires_grad, extractor.pos_embed.requires_grad) == (token, position), unfreeze
        assert ("cls_token" in trainable["backbone_layers"]) is token

    def earlier_freeze(model, *args, **options):  # the earlier tl: the class token only with every layer
        trainable = freeze(model, *args, **options)
        model.features.extractor.cls_token.requires_grad_(False)
        return trainable

    result, before, after = _resumed_from_an_earlier_freeze(images, tmp_path, monkeypatch, earlier_freeze, 2, 1e-4)
    token, position = "features.extractor.cls_token", "features.extractor.pos_embed"
    assert result.resumed_from == 1 and result.trainable["backbone_layers"][0] == "cls_token"
    assert not torch.equal(before[token], after[token]) and torch.equal(before[position], after[position])


def test_layers_kept_past_a_stage_tap_but_never_used_do_not_train(images, tmp_path, monkeypatch):
    """A ViT cut at a stage keeps its final norm, which nothing after the stage uses: --unfreeze 1 marked it
    trainable and listed it, and torchrun's DDP stopped at the second step ('Expected to have finished
    reduction') with a traceback. A parameter no gradient reaches is frozen and not listed."""
    from pipeline.model_files import build_model, freeze, load_head
    from pipeline.training import unreached

    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone="timm:vit_tiny_patch16_224", weights="none",
                              layers=("stage5",), dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    head, metadata = load_head(tmp_path / "h.pt")
    model, _, convs = build_model(metadata, head, None)
    assert convs[-1] == "blocks.5"
    trainable = freeze(model, convs, 1)
    extractor = model.features.extractor
    assert not extractor.norm.weight.requires_grad and "norm" not in trainable["backbone_layers"]
    assert extractor.blocks[5].mlp.fc2.weight.requires_grad and trainable["backbone_layers"][0].startswith("blocks.5.")
    assert not any(parameter.requires_grad for parameter in extractor.blocks[4].parameters())
    pixels = torch.randn(2, 3, 224, 224)
    model.train()
    model(pixels).sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
    # found on the meta device (no memory, milliseconds), as the real pass finds them, or by it where an
    # operation of the model does not run on meta
    extractor.norm.requires_grad_(True)
    found = ["extractor.norm.weight", "extractor.norm.bias"]
    assert unreached(model, "features", 224) == unreached(model, "features", 224, devices=(None,)) == found

    def no_meta_kernel(*args, **options):
        raise NotImplementedError("an operation without a meta kernel")

    monkeypatch.setattr(torch.func, "functional_call", no_meta_kernel)
    assert unreached(model, "features", 224) == found and model.training


def _resumed_from_an_earlier_freeze(images, tmp_path, monkeypatch, earlier_freeze, unfreeze: int, lr: float):
    """(the result, the model's state before, after) of a one-epoch finetune of h.pt frozen as an earlier tl
    did (`earlier_freeze` in place of model_files.freeze), resumed for a second epoch by this tl."""
    import dataclasses

    import pipeline.finetune
    from pipeline.model_files import load_model_file

    config = FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / "m.pt", unfreeze=unfreeze, epochs=1,
                            batch_size=3, workers=0, quiet=True, lr=lr)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.finetune, "freeze", earlier_freeze)
        run_finetune(config, say=lambda text: None)
    before = load_model_file(tmp_path / "m.pt")[0].state_dict()
    result = run_finetune(dataclasses.replace(config, epochs=2, resume=True), say=lambda text: None)
    return result, before, load_model_file(tmp_path / "m.pt")[0].state_dict()


def test_a_checkpoint_that_froze_a_blocks_own_parameters_resumes(images, tmp_path, monkeypatch):
    """A run stopped by a tl that left ConvNeXt's `gamma` frozen has a checkpoint whose optimizer lacks it:
    it was refused as 'another optimizer layout' (--overwrite: the run lost); it resumes, gamma training."""
    from pipeline.model_files import freeze

    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone="timm:convnext_atto", weights="none",
                              dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))

    def earlier_freeze(model, *args, **options):  # the earlier tl: a block's own gamma never trained
        trainable = freeze(model, *args, **options)
        for name, parameter in model.features.named_parameters():
            parameter.requires_grad &= not name.endswith(".gamma")
        return trainable

    result, before, after = _resumed_from_an_earlier_freeze(images, tmp_path, monkeypatch, earlier_freeze, 1, 0.1)
    gamma = "features.extractor.stages.3.blocks.1.gamma"
    assert result.resumed_from == 1 and not torch.equal(before[gamma], after[gamma])


def test_a_checkpoint_that_trained_a_parameter_no_gradient_reaches_resumes(images, tmp_path, monkeypatch):
    """A ViT cut at a stage keeps its final norm; a tl before f6d3363 listed it in the optimizer's groups, this
    one freezes it, so a run stopped by that tl was refused as 'another optimizer layout' (--overwrite: the
    run lost). It resumes, its momentum carried over, the norm frozen."""
    import dataclasses

    import pipeline.finetune
    from pipeline.errors import FinetuneError
    from pipeline.model_files import checkpoint_paths, freeze, read_payload

    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone="timm:vit_tiny_patch16_224", weights="none",
                              layers=("stage5",), dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))

    def earlier_freeze(model, *args, **options):  # the earlier tl: the final norm trained (it never moved)
        trainable = freeze(model, *args, **options)
        model.features.extractor.norm.requires_grad_(True)
        return trainable

    config = FinetuneConfig(data=images, head=tmp_path / "h.pt", out=tmp_path / "m.pt", unfreeze=1, epochs=1,
                            batch_size=3, workers=0, quiet=True, lr=0.1, optimizer="sgd", momentum=0.9)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.finetune, "freeze", earlier_freeze)
        run_finetune(config, say=lambda text: None)
    def sizes():  # of the optimizer's groups in the last checkpoint
        payload = read_payload(checkpoint_paths(tmp_path / "m.pt")[0], "checkpoint", "", FinetuneError)[0]
        return [len(group["params"]) for group in payload["optimizer"]["param_groups"]]

    earlier = sizes()
    result = run_finetune(dataclasses.replace(config, epochs=2, resume=True), say=lambda text: None)
    assert result.resumed_from == 1 and "norm" not in result.trainable["backbone_layers"]
    assert sum(earlier) == sum(sizes()) + 2  # the norm's weight and bias, stepped with momentum from epoch 1 on


def test_finetuning_a_timm_head_leaves_frozen_norm_act_statistics_alone(images, tmp_path):
    """timm's BatchNormAct2d holds its statistics and child modules (drop, act): a frozen one stays in
    eval mode, so a head-only epoch changes no backbone tensor and the model still gives the cache's codes."""
    from pipeline.model_files import load_model_file

    run_extract(ExtractConfig(data=images, out=tmp_path / "c", backbone="timm:mobilenetv3_small_050",
                              weights="none", dtype="float32", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    saved = {}
    for epochs, unfreeze in ((0, 0), (1, 0), (1, 1)):
        out = tmp_path / f"m{epochs}{unfreeze}.pt"
        result = run_finetune(FinetuneConfig(data=images, head=tmp_path / "h.pt", out=out, unfreeze=unfreeze,
                                             epochs=epochs, batch_size=3, workers=0, quiet=True, lr=0.1),
                              say=lambda text: None)
        saved[epochs, unfreeze] = load_model_file(out)[0].state_dict()
    before, head_only, tail = saved[0, 0], saved[1, 0], saved[1, 1]
    backbone = [name for name in before if name.startswith("features.") and "running_" in name]
    assert backbone and all(torch.equal(before[name], head_only[name]) for name in backbone)
    frozen = [name for name in backbone if ".blocks.5." not in name and ".conv_head" not in name]
    assert frozen and all(torch.equal(before[name], tail[name]) for name in frozen)  # before the last conv
    head = [name for name in before if name.startswith("head.")]
    assert result.trainable["conv_layers"] and any(not torch.equal(before[n], head_only[n]) for n in head)


def test_timm_weights_that_give_nan_are_one_line(run_tl, images, tmp_path):
    """The folding probe meets the NaN first: the model stays eager and extract's check of the codes
    names the file, as for a built-in backbone."""
    state = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()
    state["blocks.5.0.conv.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    result = run_tl("extract", "--data", images, "--out", tmp_path / "c", "--backbone", "timm:mobilenetv3_small_050",
                    "--weights", tmp_path / "nan.pt", "--workers", "0", "--quiet")
    assert result.code == 2 and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert "NaN or Inf" in result.err and "check the weights file" in result.err


@pytest.mark.parametrize("args,message", [
    (["--backbone", "timm:resnet5O"], "timm has no model 'resnet5O'; close names: resnet50"),
    (["--backbone", f"timm:{MODEL}", "--layers", "fc7"], "unknown layer 'fc7' for backbone timm:resnet18; valid layers: pool (512), stage0 (64)"),
    (["--backbone", f"timm:{MODEL}", "--weights", "imagenet"], "are not in the Hugging Face cache"),
])
def test_bad_timm_choices_are_one_line(run_tl, images, tmp_path, args, message):
    result = run_tl("extract", "--data", images, "--out", tmp_path / "c", *args)
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1, result
    assert not (tmp_path / "c").exists()


def test_timm_is_imported_only_for_a_timm_backbone():
    code = "import sys, pipeline.backbones, pipeline.extract, cli; print('timm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done


def test_backbones_lists_taps_input_and_weights_here(run_tl, monkeypatch, tmp_path):
    result = run_tl("backbones")
    assert result.code == 0, result
    lines = {line.split()[0]: line for line in result.out.splitlines()}
    assert "weights here" in lines["efficientnet_lite0"] and "block12 (9408)" in lines["efficientnet_lite0"]
    assert "fc7 (4096)" in lines["alexnet"] and "timm:MODEL" in lines
    one = run_tl("backbones", "--timm", "resnet18.a1_in1k")
    row = next(line for line in one.out.splitlines() if line.startswith("timm:resnet18.a1_in1k"))
    assert "bicubic" in row and "weights missing" in row and "stage4 (512)" in row
    many = run_tl("backbones", "--timm", "convnext_at*")
    assert sum(line.startswith("timm:convnext_atto") for line in many.out.splitlines()) >= 2
    none = run_tl("backbones", "--timm", "zzz*")
    assert none.code == 2 and "no timm model with pretrained weights matches 'zzz*'" in none.err
    # a model extract refuses (squash crops, inputs not square) was listed as a backbone like any other
    listed = {line.split()[0]: line for line in run_tl("backbones", "--timm", "convnext_base.fb_in22k*").out.splitlines()}
    assert "refused: trained on images prepared by crop_mode 'squash'" in listed["timm:convnext_base.fb_in22k_ft_in1k_384"]
    assert "refused" not in listed["timm:convnext_base.fb_in22k_ft_in1k"]
    alone = run_tl("backbones", "--timm", "convnext_base.fb_in22k_ft_in1k_384")
    assert alone.code == 0 and "refused: trained on images prepared by crop_mode 'squash'" in alone.out, alone


def test_imagenet_weights_come_from_the_hugging_face_cache(images, tmp_path):
    """A pretrained file laid out as huggingface_hub caches it is found offline and loaded through
    timm's own loader: the codes are those of a model holding that file's weights."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    published = timm.create_model(MODEL, pretrained=False).eval()
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(snapshot / "model.safetensors"))
    environment = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cli", "extract", "--data", images, "--out", tmp_path / "c",
                           "--backbone", f"timm:{MODEL}", "--weights", "imagenet", "--layers", "pool",
                           "--dtype", "float32", "--decode", "exact", "--workers", "0", "--quiet"],
                          cwd=REPO, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reader = CacheReader(tmp_path / "c")
    assert reader.manifest.key["weights"] == "imagenet:000000000000/model.safetensors"  # the snapshot names it
    np.testing.assert_allclose(reader.load("pool"), _reference_codes(published, images)["pool"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone,message", [
    ("timm:resnet18.foo", "timm has no pretrained tag 'resnet18.foo'; tags of resnet18: resnet18.a1_in1k"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", "timm has no model 'hf-hub:timm/resnet18.a1_in1k'"),
    ("timm:RESNET18", "close names: resnet18"),
    ("timm:resnet18.", "timm has no model 'resnet18.'"),
    ("timm:convnextv2_nano.fcmae_ft_in22k_in1k_384", "crop_mode 'squash'"),
])
def test_names_outside_the_catalogue_are_one_line(run_tl, images, tmp_path, backbone, message):
    result = run_tl("extract", "--data", images, "--out", tmp_path / "c", "--backbone", backbone, "--weights", "none")
    assert result.code == 2 and message in result.err and result.err.count("\n") == 1, result


def test_a_state_dict_with_another_classifier_loads(images, tmp_path):
    torch.manual_seed(2)
    ten_classes = timm.create_model(MODEL, pretrained=False, num_classes=10).eval()
    torch.save(ten_classes.state_dict(), tmp_path / "r18_10.pt")
    _, codes = _extract(images, tmp_path / "c", str(tmp_path / "r18_10.pt"))
    np.testing.assert_allclose(codes["pool"], _reference_codes(ten_classes, images)["pool"], atol=1e-4, rtol=1e-4)


def _timm_taps(name: str, taps: list[str]):
    """A seeded timm tap model whose BatchNorm statistics are far from the identity."""
    from pipeline.backbones import load_model, resolve_weights, tap_model
    from tests.test_folding import randomized_statistics

    backbone = get_backbone(f"timm:{name}")
    torch.manual_seed(0)
    model = tap_model(load_model(backbone, resolve_weights(backbone, "none")), backbone, taps).eval()
    return randomized_statistics(model), backbone


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])  # BatchNorm2d; BatchNormAct2d
def test_timm_graphs_are_traced_and_folded_with_the_same_codes(name):
    from pipeline.backbones import for_inference
    from timm.layers import BatchNormAct2d

    model, backbone = _timm_taps(name, ["stage2", "pool"])
    norms = [layer for layer in model.modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    assert any(type(layer) is BatchNormAct2d for layer in norms) == (name != "resnet18")
    eager, original = copy.deepcopy(model).double(), model.extractor
    folded = for_inference(model.double(), torch.device("cpu"))
    assert folded.traced and folded.extractor.meta["folded_for_inference"]["batch_norm"] == len(norms)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in folded.modules())
    pixels = torch.randn(2, 3, backbone.input_size, backbone.input_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, codes = eager(pixels), folded(pixels)
        kept = original.forward_head(original.forward_features(pixels), pre_logits=True)  # never changed
    for tap in ("stage2", "pool"):
        assert float((codes[tap] - expected[tap]).norm() / expected[tap].norm()) < 1e-10
    assert torch.equal(kept, expected["pool"])


@pytest.mark.parametrize("name", ["resnet18", "hiera_tiny_224"])  # Hiera's forward_intermediates stops early
def test_stage_and_pool_taps_run_the_timm_model_once(name):
    model, backbone = _timm_taps(name, ["stage1", "pool"])
    timm_model = model.extractor
    calls = []
    next(layer for layer in timm_model.modules() if isinstance(layer, torch.nn.Conv2d)).register_forward_hook(
        lambda *_: calls.append(1))
    pixels = torch.randn(2, 3, backbone.input_size, backbone.input_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        codes = model(pixels)
        assert len(calls) == 1
        pool = timm_model.forward_head(timm_model.forward_features(pixels), pre_logits=True)
        stage = timm_model.forward_intermediates(pixels, indices=[1], intermediates_only=True)[0]
    assert torch.equal(codes["pool"], pool) and torch.equal(codes["stage1"], stage.mean(dim=(2, 3)))


def test_a_timm_graph_that_cannot_be_traced_or_differs_stays_eager(monkeypatch):
    from torch import fx

    import pipeline.folding

    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    model, _ = _timm_taps("resnet18", ["stage2", "pool"])
    with torch.inference_mode():
        expected = model(pixels)["pool"]
    with monkeypatch.context() as patched:
        patched.setattr(fx.Tracer, "trace", lambda *args, **kwargs: (_ for _ in ()).throw(fx.proxy.TraceError("no")))
        assert model.fold_for_inference() == {} and not model.traced
    fold = pipeline.folding.fold_for_inference

    def wrong_fold(graph, **options):  # a fold whose graph gives other codes, at the last tap only
        counts = fold(graph, **options)
        graph.register_forward_hook(lambda module, inputs, outputs: {**outputs, "pool": 2 * outputs["pool"]})
        return counts

    monkeypatch.setattr(pipeline.folding, "fold_for_inference", wrong_fold)
    assert model.fold_for_inference() == {} and not model.traced
    with torch.inference_mode():
        assert torch.equal(model(pixels)["pool"], expected)
    monkeypatch.setattr(pipeline.folding, "fold_for_inference", fold)
    assert model.fold_for_inference()["batch_norm"] == 20 and model.traced
    graph = model.extractor  # folding again changes nothing
    assert model.fold_for_inference()["batch_norm"] == 20 and model.extractor is graph


def test_a_timm_graph_with_nothing_to_fold_stays_eager():
    model, backbone = _timm_taps("convnext_atto", ["pool"])  # LayerNorm only
    timm_model = model.extractor
    assert model.fold_for_inference() == {} and not model.traced and model.extractor is timm_model


def test_timm_backbones_made_in_a_process_stay_out_of_the_built_in_list():
    from pipeline.backbones import list_backbones

    get_backbone(f"timm:{MODEL}")
    assert list_backbones() == ["alexnet", "efficientnet_lite0", "resnet50", "vgg16"]
