"""Stage three through run_finetune: frozen layers stay bit-identical, the epoch-0 model is the stage-two
head, a killed run resumes to the same weights, exports match; through `tl finetune`: the summary,
list flags, and every bad input as a one-line error."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import pipeline.extract
import pipeline.finetune
import pipeline.image_sets
import pipeline.predict
from cache.reader import CacheReader
from pipeline import allocator
from pipeline.backbones import get_backbone
from pipeline.errors import FinetuneError, HeadError
from pipeline.evaluate import EvaluateConfig, run_evaluate
from pipeline.export import export_model
from pipeline.extract import ExtractConfig, run_extract
from pipeline.finetune import FinetuneConfig, FinetuneResult, run_finetune
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.image_sets import DecodedImages, score_images
from pipeline.model_files import build_model, checkpoint_paths, load_model_file
from pipeline.formats import open_source
from pipeline.model_files import load_head
from pipeline.multiscale import PatchSettings
from pipeline.predict import PredictConfig, run_predict
from pipeline.report import headline
from tests.conftest import make_image_folder, start_stage

ALEXNET = dict(backbone="alexnet", weights="none", seed=0, workers=0, quiet=True)


@pytest.fixture(scope="module")
def alexnet_head(tmp_path_factory):
    """Images of two classes, a float32 pool5 cache of a seeded random AlexNet (pool5 keeps the model and
    its checkpoints small: conv layers only), and a logreg head on it."""
    root = tmp_path_factory.mktemp("ft")
    make_image_folder(root / "train", classes=("a", "b"), per_class=6)
    make_image_folder(root / "val", classes=("a", "b"), per_class=2)
    run_extract(ExtractConfig(data=root / "train", out=root / "cache", layers=("pool5",), dtype="float32", **ALEXNET))
    fit_head(FitHeadConfig(cache=root / "cache", out=root / "head.pt"))
    return root


def finetune_config(root, out, **options) -> FinetuneConfig:
    return FinetuneConfig(**{"data": root / "train", "head": root / "head.pt", "out": out, "batch_size": 4,
                             "quiet": True, **options})


def finetune(root, out, **options) -> FinetuneResult:
    return run_finetune(finetune_config(root, out, **options), say=lambda text: None)


def finetune_args(root, out, *more):
    return ["finetune", "--data", root / "train", "--head", root / "head.pt", "--out", out, "--batch-size", "4",
            "--quiet", *more]


def test_unfreeze_counts_the_conv_layers_before_a_tap_inside_the_network(tmp_path):
    """An efficientnet block12 head counted the conv layers of the blocks after block12 too: --unfreeze 1
    chose one of them, not in the model, and ended in a StopIteration traceback."""
    make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=3)
    net = {"backbone": "efficientnet_lite0", "weights": "none", "workers": 0, "quiet": True}
    run_extract(ExtractConfig(data=tmp_path / "train", out=tmp_path / "cache", layers=("block12",), **net))
    fit_head(FitHeadConfig(cache=tmp_path / "cache", out=tmp_path / "head.pt"))
    result = finetune(tmp_path, tmp_path / "m.pt", unfreeze=1, epochs=1, workers=0)
    assert result.trainable["conv_layers"] == ["_blocks.12._project_conv"], result.trainable
    with pytest.raises(FinetuneError, match="more than the 39 conv layers of this backbone before the tap"):
        finetune(tmp_path, tmp_path / "m2.pt", unfreeze=40, epochs=1, workers=0)


@pytest.mark.parametrize("name", ["alexnet", "efficientnet_lite0", "timm:resnet18", "timm:convnext_atto"])
def test_the_conv_layers_counted_without_memory_are_those_of_the_built_model(name):
    """tl run's --unfreeze check counts conv layers on the meta device: the same layers, at every tap, as
    the model finetune builds (a timm model is pruned to its tap, so each tap builds it again)."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    from pipeline.backbones import tap_model
    from pipeline.model_files import _conv_layers, tap_conv_layers

    backbone = get_backbone(name)
    for tap in backbone.taps:
        torch.manual_seed(0)
        full = backbone.build().eval()
        built = _conv_layers(backbone, full, tap_model(full, backbone, [tap]))
        assert tap_conv_layers(backbone, tap)[0] == built and built, (name, tap)


def test_every_conv_kernel_of_the_default_backbone_is_decayed_in_the_layout_of_earlier_checkpoints():
    """Weight decay skipped "embeddings held beside layers": parameters of a module with children. The traced
    efficientnet_lite0 keeps each conv with static padding as a module holding its kernel beside its
    padding child: 17 conv kernels went undecayed in a fifth group from --unfreeze 3, and a stopped run of
    an earlier tl was refused as "another optimizer layout". Every kernel is decayed, in the four groups
    (head, then backbone: decayed, then not) that the checkpoints of an earlier tl hold."""
    from torch import nn

    from pipeline.backbones import tap_model
    from pipeline.training import parameter_groups
    from pipeline.model_files import FinetuneModel, _conv_layers, freeze
    from pipeline.training import decay_groups

    backbone = get_backbone("efficientnet_lite0")
    full = backbone.build()
    features = tap_model(full, backbone, [backbone.default_tap])
    convs = _conv_layers(backbone, full, features)
    model = FinetuneModel(features, backbone.default_tap, nn.Linear(backbone.taps[backbone.default_tap].width, 2))
    freeze(model, convs, len(convs))
    config = FinetuneConfig(data="unused", head="unused", out="unused", weight_decay=0.01)
    groups = decay_groups(parameter_groups(model, config.lr, config.backbone_lr_scale), config.weight_decay)
    kernels = [p for p in model.features.parameters() if p.ndim > 1]
    assert [(len(group["params"]), group["weight_decay"]) for group in groups] == [
        (1, 0.01), (1, 0.0), (len(kernels), 0.01), (len(list(model.features.parameters())) - len(kernels), 0.0)]


