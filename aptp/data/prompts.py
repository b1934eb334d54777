"""Reading prompt files: one prompt per line, or a TSV/CSV table with a ``Prompt`` column.

* ``.tsv`` / ``.csv`` (or, for another suffix, a first line that is a tab-separated header with a
  ``Prompt`` column): a table; the ``Prompt`` column (any case) gives the prompts, the other
  columns are labels (e.g. PartiPrompts' ``Category`` and ``Challenge``). TSV is read without quote processing (prompts may contain ``"``);
  CSV with standard quoting.
* anything else: one prompt per line.

Blank lines / empty prompts are skipped; surrounding whitespace is stripped. Files are UTF-8
(a BOM is accepted).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from aptp.core.errors import ConfigError

PROMPT_COLUMN = "prompt"


class PromptFileError(ConfigError):
    """A prompt file cannot be read: empty, no ``Prompt`` column, not UTF-8."""


class PromptFileNotFoundError(PromptFileError, FileNotFoundError):
    """The prompt file does not exist."""


@dataclass
class PromptTable:
    """Prompts with their label columns (empty for one-prompt-per-line files)."""

    prompts: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)  # column name -> value per prompt

    def __len__(self) -> int:
        return len(self.prompts)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PromptFileNotFoundError(f"prompt file {path} does not exist; check the path.")
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} is not a file; pass a text, TSV or CSV file of prompts.")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _delimiter(path: Path, first_line: str) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    # another suffix: a table only if its first line is a tab-separated header with a Prompt column
    # (commas are common inside prompts, tabs are not)
    if "\t" in first_line and PROMPT_COLUMN in (c.strip().lower() for c in first_line.split("\t")):
        return "\t"
    return None


def _read_rows(path: Path, text: str, delim: str) -> list[list[str]]:
    """The rows of a TSV (no quote processing) or CSV (standard quoting, strict). A CSV record that
    spans lines, or quoting the reader rejects, is refused with its line number: one stray quote
    would otherwise swallow every following row into one prompt."""
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, quoting=quoting, strict=True)
    rows: list[list[str]] = []
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            raise PromptFileError(
                f"prompt table {path}, line {start}: malformed quoting ({exc}); a field that starts with \" must "
                'end with " before the next comma, and a " inside a quoted field is written "". Fix the '
                "quotes, or save the file as .tsv (read without quote processing)."
            ) from None
        if reader.line_num > start and any("\n" in f or "\r" in f for f in row):
            raise PromptFileError(
                f"prompt table {path}, line {start}: a quoted field runs on to line {reader.line_num}, so rows "
                f"{start} to {reader.line_num} would become one prompt; a stray \" there? Close the quote on its "
                'line or write a literal quote as "" inside a quoted field (or save the file as .tsv).'
            )
        rows.append(row)
        start = reader.line_num + 1


def read_prompt_table(path: str | Path) -> PromptTable:
    """Prompts and label columns of a prompt file (see the module doc)."""
    path = Path(path).expanduser()
    text = _read_text(path)
    if not text.strip():
        raise PromptFileError(f"prompt file {path} is empty; put one prompt per line, or a table with a Prompt column.")
    delim = _delimiter(path, text.splitlines()[0])
    if delim is None:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        return PromptTable(prompts)
    rows = _read_rows(path, text, delim)
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if PROMPT_COLUMN not in lower:
        raise PromptFileError(
            f"prompt table {path} has no 'Prompt' column (columns: {header}); add a header line with a "
            "Prompt column, or use a plain text file with one prompt per line."
        )
    col = lower.index(PROMPT_COLUMN)
    prompts: list[str] = []
    labels: dict[str, list[str]] = {h: [] for i, h in enumerate(header) if i != col}
    for row in rows[1:]:
        if col >= len(row) or not row[col].strip():
            continue
        prompts.append(row[col].strip())
        for i, h in enumerate(header):
            if i != col:
                labels[h].append(row[i].strip() if i < len(row) else "")
    if not prompts:
        raise PromptFileError(f"prompt table {path} has a Prompt column but no prompts; add rows below the header.")
    return PromptTable(prompts, labels)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompt file, in order (see the module doc)."""
    return read_prompt_table(path).prompts
