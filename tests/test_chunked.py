"""Bounded memory (issue #12): prompts longer than the cache, read in chunks with compressions in between.

The fast path (each probe and the prompt's window scored inside the last ubatch of a chunk) is
checked against a plain reference written here with the low-level API (each probe and the window
evaluated as a decode of their own, as before); the rest checks what a user relies on: the cache
never holds more than n_ctx cells, llama-cpp-python's bookkeeping follows positions past n_ctx,
prefix reuse stays exact, and what cannot be done is refused before anything is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from words import text

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.errors import CacheFullError
from adakv_local.eval.fidelity import last_logits
from adakv_local.llama import Llama
from adakv_local.policies import AllocationConfig, keep_sets

BUDGET, WINDOW, CHUNK, N_CTX = 24, 8, 128, 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, n_ctx_train=2048, seed=31))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from adakv_local.testing import write_gemma3_gguf

    return str(write_gemma3_gguf(tmp_path_factory.mktemp("g") / "g3.gguf", n_layer=6, n_embd=256, n_head=4,
                                 n_head_kv=2, head_dim=64, sliding_window=16, sliding_window_pattern=3,
                                 n_ctx_train=2048, seed=32))


def llama(path: str, **kw) -> Llama:
    opts = dict(model_path=path, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1, seed=0, verbose=False,
                adakv_budget=BUDGET, adakv_window=WINDOW, adakv_chunk=CHUNK)
    opts.update(kw)
    return Llama(**opts)


def prompt_of(llm: Llama, n_words: int, seed: int) -> list[int]:
    return llm.tokenize(text(n_words, seed).encode())


def stock_eval(llm: Llama, tokens: list[int]) -> None:
    """llama-cpp-python's own eval: no scoring, no compression."""
    super(Llama, llm).eval(tokens)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Logits of the same cache computed in ubatches of other sizes: llama.cpp's CPU flash attention
    takes its tiled f16 path for a chunk's last ubatch and its per-row path for a window decoded on its
    own; they agree to about 3e-5 of the logits' scale (1e-4 allowed), not bit for bit."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def kept_positions(llm: Llama) -> list[list[list[int]]]:
    return [[h.tolist() for h in layer] for layer in llm.adakv_kept_positions()]


def reference_chunked(llm: Llama, tokens: list[int], chunk: int = CHUNK, alone: bool = True,
                      span_ids: Callable[[Llama, int], np.ndarray] | None = None,
                      span_share: float | None = None) -> tuple[int, int]:
    """The chunk schedule by hand: chunks of ``chunk`` tokens, a compression after one when the next
    would not fit beside it (and the window); returns (chunks, compressions).

    alone: each probe and the window are a decode of their own (the plain path); else they end the
    chunk's last ubatch as in the fast path, so that only the schedule and the bookkeeping are checked.
    span_ids: with option spans, the span ids of cells [0, n) for every layer and head.
    span_share: with option spans, the option span_share.
    """
    kv, w = llm.adakv_kvcache, WINDOW
    assert kv is not None
    doc, probe = tokens[:-w], tokens[-w:]

    def scored(seq: list[int]) -> None:
        k = w if alone else min(len(seq) + w, llm.n_batch)
        head, tail = (seq, probe) if alone else ((seq + probe)[:-k], (seq + probe)[-k:])
        stock_eval(llm, head)
        kv.arm_scores(w)
        stock_eval(llm, tail)

    def compress(n_cells: int, window: int) -> None:
        scores = kv.read_scores(n_cells + (w if window == 0 else 0))
        alloc = AllocationConfig(budget=BUDGET, window=window)
        kept = keep_sets(list(scores[:, :, :n_cells]), n_cells, "ada-snapkv", alloc, valid_from=list(kv.starts()),
                         spans=None if span_ids is None else span_ids(llm, n_cells), span_share=span_share)
        kv.compact(kept)

    i, n_ctx, chunks, compressions = 0, llm.n_ctx(), 1, 1
    while len(doc) - i > chunk or kv.n_cells() + len(doc) - i + w > n_ctx:
        piece = doc[i : i + chunk]
        i += chunk
        chunks += 1
        n = kv.n_cells() + len(piece)
        if n + min(len(doc) - i, chunk) + w <= n_ctx:  # the next chunk fits beside this one: no compression
            stock_eval(llm, piece)
            continue
        scored(piece)  # the chunk, then the probe
        llm.n_tokens -= w
        assert llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        compress(kv.view_cells(), 0)  # the cells of the per-head view (after the chunk, without the probe)
        compressions += 1
    scored(doc[i:])  # the last chunk, then the window
    compress(kv.view_cells(), w)
    return chunks, compressions