def test_epoch_zero_model_is_the_stage_two_head(alexnet_head, tmp_path):
    result = finetune(alexnet_head, tmp_path / "m.pt", epochs=0)
    assert result.out == tmp_path / "m.pt" and result.epochs_run == 0
    model, metadata = load_model_file(tmp_path / "m.pt")
    backbone = get_backbone("alexnet")
    source = open_source("imagefolder", alexnet_head / "train")
    through_model = score_images(model, DecodedImages(source, backbone.transform()), 5, 0, torch.device("cpu"),
                                  multilabel=False)
    head, _ = load_head(alexnet_head / "head.pt")
    reader = CacheReader(alexnet_head / "cache")
    on_codes = head.predict_proba(reader.load("pool5"))
    np.testing.assert_allclose(through_model, on_codes, atol=1e-4)
    assert metadata["unfreeze"] == 0 and metadata["history"] == []


def test_epoch_zero_model_of_a_float16_head_scores_as_the_head_on_its_cache(tmp_path):
    """A head fitted on a float16 cache saw its codes rounded to float16; the model of --epochs 0 (neon's
    `-e 0`) gave it the unrounded float32 codes, and scored up to 0.06 off the head on its cache (a
    random-init efficientnet_lite0: near-constant columns, standardized by tiny deviations). The model
    rounds them as the cache did, in the file it writes too."""
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=4)
    run_extract(ExtractConfig(data=folder, out=tmp_path / "c", backbone="efficientnet_lite0", weights="none",
                              layers=("block12",), dtype="float16", workers=0, quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    run_finetune(FinetuneConfig(data=folder, head=tmp_path / "h.pt", out=tmp_path / "m.pt", epochs=0, workers=0,
                                quiet=True), say=lambda text: None)
    model, metadata = load_model_file(tmp_path / "m.pt")
    source = open_source("imagefolder", folder)
    through_model = score_images(model, DecodedImages(source, get_backbone("efficientnet_lite0").transform()), 5, 0,
                                 torch.device("cpu"), multilabel=False)
    head, _ = load_head(tmp_path / "h.pt")
    reader = CacheReader(tmp_path / "c")
    on_codes = dict(zip(reader.load_column("sample_id"), head.predict_proba(reader.load("block12"))))
    np.testing.assert_allclose(through_model, [on_codes[sample.sample_id] for sample in source.samples], atol=1e-4)
    assert metadata["codes_dtype"] == "float16"


def test_unfreezing_two_layers_moves_only_them(tmp_path):
    """efficientnet_lite0 (real weights, BatchNorm everywhere): frozen weights and BN statistics stay."""
    make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=4)
    run_extract(ExtractConfig(data=tmp_path / "train", out=tmp_path / "c", backbone="efficientnet_lite0", workers=0,
                              quiet=True))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    head, metadata = load_head(tmp_path / "h.pt")
    before, _, convs = build_model(metadata, head, None)
    before_state = before.features.state_dict()
    trainable = ("extractor._blocks.15._project_conv.", "extractor._blocks.15._bn2.", "extractor._conv_head.",
                 "extractor._bn1.")
    for bn_stats, moving in ((False, 6), (True, 10)):
        out = tmp_path / f"m{bn_stats}.pt"
        result = run_finetune(FinetuneConfig(data=tmp_path / "train", head=tmp_path / "h.pt", out=out, unfreeze=2,
                                             epochs=1, lr=0.05, backbone_lr_scale=1, batch_size=4, bn_stats=bn_stats),
                              say=lambda text: None)
        assert result.trainable["backbone_layers"] == ["_blocks.15._project_conv", "_blocks.15._bn2", "_conv_head",
                                                       "_bn1"]
        after, saved = load_model_file(out)
        assert saved["trainable"]["conv_layers"] == convs[-2:] == ["_blocks.15._project_conv", "_conv_head"]
        moved, frozen = set(), 0
        after_state = after.features.state_dict()
        for name, tensor in before_state.items():
            if name.startswith(trainable):
                if not torch.equal(tensor, after_state[name]) and "num_batches" not in name:
                    moved.add(name)
            else:
                assert torch.equal(tensor, after_state[name]), f"{name} of a frozen layer changed"
                frozen += 1
        # 2 conv weights and 2 BN scale/shift pairs; with bn_stats also the 2 BN running mean/var pairs
        assert frozen > 200 and len(moved) == moving, sorted(moved)
        assert ("extractor._bn1.running_mean" in moved) == bn_stats


def test_a_killed_run_resumes_to_the_same_weights(alexnet_head, tmp_path):
    whole = finetune_config(alexnet_head, tmp_path / "whole.pt", unfreeze=1, epochs=3, lr=1e-4,
                            val_data=alexnet_head / "val")
    run_finetune(whole, say=lambda text: None)
    killed = replace(whole, out=tmp_path / "resumed.pt")
    process = start_stage("pipeline.finetune:run_finetune", killed, stdout=subprocess.DEVNULL)
    last, _ = checkpoint_paths(killed.out)
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.exists() and not killed.out.exists()  # stopped inside a later epoch
    result = run_finetune(replace(killed, resume=True), say=lambda text: None)
    assert result.resumed_from is not None and result.resumed_from >= 1
    whole, whole_meta = load_model_file(tmp_path / "whole.pt")
    resumed, resumed_meta = load_model_file(tmp_path / "resumed.pt")
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=1e-6, rtol=0)
    for a, b in zip(whole_meta["history"], resumed_meta["history"]):
        assert a == pytest.approx(b, abs=1e-6)


