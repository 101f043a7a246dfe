"""Apple Silicon: the Metal backend against the CPU path of the same build (macOS only).

Nobody on this project has a Mac: these tests have never run. They are written to be the first
thing a person with one runs (`pytest tests/test_metal.py -v` after `scripts/install.sh`, which
builds Metal by default on macOS). Metal's flash-attention kernel does not read the start cells
(patch 0001 lets only the CPU and CUDA through), so after a compaction every evicted layer must
take the per-head mask path on stock kernels (one call per layer with a mask plane per query
head), and the results must equal the CPU's within the tolerance below.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "darwin", reason="Metal runs on macOS only")

PROMPT = b"The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 8
CONT = b" Then a long time passed, and the story went on and on"


def _metal_available() -> bool:
    import llama_cpp

    import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)

    return bool(llama_cpp.llama_supports_gpu_offload())


def run(path: str, n_gpu_layers: int, layout: str = "pooled") -> tuple[np.ndarray, list[str]]:
    """Prefill with scoring, compact with the same seeded kept cells on every device, then decode
    CONT token by token; (logits of CONT, the path each layer used)."""
    from test_eviction import make, prefill, random_kept

    llm, kv = make(path, n_gpu_layers=n_gpu_layers, n_ctx=1024, layout=layout)
    toks = llm.tokenize(PROMPT)
    prefill(llm, kv, toks)
    kv.compact(random_kept(kv, kv.n_cells(), 8, seed=5))
    n0 = llm.n_tokens
    for t in llm.tokenize(CONT, add_bos=False):
        llm.eval([t])
    return np.array(llm.scores[n0 : llm.n_tokens]), kv.attn_used()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from adakv_local.testing import write_gemma3_gguf, write_llama_gguf

    d = tmp_path_factory.mktemp("metal")
    return {
        "llama-gqa": str(write_llama_gguf(d / "l.gguf", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256,
                                          seed=21)),
        "llama-32x8": str(write_llama_gguf(d / "l32.gguf", n_layer=32, n_embd=256, n_head=8, n_head_kv=8,
                                           head_dim=32, n_ff=128, seed=8)),
        "gemma3-iswa": str(write_gemma3_gguf(d / "g.gguf", n_layer=6, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                                             sliding_window=16, sliding_window_pattern=3, seed=4)),
    }


@pytest.mark.parametrize("layout", ["pooled", "rect"])
@pytest.mark.parametrize("model", ["llama-gqa", "llama-32x8", "gemma3-iswa"])
def test_metal_mask_path_equals_the_cpu(models, model, layout):
    if not _metal_available():
        pytest.skip("this build has no Metal backend (build on macOS with the default options)")
    cpu, cpu_used = run(models[model], 0, layout)
    gpu, gpu_used = run(models[model], 999, layout)
    assert set(cpu_used) == {"kernel"}, cpu_used
    # one-token decodes: the pooled block read where it lies with the pool mask (a per-head mask too)
    want = {"pooled": "pool-mask", "rect": "mask"}[layout]
    assert set(gpu_used) == {want}, f"Metal should take the per-head mask path ({want}), took {gpu_used}"
    # Metal's flash attention converts Q to f16 and accumulates in f16 halves on some paths; the
    # logits of a random tiny model have a scale of ~10: 2e-2 relative to that scale
    scale = np.abs(cpu).max()
    assert np.abs(gpu - cpu).max() <= 2e-2 * scale
