"""`tl extract` end to end: output, resume after SIGKILL, config files, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision

from cache.reader import CacheReader
from tests.conftest import REPO, make_image_folder, write_cifar10, write_gtsrb, write_image

FAST = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc7", "--workers", "0", "--quiet"]


def manifest_of(cache):
    return json.loads((cache / "manifest.json").read_text())


def test_extract_writes_shards_manifest_and_summary(run_tl, image_folder, tmp_path):
    out = tmp_path / "cache"
    result = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    assert result.code == 0, result
    assert "wrote" in result.out and "12 rows" in result.out and "fc7" in result.out and "4096" in result.out
    assert "size on disk" in result.out and "img/s" in result.out
    assert result.err == ""  # --quiet: no progress bar
    manifest = manifest_of(out)
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["classes"] == ["cat", "dog", "fox"]
    assert manifest["key"]["backbone"] == "alexnet" and manifest["taps"] == {"fc7": {"width": 4096, "dtype": "float16"}}
    reader = CacheReader(out)
    assert reader.load("fc7").shape == (12, 4096)
    assert list(reader.load_column("target")) == [0] * 4 + [1] * 4 + [2] * 4


def test_progress_bar_shows_rate_and_eta(run_tl, image_folder, tmp_path):
    args = [a for a in FAST if a != "--quiet"]
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "cache", *args)
    assert result.code == 0 and "img/s" in result.err and "12/12" in result.err


def test_second_run_reuses_every_shard(run_tl, image_folder, tmp_path):
    out = tmp_path / "cache"
    run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    again = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    assert again.code == 0 and "0 shards new, 3 reused" in again.out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == before


def test_kill_and_resume_equals_an_uninterrupted_run(run_tl, tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=10)
    args = ["--data", str(folder), "--shard-rows", "2", "--batch-size", "1", "--dtype", "float32", *FAST]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "cli", "extract", "--out", str(killed), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        # the manifest is replaced atomically, so it is either absent or whole
        if (killed / "manifest.json").exists() and manifest_of(killed)["shards"]:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    at_kill = manifest_of(killed)
    assert not at_kill["complete"] and 1 <= len(at_kill["shards"]) < 15

    resumed = run_tl("extract", "--out", killed, *args)
    assert resumed.code == 0, resumed
    assert f"{len(at_kill['shards'])} reused" in resumed.out
    straight = tmp_path / "straight"
    assert run_tl("extract", "--out", straight, *args).code == 0
    a, b = CacheReader(killed), CacheReader(straight)
    assert list(a.load_column("sample_id")) == list(b.load_column("sample_id"))
    np.testing.assert_array_equal(a.load("fc7"), b.load("fc7"))
    assert not list(killed.glob(".shard-*"))


def test_deleted_shard_is_rewritten(run_tl, image_folder, tmp_path):
    out = tmp_path / "cache"
    run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    codes = CacheReader(out).load("fc7")
    (out / "shard-00001.h5").unlink()
    again = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    assert again.code == 0 and "1 shards new, 2 reused" in again.out
    np.testing.assert_array_equal(CacheReader(out).load("fc7"), codes)


def test_samples_per_class_and_float32(run_tl, tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=5, size=(16, 16))
    out = tmp_path / "cache"
    result = run_tl("extract", "--data", folder, "--out", out, "--samples-per-class", "2", "--dtype", "float32", *FAST)
    assert result.code == 0, result
    reader = CacheReader(out)
    assert reader.num_rows == 4 and reader.load("fc7").dtype == np.float32


def test_cifar10_and_gtsrb_extract(run_tl, tmp_path):
    cifar = write_cifar10(tmp_path / "cifar")
    result = run_tl("extract", "--format", "cifar10", "--data", cifar, "--split", "test", "--out", tmp_path / "c1", *FAST)
    assert result.code == 0, result
    assert CacheReader(tmp_path / "c1").num_rows == 6
    gtsrb = write_gtsrb(tmp_path / "gtsrb")
    result = run_tl("extract", "--format", "gtsrb", "--data", gtsrb, "--out", tmp_path / "c2", *FAST)
    assert result.code == 0, result
    assert sorted(set(CacheReader(tmp_path / "c2").load_column("target"))) == [0, 2, 42]


def test_config_file_supplies_options_and_flags_win(run_tl, image_folder, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"data: {image_folder}\nbackbone: alexnet\nweights: none\nlayers: [fc6, fc7]\nworkers: 0\nquiet: true\n"
        "dtype: float32\nfit-head:\n  head: mlp\nextract:\n  shard-rows: 5\n"
    )
    out = tmp_path / "cache"
    result = run_tl("extract", "--config", config, "--out", out, "--dtype", "float16")
    assert result.code == 0, result
    manifest = manifest_of(out)
    assert manifest["taps"] == {"fc6": {"width": 4096, "dtype": "float16"}, "fc7": {"width": 4096, "dtype": "float16"}}
    assert manifest["shard_rows"] == 5


def test_info_describes_and_verifies(run_tl, image_folder, tmp_path):
    out = tmp_path / "cache"
    run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    result = run_tl("info", out, "--verify")
    assert result.code == 0, result
    for text in ("alexnet", "fc7", "4096", "classes    3: cat, dog, fox", "12 of 12 samples in 3/3 shards",
                 "verified   3 shards"):
        assert text in result.out
    shard = out / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    result = run_tl("info", out, "--verify")
    assert result.code == 2 and "error: 1 problems" in result.err and "checksum mismatch" in result.err


def test_every_stage_is_listed_in_help(run_tl):
    help_text = run_tl("--help").out
    for command in ("extract", "fit-head", "finetune", "evaluate", "predict", "quickstart", "info"):
        assert command in help_text


# ------------------------------------------------------------------ bad input: one line, exit 2


def assert_user_error(result, *fragments):
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_data_dir(run_tl, tmp_path):
    assert_user_error(run_tl("extract", "--data", tmp_path / "nope", "--out", tmp_path / "c", *FAST),
                      "does not exist", "--data")


def test_empty_data_dir(run_tl, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert_user_error(run_tl("extract", "--data", tmp_path / "empty", "--out", tmp_path / "c", *FAST), "no images")


def test_unknown_backbone_and_layer(run_tl, image_folder, tmp_path):
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "lenet")
    assert_user_error(result, "unknown backbone 'lenet'", "alexnet, efficientnet_lite0, resnet50, vgg16")
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "alexnet",
                    "--weights", "none", "--layers", "fc7,conv9")
    assert_user_error(result, "unknown layer 'conv9'", "pool5 (9216), fc6 (4096), fc7 (4096)")
    assert not (tmp_path / "c").exists()


def test_corrupt_and_truncated_images_are_skipped_and_recorded(run_tl, image_folder, tmp_path):
    (image_folder / "dog" / "img01.png").write_bytes(b"not an image at all")
    cut = write_image(image_folder / "fox" / "img09.jpg", seed=5, size=(64, 64), fmt="JPEG")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "cache"
    result = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *FAST)
    assert result.code == 0, result
    assert "warning: skipped 2 unreadable images" in result.err
    skipped = manifest_of(out)["skipped"]
    assert [s["sample_id"] for s in skipped] == ["dog/img01.png", "fox/img09.jpg"]
    assert all(s["reason"] for s in skipped)
    reader = CacheReader(out)
    assert reader.num_rows == 11 and "dog/img01.png" not in list(reader.load_column("sample_id"))


def test_on_error_fail_stops_and_keeps_earlier_shards(run_tl, image_folder, tmp_path):
    (image_folder / "fox" / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "cache"
    result = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", "--on-error", "fail", *FAST)
    assert_user_error(result, "cannot decode fox/img02.png", "--on-error skip")
    manifest = manifest_of(out)
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    assert CacheReader(out, allow_partial=True).load("fc7").shape == (10, 4096)


def test_unwritable_output(run_tl, image_folder, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "file" / "cache", *FAST)
    assert_user_error(result, "cannot write to output", "choose another --out")


def test_config_file_errors(run_tl, image_folder, tmp_path):
    out = ["--data", image_folder, "--out", tmp_path / "c"]
    assert_user_error(run_tl("extract", "--config", tmp_path / "none.yaml", *out), "config file", "does not exist")
    (tmp_path / "bad.yaml").write_text("backbone: [alexnet\n")
    assert_user_error(run_tl("extract", "--config", tmp_path / "bad.yaml", *out), "not valid YAML", "line")
    (tmp_path / "typo.yaml").write_text("backbon: alexnet\n")
    assert_user_error(run_tl("extract", "--config", tmp_path / "typo.yaml", *out), "unknown key 'backbon'")
    (tmp_path / "list.yaml").write_text("- alexnet\n")
    assert_user_error(run_tl("extract", "--config", tmp_path / "list.yaml", *out), "must be a mapping")


def test_stale_cache_is_refused_and_kept(run_tl, image_folder, tmp_path):
    out = tmp_path / "cache"
    run_tl("extract", "--data", image_folder, "--out", out, *FAST)
    codes = CacheReader(out).load("fc7")
    write_image(image_folder / "cat" / "img00.png", seed=77)  # the data changed since
    result = run_tl("extract", "--data", image_folder, "--out", out, *FAST)
    assert_user_error(result, "made with other settings", "dataset.fingerprint", "--overwrite")
    np.testing.assert_array_equal(CacheReader(out).load("fc7"), codes)
    result = run_tl("extract", "--data", image_folder, "--out", out, "--overwrite", *FAST)
    assert result.code == 0
    assert not np.array_equal(CacheReader(out).load("fc7"), codes)


def test_nan_codes_are_refused_naming_the_sample(run_tl, image_folder, tmp_path):
    state = torchvision.models.alexnet(weights=None).state_dict()
    state["classifier.4.bias"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    args = [a if a != "none" else str(tmp_path / "nan.pt") for a in FAST]
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", *args)
    assert_user_error(result, "NaN or Inf in fc7 for cat/img00.png", "check the weights")


def test_second_extract_on_a_locked_cache_is_refused(run_tl, image_folder, tmp_path):
    from cache.writer import cache_lock

    (tmp_path / "c").mkdir()
    lock = cache_lock(tmp_path / "c")
    lock.acquire()
    try:
        result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", *FAST)
        assert_user_error(result, f"pid {os.getpid()}", "is writing to")
    finally:
        lock.release()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_extract_recipes(run_tl, tmp_path, config):
    """Every recipe parses and names known options: the only complaint is the absent data."""
    result = run_tl("extract", "--config", config, "--data", tmp_path / "absent", "--out", tmp_path / "c")
    assert_user_error(result, str(tmp_path / "absent"))
    assert "config file" not in result.err


@pytest.mark.parametrize("precision, tolerance", [("bfloat16", 3e-2), ("float16", 3e-3)])
def test_autocast_codes_agree_with_float32(run_tl, image_folder, tmp_path, precision, tolerance):
    """The autocast path (float16 is CUDA's default) on the CPU: bfloat16 keeps about 3 significant
    digits, float16 about 4; the row-wise relative error stays within the stated tolerance."""
    args = ["--data", image_folder, "--dtype", "float32", *FAST]
    assert run_tl("extract", "--out", tmp_path / "f32", *args).code == 0
    assert run_tl("extract", "--out", tmp_path / "low", "--precision", precision, *args).code == 0
    reference, low = CacheReader(tmp_path / "f32").load("fc7"), CacheReader(tmp_path / "low").load("fc7")
    error = np.linalg.norm(low - reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(precision, "relative error", error.max())
    assert 0 < error.max() <= tolerance
    assert json.loads((tmp_path / "low" / "manifest.json").read_text())["key"]["precision"] == precision