def test_exports_of_a_trained_model_give_its_outputs(alexnet_head, tmp_path):
    finetune(alexnet_head, tmp_path / "m.pt", epochs=1)
    exported = export_model(tmp_path / "m.pt", "torchscript", tmp_path / "m.ts", raw_pixels=False)
    assert exported.difference <= 1e-4 and exported.agreeing == exported.checked == 12
    with pytest.warns(Warning):
        loaded = torch.jit.load(str(tmp_path / "m.ts"))
    model, _ = load_model_file(tmp_path / "m.pt")
    sample = torch.rand(3, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(sample).numpy(), torch.softmax(model(sample), 1).numpy(), atol=1e-5)
    pytest.importorskip("onnxruntime")
    exported = export_model(tmp_path / "m.pt", "onnx", tmp_path / "m.onnx", raw_pixels=False)
    assert exported.difference <= 1e-4 and exported.agreeing == exported.checked
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_evaluate_and_predict_with_a_model(alexnet_head, tmp_path, monkeypatch):
    finetune(alexnet_head, tmp_path / "m.pt", epochs=1)
    from pipeline import backbones, evaluate, predict

    folded = []  # both run the model's graph folded for inference (test_folding)
    for stage in (evaluate, predict):
        monkeypatch.setattr(stage, "for_inference", lambda model, device: folded.append(model) or
                            backbones.for_inference(model, device))
    evaluated = run_evaluate(EvaluateConfig(head=None, cache=None, model=tmp_path / "m.pt", data=alexnet_head / "val",
                                            out=tmp_path / "r"))
    assert evaluated.report["rows"] == 4 and 0 <= evaluated.report["accuracy"] <= 1
    assert not evaluated.report["source"]["warnings"]
    # the images it was finetuned on, named as the model file records them or otherwise: not a test
    for data, split in ((alexnet_head / "train", "test"), (alexnet_head / "train" / ".." / "train", "train")):
        trained = run_evaluate(EvaluateConfig(head=None, cache=None, model=tmp_path / "m.pt", data=data, split=split,
                                              out=tmp_path / "t"))
        assert trained.report["source"]["warnings"] == [
            f"data {data} holds the images model {tmp_path / 'm.pt'} was finetuned on: these are training numbers, "
            "not a test; evaluate images held out of training"]
    assert (tmp_path / "r" / "training_curve.png").is_file() and (tmp_path / "r" / "confusion_matrix.png").is_file()
    predicted = list(run_predict(PredictConfig(head=None, model=tmp_path / "m.pt", top_k=1,
                                               paths=(alexnet_head / "val",))))
    assert len(predicted) == 4 and all(len(p.labels) == 1 and not p.error for p in predicted), predicted
    assert [type(model).__name__ for model in folded] == ["FinetuneModel"] * 4
    both = PredictConfig(head=alexnet_head / "head.pt", model=tmp_path / "m.pt", paths=(alexnet_head / "val",))
    with pytest.raises(HeadError, match="either --head H or --model M"):
        list(run_predict(both))


@pytest.mark.skipif(allocator.glibc_allocator() is None, reason="host memory is kept on glibc only")
def test_every_stage_that_runs_the_backbone_keeps_host_memory_while_it_does(alexnet_head, tmp_path, monkeypatch):
    seen = []

    def recorded(module, name):
        original = getattr(module, name)

        def recording(*args, **kwargs):
            seen.append((f"{module.__name__}.{name}", allocator.memory_kept()))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, recording)

    recorded(pipeline.extract, "forward_codes")  # stage one
    recorded(pipeline.finetune, "training_step")  # stage three
    recorded(pipeline.image_sets, "autocast")  # scoring images: finetune's validation, evaluate --model
    recorded(pipeline.predict, "forward_codes")  # predict --head
    run_extract(ExtractConfig(data=alexnet_head / "val", out=tmp_path / "c", layers=("pool5",), **ALEXNET))
    finetune(alexnet_head, tmp_path / "m.pt", epochs=1, val_data=alexnet_head / "val")
    run_evaluate(EvaluateConfig(head=None, cache=None, model=tmp_path / "m.pt", data=alexnet_head / "val",
                                out=tmp_path / "r"))
    assert len(list(run_predict(PredictConfig(head=alexnet_head / "head.pt", paths=(alexnet_head / "val",))))) == 4
    assert {name for name, _ in seen} == {"pipeline.extract.forward_codes", "pipeline.finetune.training_step",
                                          "pipeline.image_sets.autocast", "pipeline.predict.forward_codes"}
    assert all(kept for _, kept in seen), seen
    assert not allocator.memory_kept()  # and glibc's own settings are back once each stage ends


def test_cli_finetune_and_export_print_their_summaries(run_tl, alexnet_head, tmp_path):
    out = tmp_path / "m.pt"
    result = run_tl(*finetune_args(alexnet_head, out, "--epochs", "1", "--val-data", alexnet_head / "val",
                                   "--lr-steps", "2,4", "--lr-factors", "0.5"))
    assert result.code == 0, result
    summary = result.out.splitlines()
    assert summary[0] == f"wrote {out}: 1 epoch run; checkpoints m.last.ckpt, m.best.ckpt", result.out
    assert summary[1].startswith("  validation loss ") and ", accuracy " in summary[1], result.out
    settings = load_model_file(out)[1]["settings"]
    assert (tuple(settings["lr_steps"]), tuple(settings["lr_factors"])) == ((2, 4), (0.5,))
    exported = run_tl("export", "--model", out, "--format", "torchscript", "--out", tmp_path / "m.ts")
    assert exported.code == 0, exported
    assert exported.out.startswith(f"wrote {tmp_path / 'm.ts'} (torchscript) and its contract {tmp_path / 'm.ts.json'}")
    assert "top-1 agrees on 12/12" in exported.out


def test_epochs_zero_says_what_it_evaluated_and_when_nothing(run_tl, alexnet_head, tmp_path):
    """--epochs 0 (neon's -e 0) evaluates the validation images; given none, it says nothing was evaluated
    and how to score the model, where it used to end at the 'wrote' line as if the run had been checked."""
    bare = run_tl(*[arg for arg in finetune_args(alexnet_head, tmp_path / "m.pt", "--epochs", "0") if arg != "--quiet"])
    assert bare.code == 0, bare
    assert bare.out.splitlines()[0].startswith("--epochs 0: not training "), bare.out
    # it wrote no checkpoint: the 'wrote' line named m.last.ckpt all the same
    assert f"wrote {tmp_path / 'm.pt'}: 0 epochs run\n" in bare.out and not (tmp_path / "m.last.ckpt").exists()
    assert bare.out.splitlines()[-1] == (f"  nothing evaluated (no --val-data or --val-fraction); score it with "
                                         f"tl evaluate --model {tmp_path / 'm.pt'} --data DIR"), bare.out
    checked = run_tl(*finetune_args(alexnet_head, tmp_path / "v.pt", "--epochs", "0", "--val-data",
                                    alexnet_head / "val"))
    assert checked.code == 0 and checked.out.splitlines()[-1].startswith("  validation loss "), checked
    assert "nothing evaluated" not in checked.out


