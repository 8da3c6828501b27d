"""The throughput benchmark runs end to end (tiny, on the CPU) and prints its table, so it cannot rot
between the sessions that have a GPU to run it on."""

from __future__ import annotations

import importlib

from tests.conftest import REPO


def test_extract_throughput_prints_a_row_per_backbone_and_precision(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("extract_throughput")
    before = (REPO / "bench" / "RESULTS.md").read_text()
    bench.main(["--images", "4", "--batch-size", "2", "--backbones", "alexnet", "--precision", "float32",
                "--workers", "0", "--train-steps", "1", "--device", "cpu", "--no-write"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| alexnet |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "float32"
    assert all(float(cells[i]) > 0 for i in (2, 3, 6))  # extract, bare forward and finetune step img/s
    assert (REPO / "bench" / "RESULTS.md").read_text() == before  # --no-write leaves the results alone
