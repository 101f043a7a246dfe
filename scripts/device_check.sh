#!/usr/bin/env bash
# GPU check (issue 11): CUDA against the CPU, then speed, in one call of at most ~8 minutes.
#
#   scripts/device_check.sh LIBS.tar.xz WHEELS_DIR OUT_DIR     on a machine with an NVIDIA GPU
#   scripts/device_check.sh --dry-run OUT_DIR                  here: the same steps on the CPU
#
# The GPU form is meant for a bare x86-64 Linux machine with an NVIDIA GPU and its driver, CUDA 13
# (cuBLAS: the toolkit's, or the nvidia-cublas wheel's), python3 with numpy and pytest, and no
# network. The repository is the working directory. LIBS.tar.xz holds the libraries built here:
#   cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DADAKV_CUDA=ON \
#         -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON && cmake --build build-cuda
#   tar -C build-cuda/bin -cJf libs.tar.xz libllama.so libggml.so libggml-base.so libggml-cpu.so libggml-cuda.so
# WHEELS_DIR the Python packages the machine lacks, for its Python (nvidia-h200's image: Python
# 3.12 with numpy, pytest, pyyaml, tqdm, jinja2; so cffi, pycparser, gguf, diskcache and the
# llama-cpp-python 0.3.36 bindings). The dry run uses the current environment and libraries
# (ADAKV_LIB_DIR or the installed package) and a tiny model.
#
# 1. correctness (OUT_DIR/pytest.log): tests/test_gpu.py (one flash-attention op with starts on
#    CUDA against a float64 reference: f16/q8_0/q4_0, head sizes 64/128, GQA 1/4/8, 1/2/32
#    queries, starts 0, n_kv - n_q and inside a tile; the same with the pooled block's rows of
#    patch 0005 (runs of 0, 1, a tile -1/+1 and ~300 rows, vec and tile kernels); supports_op
#    exactly for the extended shapes, with and without pooled rows; end-to-end attention and
#    logits against the CPU path on tiny64 and on 32 layers x 8 KV heads, pooled and rect block;
#    scoring adds no CPU split; fast path == fallback) and the gpu cases of tests/test_eviction.py
#    (compaction bitwise, keeping every cell == no eviction);
# 2. speed (OUT_DIR/speed.json, speed.log, a table): scripts/device_speed.py on a random
#    Llama-3-8B-shaped Q4_K model it writes: prompts of 4K, 32K and 128K tokens; decode t/s with
#    the full cache, with eviction at budget 2048 (the pooled block read in the kernels) and with
#    the forced per-head fallback (the block gathered per ubatch, one call per KV head); prefill
#    time, compression overhead, device memory around the compression.
# ADAKV_CHECK_TEST_TIMEOUT / ADAKV_CHECK_SPEED_TIMEOUT (seconds, default 240 / 330) bound the steps;
# ADAKV_CHECK_SPEED_ARGS replaces the speed step's arguments (e.g. "--lengths 4096,32768").
# Exit status: 0 everything passed, 1 a test or the speed run failed (or timed out), 2 setup failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
test_timeout="${ADAKV_CHECK_TEST_TIMEOUT:-240}"
speed_timeout="${ADAKV_CHECK_SPEED_TIMEOUT:-330}"

if [ "${1:-}" = "--dry-run" ]; then
    out=${2:?usage: $0 --dry-run OUT_DIR}
    mkdir -p "$out"
    py="${PYTHON:-python3}"
    speed_args=(--model "$out/tiny-q4k.gguf" --write-model --dims 2,256,4,2,64,512,1024 --lengths 512,2048
                --budget 128 --decode 16 --gpu-layers 0 --threads 2)
else
    libs_tar=${1:?usage: $0 LIBS.tar.xz WHEELS_DIR OUT_DIR}
    wheels=${2:?usage: $0 LIBS.tar.xz WHEELS_DIR OUT_DIR}
    out=${3:?usage: $0 LIBS.tar.xz WHEELS_DIR OUT_DIR}
    work=/tmp/adakv-device
    mkdir -p "$work/lib" "$out"
    tar -xJf "$libs_tar" -C "$work/lib" || exit 2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$wheels"/*.whl || exit 2
    export PYTHONPATH="$work/site:$root" ADAKV_LIB_DIR="$work/lib"
    # the machine's own CUDA runtime and cuBLAS (toolkit or pip wheels), found by soname
    for so in libcudart.so.13 libcublas.so.13; do
        found="$(find /usr/local/cuda*/targets /usr/local/cuda*/lib64 "$(python3 -c 'import sys; print(sys.prefix)')" \
            -name "$so*" 2>/dev/null | head -n 1)"
        [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    py=python3
    speed_args=(--model "$work/llama8b-q4k.gguf" --write-model --threads 8)
fi
export PYTHONUNBUFFERED=1
if [ -n "${ADAKV_CHECK_SPEED_ARGS:-}" ]; then
    read -r -a extra <<<"$ADAKV_CHECK_SPEED_ARGS"
    speed_args+=("${extra[@]}")
fi
"$py" -c 'import adakv_local, cffi, gguf, llama_cpp; print("adakv-local", adakv_local.__file__)' || exit 2

status=0
t0=$SECONDS
timeout "$test_timeout" "$py" -m pytest tests/test_gpu.py tests/test_eviction.py -k "gpu or cuda" -m "not slow" \
    -q -rs -p no:cacheprovider --durations=10 2>&1 | tee "$out/pytest.log" || status=1
echo "device_check: tests took $((SECONDS - t0)) s (status $status)"

t0=$SECONDS
timeout "$speed_timeout" "$py" scripts/device_speed.py "${speed_args[@]}" --json "$out/speed.json" 2>&1 |
    tee "$out/speed.log" || status=1
echo "device_check: speed took $((SECONDS - t0)) s (status $status)"
exit $status