def test_window_scores_inside_a_ubatch_match_a_window_alone(gemma):
    """The fast path's scores (the window's rows of a larger ubatch) against the window decoded alone."""
    llm, ref = llama(gemma, n_batch=64), llama(gemma, n_batch=64)
    toks = prompt_of(llm, 30, 16)
    stock_eval(llm, toks[:-64])
    llm.adakv_kvcache.arm_scores(WINDOW)
    stock_eval(llm, toks[-64:])
    stock_eval(ref, toks[:-WINDOW])
    ref.adakv_kvcache.arm_scores(WINDOW)
    stock_eval(ref, toks[-WINDOW:])
    got, want = llm.adakv_kvcache.read_scores(len(toks)), ref.adakv_kvcache.read_scores(len(toks))
    assert want.min() >= 0 and want.max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(want.max()))
    with pytest.raises(ValueError, match="must end with the 8 window tokens"):
        llm.adakv_kvcache.arm_scores(WINDOW)
        stock_eval(llm, [5, 6, 7])  # a last ubatch shorter than the window
        llm.adakv_kvcache.read_scores(len(toks) + 3)


def test_chunked_prefill_equals_the_plain_reference(tiny):
    """Scores of each probe and of the window taken inside the chunk's last ubatch keep the same
    cells, and give the same logits, as the probe and window evaluated on their own."""
    llm, ref = llama(tiny), llama(tiny)
    toks = prompt_of(llm, 100, 1)
    assert len(toks) > 2 * N_CTX
    llm.eval(toks)
    chunks, compressions = reference_chunked(ref, toks)
    assert kept_positions(llm) == kept_positions(ref)
    assert_close(last_logits(llm), last_logits(ref))
    st = llm.adakv_stats
    assert st is not None
    assert (st.chunks, st.compressions) == (chunks, compressions) and compressions > 2
    assert st.cells_before == len(toks) and st.prompt_tokens == len(toks) == llm.n_tokens
    # the cache never held more than n_ctx cells; the peak is a chunk and its probe after a block
    assert st.peak_cells <= llm.n_ctx() and st.peak_cells > CHUNK
    assert 0 < st.kv_bytes < st.kv_bytes_peak <= st.kv_bytes_allocated
    mem = llm.adakv_kvcache.memory()
    assert st.kv_bytes_allocated == mem.cells * mem.cell_bytes and mem.cells == llm.n_ctx()
    # decoding goes on from the compressed cache exactly as in the reference
    for _ in range(4):
        tok = int(np.argmax(last_logits(llm)))
        assert tok == int(np.argmax(last_logits(ref)))
        llm.eval([tok])
        ref.eval([tok])
        assert_close(last_logits(llm), last_logits(ref))


def test_window_scored_in_the_last_ubatch_equals_a_window_of_its_own(tiny):
    """The one-shot path (a prompt that fits) now scores its window inside the prompt's last ubatch."""
    llm, ref = llama(tiny, n_ctx=1024, n_batch=512), llama(tiny, n_ctx=1024, n_batch=512)
    toks = prompt_of(llm, 50, 2)
    llm.eval(toks)
    kv = ref.adakv_kvcache
    stock_eval(ref, toks[:-WINDOW])
    kv.arm_scores(WINDOW)
    stock_eval(ref, toks[-WINDOW:])
    kept = keep_sets(list(kv.read_scores(len(toks))), len(toks), "ada-snapkv", AllocationConfig(BUDGET, WINDOW))
    kv.compact(kept)
    assert kept_positions(llm) == kept_positions(ref)
    assert llm.adakv_stats.compressions == 1 and llm.adakv_stats.chunks == 1


