"""The tiny random-weight GGUF writers produce models that llama.cpp loads and runs."""

from __future__ import annotations

import numpy as np
import pytest

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_tiny_model_loads_tokenizes_and_generates(fixture, request):
    import llama_cpp

    path = request.getfixturevalue(fixture)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, seed=0, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"Hello, world! The quick brown fox.")
    assert len(tokens) > 5
    assert llm.detokenize(tokens).decode().strip().endswith("The quick brown fox.")

    out = llm.create_completion("The quick brown fox", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    # random weights, but finite and not degenerate logits
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[llm.n_tokens - 1])
    assert np.all(np.isfinite(logits))
    assert logits.std() > 1e-3


def test_tiny_llama_has_the_requested_shape(tiny_llama):
    import gguf

    r = gguf.GGUFReader(str(tiny_llama))
    fields = {f.name: f for f in r.fields.values()}
    n_head = int(fields["llama.attention.head_count"].parts[-1][0])
    n_head_kv = int(fields["llama.attention.head_count_kv"].parts[-1][0])
    assert (n_head, n_head_kv) == (4, 2)


def test_same_seed_same_file(tmp_path):
    from adakv_local.testing import write_llama_gguf

    a = write_llama_gguf(tmp_path / "a.gguf", seed=5).read_bytes()
    b = write_llama_gguf(tmp_path / "b.gguf", seed=5).read_bytes()
    c = write_llama_gguf(tmp_path / "c.gguf", seed=6).read_bytes()
    assert a == b and a != c
