"""Writes a benchmark's section into benchmarks/RESULTS.md (shared by the benchmark scripts)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(marker: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section starting with ``marker`` (up to the next '## ') or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(marker)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(marker))
        new = old[:start] + text + (old[end + 1 :] if end >= 0 else "")
    path.write_text(new)
