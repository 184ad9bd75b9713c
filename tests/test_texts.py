"""The offline texts the benchmarks stream: named texts, any file, a clear error when missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from infmllm_gguf.texts import JARGON_PATH, genesis, jargon, load_text


def test_named_texts_and_files(tmp_path, monkeypatch):
    book = genesis()
    assert book.startswith("In the beginning God created the heaven and the earth.")
    assert book.rstrip().endswith("and he was put in a coffin in Egypt.")  # all 50 chapters
    monkeypatch.chdir(tmp_path)
    Path("genesis").write_text("a file that happens to share the name\n")
    assert load_text("genesis").startswith("In the beginning")  # a name is the named text
    assert load_text("./genesis") == "a file that happens to share the name\n"
    path = tmp_path / "notes.txt"
    path.write_text("any text file streams too\n")
    assert load_text(str(path)) == "any text file streams too\n"
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "missing.txt"))


def test_jargon_is_the_lexicon_or_a_clear_error():
    if not JARGON_PATH.exists():
        with pytest.raises(FileNotFoundError, match="apt-get install jargon-text"):
            jargon()
        return
    text = jargon()
    assert text.startswith("Chapter 1. Hacker Slang and Hacker Culture\n")
    assert "\n:hacker: n.\n" in text  # lexicon entries, de-indented
    assert "\n(TM)\n\n/dev/null\n" not in text  # the glossary's bare list of terms is dropped
    assert "\u00a0" not in text
    assert len(text) > 1_000_000
