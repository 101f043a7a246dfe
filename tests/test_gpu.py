"""Eviction on a GPU backend (CUDA here), checked against the CPU path of the same build.

These tests need a libllama built with a GPU backend (``-DADAKV_CUDA=ON``) and a GPU; they are
skipped elsewhere (CI has none). ``scripts/device_check.sh`` runs them on a machine with one.

The GPU backends have no fast path for per-head start cells yet: ``ggml_backend_dev_supports_op``
refuses the op with starts, and the graph hook builds the per-head fallback (one stock flash
attention per KV head). Compaction (get_rows + cpy of an I32 alias) runs on the GPU itself.
What is checked, on random weights and random kept sets:

* compaction is bitwise exact on the GPU (rows read back before and after);
* window scores computed in the GPU graph match the CPU's (f16 K, f32 accumulation: 1e-3);
* continuations after the same compaction match the CPU's within the tolerance that f16
  matmuls and a different attention kernel justify, while eviction itself changes them by far
  more (so the test can fail).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_eviction import CONT, PROMPT, WINDOW, continuation_logits, make, prefill, random_kept

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)


def _has_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


pytestmark = pytest.mark.skipif(not _has_gpu(), reason="this libllama has no GPU backend (build with -DADAKV_CUDA=ON)")

ALL_LAYERS = 999


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    from adakv_local.models.testmodel import write_llama_gguf

    path = tmp_path_factory.mktemp("models") / "tiny64.gguf"
    return write_llama_gguf(path, n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, seed=11)


@pytest.mark.exactness
@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_gpu_compaction_is_bitwise_exact(tiny64, type_kv):
    llm, kv = make(tiny64, type_kv=type_kv, n_gpu_layers=ALL_LAYERS)
    prefill(llm, kv, llm.tokenize(PROMPT))
    n = kv.n_cells()
    before = {(layer, w): kv.read_rows(layer, w, 0, n) for layer in range(kv.n_layer) for w in "kv"}
    kept = random_kept(kv, n, WINDOW, seed=zlib.crc32(type_kv.encode()))
    r = kv.compact(kept)
    assert kv.n_cells() == r
    for layer in range(kv.n_layer):
        for w in "kv":
            after = kv.read_rows(layer, w, 0, r)
            for h in range(kv.n_head_kv):
                cells = kept[layer][h]
                np.testing.assert_array_equal(
                    after[r - len(cells) :, h], before[(layer, w)][cells, h], err_msg=f"{type_kv} {layer} {w} {h}"
                )


@pytest.mark.exactness
def test_gpu_window_scores_match_the_cpu(tiny64):
    out = []
    for n_gpu_layers in (0, ALL_LAYERS):
        llm, kv = make(tiny64, n_gpu_layers=n_gpu_layers)
        out.append(prefill(llm, kv, llm.tokenize(PROMPT)))
    cpu, gpu = out
    assert cpu.shape == gpu.shape
    # each column is a sum of WINDOW probabilities: errors are relative to that scale
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3 * WINDOW)


@pytest.mark.exactness
@pytest.mark.parametrize("type_kv", ["f16", "q8_0"])
def test_gpu_continuation_matches_the_cpu(tiny64, type_kv):
    results = []
    for n_gpu_layers in (0, ALL_LAYERS):
        llm, kv = make(tiny64, type_kv=type_kv, n_gpu_layers=n_gpu_layers)
        prefill(llm, kv, llm.tokenize(PROMPT))
        kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=5))
        batch = continuation_logits(llm, CONT * 2)  # a prompt batch, then one-token decodes
        single = [continuation_logits(llm, t) for t in (b" and", b" then")]
        results.append(np.concatenate([batch, *single]))
    cpu, gpu = results
    scale = max(1.0, np.abs(cpu).max())
    err = np.abs(gpu - cpu).max()
    assert err <= 1e-2 * scale, (err, scale)

    ref_llm, _ = make(tiny64, type_kv=type_kv, enable=False)
    ref_llm.eval(ref_llm.tokenize(PROMPT))
    full = continuation_logits(ref_llm, CONT * 2)
    assert np.abs(full - cpu[: len(full)]).max() > 10 * err  # eviction matters more than the device


def test_gpu_keeping_every_cell_matches_no_eviction(tiny64):
    ref_llm, _ = make(tiny64, enable=False, n_gpu_layers=ALL_LAYERS)
    toks = ref_llm.tokenize(PROMPT)
    ref_llm.eval(toks[:-WINDOW])
    ref_llm.eval(toks[-WINDOW:])
    ref = continuation_logits(ref_llm)

    llm, kv = make(tiny64, n_gpu_layers=ALL_LAYERS)
    prefill(llm, kv, toks)
    n = kv.n_cells()
    assert kv.compact([[np.arange(n, dtype=np.int32)] * kv.n_head_kv for _ in range(kv.n_layer)]) == n
    out = continuation_logits(llm)
    # per-head attention calls instead of one: the same math, possibly another kernel configuration
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3 * max(1.0, np.abs(ref).max()))
