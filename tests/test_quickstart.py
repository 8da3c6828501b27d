"""tl quickstart end to end on a reduced set of digits: real offline weights, accuracy well above
chance, and a second run reuses the caches."""

from __future__ import annotations

import json


def test_quickstart_end_to_end_and_resume(run_tl, tmp_path):
    out = tmp_path / "qs"
    first = run_tl("quickstart", "--out", out, "--per-class", "10", "--quiet")
    assert first.code == 0, first
    assert "test accuracy" in first.out and "report/report.md" in first.out
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["rows"] == 20 and report["accuracy"] >= 0.5  # ten classes: chance is 0.1
    assert (out / "report" / "confusion_matrix.png").is_file() and (out / "heads" / "digits-logreg.pt").is_file()
    second = run_tl("quickstart", "--out", out, "--per-class", "10", "--quiet")
    assert second.code == 0 and second.out.count("(reused)") == 2
    assert json.loads((out / "report" / "report.json").read_text())["accuracy"] == report["accuracy"]
