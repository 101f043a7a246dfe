"""Chat that lasts (issue #27): every turn brings the cache back to the budget, short turns included,
and a budget given as a fraction is a fraction of the whole conversation (issue #24)."""

from __future__ import annotations

import pytest
from words import text

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local.llama import Llama

BUDGET, WINDOW, N_CTX = 24, 8, 128  # llama.cpp rounds n_ctx up to 256 cells


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, n_ctx_train=8192, seed=41))


def llama(path: str, **kw) -> Llama:
    opts = dict(model_path=path, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1, seed=0, verbose=False,
                adakv_budget=BUDGET, adakv_window=WINDOW)
    opts.update(kw)
    return Llama(**opts)


def turn(llm: Llama, history: list[int], message: list[int], n_reply: int) -> list[int]:
    """One chat turn through ``generate`` (llama-cpp-python's prefix reuse): the message, then
    n_reply greedy tokens; returns the reply (its last token is evaluated with the next turn)."""
    history += message
    reply: list[int] = []
    for tok in llm.generate(history, temp=0.0):
        reply.append(tok)
        if len(reply) == n_reply:
            break
    history += reply
    return reply


def short_message(llm: Llama, i: int) -> list[int]:
    msg = llm.tokenize(text(2, 100 + i).encode(), add_bos=False)[:4]
    assert 0 < len(msg) < WINDOW
    return msg


def test_a_hundred_short_turns_never_fill_a_small_cache(tiny):
    llm = llama(tiny)
    kv = llm.adakv_kvcache
    history = llm.tokenize(text(12, 3).encode())[:60]
    held, compressed = [], 0
    for i in range(100):
        turn(llm, history, short_message(llm, i), 6)
        st = llm.adakv_stats
        if st.compressed:
            # back to the budget, the window completed from the cache's last cells (the first turn
            # brings a window of its own)
            assert (st.reevaluated > 0) == (i > 0), (i, st)
            assert st.cells_after == kv.footprint() <= BUDGET + 1  # R: the per-head budgets over the KV heads
            compressed += 1
        else:  # less than a window above the budget: left until it is more
            assert "short turn" in st.reason and st.cells_after <= BUDGET + 1 + WINDOW, (i, st)
        held.append(kv.n_cells())
    assert llm.n_tokens > 4 * llm.n_ctx()  # the conversation is many times the cache
    assert compressed >= 100 * 10 // (WINDOW + 10)  # 10 new cells a turn: a compression every 2 turns or so
    assert max(held) <= BUDGET + 1 + WINDOW + 6  # the block, a window, and the reply's tokens after it


def test_short_turns_answer_as_the_full_cache_while_it_fits(tiny):
    ev, full = llama(tiny, adakv_budget=100), llama(tiny, adakv_budget=None, adakv_window=None)
    h_ev = ev.tokenize(text(6, 4).encode())[:30]
    h_full = list(h_ev)
    same = 0
    for i in range(30):
        a = turn(ev, h_ev, short_message(ev, i), 5)
        b = turn(full, h_full, short_message(full, i), 5)
        if ev.adakv_stats.compressed:  # the cache went above the budget: from here on it differs
            break
        assert a == b, i
        same += 1
    assert same >= 3 and ev.adakv_stats.compressed, same


def test_a_fractional_budget_is_a_fraction_of_the_conversation(tiny):
    llm = llama(tiny, adakv_budget=0.25, n_ctx=512, n_batch=512)
    history: list[int] = []
    budgets = []
    for i in range(3):
        message = llm.tokenize(text(20, 10 + i).encode(), add_bos=not history)[:100]
        turn(llm, history, message, 4)
        st = llm.adakv_stats
        assert st.compressed
        assert st.budget == round(0.25 * st.prompt_tokens), (i, st.budget, st.prompt_tokens)
        assert abs(st.kept_mean - st.budget) <= 1.0, (i, st.kept_mean, st.budget)
        budgets.append(st.budget)
    # a quarter of 100, ~200, ~300 tokens: the budget grows with the conversation (it used to be a
    # quarter of the cells held, ~25 + 100 on the second turn, and shrink back towards the first)
    assert budgets[0] < budgets[1] < budgets[2] and budgets[2] >= 70, budgets
    # a short turn takes the fraction of the whole conversation too
    turn(llm, history, short_message(llm, 0), 2)
    st = llm.adakv_stats
    assert st.budget == round(0.25 * st.prompt_tokens) and st.budget > budgets[2]


def test_tokens_evaluated_one_by_one_compress_once_a_window_or_as_decoded_when_full(tiny):
    llm = llama(tiny)
    kv = llm.adakv_kvcache
    toks = llm.tokenize(text(60, 5).encode())
    llm.eval(toks[:60])
    assert llm.adakv_stats.compressed
    # one eval per token (a caller's own loop): short turns, compressed once the cache holds a
    # window more than the budget, not at every token
    compressions = 0
    for i in range(40):
        llm.eval([toks[60 + i]])
        compressions += llm.adakv_stats.compressed
        assert kv.n_cells() <= BUDGET + 1 + WINDOW
    assert 1 <= compressions <= 40 // WINDOW + 1, compressions
    # the same loop as generate decodes: no record, no budget check, a compression when full only
    record = llm.adakv_stats
    with llm.adakv_decoding():
        for i in range(llm.n_ctx()):
            llm.eval([toks[i % 50]])
            assert kv.n_cells() <= llm.n_ctx()
    assert llm.adakv_stats.prompt_tokens == record.prompt_tokens
    assert llm.adakv_stats.decode_compressions >= 1