def test_starting_over_leaves_no_earlier_checkpoint_to_resume_or_name(run_tl, alexnet_head, tmp_path, monkeypatch):
    """--overwrite kept an earlier run's checkpoints until its own first epoch ended: a stop before that,
    then --resume (what tl run does after a stop), took up the earlier run (another --lr) as this one;
    and a run without validation named the earlier run's best checkpoint as its own."""
    out = tmp_path / "m.pt"
    last, best = checkpoint_paths(out)
    earlier = run_tl(*finetune_args(alexnet_head, out, "--epochs", "1", "--val-data", alexnet_head / "val"))
    assert earlier.code == 0 and last.exists() and best.exists(), earlier
    again = run_tl(*finetune_args(alexnet_head, out, "--epochs", "1"))
    assert again.code == 2 and "holds an earlier run" in again.err, again  # neither is dropped unasked
    plain = run_tl(*finetune_args(alexnet_head, out, "--epochs", "1", "--overwrite"))
    assert plain.code == 0 and plain.out.splitlines()[0] == f"wrote {out}: 1 epoch run; checkpoints m.last.ckpt", plain
    assert not best.exists()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # another run over it, stopped in its first epoch
        patch.setattr(pipeline.finetune, "training_step", stopped)
        with pytest.raises(KeyboardInterrupt):
            finetune(alexnet_head, out, epochs=2, lr=0.01, overwrite=True)
    assert not last.exists() and not best.exists()
    said = []
    resumed = run_finetune(finetune_config(alexnet_head, out, epochs=2, lr=0.01, resume=True), say=said.append)
    assert resumed.resumed_from is None and said[0].startswith(f"no checkpoint {last} yet"), said


def test_a_start_over_that_is_refused_keeps_the_earlier_runs_checkpoints(run_tl, alexnet_head, tmp_path):
    """--overwrite removed the earlier run's checkpoints before the head, images and model were checked: a
    refused start (an --unfreeze past the backbone's conv layers; under tl run, a mistyped --set) lost the
    earlier run's epochs, which --resume would have continued."""
    out = tmp_path / "m.pt"
    last, best = checkpoint_paths(out)
    earlier = run_tl(*finetune_args(alexnet_head, out, "--epochs", "1", "--val-data", alexnet_head / "val"))
    assert earlier.code == 0 and last.exists() and best.exists(), earlier
    refused = run_tl(*finetune_args(alexnet_head, out, "--epochs", "2", "--unfreeze", "99", "--overwrite"))
    assert refused.code == 2 and "--unfreeze 99 is more than" in refused.err, refused
    assert last.exists() and best.exists()
    resumed = run_finetune(finetune_config(alexnet_head, out, epochs=2, val_data=alexnet_head / "val", resume=True),
                           say=lambda text: None)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2, resumed


def test_unfreeze_all_trains_every_conv_layer_and_resumes_as_its_count(run_tl, alexnet_head, tmp_path):
    """--unfreeze took only a count, so a recipe's "every layer" was a backbone's count (AlexNet's 5, under
    --set backbone=vgg16 5 of 13): `all` is every conv layer before the tap, checkpointed and written as the
    count, so a run of either resumes under the other."""
    out = tmp_path / "m.pt"
    first = run_tl(*finetune_args(alexnet_head, out, "--unfreeze", "all", "--epochs", "1", "--lr", "1e-6"))
    assert first.code == 0, first
    assert load_model_file(out)[1]["unfreeze"] == 5
    for epochs, unfreeze in (("2", "5"), ("3", "ALL")):
        resumed = run_tl(*finetune_args(alexnet_head, out, "--unfreeze", unfreeze, "--epochs", epochs, "--lr", "1e-6",
                                        "--resume"))
        assert resumed.code == 0 and f"resumed after epoch {int(epochs) - 1}" in resumed.out, resumed
    _, metadata = load_model_file(out)
    assert metadata["unfreeze"] == 5 and len(metadata["trainable"]["conv_layers"]) == 5
    assert metadata["trainable"]["backbone_layers"][0] == "features.0"  # the first conv layer on
    refused = run_tl(*finetune_args(alexnet_head, out, "--unfreeze", "every", "--overwrite"))
    assert refused.code == 2 and "'every' is not a valid count or all" in refused.err, refused


def test_an_epoch_is_said_once_its_checkpoint_is_written(alexnet_head, tmp_path):
    """A stop right after the "epoch N" line kept only epoch N - 1: the line came before the checkpoint."""
    out = tmp_path / "m.pt"
    last, best = checkpoint_paths(out)
    written = {}

    def say(text):
        if text.startswith("epoch "):
            written[text.split(":")[0]] = (last.exists(), best.exists())

    run_finetune(finetune_config(alexnet_head, out, epochs=2, val_data=alexnet_head / "val"), say=say)
    assert written == {"epoch 1": (True, True), "epoch 2": (True, True)}, written


def test_val_data_of_a_csv_or_a_tar_is_the_training_images_whatever_its_split(tmp_path):
    """A CSV, one tar or a brace pattern is read whatever --split says: --val-data naming --data's file with another
    --val-split validated on the training images, unrefused. A folder's split sub-folders are other images."""
    from pipeline.image_sets import refuse_training_images

    (tmp_path / "tars" / "train").mkdir(parents=True)
    (tmp_path / "tars" / "test").mkdir()
    for data, format in ((tmp_path / "list.csv", "csv"), (tmp_path / "tars" / "00000.tar", "webdataset"),
                         (f"{tmp_path}/tars/{{00000..00001}}.tar", "webdataset")):
        with pytest.raises(FinetuneError, match=r"\(split test\) holds the training images"):
            refuse_training_images(data, "test", data, "train", format)
    refuse_training_images(tmp_path / "tars", "test", tmp_path / "tars", "train", "webdataset")
    refuse_training_images(tmp_path / "voc", "test", tmp_path / "voc", "trainval", "voc")  # its split files
    with pytest.raises(FinetuneError, match="holds the training images"):
        refuse_training_images(tmp_path / "tars" / "train", "test", tmp_path / "tars", "train", "webdataset")


