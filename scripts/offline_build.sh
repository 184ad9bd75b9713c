#!/usr/bin/env bash
# Build an infmllm-gguf wheel from an extracted llama-cpp-python sdist with no network,
# proving the build needs nothing but the pinned source it is given.
#
# Usage: scripts/offline_build.sh OUT_DIR
#   OUT_DIR      where the wheel is written (created if missing)
# Environment:
#   PYTHON       interpreter of a venv holding the build tools (default: .venv/bin/python);
#                it needs scikit-build-core>=0.11, cmake and ninja:
#                  $PYTHON -m pip install "scikit-build-core>=0.11" cmake ninja
#   SDIST        the pinned sdist (default: ~/.cache/infmllm-gguf/llama_cpp_python-<version>.tar.gz),
#                sha256-checked against cmake/upstream.json before it is extracted
#   CMAKE_ARGS   extra CMake arguments, passed through (e.g. -DINFMLLM_SANITIZE=ON)
#
# Each distinct CMAKE_ARGS gets its own build dir, build/offline-<hash>/<wheel tag>, so a
# variant neither clobbers the normal build/<wheel tag> nor another variant.
set -euo pipefail

if [ $# -ne 1 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"

read -r version sdist_name sha256 < <(python3 -c '
import json, sys
u = json.load(open(sys.argv[1]))
print(u["version"], u["sdist"], u["sha256"])' "$root/cmake/upstream.json")
sdist="${SDIST:-$HOME/.cache/infmllm-gguf/$sdist_name}"

export PATH="$(dirname "$python"):$PATH"  # the venv's cmake and ninja, when it has them
if ! "$python" -c 'import scikit_build_core' 2>/dev/null || ! command -v cmake >/dev/null \
    || ! command -v ninja >/dev/null; then
    echo "offline_build: $python lacks the build tools; install them first:" >&2
    echo "  $python -m pip install 'scikit-build-core>=0.11' cmake ninja" >&2
    exit 1
fi
if [ ! -f "$sdist" ]; then
    echo "offline_build: $sdist not found (pip download --no-deps --no-binary :all: llama-cpp-python==$version)" >&2
    exit 1
fi
echo "$sha256  $sdist" | sha256sum --check --quiet

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp"
source_dir="$tmp/${sdist_name%.tar.gz}"

variant="$(printf '%s' "${CMAKE_ARGS:-}" | sha256sum | cut -c1-8)"
build_cmd=(
    env "INFMLLM_LLAMA_SOURCE=$source_dir" "CMAKE_ARGS=${CMAKE_ARGS:-}"
    PIP_NO_INDEX=1
    "$python" -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check
    -C "build-dir=build/offline-$variant/{wheel_tag}" -w "$out" "$root"
)

start=$SECONDS
if unshare --net true 2>/dev/null; then
    echo "offline_build: building in a network namespace with no network (unshare --net)"
    unshare --net -- "${build_cmd[@]}"
else
    echo "offline_build: WARNING: 'unshare --net' is not permitted here (needs root or user" \
        "namespaces); building WITH network access. The llama.cpp source still comes only" \
        "from $source_dir, and pip is told not to use an index (PIP_NO_INDEX=1)." >&2
    "${build_cmd[@]}"
fi
echo "offline_build: wheel in $out (CMAKE_ARGS='${CMAKE_ARGS:-}', build/offline-$variant) in $((SECONDS - start)) s"
