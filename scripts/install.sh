#!/usr/bin/env bash
# Install adakv-local into the active Python environment (a virtualenv is recommended).
#
#   scripts/install.sh [PIP_TARGET]        PIP_TARGET defaults to ".", e.g. ".[test]"
#
# 1. llama-cpp-python==0.3.36 as Python bindings only (-DLLAMA_BUILD=OFF), built from the
#    same verified sdist our build takes llama.cpp from: adakv-local points it at its own
#    patched libllama, so compiling llama.cpp for it as well would only double the time.
#    Skipped when that version is already installed.
# 2. adakv-local itself: `pip install PIP_TARGET`, which builds the pinned llama.cpp with our
#    patches (scikit-build-core; build directory build/ is reused by later installs).
#
# Plain `pip install .` works too; it just compiles llama.cpp twice.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-.}"
py="${PYTHON:-python}"

if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    sdist="$("$py" "$root/cmake/prepare_llama_cpp.py" --print-sdist)"
    echo "[adakv-local] installing llama-cpp-python 0.3.36 (Python bindings only) from $sdist" >&2
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$py" -m pip install --disable-pip-version-check "$sdist"
fi
cd "$root"
"$py" -m pip install --disable-pip-version-check "$target"
