"""pipeline.hardware: what --device and --precision resolve to, and how DataLoaders are fed."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.errors import TLError
from pipeline.hardware import (autocast, default_workers, float32_math, grad_scaler, loader_options, pinned,
                               prepare_module, resolve_device, resolve_precision, stack_channels_last, tf32_settings,
                               to_device)

CPU = torch.device("cpu")


def test_precision_auto_is_float32_on_the_cpu_float16_on_cuda_and_explicit_choices_stand():
    assert resolve_precision("auto", CPU) == "float32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "float16"
    for precision in ("float32", "bfloat16", "float16"):
        assert resolve_precision(precision, CPU) == precision
    with pytest.raises(TLError, match="unknown --precision float8; valid: auto, float32, bfloat16, float16"):
        resolve_precision("float8", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_it_says_what_to_do():
    with pytest.raises(TLError, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU
    with pytest.raises(TLError, match="unknown --device tpu"):
        resolve_device("tpu")


def test_workers_share_the_cores_among_the_ranks_of_a_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers(None) == 16  # at most 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(None) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers(None) == 1  # never none by default
    assert default_workers(0) == 0 and default_workers(3) == 3  # as given


def test_loader_options_pin_and_prefetch_only_where_they_apply():
    assert loader_options(CPU, 0) == {"num_workers": 0, "pin_memory": False, "prefetch_factor": None}
    assert loader_options(CPU, 2, prefetch=2) == {"num_workers": 2, "pin_memory": False, "prefetch_factor": 2}
    assert loader_options(torch.device("cuda", 0), 3)["pin_memory"] is True


def test_cpu_tensors_pass_through_and_autocast_is_off_for_float32():
    images = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert pinned(images, CPU) is images and to_device(images, CPU) is images
    codes = torch.randn(2, 3)
    assert to_device(codes, CPU) is codes
    with autocast(CPU, "float32"):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32
    with autocast(CPU, "bfloat16"):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.bfloat16
    assert not grad_scaler(CPU, "bfloat16").is_enabled() and grad_scaler(CPU, "float16").is_enabled()


def tf32_flags() -> list:
    return [getattr(owner, name) for owner, name, _ in tf32_settings()]


@pytest.mark.parametrize("device", [CPU, torch.device("cuda")])
def test_float32_means_ieee_float32_on_cuda_within_the_block_and_the_flags_come_back(device):
    settings = tf32_settings()
    before = tf32_flags()  # torch's defaults: TF32 convolutions in cuDNN, IEEE matrix products
    with autocast(device, "float32"):  # torch.autocast is not entered for float32: no CUDA is needed
        assert tf32_flags() == [value for _, _, value in settings]
    assert tf32_flags() == before
    with pytest.raises(ValueError), autocast(device, "float32"):
        raise ValueError("a failing forward pass")
    assert tf32_flags() == before
    with float32_math("float16"), float32_math("bfloat16"):
        assert tf32_flags() == before  # half precisions leave them as they are


def test_the_tf32_settings_are_torchs_per_operator_ones_where_it_has_them():
    """Mixing them with the legacy allow_tf32 flags is an error in torch 2.9 and later: once a process
    has used the new API, setting a legacy flag raises."""
    settings = tf32_settings()
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        assert [name for _, name, _ in settings] == ["fp32_precision", "fp32_precision"]
        saved = torch.backends.cudnn.conv.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # a user's own setting, by the new API
        try:
            with float32_math("float32"):
                assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        finally:
            torch.backends.cudnn.conv.fp32_precision = saved
    else:
        assert [name for _, name, _ in settings] == ["allow_tf32", "allow_tf32"]


def test_a_rank_without_a_gpu_of_its_own_is_told_so(monkeypatch):
    """torchrun started more processes on this machine than it has GPUs: one line, before any CUDA call."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TLError, match=r"local rank 2 has no GPU of its own \(2 visible\); start at most one process "
                                      r"per GPU"):
        resolve_device("auto")


def test_models_and_image_batches_run_in_channels_last_on_the_cpu_too():
    """oneDNN runs channels_last convolutions 1.3x to 1.6x faster than NCHW (bench/RESULTS.md)."""
    model = prepare_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(2, 2)), CPU)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 5, 5)
    moved = to_device(images, CPU)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, images)
    with torch.inference_mode():
        torch.testing.assert_close(model[0](moved), model[0](images.contiguous()))


def test_a_module_with_a_5d_tensor_is_prepared_too():
    """channels_last takes 4-D tensors: a 5-D buffer (a traced Swin's attention masks) stays as it is
    instead of failing the conversion, as Module.to(memory_format=) would."""
    model = torch.nn.Conv2d(3, 4, 3)
    model.register_buffer("mask", torch.randn(1, 2, 3, 4, 5))
    prepared = prepare_module(model, CPU)
    assert prepared.weight.is_contiguous(memory_format=torch.channels_last)
    assert prepared.mask.shape == (1, 2, 3, 4, 5) and prepared.mask.is_contiguous()


def test_crops_are_stacked_straight_into_channels_last():
    crops = [torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]  # as from PIL
    batch = stack_channels_last(crops)
    assert batch.shape == (3, 3, 5, 4) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(crops))
    floats = [torch.randn(3, 5, 4) for _ in range(2)]  # normalised items (stage three) are (C, H, W) in memory
    assert torch.equal(stack_channels_last(floats), torch.stack(floats))
    from pipeline.image_sets import collate_decoded

    pixels, indices, errors = collate_decoded([(crops[0], 4, ""), (None, 5, "OSError: broken"), (crops[1], 6, "")])
    assert pixels.is_contiguous(memory_format=torch.channels_last) and torch.equal(pixels, torch.stack(crops[:2]))
    assert indices == [4, 6] and errors == [(5, "OSError: broken")]

