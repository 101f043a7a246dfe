#!/usr/bin/env bash
# GPU check: the eviction tests on a GPU against the CPU path, then a speed run, in one go.
#
#   scripts/device_check.sh LIBS.tar.xz WHEELS_DIR OUT_DIR
#
# Meant for a bare Linux machine with an NVIDIA GPU, CUDA 13 and python3 + numpy + pytest,
# and nothing else (no network): LIBS.tar.xz holds libllama and libggml* built here with
#   cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DADAKV_CUDA=ON \
#         -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON && cmake --build build-cuda
# and WHEELS_DIR the Python packages missing there (cffi, pycparser, gguf, diskcache and the
# llama-cpp-python 0.3.36 bindings wheel). The repository itself is the working directory.
# Writes OUT_DIR/pytest.log, OUT_DIR/bench-gpu.json and prints a short table.
set -uo pipefail
libs_tar=$1 wheels=$2 out=$3
work=/tmp/adakv-device
mkdir -p "$work/lib" "$out"
tar -xJf "$libs_tar" -C "$work/lib" || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$wheels"/*.whl || exit 2
export PYTHONPATH="$work/site:$PWD" ADAKV_LIB_DIR="$work/lib" PYTHONUNBUFFERED=1
# the machine's own cuBLAS (the libraries were linked against the PyPI wheel's)
cublas="$(find /usr/local/cuda*/targets /usr/local/cuda*/lib64 -name 'libcublas.so.13*' 2>/dev/null | head -1)"
[ -n "$cublas" ] && export LD_LIBRARY_PATH="$(dirname "$cublas"):${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

status=0
python3 -m pytest tests/test_gpu.py tests/test_eviction.py -k gpu -m "not slow" -q -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.log" || status=1

# speed: attention shaped like Llama-3-8B (32 query / 8 KV heads of 128), 8 layers, f16 random weights
python3 - "$work/m.gguf" <<'EOF' || exit 2
import sys, time
from adakv_local.models.testmodel import write_llama_gguf
t = time.perf_counter()
write_llama_gguf(sys.argv[1], n_layer=8, n_embd=4096, n_head=32, n_head_kv=8, n_ff=4096,
                 n_ctx_train=131072, dtype="f16", seed=3)
print(f"random 8-layer model written in {time.perf_counter() - t:.1f} s", flush=True)
EOF
python3 -m adakv_local bench --model "$work/m.gguf" --lengths 4096,16384,32768 --budget 1024 \
    --gpu-layers 999 --decode-tokens 128 --threads 4 --nofa-baseline --json "$out/bench-gpu.json" || status=1
exit $status
