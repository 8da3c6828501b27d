"""The throughput benchmark runs end to end (tiny, on the CPU) and prints its table, so it cannot rot
between the sessions that measure with it; its photo set has the promised size mix."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.allocator import glibc_allocator
from tests.conftest import REPO


def test_extract_throughput_prints_a_row_per_backbone_and_decoding_mode(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("extract_throughput")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    # --train-steps: on by default on CUDA only, so the CPU suite must ask for the finetune step's measure
    bench.main(["--images", "6", "--batch-size", "2", "--backbones", "alexnet", "--precision", "float32",
                "--workers", "0", "--loop-workers", "0", "--multiscale-images", "1", "--device", "cpu", "--no-write",
                "--rounds", "1", "--train-steps", "1", "--multiscale-scales", "1,2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| alexnet |")]
    assert [row[2] for row in rows[:2]] == ["fast", "exact"] and len(rows) == 5  # + code differences, multiscale x2
    # tl, bare forward (tl's folded graph, the eager graph), plain loop, decoding alone, shared-core bound, img/s
    assert all(float(row[i]) > 0 for row in rows[:2] for i in (3, 4, 5, 6, 7, 8))
    assert float(rows[1][-1]) > 0  # finetune step img/s, on the backbone's last row
    for row in rows[:2]:  # the bound is below both of its parts; tl / bound and tl / bare eager are quotients
        assert float(row[8]) < min(float(row[4]), float(row[7]))
        assert float(row[11]) == pytest.approx(float(row[3]) / float(row[8]), rel=0.05)
        assert float(row[10]) == pytest.approx(float(row[3]) / float(row[5]), rel=0.05)
    assert 0 <= float(rows[2][2]) < 0.05  # median relative difference of fast and exact codes
    assert [row[2] for row in rows[3:]] == ["fast", "exact"] and all(float(row[3]) > 0 for row in rows[3:])
    assert (REPO / "bench" / "RESULTS.md").read_text() == before  # --no-write leaves the results alone


def test_rounds_give_each_figure_its_median_and_the_bound_adds_per_image_times(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("extract_throughput")
    runs = {"a": iter([{"rate": 3.0, "wall": 9.0}, {"rate": 1.0, "wall": 1.0}, {"rate": 2.0, "wall": 5.0}]),
            "b": iter([{"rate": 10.0}, {"rate": 30.0}, {"rate": 20.0}])}
    order = []

    def measure(label):
        order.append(label)
        return next(runs[label])

    medians = bench.in_rounds({"a": lambda: measure("a"), "b": lambda: measure("b")}, 3)
    assert medians == {"a": {"rate": 2.0, "wall": 5.0}, "b": {"rate": 20.0}}
    assert order == ["a", "b"] * 3  # back to back within each round
    # 100 img/s forward and 400 img/s decoding on the same cores: 10 + 2.5 ms per image
    assert bench.shared_core_bound(100.0, 400.0) == pytest.approx(80.0)


def test_photo_set_has_the_size_mix_of_real_collections():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from photos import photo_sizes

    sizes = photo_sizes(200)
    pixels = sorted(w * h for w, h in sizes)
    assert sum(1 for w, h in sizes if max(w, h) <= 500) == 140  # 70% near 500x375 or 375x500
    assert sum(1 for w, h in sizes if h > w) > 40  # portraits among them
    assert sum(1 for w, h in sizes if 900 < max(w, h) <= 1024) == 50 and pixels[-10:] == [4032 * 3024] * 10


def test_sweep_cost_prints_its_ratios(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("sweep_cost")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--rows", "300", "--width", "32", "--classes", "3", "--epochs", "1", "--lbfgs-rows", "200", "--no-write"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| `tl", "| the training"))]
    assert len(rows) == 6 and all(float(row.split("|")[-2]) > 0 for row in rows)
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_shard_records_prints_the_ratio_of_late_to_early(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("shard_records")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--shards", "300", "--early", "100", "--window", "40", "--no-write"])
    out = capsys.readouterr().out
    ratio = [line for line in out.splitlines() if line.startswith("| ratio")]
    assert len(ratio) == 1 and float(ratio[0].split("|")[-2]) > 0
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_channels_last_prints_both_layouts_and_their_ratio(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("channels_last")
    bench.main(["--backbones", "alexnet", "--batch-size", "2", "--batches", "1", "--rounds", "1", "--no-write"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| alexnet |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cells[i]) > 0 for i in (1, 2, 4, 5))
    # the ratio of the unrounded rates: within the rounding of the printed ones (0.1 img/s, 0.01)
    low = (float(cells[2]) - 0.05) / (float(cells[1]) + 0.05) - 0.005
    high = (float(cells[2]) + 0.05) / (float(cells[1]) - 0.05) + 0.005
    assert low <= float(cells[3].rstrip("x")) <= high


@pytest.mark.skipif(glibc_allocator() is None,
                    reason="compares glibc's allocator settings")
def test_host_memory_prints_both_settings_and_their_ratio(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("host_memory")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--backbones", "alexnet", "--forward-batch", "2", "--training-batch", "2", "--batches", "1",
                "--rounds", "1", "--extract-photos", "4", "--no-write"])
    rates, extract = [[cell.strip() for cell in line.strip("|").split("|")]
                      for line in capsys.readouterr().out.splitlines() if line.startswith("| alexnet |")]
    assert all(float(rates[i]) > 0 for i in (1, 2, 4, 5)) and all(rates[i].endswith("x") for i in (3, 6))
    assert all(float(cell) > 0 for cell in extract[1:])  # walls and peaks of whole tl extracts
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_crop_resize_times_both_resizes_and_compares_their_pixels_with_exact(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("crop_resize")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--images", "4", "--rounds", "1", "--no-write"])
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("| bilinear |", "| bicubic |"))]
    pillow = [row for row in rows if row[1] != bench.TURBO]
    assert [(row[0], row[1]) for row in pillow] == [
        ("bilinear", "Pillow draft, Pillow resize of the crop's box"), ("bilinear", "Pillow draft, torch uint8 resize (tl)"),
        ("bicubic", "Pillow draft, Pillow resize of the crop's box"), ("bicubic", "Pillow draft, torch uint8 resize (tl)")]
    turbo = importlib.util.find_spec("simplejpeg") is not None  # a lever not taken, measured where it is installed
    assert len(rows) == 4 + 2 * turbo and all(float(row[2]) > 0 for row in rows)
    # photos not reduced: a few pixel values off by a level or two, whichever resize
    assert all(float(row[3]) < 0.01 and int(row[4]) <= 2 for row in pillow)
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_folded_graph_times_both_graphs_and_their_codes_agree(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("folded_graph")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--backbones", "efficientnet_lite0,alexnet", "--batch-size", "2", "--batches", "1", "--rounds", "1",
                "--no-write"])
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("| efficientnet_lite0 |", "| alexnet |"))}
    assert rows["efficientnet_lite0"][1] == "49 / 12 / 33" and rows["alexnet"][1] == "0 / 0 / 7"
    assert all(float(row[i]) > 0 for row in rows.values() for i in (2, 3))
    assert all(float(row[5]) < 1e-5 for row in rows.values())  # float32 rounding only
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_folded_graph_compares_with_the_eager_graph_in_ieee_float32(monkeypatch, capsys):
    """The reference codes are float32 in full: on CUDA cuDNN runs float32 convolutions in TF32 unless told
    otherwise, which would put TF32's error, not the folding's, in the difference column."""
    import torch

    from pipeline.hardware import tf32_settings

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("folded_graph")
    made, seen = bench.graphs, []

    def recording(name, device):
        models = made(name, device)
        eager = models["eager"]

        class Recorded(torch.nn.Module):
            def forward(self, images):
                seen.append([getattr(owner, attribute) == ieee for owner, attribute, ieee in tf32_settings()])
                return eager(images)

        return {"eager": Recorded(), "folded": models["folded"]}

    monkeypatch.setattr(bench, "graphs", recording)
    bench.main(["--backbones", "alexnet", "--batch-size", "2", "--batches", "1", "--rounds", "1", "--no-write",
                "--precision", "bfloat16"])
    assert seen[0] == [True, True]  # the reference's forward pass, before the timed ones
    assert "| alexnet |" in capsys.readouterr().out


def test_gpu_checks_record_each_step_and_go_on_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("gpu_checks")
    checks = bench.Checks(tmp_path, budget=30, header="header", least=0.5)
    assert checks.run("fine", [sys.executable, "-c", "print('one'); print('two')"], 20) == (0, "one\ntwo\n")
    checks.figure("3 rows")
    code, output = checks.run("fails", [sys.executable, "-c", "import sys; print('why it failed'); sys.exit(3)"], 20)
    assert code == 3 and "why it failed" in output
    assert checks.run("hangs", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                      1)[0] == 124
    checks.deadline = 0  # the budget is spent: what is left is not run
    assert checks.run("late", [sys.executable, "-c", "print(1)"], 20) == (-1, "")
    table = (tmp_path / "gpu_checks.md").read_text().splitlines()
    assert table[0] == "header"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")] for line in table[4:]}
    assert rows["fine"][1] == "ok" and rows["fine"][3] == "3 rows"
    assert rows["fails"][1:4:2] == ["exit 3", "why it failed"]
    assert rows["hangs"][1] == "stopped at its cap" and float(rows["hangs"][2]) < 20
    assert rows["late"][1] == "not run: no time left"
    log = (tmp_path / "gpu_checks.log").read_text()
    assert "why it failed" in log and "[hangs: exit 124" in log and "started" in log


def test_a_gpu_check_stopped_at_its_cap_takes_the_processes_it_started_with_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("gpu_checks")
    marker = tmp_path / "grandchild.pid"
    grandchild = ("import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(60)" % str(marker))
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    checks = bench.Checks(tmp_path, budget=30, least=0.5)
    started = time.monotonic()
    assert checks.run("bench", [sys.executable, "-c", child], 3)[0] == 124
    assert time.monotonic() - started < 30  # not held until the grandchild's minute is over
    pid = int(marker.read_text())

    def alive() -> bool:  # a zombie (killed, not yet reaped by whoever adopted it) is not
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    for _ in range(50):  # the kill is sent; the process may take a moment to go
        if not alive():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the grandchild outlived its step's cap")


def test_gpu_checks_data_takes_every_decoding_path_and_caches_compare(tmp_path, monkeypatch):
    from tests.conftest import write_code_cache

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("gpu_checks")
    bench.write_checks_data(tmp_path / "data", 4)
    files = {path.name: path for path in (tmp_path / "data").rglob("*.*")}
    assert len(files) == 8 and set(bench.ODD_FILES) <= set(files)
    with Image.open(files["odd-cmyk.jpg"]) as image:
        assert image.format == "JPEG" and image.mode == "CMYK"
    with Image.open(files["odd-png.png"]) as image:
        assert image.format == "PNG"
    photos = sorted((tmp_path / "data").glob("*/*.jpg"))
    assert bench.repeat_photos(tmp_path / "data", 3) == 3 * len(photos) == len(list((tmp_path / "data").glob("*/*.jpg")))
    assert all(path.with_name(f"{path.stem}-2.jpg").read_bytes() == path.read_bytes() for path in photos)
    codes = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    first = write_code_cache(tmp_path / "first", codes, np.arange(6) % 2, ["a", "b"])
    scaled = codes * 1.01
    scaled[3] *= 1.5  # one image read otherwise: the line names it
    second = write_code_cache(tmp_path / "second", scaled, np.arange(6) % 2, ["a", "b"])
    third = write_code_cache(tmp_path / "third", codes[:4], np.arange(4) % 2, ["a", "b"])
    same, line = bench.compare_caches(first, second)
    assert same and "median 9.9e-03" in line and "same samples: 6 kept, 0 skipped" in line and "(row00003;" in line
    same, line = bench.compare_caches(first, third)
    assert not same and "median 0.0e+00" in line and "DIFFERENT samples: 6 vs 4 kept" in line


def test_gpu_checks_give_tl_commands_that_its_cli_takes(tmp_path, monkeypatch):
    """The prepared GPU run is only run where a GPU is lent: its `tl` command lines are parsed here by
    the CLI itself, so that an option renamed since cannot waste the GPU's minutes."""
    import click

    import cli

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("gpu_checks")
    parsed = []

    def parse_only(self, step, argv, cap):
        if argv[0] == "tl":
            command = cli.tl.commands[argv[1]]
            with command.make_context(argv[1], list(argv[2:])) as context:
                parsed.append((argv[1], context.params))
        elif argv[1].startswith("bench/"):  # a bench's own parser: exit 2 on an unknown option
            script = Path(argv[1]).stem
            parsed.append((script, vars(importlib.import_module(script).arguments().parse_args(argv[2:]))))
        elif "run_extract(" in argv[-1]:  # the extraction with JPEGs in workers: its ExtractConfig is built
            exec(argv[-1], {})
        self.add(step, "parsed")
        return 0, ""

    monkeypatch.setattr(bench.Checks, "run", parse_only)
    monkeypatch.setattr("pipeline.extract.run_extract", lambda config: parsed.append(("run_extract", vars(config))))
    monkeypatch.setattr(bench, "compare_caches", lambda first, second: (True, ""))
    monkeypatch.setattr(bench, "_accuracy", lambda report: "")
    checks = bench.Checks(tmp_path, budget=30)
    bench.functional_checks(checks, "cuda", tmp_path, 4)
    stages = ["extract"] * 4 + ["run_extract", "extract"] + ["fit-head"] * 2 + ["evaluate", "finetune", "finetune",
                                                                                 "evaluate", "predict", "export"]
    # the test extra installs timm (its extraction on the device and on the CPU) and the offline weights
    assert [name for name, _ in parsed] == stages + ["extract"] * 2 + ["quickstart"]
    assert {params["device"] for name, params in parsed if "device" in params} == {"cuda", "cpu"}
    workers = next(params for name, params in parsed if name == "run_extract")
    assert workers["device_decode"] == "off" and workers["dtype"] == "float32"
    parsed.clear()
    bench.benches(checks, "cuda", tmp_path, 8, 4)
    assert [name for name, _ in parsed] == ["folded_graph"] * 2 + ["extract_throughput"] * 6
    assert all(params["device"] == "cuda" and params["no_write"] for _, params in parsed)
    assert [(params["backbones"], params["precision"], params["decode"]) for _, params in parsed[2:]] == [
        ("alexnet", "float16", "fast"), ("alexnet", "float32", "fast"), ("alexnet", "bfloat16", "fast"),
        ("resnet50", "float16", "fast"), ("vgg16", "float16", "fast"), ("alexnet", "float16", "fast,exact")]
    assert isinstance(cli.tl, click.Group)


