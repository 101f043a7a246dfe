#!/usr/bin/env bash
# Build ggml, libllama and native/ with AddressSanitizer + UBSan and run the exactness and
# native tests on that build.
#
#   scripts/sanitize.sh [PYTEST_ARGS...]     e.g. scripts/sanitize.sh -x -k fallback
#
# Run it from an environment where adakv-local's test extra is installed (README, "Running the
# tests"). The build goes to build-asan/ (reused by later runs) and is used only through
# ADAKV_LIB_DIR; the installed package is left alone. Python itself is not instrumented, so the
# ASan runtime is preloaded; leak checking is off (CPython keeps memory until exit by design),
# and any ASan or UBSan report stops the process with a non-zero exit code.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
build="${ADAKV_SANITIZE_BUILD:-build-asan}"

if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DADAKV_SANITIZE=ON \
        -DPython_EXECUTABLE="$(command -v "$py")" >/dev/null
fi
# the instrumented build is long and noisy (compiler warnings of ggml's SIMD code): its output
# goes to a log, whose tail is shown if it fails
echo "[sanitize] building $build/ (log: $build/build.log)" >&2
if ! cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1; then
    tail -n 40 "$build/build.log" >&2
    echo "[sanitize] the build failed" >&2
    exit 1
fi

asan="$(${CC:-cc} -print-file-name=libasan.so)"
# libstdc++ must be there when the ASan runtime starts, or its __cxa_throw interceptor finds no
# real function to call and the first C++ exception aborts ("CHECK failed: asan_interceptors.cpp")
cxx="$(${CXX:-c++} -print-file-name=libstdc++.so.6)"
for lib in "$asan" "$cxx"; do
    if [ ! -f "$lib" ]; then
        echo "scripts/sanitize.sh: $(basename "$lib") was not found by the compiler (\$CC / \$CXX)" >&2
        exit 1
    fi
done

tests=(tests/test_fattn_op.py tests/test_fattn_pooled.py tests/test_eviction.py tests/test_pooled.py tests/test_reliability.py
       tests/test_llama.py tests/test_random_api.py tests/test_chunked.py tests/test_native_checks.py
       tests/test_conversations.py)
echo "[sanitize] running ${tests[*]} on $build/bin under ASan + UBSan" >&2
# --capture=sys: pytest captures Python's output only, so a report written to the process's
# stderr by the sanitizer runtime reaches the log even when it ends the process
ADAKV_LIB_DIR="$root/$build/bin" \
LD_PRELOAD="$asan $cxx" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "$py" -m pytest -p no:cacheprovider --capture=sys -q -m "not slow" "${tests[@]}" "$@"
