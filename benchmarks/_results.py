"""Writing one benchmark's section of benchmarks/RESULTS.md (between its start/end markers)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def update_section(start: str, end: str, section: str, path: Path = RESULTS) -> None:
    """Replace the text between ``start`` and ``end`` (markers included in ``section``), or append it."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
