"""Offline long texts: the whole KJV Bible via Debian's bible-kjv when present, else Genesis (shipped);
the Jargon File (Debian's jargon-text) as a second text of a different kind, never tuned on."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

_VERSE_REF = re.compile(r"^\S*?\d+:\d+ ", re.M)
JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def genesis() -> str:
    """Genesis (KJV, public domain), shipped with the package."""
    return resources.files("infmllm_gguf").joinpath("data/genesis-kjv.txt").read_text()


def kjv() -> str:
    """The King James Bible from `bible -f`, or Genesis when bible-kjv is missing."""
    if shutil.which("bible") is None:
        return genesis()
    out = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    return _VERSE_REF.sub("", out)


def jargon() -> str:
    """The Jargon File 4.4.7 (public domain): its essays, then the lexicon entries.

    The table of contents and the glossary's bare list of terms are dropped.
    """
    if not JARGON_PATH.exists():
        raise FileNotFoundError(f"{JARGON_PATH} is missing: apt-get install jargon-text")
    lines = gzip.decompress(JARGON_PATH.read_bytes()).decode("utf-8").replace("\u00a0", " ").splitlines()
    essays = next(i for i, line in enumerate(lines) if line.startswith("Chapter 1."))
    glossary = next(i for i, line in enumerate(lines) if line.startswith("Glossary"))
    entries = next(i for i, line in enumerate(lines) if line.startswith("   :"))
    body = lines[essays:glossary] + lines[entries:]
    return "\n".join(line[3:] if line.startswith("   ") else line for line in body) + "\n"


TEXTS = {"kjv": kjv, "genesis": genesis, "jargon": jargon}


def load_text(name_or_path: str) -> str:
    """A named text (kjv, genesis, jargon) or any text file."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    return Path(name_or_path).read_text(encoding="utf-8", errors="replace")