def test_a_section_of_the_results_is_replaced_by_its_own_heading_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    results = importlib.import_module("results")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.record("## Folded inference graph on CUDA (float16)", "half")
    results.record("## Folded inference graph on CUDA", "single")
    results.record("## Folded inference graph on CUDA", "single again")
    text = results.RESULTS.read_text()
    assert "half" in text and "single again" in text and text.count("## Folded inference graph on CUDA\n") == 1


def test_sample_memory_counts_tens_of_bytes_an_image_where_a_sample_object_took_hundreds(monkeypatch, capsys):
    """bench/sample_memory.py runs (small) and shows what a webdataset source holds per image: its columns, not a
    Sample object each (a billion images must fit a rank's memory)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("sample_memory")
    bench.main(["--images", "8000", "--tars", "8", "--traced-images", "8000", "--ranks", "2", "--no-write"])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| the opened source", "| a rank of", "| one Python"))]
    (held, peak), pending, (rank, rank_peak) = map(float, rows[0][1:3]), float(rows[1][1]), map(float, rows[2][1:3])
    objects = float(rows[3][1])
    assert "TarSamples" in rows[0][0] and held < 60 and peak < 110 and objects > 200, rows  # peak: 136 before
    assert "listings" in rows[1][0] and pending < held + 25, rows  # the listings' JSON waits compressed (+39)
    # a rank of 2 holds its tars' samples only (and what any source holds: here 1,000 class names, 7 bytes an
    # image), and while opening it never held the other rank's tars' columns (its peak was above one process's)
    assert "HeldSamples" in rows[2][0] and rank < held * 0.75 and rank_peak < peak, rows


def test_tar_listing_times_the_three_ways_a_webdataset_is_listed(monkeypatch, capsys):
    """bench/tar_listing.py runs (small): the README's per-image listing costs (tl's header reader, tarfile
    alone, kept listings) come from it, and the kept-listings row is one that reused them."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("tar_listing")
    bench.main(["--tars", "3", "--per-tar", "10", "--rounds", "1", "--no-write"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(bench.WAYS), rows
    assert all(float(row.split("|")[2]) > 0 for row in rows), rows
