"""Eviction on a GPU backend (CUDA here), checked against the CPU path of the same build.

These tests need a libllama built with a GPU backend (``-DADAKV_CUDA=ON``) and a GPU; they are
skipped elsewhere (CI has none). ``scripts/device_check.sh`` runs them on a machine with one.

The GPU backends have no fast path for per-head start cells yet: ``ggml_backend_dev_supports_op``
refuses the op with starts, and the graph hook builds the per-head fallback (one stock flash
attention per KV head). Compaction (get_rows + cpy of an I32 alias) runs on the GPU itself.
Compaction (bitwise) and "keep every cell == no eviction" run on the GPU too as the ``gpu``
cases of tests/test_eviction.py. Here, on random weights and random kept sets:

* window scores computed in the GPU graph match the CPU's (f16 K, f32 accumulation: 1e-3);
* continuations after the same compaction match the CPU's within the tolerance that f16
  matmuls and a different attention kernel justify, while eviction itself changes them by far
  more (so the test can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_eviction import ALL_LAYERS, CONT, PROMPT, WINDOW, continuation_logits, make, needs_gpu, prefill, random_kept

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)

pytestmark = needs_gpu


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
