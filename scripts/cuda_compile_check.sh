#!/usr/bin/env bash
# CUDA compile check: compiles, for one GPU architecture, only the CUDA sources that the patch
# series touches, so that a CUDA compile error cannot land unnoticed on a machine without a GPU.
#
#   scripts/cuda_compile_check.sh            (nvcc on PATH; otherwise it says so and exits 0)
#
# It configures the project's own CMakeLists.txt with -DADAKV_CUDA=ON for one architecture
# (which prepares the patched llama.cpp with cmake/prepare_llama_cpp.py, as every build does)
# and builds the object files below: no library, no link. Which objects, and why (patches 0003
# and 0005 change the headers fattn-common.cuh, fattn-vec.cuh, fattn-tile.cuh and
# fattn-mma-f16.cuh, which every flash-attention template instance includes; the instances are
# what makes a full CUDA build take most of an hour):
#   ggml-backend.cpp                          the generic supports_op refusal (patches 0001, 0003-0005)
#   fattn.cu                                  kernel selection = supports_op, launch_fattn's callers
#   fattn-vec-instance-f16-f16.cu             the vec kernel with f16 K/V (D 64, 128, 256): start
#                                             cells (0003), pooled rows (0005)
#   fattn-vec-instance-q8_0-q8_0.cu           the vec kernel with quantized K/V (q8_1 Q path)
#   fattn-tile-instance-dkq128-dv128.cu       the tile kernel, D 128, every column/GQA variant
#                                             (ncols2 1 with and ncols2 > 1 without bounds checks)
#   fattn-mma-f16-instance-ncols1_1-ncols2_16.cu  the mma kernel, which only gains the arguments
#                                             (the instance file with the fewest cases)
# The other vec and tile instances differ only in template arguments, the other mma instances
# in nothing that the patches touch.
#
# Environment:
#   ADAKV_CUDA_CHECK_ARCH  CMAKE_CUDA_ARCHITECTURES value (default 90: Hopper; 75 for Turing)
#   ADAKV_CUDA_CHECK_DIR   work directory, reused by later runs (default build-cuda-check/ in this
#                          checkout: a build directory belongs to one source tree)
#   ADAKV_CUDA_CHECK_JOBS  parallel compile jobs (default 2)
#   ADAKV_CUBLAS_DIR       directory with include/cublas_v2.h, when the toolkit has no cuBLAS;
#                          otherwise the headers are taken from the nvidia-cublas wheel
#                          (pip download --no-deps, ~450 MB once, only the headers unpacked)
# Exit status: 0 compiled (or skipped: no nvcc), 1 a compile or configure error, 2 setup failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"

if ! command -v nvcc >/dev/null 2>&1; then
    echo "cuda_compile_check: nvcc is not on PATH: skipped"
    exit 0
fi
arch="${ADAKV_CUDA_CHECK_ARCH:-90}"
work="${ADAKV_CUDA_CHECK_DIR:-$root/build-cuda-check}"
jobs="${ADAKV_CUDA_CHECK_JOBS:-2}"
mkdir -p "$work"
t0=$SECONDS

# cuBLAS headers: ggml-cuda's common header includes cublas_v2.h in every translation unit
nvcc_root="$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)"
cublas_inc=""
for d in "${ADAKV_CUBLAS_DIR:+$ADAKV_CUBLAS_DIR/include}" "$nvcc_root/include" /usr/local/cuda/include; do
    if [ -n "$d" ] && [ -f "$d/cublas_v2.h" ]; then
        cublas_inc="$d"
        break
    fi
done
if [ -z "$cublas_inc" ]; then
    cublas_inc="$work/cublas/nvidia/cu13/include"
    if [ ! -f "$cublas_inc/cublas_v2.h" ]; then
        echo "cuda_compile_check: no cuBLAS headers in the toolkit, taking them from the nvidia-cublas wheel" >&2
        "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/cublas" nvidia-cublas || exit 2
        (cd "$work/cublas" && unzip -q -o nvidia_cublas-*.whl 'nvidia/cu13/include/*') || exit 2
    fi
fi
cublas_lib="$(dirname "$cublas_inc")/lib" # never linked: FindCUDAToolkit only needs a path for CUDA::cublas

build="$work/build-sm$arch"
if [ ! -f "$build/build.ninja" ]; then
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$py")" \
        -DADAKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_NO_VMM=ON -DGGML_CCACHE=OFF \
        -DCMAKE_CUDA_FLAGS="-I$cublas_inc" \
        -DCUDA_cublas_LIBRARY="$cublas_lib/libcublas.so.13" \
        -DCUDA_cublasLt_LIBRARY="$cublas_lib/libcublasLt.so.13" >"$work/configure.log" 2>&1 || {
        tail -n 30 "$work/configure.log" >&2
        echo "cuda_compile_check: configure failed (log: $work/configure.log)" >&2
        exit 1
    }
fi

sources=(
    ggml-backend.cpp
    fattn.cu
    fattn-vec-instance-f16-f16.cu
    fattn-vec-instance-q8_0-q8_0.cu
    fattn-tile-instance-dkq128-dv128.cu
    fattn-mma-f16-instance-ncols1_1-ncols2_16.cu
)
all_targets="$(ninja -C "$build" -t targets all)"
targets=()
for s in "${sources[@]}"; do
    t="$(printf '%s\n' "$all_targets" | grep -o "^llama.cpp/ggml/src/[^:]*/${s//./\\.}\.o:" | head -n 1 || true)"
    t="${t%:}"
    if [ -z "$t" ]; then
        echo "cuda_compile_check: no object target for $s" >&2
        exit 2
    fi
    targets+=("$t")
done

echo "cuda_compile_check: sm_$arch, ${#targets[@]} objects, -j$jobs (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
if ! ninja -C "$build" -j "$jobs" "${targets[@]}"; then
    echo "cuda_compile_check: FAILED" >&2
    exit 1
fi
echo "cuda_compile_check: OK in $((SECONDS - t0)) s"
