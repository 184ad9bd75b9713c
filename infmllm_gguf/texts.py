"""Offline long texts: the whole KJV Bible via Debian's bible-kjv when present, else Genesis (shipped)."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources

_VERSE_REF = re.compile(r"^\S*?\d+:\d+ ", re.M)


def genesis() -> str:
    """Genesis (KJV, public domain), shipped with the package: ~50K tokens."""
    return resources.files("infmllm_gguf").joinpath("data/genesis-kjv.txt").read_text()


def kjv() -> str:
    """The King James Bible (~1M tokens) from `bible -f`, or Genesis when bible-kjv is missing."""
    if shutil.which("bible") is None:
        return genesis()
    out = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    return _VERSE_REF.sub("", out)