def test_finetune_bad_inputs(run_tl, alexnet_head, tmp_path):
    def refused(*more, out=tmp_path / "m.pt"):
        result = run_tl(*finetune_args(alexnet_head, out, *more))
        assert result.code == 2 and result.err.startswith("error: ") and result.err.count("\n") == 1, result
        return result.err

    assert "--unfreeze 9 is more than the 5 conv layers" in refused("--unfreeze", "9")
    assert refused("--val-data", tmp_path / "nowhere") == (f"error: --val-data {tmp_path / 'nowhere'} does not exist; "
                                                           "pass --val-data images laid out as the training images are\n")
    # the training images again (--val-data DATA took --split train), however spelled: it validated on them, 1.0
    for val in (alexnet_head / "train", alexnet_head / "train" / ".." / "train"):
        assert (f"error: --val-data {val} (split train) holds the training images: validation would score the images "
                "finetune trains on; pass other images (--val-split), or --val-fraction") in refused("--val-data", val)
    assert not (tmp_path / "m.pt").exists()
    # missing data is found before the model is built: no "training N parameters" line ahead of the error
    nowhere = run_tl("finetune", "--data", tmp_path / "nowhere", "--format", "cifar10", "--head",
                     alexnet_head / "head.pt", "--out", tmp_path / "n.pt")
    assert nowhere.code == 2 and nowhere.out == "" and "fetch them with tl extract --download" in nowhere.err, nowhere
    assert "trained on alexnet codes, not vgg16" in refused("--backbone", "vgg16")
    assert "trained on alexnet codes" in refused("--backbone", "vgg16", out=tmp_path / "new" / "dir" / "m.pt")
    assert not (tmp_path / "new").exists()  # refused after taking its lock: neither lock file nor folders stay
    # stopped in its first epoch, before any checkpoint: --resume (as the interrupt line says) starts over
    first = run_tl(*finetune_args(alexnet_head, tmp_path / "m.pt", "--epochs", "1", "--resume"))
    assert first.code == 0 and "1 epoch run;" in first.out and "resumed" not in first.out, first
    assert "holds an earlier run; pass --resume" in refused("--epochs", "2")
    assert "does not match this run (unfreeze differ)" in refused("--resume", "--unfreeze", "1", "--epochs", "2")
    assert "(seed differ)" in refused("--resume", "--seed", "7", "--epochs", "2")
    other = make_image_folder(tmp_path / "other", classes=("a", "b"), per_class=3)
    error = refused("--resume", "--epochs", "2", "--data", other)
    assert "(classes, data differ)" in error or "(data differ)" in error, error
    last, _ = checkpoint_paths(tmp_path / "m.pt")
    good = last.read_bytes()
    error = refused("--resume", "--epochs", "3", "--lr", "1e30")
    assert "in epoch 2, batch" in error and "last good checkpoint" in error and "epoch 1) is kept" in error
    assert last.read_bytes() == good
    assert "--early-stop needs validation images" in refused("--early-stop", "--overwrite")
    assert "--crop-scale must be in (0, 1], got 0.0" in refused("--crop-scale", "0", "--overwrite")
    assert "--momentum and --weight-decay must be finite and 0 or more, got inf" in refused("--momentum", "inf", "--overwrite")
    assert "--lr must be a positive finite number, got inf" in refused("--lr", "inf", "--overwrite")
    assert "--backbone-lr-scale must be a finite number 0 or more, got nan" in refused("--backbone-lr-scale", "nan",
                                                                                      "--overwrite")
    last.write_bytes(b"not a checkpoint")
    assert f"{last} is not a tl checkpoint; delete it and start over" in refused("--resume", "--epochs", "3")
    for model, message in ((tmp_path / "absent.pt", "model file {} does not exist; train one with tl finetune"),
                           (last, "{} is not a tl model file; train one with tl finetune")):
        result = run_tl("evaluate", "--model", model, "--data", alexnet_head / "val", "--out", tmp_path / "r")
        assert result.code == 2 and result.err == f"error: {message.format(model)}\n", result


def test_a_multiscale_head_finetunes_on_patches_labelled_as_in_stage_one(tmp_path):
    from pipeline.examples import write_shapes_voc
    from pipeline.image_sets import Augmentation, image_set

    base = write_shapes_voc(tmp_path, {"trainval": 8, "test": 4})
    run_extract(ExtractConfig(data=base, out=tmp_path / "c", format="voc", split="trainval", classes="auto",
                              multiscale=True, patches=PatchSettings(scales=(1.0, 2.0), background_fraction=0.3),
                              shard_rows=3, layers=("pool5",), **ALEXNET))
    fit_head(FitHeadConfig(cache=tmp_path / "c", out=tmp_path / "h.pt"))
    head, metadata = load_head(tmp_path / "h.pt")
    source = open_source("voc", base, "trainval", classes="auto")
    dataset, targets = image_set(source, get_backbone("alexnet"), metadata, Augmentation(), 0, 0.3, "data", "head")
    cache = CacheReader(tmp_path / "c")
    np.testing.assert_array_equal(targets, cache.load_column("target"))  # same patches, labels and thinning
    np.testing.assert_allclose(dataset.boxes, cache.load_column("box"), atol=1e-4)
    said = []
    result = run_finetune(FinetuneConfig(data=base, head=tmp_path / "h.pt", out=tmp_path / "m.pt", format="voc",
                                         split="trainval", classes="auto", unfreeze=1, epochs=1, lr=1e-4,
                                         background_fraction=0.3, batch_size=8, val_data=base, val_split="test",
                                         quiet=True), say=said.append)
    report = run_evaluate(EvaluateConfig(head=None, cache=None, model=tmp_path / "m.pt", format="voc", data=base,
                                         split="test", classes="auto", out=tmp_path / "r")).report
    assert "patches pooled into images" in dict(headline(report))
    assert report["pooling"]["images"] == 4 and report["pooling"]["patches"] == 4 * 8
    # validation scores the images as evaluate does (pooled patches, VOC07 AP): the measure the recipe reports
    assert result.val["val_image_map"] == pytest.approx(report["mAP"], abs=1e-12)
    assert result.history[0]["val_image_map"] == pytest.approx(report["mAP"], abs=1e-12)
    assert any(line.startswith("epoch 1:") and "val_image_map" in line for line in said), said


