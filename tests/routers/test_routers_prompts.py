"""Prompt files: one per line, TSV/CSV with a Prompt column, labels, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from aptp.core.errors import ConfigError
from aptp.data.prompts import PromptFileError, read_prompt_table, read_prompts

PARTI = Path("/work/shared/data/PartiPrompts.tsv")


def test_one_prompt_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  a blue sphere  \n")
    assert read_prompts(f) == ["a red cube", "a blue sphere"]
    f.write_text("prompt, a cat on a mat\na dog, running\n")  # commas in a text file are just text
    assert read_prompts(f) == ["prompt, a cat on a mat", "a dog, running"]


def test_tsv_with_quotes_and_labels(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text('Prompt\tCategory\n"Hello" written on a wall\tText\na cat\tAnimals\n')
    t = read_prompt_table(f)
    assert t.prompts == ['"Hello" written on a wall', "a cat"]
    assert t.labels == {"Category": ["Text", "Animals"]}


def test_csv_with_quoted_commas(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt\n1,"a cat, a dog"\n2,a bird\n', encoding="utf-8-sig")
    t = read_prompt_table(f)
    assert t.prompts == ["a cat, a dog", "a bird"] and t.labels == {"id": ["1", "2"]}


def test_header_detected_in_a_txt_table(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Prompt\tChallenge\na cat\tBasic\n")
    assert read_prompt_table(f).labels == {"Challenge": ["Basic"]}


@pytest.mark.skipif(not PARTI.is_file(), reason="PartiPrompts.tsv not present")
def test_parti_prompts():
    t = read_prompt_table(PARTI)
    assert len(t.prompts) == 1632 and set(t.labels) == {"Category", "Challenge", "Note"}
    assert all(len(v) == 1632 for v in t.labels.values())


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptFileError, match="empty"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "nocol.tsv").write_text("Text\tCategory\na cat\tx\n")
    with pytest.raises(PromptFileError, match="no 'Prompt' column"):
        read_prompts(tmp_path / "nocol.tsv")
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_prompts(tmp_path / "latin1.txt")
    (tmp_path / "header-only.csv").write_text("prompt,x\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(tmp_path / "header-only.csv")
