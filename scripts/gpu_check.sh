#!/usr/bin/env bash
# The GPU check in one run, on a machine with an NVIDIA GPU and no network: build with CUDA
# for this device's own architecture (from the carried source, offline), run the tests marked
# gpu, then the GPU benchmark.  Logs and results go to $OUT (default bench/results/gpu/):
# build.log, build_info.json, tests.log, bench.log, gpu.json, gpu.csv, gpu.png.  Sized to
# finish within 8 minutes on a 16-core machine; every step prints a timestamp.
#
# Needs .gpu/ from scripts/gpu_prepare.sh (carry it along with the checkout) and a Python
# holding numpy, pytest, matplotlib, scikit-build-core, cmake and ninja (a CUDA image's).
#
# Usage: scripts/gpu_check.sh [--cpu]
#   --cpu   dry run without a GPU: a CPU build, the gpu tests with the CPU in the GPU's place
#           (INFMLLM_GPU_TESTS_ON_CPU=1) and the benchmark on a small model; it proves the
#           script and the carry, nothing about a GPU
# Environment: PYTHON (default python3), OUT, BUDGET_S (the whole run's seconds, default 480:
# the benchmark's stream stops in time for it), WHEEL (install this wheel, e.g. one built with
# CUDA on another machine and carried, instead of building).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = --cpu ] && mode=cpu
python="$(realpath -s "$(command -v "${PYTHON:-python3}")")" # absolute: steps run in tests/ too
out="${OUT:-bench/results/gpu}"
budget_s="${BUDGET_S:-480}"
mkdir -p "$out"
start=$SECONDS
say() { echo "[$(date +%H:%M:%S) +$((SECONDS - start))s] gpu_check: $*"; }
fail() {
    say "FAILED: $*"
    exit 1
}

work="$(mktemp -d)"
site="$work/site"
say "mode $mode; $("$python" --version 2>&1); $(nproc) cores; results in $out"
cmake_args=""
if [ "$mode" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || fail "nvidia-smi"
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
    cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${cap}-real"
    say "$(nvcc --version | tail -1)"
    # the CUDA runtime and cuBLAS the libraries link to (RPATH is $ORIGIN only)
    [ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
        # a toolkit without cuBLAS: take the one of Python's nvidia-cublas package (PyTorch's),
        # under the unversioned names CMake's FindCUDAToolkit looks for
        pkgs="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia"
        lib="$(find "$pkgs" -name 'libcublas.so.*' 2>/dev/null | head -1)"
        inc="$(find "$pkgs" -name cublas_v2.h 2>/dev/null | head -1)"
        [ -n "$lib" ] && [ -n "$inc" ] || fail "no cuBLAS in /usr/local/cuda nor under $pkgs"
        mkdir -p "$work/cublas"
        for f in "$(dirname "$lib")"/libcublas*.so.*; do
            ln -sf "$f" "$work/cublas/$(basename "$f" | sed 's/\.so\..*/.so/')"
        done
        export CMAKE_LIBRARY_PATH="$work/cublas" CPATH="$(dirname "$inc")${CPATH:+:$CPATH}"
        export LD_LIBRARY_PATH="$(dirname "$lib"):$LD_LIBRARY_PATH"
        say "cuBLAS from $(dirname "$lib")"
    fi
fi
"$python" -m pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl ||
    fail "installing the carried wheels (run scripts/gpu_prepare.sh and carry .gpu)"
export PYTHONPATH="$site" # the carried build backend too
# Python's tarfile: a CUDA image need not have xz
"$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    .gpu/llama_cpp_python-*-trimmed.tar.xz "$work" || fail "extracting the carried source"

t=$SECONDS
if [ -n "${WHEEL:-}" ]; then
    say "installing $WHEEL instead of building"
    mkdir -p "$work/dist" && cp "$WHEEL" "$work/dist/" || fail "no wheel at $WHEEL"
else
    say "building (CMAKE_ARGS='$cmake_args')"
    env INFMLLM_LLAMA_SOURCE="$(echo "$work"/llama_cpp_python-*)" CMAKE_ARGS="$cmake_args" PIP_NO_INDEX=1 \
        "$python" -m pip wheel -v --no-build-isolation --no-deps --disable-pip-version-check \
        -C "build-dir=build/gpu-check-$mode" -w "$work/dist" . >"$out/build.log" 2>&1 ||
        {
            tail -40 "$out/build.log"
            fail "build"
        }
fi
build_s=$((SECONDS - t))
say "built in $build_s s ($(ls "$work"/dist))"
"$python" -m pip install -q --upgrade --no-index --no-deps --target "$site" "$work"/dist/*.whl || fail "installing the wheel"
(cd tests && "$python" -c "
import json, infmllm_gguf
info = infmllm_gguf.build_info()
print(json.dumps({k: info[k] for k in ('backends_built', 'backends', 'devices')}))") | tee "$out/build_info.json" ||
    fail "importing the build"

say "tests marked gpu"
dry=()
[ "$mode" = cpu ] && dry=(INFMLLM_GPU_TESTS_ON_CPU=1)
(cd tests && env "${dry[@]}" "$python" -m pytest -m gpu -v -rs -p no:cacheprovider test_gpu.py) >"$out/tests.log" 2>&1
tests_rc=$?
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$out/tests.log" | tail -25
say "tests finished with status $tests_rc"

bench=()
[ "$mode" = cpu ] && bench=(--shape small --budget 256 --piece 256 --steps 16 --rounds 2 --stream-tokens 30000)
left=$((budget_s - (SECONDS - start)))
stream_s=$((left - 150)) # model, quantization and the decode rounds take about 2 min before it
[ "$stream_s" -lt 30 ] && stream_s=30
say "benchmark (stream limited to $stream_s s)"
PYTHONUNBUFFERED=1 "$python" -m bench gpu --out "$out" --max-seconds "$stream_s" "${bench[@]}" 2>&1 |
    grep -v -E '^\[ *[0-9]+/ *[0-9]+\]|^llama_model_loader|^llama_model_quantize|^print_info|^load' >"$out/bench.log"
bench_rc=${PIPESTATUS[0]}
grep "^\[" "$out/bench.log" | grep -v "stream .* tokens:" | tail -8
say "benchmark finished with status $bench_rc"
say "done: build $build_s s, tests status $tests_rc, benchmark status $bench_rc, $((SECONDS - start)) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