def test_validation_images_of_a_class_the_head_lacks_are_refused_before_training():
    """An image can hold a class the head does not know that none of its patches is labelled with (a tiny
    object): val_image_map refused it only after the first epoch, and under torchrun as an error rank 0
    did not pass on to the other ranks."""
    from types import SimpleNamespace

    from pipeline.image_sets import image_labels

    source = SimpleNamespace(classes=["cat", "dog", "bird"], samples=[SimpleNamespace(target=(1, 0, 0)),
                                                                     SimpleNamespace(target=(0, 1, 1))],
                             columns=lambda index: {"ignore": np.zeros(3, np.int8)})
    source.targets = lambda: np.array([sample.target for sample in source.samples])  # as Source.targets
    with pytest.raises(HeadError, match="^validation data v has labels head h does not know: bird; use data of"):
        image_labels(SimpleNamespace(source=source), ["background", "cat", "dog"], "validation data v", "head h")
    # a head that knows every class, in its own order
    targets, ignore = image_labels(SimpleNamespace(source=source), ["background", "bird", "dog", "cat"], "v", "h")
    assert targets.tolist() == [[0, 0, 1], [1, 1, 0]] and ignore.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_epochs_zero_with_resume_only_evaluates_the_checkpoint(alexnet_head, tmp_path):
    finetune(alexnet_head, tmp_path / "m.pt", epochs=2, lr=1e-4)
    last, _ = checkpoint_paths(tmp_path / "m.pt")
    checkpoint = last.read_bytes()
    trained, _ = load_model_file(tmp_path / "m.pt")
    (tmp_path / "m.pt").unlink()
    # fewer epochs than the checkpoint ran: the model of that run is not in it; refused, nothing written
    with pytest.raises(FinetuneError, match=r"has run 2 epochs, more than --epochs 1; pass --epochs 2 or more"):
        finetune(alexnet_head, tmp_path / "m.pt", epochs=1, resume=True)
    assert last.read_bytes() == checkpoint and not (tmp_path / "m.pt").exists()
    result = finetune(alexnet_head, tmp_path / "m.pt", epochs=0, resume=True, val_data=alexnet_head / "val")
    assert result.epochs_run == 0 and result.resumed_from == 2 and "val_loss" in result.val
    assert last.read_bytes() == checkpoint
    again, metadata = load_model_file(tmp_path / "m.pt")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)
    assert len(metadata["history"]) == 2


def test_mixed_precision_training_follows_float32_and_resumes_its_loss_scale(alexnet_head, tmp_path):
    """On the CPU, bf16 and fp16 autocast loss curves stay within 10% of float32's. fp16 trains with a
    GradScaler: this random AlexNet's gradients overflow the default scale, so the first steps are
    skipped and the scale lowered; the scale is checkpointed and a resumed run restores it."""
    curves = {}
    for precision in ("float32", "bfloat16", "float16"):
        result = finetune(alexnet_head, tmp_path / f"{precision}.pt", unfreeze=1, epochs=2, lr=1e-6,
                          precision=precision)
        assert result.precision == precision
        _, metadata = load_model_file(tmp_path / f"{precision}.pt")
        curves[precision] = [point["train_loss"] for point in metadata["history"]]
        assert metadata["settings"]["precision"] == precision
    for precision in ("bfloat16", "float16"):  # measured: within 3.4% and 4.2%; the fp16 curve lost 3 steps
        np.testing.assert_allclose(curves[precision], curves["float32"], rtol=0.1)
        assert curves[precision] != curves["float32"]  # autocast did run
    scaler_of = lambda path: torch.load(checkpoint_paths(path)[0], weights_only=True)["scaler"]  # noqa: E731
    assert scaler_of(tmp_path / "float32.pt") == {} and scaler_of(tmp_path / "bfloat16.pt") == {}
    unbroken = scaler_of(tmp_path / "float16.pt")
    assert unbroken["scale"] < 2.0 ** 16  # lowered from torch's default by the overflowing steps
    resumed = tmp_path / "resumed.pt"
    finetune(alexnet_head, resumed, unfreeze=1, lr=1e-6, precision="float16", epochs=1)
    finetune(alexnet_head, resumed, unfreeze=1, lr=1e-6, precision="float16", epochs=2, resume=True)
    assert scaler_of(resumed) == unbroken
    _, metadata = load_model_file(resumed)
    np.testing.assert_allclose([p["train_loss"] for p in metadata["history"]], curves["float16"], rtol=1e-6)


def test_a_float16_step_whose_gradients_overflow_is_skipped():
    from pipeline.finetune import training_step
    from pipeline.hardware import grad_scaler

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = grad_scaler(torch.device("cpu"), "float16")
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0 ** 40})  # far past float16's 65504
    pixels, targets = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    loss = training_step(layer, pixels, targets, torch.nn.CrossEntropyLoss(), optimizer, scaler,
                         torch.device("cpu"), "float16")
    assert np.isfinite(loss)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name])  # the step was skipped...
    assert scaler.get_scale() == 2.0 ** 39  # ...and the scale lowered
    training_step(layer, pixels, targets, torch.nn.CrossEntropyLoss(), optimizer,
                  grad_scaler(torch.device("cpu"), "float16"), torch.device("cpu"), "float16")
    assert not torch.equal(layer.weight, before["weight"])  # the default scale steps


def test_a_float32_step_runs_its_backward_pass_in_ieee_float32_too():
    from pipeline.finetune import training_step
    from pipeline.hardware import grad_scaler

    from pipeline.hardware import tf32_settings

    (owner, name, ieee), _ = tf32_settings()  # cuDNN's convolutions
    before = getattr(owner, name)
    seen = []
    layer = torch.nn.Linear(8, 3)
    layer.register_full_backward_hook(lambda *_: seen.append(getattr(owner, name)))
    for precision in ("float32", "bfloat16"):
        training_step(layer, torch.randn(4, 8, requires_grad=True), torch.tensor([0, 1, 2, 0]),
                      torch.nn.CrossEntropyLoss(), torch.optim.SGD(layer.parameters(), lr=0.1),
                      grad_scaler(torch.device("cpu"), precision), torch.device("cpu"), precision)
    assert seen == [ieee, before] and before != ieee and getattr(owner, name) == before


