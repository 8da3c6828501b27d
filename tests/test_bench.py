"""The throughput benchmark runs end to end (tiny, on the CPU) and prints its table, so it cannot rot
between the sessions that measure with it; its photo set has the promised size mix."""

from __future__ import annotations

import importlib

import pytest

from pipeline.allocator import glibc_allocator
from tests.conftest import REPO


def test_extract_throughput_prints_a_row_per_backbone_and_decoding_mode(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("extract_throughput")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--images", "6", "--batch-size", "2", "--backbones", "alexnet", "--precision", "float32",
                "--workers", "0", "--loop-workers", "0", "--multiscale-images", "1", "--device", "cpu", "--no-write",
                "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| alexnet |")]
    assert [row[2] for row in rows[:2]] == ["fast", "exact"] and len(rows) == 5  # + code differences, multiscale x2
    # tl, bare forward (tl's folded graph, the eager graph), plain loop, decoding alone, shared-core bound, img/s
    assert all(float(row[i]) > 0 for row in rows[:2] for i in (3, 4, 5, 6, 7, 8))
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
    assert [(row[0], row[1]) for row in rows] == [
        ("bilinear", "Pillow, the crop's box"), ("bilinear", "torch uint8 (tl)"),
        ("bicubic", "Pillow, the crop's box"), ("bicubic", "torch uint8 (tl)")]
    assert all(float(row[2]) > 0 for row in rows)
    # photos not reduced: a few pixel values off by a level or two, whichever resize
    assert all(float(row[3]) < 0.01 and int(row[4]) <= 2 for row in rows)
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