def test_chunk_size_default_fills_the_cache(tiny):
    llm = llama(tiny, adakv_chunk=None)
    toks = prompt_of(llm, 100, 3)
    llm.eval(toks)
    st = llm.adakv_stats
    assert st.compressions >= 2 and st.peak_cells <= llm.n_ctx()
    assert st.peak_cells > llm.n_ctx() - 2 * WINDOW - st.footprint  # each chunk took what was free


def test_completion_longer_than_n_ctx_and_prefix_reuse(tiny):
    """create_completion takes a prompt longer than n_ctx; the next turn that extends it evaluates only
    its new tokens, a diverging one is evaluated from scratch, both equal to a fresh context."""
    llm = llama(tiny)
    toks = prompt_of(llm, 100, 4)
    out = llm.create_completion(toks, max_tokens=5, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == len(toks) > llm.n_ctx()
    n_done = llm.n_tokens
    more = llm.tokenize((" " + text(8, 5)).encode(), add_bos=False)
    turn2 = [int(t) for t in llm.input_ids[:n_done]] + more  # the prompt and the reply as evaluated
    evaluated = []
    orig_eval = Llama.eval

    def spy(self, tokens):
        evaluated.append(len(tokens))
        return orig_eval(self, tokens)

    Llama.eval = spy
    try:
        a = llm.create_completion(turn2, max_tokens=5, temperature=0.0)["choices"][0]["text"]
    finally:
        Llama.eval = orig_eval
    assert evaluated[0] == len(more)  # only the new tokens
    fresh = llama(tiny)
    fresh.create_completion(toks, max_tokens=5, temperature=0.0)
    assert fresh.create_completion(turn2, max_tokens=5, temperature=0.0)["choices"][0]["text"] == a
    # a prompt that diverges inside the first chunk: from scratch, like a context that never saw the first
    other = toks[:50] + prompt_of(llm, 90, 6)[1:]
    b = llm.create_completion(other, max_tokens=5, temperature=0.0)["choices"][0]["text"]
    assert b == llama(tiny).create_completion(other, max_tokens=5, temperature=0.0)["choices"][0]["text"]


def test_generation_that_fills_the_cache_compresses_and_goes_on(tiny):
    llm = llama(tiny, adakv_chunk=None)
    toks = prompt_of(llm, 20, 7)
    assert len(toks) + 1500 < 2048 and len(toks) < llm.n_ctx()
    out = llm.create_completion(toks, max_tokens=1500, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 1500  # max_tokens, through a cache of 256 cells
    st = llm.adakv_stats
    assert st.prompt_tokens == len(toks) and st.decode_compressions >= 1500 // llm.n_ctx()
    assert st.decode_seconds > 0 and llm.adakv_kvcache.n_cells() <= llm.n_ctx()


def test_generation_ends_with_length_where_compressing_cannot_make_room(tiny):
    llm = llama(tiny, adakv_chunk=None, adakv_budget=256)  # the budget is the whole cache
    toks = prompt_of(llm, 20, 7)
    out = llm.create_completion(toks, max_tokens=2000, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert llm.adakv_kvcache.n_cells() == llm.n_ctx()  # it stopped because the cache was full
    assert llm.adakv_stats.decode_compressions == 0
    with pytest.raises(CacheFullError, match="cache is full"):
        llm.eval([1])


def test_generation_stops_at_the_trained_context(tiny):
    llm = llama(tiny, adakv_chunk=None)
    n_train = 2048
    toks = prompt_of(llm, 400, 7)[:1900]  # read in chunks
    out = llm.create_completion(toks, max_tokens=1000, temperature=0.0)
    # positions end at the trained context (not at the cache's 256 cells)
    assert out["choices"][0]["finish_reason"] == "length"
    assert len(toks) + out["usage"]["completion_tokens"] <= n_train
    assert llm.n_tokens <= n_train


def test_refusals_leave_everything_as_it_was(tiny):
    llm = llama(tiny)
    toks = prompt_of(llm, 20, 8)
    llm.eval(toks)
    state = (llm.n_tokens, llm.adakv_kvcache.n_cells(), llm.adakv_stats)
    too_long = prompt_of(llm, 2000, 9)[1:]
    assert llm.n_tokens + len(too_long) > 2048
    with pytest.raises(ValueError, match="trained for"):
        llm.eval(too_long)
    assert (llm.n_tokens, llm.adakv_kvcache.n_cells(), llm.adakv_stats) == state
    with pytest.raises(ValueError, match="exceed context window of 2048: the model's trained context"):
        llm.create_completion(prompt_of(llm, 2000, 9), max_tokens=1)
    with pytest.raises(ValueError, match="logits_all"):
        llama(tiny, logits_all=True).eval(prompt_of(llm, 100, 10))
    with pytest.raises(ValueError, match="n_ctx = 256 is too small"):
        llama(tiny, adakv_budget=245, adakv_chunk=None).eval(prompt_of(llm, 100, 10))  # R ~ 245 + 2 windows
    with pytest.raises(ValueError, match="adakv_chunk"):
        llama(tiny, adakv_chunk=N_CTX)
    with pytest.raises(ValueError, match="adakv_chunk"):
        llama(tiny, adakv_chunk=0)


def test_eviction_off_keeps_llama_cpp_pythons_error(tiny):
    llm = llama(tiny, adakv_budget=None, adakv_window=None, adakv_chunk=None)
    toks = prompt_of(llm, 100, 11)
    with pytest.raises(ValueError, match=rf"^Requested tokens \({len(toks)}\) exceed context window of 256$"):
        llm.create_completion(toks, max_tokens=1)
    assert llm.input_ids.shape == (256,)


def test_iswa_chunked_with_a_window_sized_ring(gemma):
    """Gemma 3 layout: the sliding-window layers keep a ring of about the window's size (swa_full off),
    the prompt is read in chunks as the reference does, and a removal that the ring can no longer
    serve is refused while one inside it works."""
    opts = dict(n_ctx=512, n_batch=64, adakv_chunk=256)
    llm, ref = llama(gemma, **opts), llama(gemma, **opts)
    mem = llm.adakv_kvcache.memory()
    assert 0 < mem.swa_cells < llm.n_ctx()
    toks = prompt_of(llm, 170, 12)
    llm.eval(toks)
    chunks, compressions = reference_chunked(ref, toks, chunk=256, alone=False)  # near ties: same ubatches
    assert kept_positions(llm) == kept_positions(ref)
    assert_close(last_logits(llm), last_logits(ref))
    st = llm.adakv_stats
    assert (st.chunks, st.compressions) == (chunks, compressions) and compressions > 2
    assert st.peak_cells <= llm.n_ctx()
    assert st.kv_bytes_allocated == mem.cells * mem.cell_bytes + mem.swa_cells * mem.swa_cell_bytes
    # 300 tokens after the block, kept as they are; the ring holds only the last ~256 positions
    with llm.adakv_suspended():
        llm.eval(prompt_of(llm, 50, 13)[1:])
    n, cells = llm.n_tokens, llm.adakv_kvcache.n_cells()
    assert not llm._ctx.kv_cache_seq_rm(0, n - 280, -1)  # after the block, behind the ring
    assert llm.adakv_kvcache.n_cells() == cells
    assert llm._ctx.kv_cache_seq_rm(0, n - 2, -1)  # inside the ring
    assert llm.adakv_kvcache.n_cells() == cells - 2


def test_iswa_diverging_prompt_equals_a_fresh_context(gemma):
    """A reuse of a prefix whose sliding window left the ring is evaluated again (llama-cpp-python
    falls back when the removal is refused); the answer equals a fresh context's."""
    opts = dict(n_ctx=512, n_batch=64, adakv_chunk=None)
    a = llama(gemma, **opts)
    p1 = prompt_of(a, 110, 14)
    a.create_completion(p1, max_tokens=3, temperature=0.0)
    p2 = p1[:-300] + prompt_of(a, 8, 15)[1:]
    got = a.create_completion(p2, max_tokens=3, temperature=0.0)["choices"][0]["text"]
    assert got == llama(gemma, **opts).create_completion(p2, max_tokens=3, temperature=0.0)["choices"][0]["text"]


def test_chunked_fidelity_measures_both_ways(tiny):
    """eval chunked's runner: one-shot and chunked reading of the same prompt against the full cache."""
    from adakv_local.config import AdaKVConfig
    from adakv_local.eval.chunked import run_chunked_fidelity

    toks = prompt_of(llama(tiny), 100, 17)
    recs = run_chunked_fidelity(tiny, [("p", toks)], AdaKVConfig(BUDGET, window=WINDOW), n_ctx=N_CTX, chunk=CHUNK,
                                n_continuation=4, n_threads=1)
    one, ch = recs
    assert (one["mode"], ch["mode"]) == ("one-shot", "chunked")
    assert one["chunks"] == 1 and ch["chunks"] > 2 and ch["peak_cells"] <= N_CTX < one["peak_cells"]
    assert all(r["kl_mean"] >= 0 and 0 <= r["top1"] <= 1 and r["prompt_tokens"] == len(toks) for r in recs)
    with pytest.raises(ValueError, match="must be below"):
        run_chunked_fidelity(tiny, [("p", toks)], AdaKVConfig(BUDGET, window=WINDOW), n_ctx=len(toks), chunk=None)


def test_streaming_and_chat_take_prompts_longer_than_n_ctx(tiny):
    llm = llama(tiny)
    toks = prompt_of(llm, 100, 18)
    pieces = list(llm.create_completion(toks, max_tokens=3, temperature=0.0, stream=True))
    assert pieces and llm.adakv_stats.chunks > 1 and llm.adakv_stats.prompt_tokens == len(toks)
    streamed = "".join(p["choices"][0]["text"] for p in pieces)
    assert streamed == llama(tiny).create_completion(toks, max_tokens=3, temperature=0.0)["choices"][0]["text"]
    out = llm.create_chat_completion(messages=[{"role": "user", "content": text(100, 19)}], max_tokens=3)
    assert out["usage"]["prompt_tokens"] > llm.n_ctx() and llm.adakv_stats.chunks > 1


def test_a_long_prompt_after_a_nearly_full_history_compresses_the_history_first(tiny):
    """Fewer free cells than a window's worth: the history is compressed with the probe alone first;
    no free cells for the probe at all: CacheFullError, nothing evaluated."""
    for short_of_full, fits in ((4 + WINDOW, True), (4, False)):
        llm = llama(tiny, adakv_chunk=None)
        llm.eval(prompt_of(llm, 100, 20))
        free = llm.n_ctx() - llm.adakv_kvcache.n_cells()
        with llm.adakv_suspended():
            llm.eval(prompt_of(llm, 200, 21)[1:][: free - short_of_full])
        n0, cells = llm.n_tokens, llm.adakv_kvcache.n_cells()
        more = prompt_of(llm, 60, 22)[1:]
        if fits:
            llm.eval(more)
            assert llm.n_tokens == n0 + len(more) and llm.adakv_stats.peak_cells <= llm.n_ctx()
            assert llm.adakv_stats.compressions >= 2
        else:
            with pytest.raises(CacheFullError, match="too few cells are free"):
                llm.eval(more)
            assert (llm.n_tokens, llm.adakv_kvcache.n_cells()) == (n0, cells)