@pytest.mark.parametrize("size,batch_size", [(10, 4), (11, 4), (11, 5), (9, 3)])
def test_epoch_batches_split_each_global_batch_over_the_ranks(size, batch_size):
    """Step i of the ranks together is step i of one process, exactly: no image repeated (padding
    repeated one when the count was odd) and the whole --batch-size (5 over 2 ranks trained 4)."""
    from pipeline.distributed import World
    from pipeline.image_sets import epoch_batches

    def world(rank, ranks):
        return World(rank=rank, size=ranks, local_rank=rank)

    single = epoch_batches(size, world(0, 1), seed=3, epoch=1, batch_size=batch_size)
    ranks = [epoch_batches(size, world(r, 2), seed=3, epoch=1, batch_size=batch_size) for r in range(2)]
    assert sorted(sum(single, [])) == list(range(size)) and all(len(batch) == batch_size for batch in single[:-1])
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
        assert 0 <= len(ranks[0][step]) - len(ranks[1][step]) <= 1
    assert epoch_batches(size, world(0, 1), 3, 1, batch_size) == single
    assert epoch_batches(size, world(0, 1), 3, 2, batch_size) != single  # each epoch reshuffles


def test_augmentation_is_mild_by_default_and_can_be_turned_off(alexnet_head):
    """crop_scale 1 without flips trains on exactly the evaluation images; the default crops and flips."""
    from pipeline.image_sets import Augmentation, SeededItems, image_set

    _, metadata = load_head(alexnet_head / "head.pt")
    source, backbone = open_source("imagefolder", alexnet_head / "train"), get_backbone("alexnet")
    evaluation, _ = image_set(source, backbone, metadata, None, 0, None, "data", "head")
    plain, _ = image_set(source, backbone, metadata, Augmentation(crop_scale=1.0, flip=False), 0, None, "d", "h")
    varied, _ = image_set(source, backbone, metadata, Augmentation(), 0, None, "data", "head")
    for index in range(len(source)):
        assert torch.equal(SeededItems(plain, 1)[index][0], evaluation[index][0])
    # crop_scale 1 with flips: the evaluation images, some mirrored
    mirrored, _ = image_set(source, backbone, metadata, Augmentation(crop_scale=1.0, flip=True), 0, None, "d", "h")
    flipped = []
    for epoch in range(4):
        for index in range(len(source)):
            pixels, reference = SeededItems(mirrored, epoch)[index][0], evaluation[index][0]
            flipped.append(torch.equal(pixels, reference.flip(-1)))
            assert flipped[-1] or torch.equal(pixels, reference)
    assert any(flipped) and not all(flipped)
    assert all(not torch.equal(SeededItems(varied, 1)[i][0], evaluation[i][0]) for i in range(len(source)))
    crop = varied.transform.transforms[0]
    assert crop.scale == (0.5, 1.0)  # at least half the image: the head was fitted on centre crops


def test_an_augmented_item_leaves_the_gpus_random_generators_alone(alexnet_head, monkeypatch):
    """With --workers 0 the items are made in the training process: seeding their augmentation must not
    reseed CUDA's generators, which the head's dropout draws from there (torch.manual_seed does)."""
    from pipeline.image_sets import Augmentation, SeededItems, image_set

    _, metadata = load_head(alexnet_head / "head.pt")
    source, backbone = open_source("imagefolder", alexnet_head / "train"), get_backbone("alexnet")
    varied, _ = image_set(source, backbone, metadata, Augmentation(), 0, None, "data", "head")
    first = SeededItems(varied, 1)[0][0]
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    torch.manual_seed(5)
    assert reseeded == [5]  # what torch.manual_seed does to the GPUs
    state = torch.get_rng_state()
    assert torch.equal(SeededItems(varied, 1)[0][0], first) and reseeded == [5]  # the same crop; no GPU reseeded
    assert torch.equal(torch.get_rng_state(), state)  # nor the CPU's generator moved


def test_validation_held_out_of_the_training_images(alexnet_head, tmp_path, monkeypatch):
    """--val-fraction: early stopping watches a seeded, stratified share of the training images, never
    trained on; with --val-data as well it is refused (two validation sets)."""
    import pipeline.finetune as stage

    seen = {}
    validate, image_set = stage._validate, stage.image_set

    def spy_set(source, *args, **kwargs):
        seen.setdefault("sets", []).append(sorted(sample.sample_id for sample in source.samples))
        return image_set(source, *args, **kwargs)

    monkeypatch.setattr(stage, "image_set", spy_set)
    monkeypatch.setattr(stage, "_validate", lambda model, dataset, *a: {**validate(model, dataset, *a),
                                                                        "images": len(dataset)})
    result = finetune(alexnet_head, tmp_path / "m.pt", epochs=2, early_stop=True, val_fraction=0.33)
    trained, held_out = seen["sets"]
    assert len(trained) == 8 and len(held_out) == 4 and not set(trained) & set(held_out)
    assert sum(sample.startswith("a/") for sample in held_out) == 2  # stratified: two of each class
    assert [point["images"] for point in result.history] == [4, 4] and "val_loss" in result.history[0]
    again = []
    monkeypatch.setattr(stage, "image_set", lambda source, *a, **k: again.append(
        sorted(s.sample_id for s in source.samples)) or image_set(source, *a, **k))
    finetune(alexnet_head, tmp_path / "m2.pt", epochs=1, val_fraction=0.33)
    assert again == [trained, held_out]  # seeded
    with pytest.raises(Exception, match="--val-data and --val-fraction"):
        finetune(alexnet_head, tmp_path / "m3.pt", val_fraction=0.3, val_data=alexnet_head / "val")
    with pytest.raises(Exception, match="--early-stop needs validation images"):
        finetune(alexnet_head, tmp_path / "m4.pt", early_stop=True)


def test_files_hold_tensors_in_the_standard_layout(tmp_path):
    """Models train in channels_last (hardware.prepare_module); their files hold what any torch code
    expects of a state dict, checksummed, with the state dict's type and version metadata."""
    from collections import OrderedDict

    from pipeline.model_files import read_payload, write_payload

    state = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).state_dict()
    assert not state["weight"].is_contiguous()
    momentum = {"state": {0: {"momentum_buffer": state["weight"] * 2}}, "param_groups": [{"params": [0]}]}
    write_payload({"metadata": "{}", "tensors": state, "optimizer": momentum}, tmp_path / "f.ckpt", "checkpoint")
    payload, _ = read_payload(tmp_path / "f.ckpt", "checkpoint", "start over", require_checksum=True)
    saved = payload["tensors"]
    assert isinstance(saved, OrderedDict) and saved._metadata == state._metadata
    assert saved["weight"].is_contiguous() and torch.equal(saved["weight"], state["weight"])
    buffer = payload["optimizer"]["state"][0]["momentum_buffer"]
    assert buffer.is_contiguous() and torch.equal(buffer, state["weight"] * 2)


