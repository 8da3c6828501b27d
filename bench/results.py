"""bench/RESULTS.md: each benchmark script owns one section and replaces only that section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(section: str, text: str) -> None:
    """Replace (or append) this section of RESULTS.md, leaving the other sections alone."""
    content = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    blocks = content.split("\n## ")
    kept = [blocks[0]] + [b for b in blocks[1:] if not ("## " + b).startswith(section)]
    RESULTS.write_text("\n## ".join(kept).rstrip() + f"\n\n{section}\n\n{text}\n")


def publish(section: str, header: str, table: list[str], write: bool = True) -> None:
    """Print a benchmark's header and table, and record them as its section unless `write` is off."""
    text = "\n".join([header, "", *table])
    print(text)
    if write:
        record(section, text)
