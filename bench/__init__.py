"""The benchmark harness: `python -m bench <name> [options]` from the repository root.

Run from the root, Python puts the checkout first on sys.path, and the checkout's
`infmllm_gguf/` is the source without its built llama.cpp layer (`_llama_cpp/`, made by the
install), which refuses to import.  So where the checkout has no such build, its root is taken
off sys.path here, before anything imports the library, and `infmllm_gguf` is the installed
package; a checkout holding a build of its own (the build products copied in) is used as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if not (ROOT / "infmllm_gguf" / "_llama_cpp").is_dir():
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
