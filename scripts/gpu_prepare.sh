#!/usr/bin/env bash
# Prepare, on a machine with network, what scripts/gpu_check.sh needs on a GPU machine without
# it, in .gpu/ (ignored by git; carry that folder along with the checkout):
#   llama_cpp_python-<version>-trimmed.tar.xz   the pinned sdist (sha256-checked first) as the
#       build extracts it (cmake/prepare_source.py's SKIP list) and patched by patches/ (the
#       GPU machine may have no git; the tree is marked with the patch set), less the ggml
#       backends and llama.cpp tools the CPU and CUDA builds never compile (src/models/ and
#       tools/mtmd stay)
#   wheels/   the pure-Python packages the runtime and tests import that a CUDA image with
#             PyTorch lacks (gguf, diskcache, threadpoolctl), and the build backend (scikit-build-core, in
#             case the machine's is older than pyproject.toml asks)
#
# Usage: scripts/gpu_prepare.sh
# Environment: PYTHON (default .venv/bin/python; its pip downloads), SDIST (default: the
# build's cache, ~/.cache/infmllm-gguf/<sdist>, downloaded there when missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
out="$root/.gpu"
rm -rf "$out"
mkdir -p "$out/wheels"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# the build's own fetch, check and extraction (prepare_source.py), into $tmp/src
name="$("$python" - "$tmp/src" <<'EOF'
import os
import sys
from pathlib import Path

sys.path.insert(0, "cmake")
import prepare_source as ps

sdist = Path(os.environ["SDIST"]) if os.environ.get("SDIST") else ps.download_sdist(
    Path(os.environ.get("INFMLLM_CACHE_DIR", Path.home() / ".cache" / "infmllm-gguf"))
)
ps.verify_sdist(sdist)
name = ps.UPSTREAM["sdist"].removesuffix(".tar.gz")
ps.extract_sdist(sdist, Path(sys.argv[1]) / name)
ps.patch_tree(Path(sys.argv[1]) / name)  # the GPU machine may have no git
print(name)
EOF
)"
llama="$tmp/src/$name/vendor/llama.cpp"
for dir in "$llama"/ggml/src/ggml-*/; do
    case "$(basename "$dir")" in
        ggml-cpu | ggml-cuda) ;;
        *) rm -rf "$dir" ;;
    esac
done
for dir in "$llama"/tools/*/; do
    [ "$(basename "$dir")" = mtmd ] || rm -rf "$dir"
done
tar -C "$tmp/src" -cJf "$out/$name-trimmed.tar.xz" "$name"

# the versions this checkout's venv runs its tests with
pins=()
for pkg in gguf diskcache threadpoolctl scikit-build-core; do
    pins+=("$pkg==$("$python" -c "import importlib.metadata as m; print(m.version('$pkg'))")")
done
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$out/wheels" "${pins[@]}"

find "$out" -type f -printf 'gpu_prepare: %p %s bytes\n'