def test_a_checkpoint_of_an_earlier_tl_resumes_without_the_fields_it_did_not_record(tmp_path):
    from pipeline.model_files import load_checkpoint, save_checkpoint

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    earlier = {"layer": "fc7", "unfreeze": 1}  # before data and seed were recorded
    save_checkpoint(tmp_path / "c.ckpt", layer, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), 1,
                    [], (1.0, 0), earlier)
    now = {**earlier, "data": "d1", "seed": 0}
    assert load_checkpoint(tmp_path / "c.ckpt", now)["epoch"] == 1
    with pytest.raises(FinetuneError, match=r"\(unfreeze differ\)"):
        load_checkpoint(tmp_path / "c.ckpt", {**now, "unfreeze": 2})
    save_checkpoint(tmp_path / "c.ckpt", layer, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), 1,
                    [], (1.0, 0), now)
    with pytest.raises(FinetuneError, match=r"\(data differ\)"):
        load_checkpoint(tmp_path / "c.ckpt", {**now, "data": "d2"})


def test_a_run_resumes_with_a_smaller_batch_size(alexnet_head, tmp_path):
    """What running out of device memory asks for: the same run, resumed with fewer images a batch."""
    finetune(alexnet_head, tmp_path / "m.pt", epochs=1)  # 4 a batch
    resumed = finetune(alexnet_head, tmp_path / "m.pt", epochs=2, batch_size=2, resume=True)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 1


def test_patience_counts_epochs_without_a_lower_validation_loss_and_best_is_written_before_last(
        alexnet_head, tmp_path, monkeypatch):
    """--patience N stops after N epochs without a lower validation loss (as fit-head does), not
    before; and the best checkpoint is on disk before the last one names it best, so a run stopped
    between the two writes resumes to the same model."""
    import pipeline.finetune as stage

    written, save = [], stage.save_checkpoint
    monkeypatch.setattr(stage, "save_checkpoint", lambda path, *a: written.append(path.name) or save(path, *a))
    for patience, epochs_run in ((1, 2), (2, 3)):
        losses = [1.0, 2.0, 3.0, 0.5, 0.5, 0.5]  # better at epoch 1, worse after; then the final validation
        monkeypatch.setattr(stage, "_validate", lambda *a: {"val_loss": losses.pop(0)})
        result = finetune(alexnet_head, tmp_path / f"p{patience}.pt", epochs=5, early_stop=True, val_fraction=0.33,
                          patience=patience)
        assert (result.epochs_run, result.best_epoch) == (epochs_run, 1), patience
    assert written[:3] == ["p1.best.ckpt", "p1.last.ckpt", "p1.last.ckpt"]


def test_counts_out_of_range_are_refused_by_the_stage_too(alexnet_head, tmp_path):
    """The CLI refuses them when it parses the command; a caller of the stage gets the stage's own line."""
    for options in ({"epochs": -1}, {"batch_size": 0}, {"patience": 0}):
        with pytest.raises(FinetuneError, match="--epochs must be 0 or more, --batch-size and --patience at least 1"):
            finetune(alexnet_head, tmp_path / "m.pt", **options)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_a_confident_models_scores_keep_their_ranking_where_float32_saturates(multilabel):
    """evaluate --model, predict --model and finetune's validation took softmax (sigmoid) of float32 logits:
    exactly 1.0 past a logit gap of 16.6, so a confident model's best images tied for AP, while a head's
    scores (float64) kept them apart. Logit gaps of 20 to 30 here: float64 keeps every score below 1."""

    class Confident(torch.nn.Module):  # the logits of an image are its pixels' first values
        head = torch.nn.Sequential(torch.nn.Linear(1, 2))

        def forward(self, pixels):
            return pixels[:, 0, 0, :2].float()

    gaps = [20.0, 24.0, 30.0]
    dataset = [(torch.tensor([[[0.0, gap]]]).expand(3, 1, 2), index, "") for index, gap in enumerate(gaps)]
    scores = score_images(Confident(), dataset, 2, 0, torch.device("cpu"), multilabel=multilabel)
    logits = np.array([[0.0, gap] for gap in gaps])
    if multilabel:
        expected = 1 / (1 + np.exp(-logits))
    else:
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    assert scores.dtype == np.float64 and not (scores[:, 1] == 1.0).any() and len(set(scores[:, 1])) == 3
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=0)


def test_a_multiscale_finetune_keeps_and_stops_on_the_image_map(alexnet_head, tmp_path, monkeypatch):
    """A multiscale head's validation scores patches (their loss, background included) and its images pooled
    (val_image_map, the number the VOC recipe is judged by): early stopping and the best epoch followed the
    patch loss, so a run whose image mAP fell while that loss still fell kept its last epoch. They follow the
    image mAP where the validation gives one, the loss otherwise; a resumed run finds its best in its history."""
    from pipeline.training import best_standing

    by_loss = [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5}, {"epoch": 3, "val_loss": 0.7}]
    assert best_standing(by_loss) == (0.5, 1) and best_standing([{"epoch": 1}]) == (math.inf, None)
    by_map = [{**point, "val_image_map": image_map} for point, image_map in zip(by_loss, (0.8, 0.6, float("nan")))]
    assert best_standing(by_map) == (-0.8, 0)
    points = iter([{"val_loss": 1.0, "val_image_map": 0.5}, {"val_loss": 0.5, "val_image_map": 0.4},
                   {"val_loss": 0.4, "val_image_map": 0.3}])
    monkeypatch.setattr(pipeline.finetune, "_validate", lambda *args: dict(next(points)))
    result = finetune(alexnet_head, tmp_path / "m.pt", epochs=3, val_data=alexnet_head / "val", early_stop=True,
                      patience=1, workers=0)
    assert [point["epoch"] for point in result.history] == [1, 2] and result.stopped_early
    assert result.best_epoch == 1  # by its loss, epoch 2 was better and the run would have gone on
