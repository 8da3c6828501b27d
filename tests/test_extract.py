"""Stage one end to end: shards, manifest, resume after SIGKILL, skipped images, autocast codes (through
run_extract); and through `tl extract`: the summary, flag and config-file parsing, every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from cache.reader import CacheReader
from pipeline.errors import CacheError, TLError
from pipeline.extract import ExtractConfig, ExtractResult, run_extract
from tests.conftest import cache_document, make_image_folder, start_stage, write_cifar10, write_gtsrb, write_image

FAST = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc7", "--workers", "0", "--quiet"]
FAST_OPTIONS = dict(backbone="alexnet", weights="none", layers=("fc7",), workers=0, quiet=True)


def extract_config(data, out, **options) -> ExtractConfig:
    return ExtractConfig(data=data, out=out, **{**FAST_OPTIONS, **options})


def extract(data, out, **options) -> ExtractResult:
    return run_extract(extract_config(data, out, **options))


def manifest_of(cache):
    return cache_document(cache)


def test_extract_writes_shards_and_manifest(image_folder, tmp_path, capsys):
    out = tmp_path / "cache"
    result = extract(image_folder, out, shard_rows=5)
    assert (result.out, result.rows, result.taps) == (out, 12, {"fc7": 4096})
    assert (result.shards_written, result.shards_reused, result.images_processed, result.skipped) == (3, 0, 12, [])
    assert result.bytes_on_disk > 3 * 5 * 4096 * 2 and result.loop_seconds > 0
    assert capsys.readouterr().err == ""  # quiet: no progress bar
    manifest = manifest_of(out)
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["classes"] == ["cat", "dog", "fox"]
    assert manifest["key"]["backbone"] == "alexnet" and manifest["taps"] == {"fc7": {"width": 4096, "dtype": "float16"}}
    reader = CacheReader(out)
    assert reader.load("fc7").shape == (12, 4096)
    assert list(reader.load_column("target")) == [0] * 4 + [1] * 4 + [2] * 4


def test_progress_bar_shows_rate_and_eta_on_a_terminal(image_folder, tmp_path, capsys, monkeypatch):
    from pipeline import progress as progress_module

    extract(image_folder, tmp_path / "log", quiet=False)
    assert "img/s" not in capsys.readouterr().err  # stderr is a log here, not a terminal: no bar
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    extract(image_folder, tmp_path / "cache", quiet=False)
    progress = capsys.readouterr().err
    assert "img/s" in progress and "12/12" in progress


def test_second_run_reuses_every_shard(image_folder, tmp_path):
    out = tmp_path / "cache"
    extract(image_folder, out, shard_rows=5)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    again = extract(image_folder, out, shard_rows=5)
    assert (again.shards_written, again.shards_reused, again.rows) == (0, 3, 12)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == before


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=10)
    killed = extract_config(folder, tmp_path / "killed", shard_rows=2, batch_size=1, dtype="float32")
    process = start_stage("pipeline.extract:run_extract", killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        # the manifest is replaced atomically, so it is either absent or whole
        if (killed.out / "manifest.json").exists() and manifest_of(killed.out)["shards"]:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    at_kill = manifest_of(killed.out)
    assert not at_kill["complete"] and 1 <= len(at_kill["shards"]) < 15

    resumed = run_extract(killed)
    assert resumed.shards_reused == len(at_kill["shards"]) and resumed.rows == 30
    straight = run_extract(replace(killed, out=tmp_path / "straight"))
    a, b = CacheReader(resumed.out), CacheReader(straight.out)
    assert list(a.load_column("sample_id")) == list(b.load_column("sample_id"))
    np.testing.assert_array_equal(a.load("fc7"), b.load("fc7"))
    assert not list(killed.out.glob(".shard-*"))


def test_deleted_shard_is_rewritten(image_folder, tmp_path):
    out = tmp_path / "cache"
    extract(image_folder, out, shard_rows=5)
    codes = CacheReader(out).load("fc7")
    (out / "shard-00001.h5").unlink()
    again = extract(image_folder, out, shard_rows=5)
    assert (again.shards_written, again.shards_reused) == (1, 2)
    np.testing.assert_array_equal(CacheReader(out).load("fc7"), codes)


def test_samples_per_class_and_float32(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=5, size=(16, 16))
    out = tmp_path / "cache"
    assert extract(folder, out, samples_per_class=2, dtype="float32").rows == 4
    reader = CacheReader(out)
    assert reader.num_rows == 4 and reader.load("fc7").dtype == np.float32


def test_cifar10_and_gtsrb_extract(tmp_path):
    cifar = write_cifar10(tmp_path / "cifar")
    extract(cifar, tmp_path / "c1", format="cifar10", split="test")
    assert CacheReader(tmp_path / "c1").num_rows == 6
    gtsrb = write_gtsrb(tmp_path / "gtsrb")
    extract(gtsrb, tmp_path / "c2", format="gtsrb")
    assert sorted(set(CacheReader(tmp_path / "c2").load_column("target"))) == [0, 2, 42]


def test_corrupt_and_truncated_images_are_skipped_and_recorded(image_folder, tmp_path):
    (image_folder / "dog" / "img01.png").write_bytes(b"not an image at all")
    cut = write_image(image_folder / "fox" / "img09.jpg", seed=5, size=(64, 64), fmt="JPEG")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "cache"
    result = extract(image_folder, out, shard_rows=5)
    assert [s["sample_id"] for s in result.skipped] == ["dog/img01.png", "fox/img09.jpg"]
    skipped = manifest_of(out)["skipped"]
    assert [s["sample_id"] for s in skipped] == ["dog/img01.png", "fox/img09.jpg"]
    assert all(s["reason"] for s in skipped)
    reader = CacheReader(out)
    assert reader.num_rows == 11 and "dog/img01.png" not in list(reader.load_column("sample_id"))


def test_on_error_fail_stops_and_keeps_earlier_shards(image_folder, tmp_path):
    (image_folder / "fox" / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "cache"
    with pytest.raises(TLError, match="cannot decode fox/img02.png.*--on-error skip") as refused:
        extract(image_folder, out, shard_rows=5, on_error="fail")
    assert "\n" not in str(refused.value)  # one `error:` line in the CLI
    manifest = manifest_of(out)
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    assert CacheReader(out, allow_partial=True).load("fc7").shape == (10, 4096)


def test_changed_files_redo_only_their_shards_and_a_new_class_refuses_the_cache(image_folder, tmp_path):
    """Per-shard input digests: a repaired or edited image redoes the shard holding it, the other shards
    are kept (and said so); the result equals a fresh extraction. A changed class list refuses the cache."""
    out = tmp_path / "cache"
    extract(image_folder, out, shard_rows=5)
    before = cache_document(out)["shards"]
    write_image(image_folder / "dog" / "img01.png", seed=77)  # sample 5: the second shard
    rerun = extract(image_folder, out, shard_rows=5)
    assert (rerun.shards_written, rerun.shards_dropped, rerun.shards_reused) == (1, 1, 2)
    after = cache_document(out)["shards"]
    assert [s["sha256"] for s in after][::2] == [s["sha256"] for s in before][::2]
    assert after[1]["sha256"] != before[1]["sha256"] and after[1]["inputs"] != before[1]["inputs"]
    extract(image_folder, tmp_path / "fresh", shard_rows=5)
    codes = CacheReader(out).load("fc7")
    np.testing.assert_array_equal(codes, CacheReader(tmp_path / "fresh").load("fc7"))
    assert CacheReader(out).manifest.content == CacheReader(tmp_path / "fresh").manifest.content
    write_image(image_folder / "emu" / "img00.png", seed=78)  # a new class: every target index may change
    with pytest.raises(CacheError, match=r"made with other settings \(.*classes: cat, dog, fox -> cat, dog, emu, "
                                         r"fox.*--overwrite") as refused:
        extract(image_folder, out, shard_rows=5)
    assert "\n" not in str(refused.value)
    np.testing.assert_array_equal(CacheReader(out).load("fc7"), codes)
    extract(image_folder, out, shard_rows=5, overwrite=True)
    assert CacheReader(out).num_rows == 13


@pytest.mark.parametrize("precision, tolerance", [("bfloat16", 3e-2), ("float16", 3e-3)])
def test_autocast_codes_agree_with_float32(image_folder, tmp_path, precision, tolerance):
    """The autocast path (float16 is CUDA's default) on the CPU: bfloat16 keeps about 3 significant
    digits, float16 about 4; the row-wise relative error stays within the stated tolerance."""
    extract(image_folder, tmp_path / "f32", dtype="float32")
    extract(image_folder, tmp_path / "low", dtype="float32", precision=precision)
    reference, low = CacheReader(tmp_path / "f32").load("fc7"), CacheReader(tmp_path / "low").load("fc7")
    error = np.linalg.norm(low - reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(precision, "relative error", error.max())
    assert 0 < error.max() <= tolerance
    assert json.loads((tmp_path / "low" / "manifest.json").read_text())["key"]["precision"] == precision


# ------------------------------------------------------------------ the CLI: summary, flags, config files


@pytest.mark.parametrize("flags, message", [
    (["--shard-rows", "0"], "error: Invalid value for '--shard-rows': 0 is not in the range x>=1."),
    (["--scales", "1,2"], "error: --scales sets --multiscale patches; add --multiscale, or leave it out"),
    (["--background-fraction", "0.5"], "error: --background-fraction sets --multiscale patches"),
])
def test_bad_extract_options_are_one_line_before_any_work(run_tl, image_folder, tmp_path, flags, message):
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "cache", *FAST, *flags)
    assert result.code == 2 and result.err.startswith(message) and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_cli_prints_the_summary_and_only_warnings_on_stderr(run_tl, image_folder, tmp_path):
    (image_folder / "dog" / "img01.png").write_bytes(b"not an image at all")
    out = tmp_path / "cache"
    flags = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc6,fc7", "--workers", "0", "--quiet"]
    result = run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *flags)
    assert result.code == 0, result
    assert f"wrote {out}: 11 rows, 3 shards new, 0 reused, 1 image skipped" in result.out
    one = tmp_path / "one"  # a count of one in the singular
    (one / "cat").mkdir(parents=True)
    (one / "cat" / "a.png").write_bytes((image_folder / "cat" / sorted(os.listdir(image_folder / "cat"))[0]).read_bytes())
    single = run_tl("extract", "--data", one, "--out", tmp_path / "single", *flags)
    assert single.code == 0 and f"wrote {tmp_path / 'single'}: 1 row, 1 shard new, 0 reused" in single.out, single
    assert "fc6      width 4096   float16" in result.out and "fc7      width 4096   float16" in result.out
    assert "size on disk" in result.out and "img/s" in result.out
    warnings = result.err.splitlines()  # --quiet: no progress bar, only the warning
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped 1 image that could not be read or labelled "
                                                         f"(tl info {out} lists them), e.g. dog/img01.png: "), result.err
    listed = run_tl("info", out)  # where the warning says they are (the manifest has no list of them)
    assert "dog/img01.png" in listed.out, listed


def test_info_lists_every_skipped_image_up_to_six(run_tl, image_folder, tmp_path):
    """The warning sends users to tl info for the skipped images; it showed the first of them only."""
    broken = [f"{name}/img0{number}.png" for name in ("cat", "dog") for number in range(4)][:7]
    for name in broken:
        (image_folder / name).write_bytes(b"not an image at all")
    out = tmp_path / "cache"
    flags = ["--backbone", "alexnet", "--weights", "none", "--layers", "fc6", "--workers", "0", "--quiet"]
    assert run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", *flags).code == 0
    lines = run_tl("info", out).out.splitlines()
    at = lines.index("skipped    7 images that could not be read or labelled:")
    assert [line.split(":")[0] for line in lines[at + 1:at + 7]] == [" " * 11 + name for name in broken[:5]] + [
        " " * 11 + "... and 2 more (shards.jsonl)"], lines
    (image_folder / broken[-1]).unlink()  # six: each on its line ("and 1 more" would take the sixth's line)
    assert run_tl("extract", "--data", image_folder, "--out", out, "--shard-rows", "5", "--overwrite", *flags).code == 0
    lines = run_tl("info", out).out.splitlines()
    at = lines.index("skipped    6 images that could not be read or labelled:")
    assert [line.strip().split(":")[0] for line in lines[at + 1:at + 7]] == broken[:6]
    assert "cannot identify image file" in lines[at + 1] and lines[at + 7].startswith("written "), lines


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
    extract(image_folder, out, shard_rows=5)
    result = run_tl("info", out, "--verify")
    assert result.code == 0, result
    for text in ("alexnet", "fc7", "4096", "classes    3: cat, dog, fox", "12 of 12 samples in 3/3 shards",
                 "verified   3 shards", "decode fast (part of the key)"):
        assert text in result.out
    shard = out / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    result = run_tl("info", out, "--verify")
    assert result.code == 2 and "error: 1 problem in" in result.err and "checksum mismatch" in result.err


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
    for layers in (",", " ", "fc7,,fc6", "fc7,"):  # were the default layer, or fc7 and fc6, silently
        result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", "--backbone", "alexnet",
                        "--weights", "none", "--layers", layers)
        assert_user_error(result, "--layers has an empty layer name", "pool5 (9216), fc6 (4096), fc7 (4096)")
    assert not (tmp_path / "c").exists()


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


def test_nan_codes_are_refused_naming_the_sample(run_tl, image_folder, tmp_path):
    state = torchvision.models.alexnet(weights=None).state_dict()
    state["classifier.4.bias"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    args = [a if a != "none" else str(tmp_path / "nan.pt") for a in FAST]
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", *args)
    assert_user_error(result, "NaN or Inf in fc7 for cat/img00.png", "check the weights")
    assert not (tmp_path / "c").exists()  # stopped before its first shard: no manifest of an empty cache stays
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("the user's")
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "kept", *args)
    assert_user_error(result, "NaN or Inf in fc7")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]  # a folder it did not make stays
    result = run_tl("extract", "--data", image_folder, "--out", tmp_path / "w", *FAST, "--workers", "-1")
    assert_user_error(result, "'--workers': -1 is not in the range x>=0")
    assert not (tmp_path / "w").exists()


def test_a_class_list_edited_in_the_manifest_is_refused(run_tl, image_folder, tmp_path):
    """The manifest holds the class names, the key their digest: names swapped by hand would label every
    code with another class."""
    assert run_tl("extract", "--data", image_folder, "--out", tmp_path / "c", *FAST).code == 0
    manifest = tmp_path / "c" / "manifest.json"
    header = json.loads(manifest.read_text())
    header["classes"] = header["classes"][::-1]
    manifest.write_text(json.dumps(header))
    for command in (("info", tmp_path / "c", "--verify"), ("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt")):
        assert_user_error(run_tl(*command), "is damaged (its class list was edited: 'classes' do not match the key's "
                                            "digest of them)")


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




def test_a_truncated_manifest_is_rebuilt_by_the_same_extract(run_tl, image_folder, tmp_path):
    """`truncate -s 20 OUT/manifest.json`: readers say to re-run the extract, which keeps every shard."""
    args = ("extract", "--data", image_folder, "--out", tmp_path / "c", "--shard-rows", "4", *FAST)
    assert run_tl(*args).code == 0
    shards = {path.name: path.read_bytes() for path in (tmp_path / "c").glob("shard-*.h5")}
    with open(tmp_path / "c" / "manifest.json", "r+b") as manifest:
        manifest.truncate(20)
    for command in (("info", tmp_path / "c"), ("fit-head", "--cache", tmp_path / "c", "--out", tmp_path / "h.pt")):
        assert_user_error(run_tl(*command), "re-run the tl extract command that made the cache: it rebuilds "
                                            "manifest.json from the shard files")
    again = run_tl(*args)
    assert again.code == 0 and "0 shards new, 3 reused" in again.out, again
    assert f"warning: {tmp_path / 'c' / 'manifest.json'} was damaged: rebuilt from its 3 shard files" in again.err
    assert {path.name: path.read_bytes() for path in (tmp_path / "c").glob("shard-*.h5")} == shards
    assert run_tl("info", tmp_path / "c", "--verify").code == 0
