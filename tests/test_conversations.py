"""Saved conversation states (``Llama.set_cache``) on compressed contexts: adakv_local.conversations.

A conversation resumed from its saved state evaluates only its new tokens and answers as the same
conversation served alone; the state saved is the compressed cache (footprint-sized); the cache
holds at most its capacity in bytes, least recently used out first, in RAM or in files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adakv_local.cli.common import metered_class
from adakv_local.conversations import ConversationCache, common_prefix, state_bytes

# one token per character on the tiny model: ~1,200 tokens each, far above the budget of 48
DOC_A = " ".join(f"Line {i}: the keeper logged wind {i % 9} and fog {i % 4}." for i in range(30))[:1200]
DOC_B = " ".join(f"Entry {i}: the pilot noted tide {i % 7} and swell {i % 5}." for i in range(30))[:1100]
SIDE = "Give this chat a title: " + DOC_A[:300]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("conv") / "tiny.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, n_ctx_train=4096, seed=5))


def make(path: str, **kw):
    kw.setdefault("adakv_budget", 48)
    return metered_class()(model_path=path, n_ctx=1024, n_threads=1, seed=0, verbose=False, adakv_window=16, **kw)


def ask(llm, prompt: str, max_tokens: int = 8) -> tuple[str, int]:
    """A greedy completion: its text and the prompt tokens this request evaluated."""
    llm.meter.reset()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    return out["choices"][0]["text"], llm.meter.prefill_tokens


def conversation(llm, doc: str, turns: int = 3) -> list[tuple[str, str, int]]:
    """(prompt, answer, prefill tokens) of each turn of a conversation about doc."""
    out, prompt = [], doc
    for i in range(turns):
        answer, prefill = ask(llm, prompt)
        out.append((prompt, answer, prefill))
        prompt = f"{prompt}{answer}\nQ{i + 2}: and then?"
    return out


CACHES = {
    "ram": lambda tmp: ConversationCache(64 << 20),
    "files": lambda tmp: ConversationCache(64 << 20, directory=tmp / "states"),
    "llama-cpp-python ram": lambda tmp: __import__("llama_cpp").LlamaRAMCache(64 << 20),
}


@pytest.mark.parametrize("kind", list(CACHES))
def test_interleaved_conversations_resume_from_their_states_and_answer_as_alone(tiny, tmp_path, kind):
    alone = {doc: conversation(make(tiny), doc) for doc in (DOC_A, DOC_B)}

    llm = make(tiny)
    llm.set_cache(CACHES[kind](tmp_path))
    turns = {DOC_A: [], DOC_B: []}
    prompt_a, prompt_b = DOC_A, DOC_B
    for i in range(3):
        for doc in (DOC_A, DOC_B):
            prompt = prompt_a if doc is DOC_A else prompt_b
            answer, prefill = ask(llm, prompt)
            turns[doc].append((prompt, answer, prefill))
            nxt = f"{prompt}{answer}\nQ{i + 2}: and then?"
            prompt_a, prompt_b = (nxt, prompt_b) if doc is DOC_A else (prompt_a, nxt)
        if i == 0:
            ask(llm, SIDE)  # a side request (a front end's title) between the turns
    for doc in (DOC_A, DOC_B):
        for t, ((p, a, n), (p1, a1, n1)) in enumerate(zip(turns[doc], alone[doc])):
            assert (p, a) == (p1, a1), (kind, t)
            if t == 0:
                assert n == len(llm.tokenize(p.encode())), (kind, n)
            else:  # only what the saved state does not hold: the new tokens, as when served alone
                assert n == n1 and n < 40, (kind, t, n, n1)


def test_llama_cpp_pythons_disk_cache_resumes_a_compressed_conversation(tiny, tmp_path):
    """Its lookup removes the state it finds (loaded or not), so it keeps one conversation going, not
    several: a conversation resumed after the context was emptied (reset)."""
    import llama_cpp

    alone = conversation(make(tiny), DOC_A)
    llm = make(tiny)
    llm.set_cache(llama_cpp.LlamaDiskCache(str(tmp_path / "disk"), 64 << 20))
    prompt, got = DOC_A, []
    for i in range(3):
        llm.reset()
        answer, prefill = ask(llm, prompt)
        got.append((prompt, answer, prefill))
        prompt = f"{prompt}{answer}\nQ{i + 2}: and then?"
    assert [(p, a) for p, a, _ in got] == [(p, a) for p, a, _ in alone]
    assert [n for _, _, n in got[1:]] == [n for _, _, n in alone[1:]]


def test_a_state_saved_with_eviction_is_the_compressed_cache(tiny):
    llm = make(tiny)
    ask(llm, DOC_A)
    kv = llm.adakv_kvcache
    state = llm.save_state()
    assert state.scores.shape[0] == 0  # logits_all=False: llama-cpp-python never reads them back
    assert state.input_ids.shape == (llm.n_tokens,)
    cells = kv.memory().used_bytes(kv.n_cells())
    assert cells <= state.llama_state_size <= cells + 64 * 1024 + 4 * llm.n_vocab()  # the cells, the layout, logits
    full = metered_class()(model_path=tiny, n_ctx=2048, n_threads=1, seed=0, verbose=False)  # no eviction
    ask(full, DOC_A)
    full_state = full.save_state()
    assert state.llama_state_size * 4 < full_state.llama_state_size  # every cell
    assert state_bytes(state) * 4 < state_bytes(full_state)  # and llama-cpp-python's logits table

    # it loads into a fresh context, and the conversation goes on as it would have
    cont = llm.tokenize(b"\nQ2: and then?", add_bos=False)
    twin = make(tiny)
    twin.load_state(state)
    for m in (llm, twin):
        m.eval(cont)
    assert twin.n_tokens == llm.n_tokens
    np.testing.assert_array_equal(twin.input_ids[: twin.n_tokens], llm.input_ids[: llm.n_tokens])
    assert [twin.sample(temp=0) for _ in range(1)] == [llm.sample(temp=0)]


def test_a_state_longer_than_the_context_is_refused_and_nothing_changes(tiny):
    import llama_cpp

    llm = make(tiny)
    ask(llm, DOC_A)
    state = llm.save_state()
    n = llm.n_tokens
    big = llama_cpp.LlamaState(input_ids=np.zeros(10**6, dtype=np.intc), scores=state.scores, n_tokens=10**6,
                               llama_state=state.llama_state, llama_state_size=state.llama_state_size, seed=0)
    with pytest.raises(RuntimeError, match="more than the .* positions of this context"):
        llm.load_state(big)
    assert llm.n_tokens == n


class FakeState:
    def __init__(self, nbytes: int) -> None:
        self.llama_state = b"x" * nbytes
        self.llama_state_size = nbytes
        self.scores = np.zeros((0, 4), dtype=np.single)
        self.input_ids = np.arange(3, dtype=np.intc)
        self.n_tokens = 3
        self.seed = 1


def test_the_cache_holds_its_capacity_least_recently_used_out_first():
    c = ConversationCache(capacity_bytes=1000)
    c[[1, 2, 3]] = FakeState(300)
    c[[4, 5]] = FakeState(300)
    c[[7]] = FakeState(300)
    assert len(c) == 3 and c.cache_size == 3 * (300 + 12)
    _ = c[[1, 2, 3, 9]]  # the longest prefix: [1, 2, 3]; now the most recently used
    c[[8, 8]] = FakeState(300)  # over 1000 bytes: the least recently used ([4, 5]) goes
    assert [e.tokens for e in c.entries()] == [1, 3, 2]  # [7], [1, 2, 3], [8, 8]: least recently used first
    assert [4, 5] not in c and [1, 2, 3] in c and [7] in c and [8, 8] in c
    with pytest.raises(KeyError):
        c[[6]]
    assert (c.hits, c.misses) == (1, 1)
    c[[9]] = FakeState(2000)  # larger than the whole cache: not kept, nothing else dropped
    assert [9] not in c and len(c) == 3
    c[[7]] = FakeState(10)  # the same tokens again: replaced
    assert len(c) == 3 and c.cache_size == 2 * 312 + 22


def test_the_cache_in_files_survives_a_restart_and_skips_a_damaged_file(tmp_path, capsys):
    c = ConversationCache(capacity_bytes=10**6, directory=tmp_path)
    c[[1, 2, 3]] = FakeState(100)
    c[[5, 6]] = FakeState(100)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    again = ConversationCache(capacity_bytes=10**6, directory=tmp_path)
    assert "skipping" in capsys.readouterr().err and len(again) == 2
    state = again[[1, 2, 3, 4]]
    assert state.llama_state == b"x" * 100 and state.n_tokens == 3 and list(state.input_ids) == [0, 1, 2]
    # a file damaged after it was indexed: a miss, and the entry is gone
    path = next(p for p in tmp_path.glob("*.npz") if p.name != "junk.npz" and p.stat().st_size)
    Path(path).write_bytes(b"damaged")
    for key in ([1, 2, 3], [5, 6]):
        try:
            again[key]
        except KeyError:
            pass
    assert len(again) == 1 and "cannot be read" in capsys.readouterr().err
    smaller = ConversationCache(capacity_bytes=1, directory=tmp_path)  # over capacity: the files go
    assert len(smaller) == 0 and not [p for p in tmp_path.glob("*.npz") if p.name != "junk.npz"]


def test_bad_capacity_is_refused():
    for bad in (-1, 1.5, "1G", True):
        with pytest.raises(ValueError, match="capacity_bytes must be an integer >= 0"):
            ConversationCache(bad)  # type: ignore[arg-type]


def test_common_prefix():
    a = np.array([1, 2, 3, 4], dtype=np.int32)
    assert common_prefix(a, np.array([1, 2, 9], dtype=np.int32)) == 2
    assert common_prefix(a, a[:2]) == 2 and common_prefix(a, np.array([], dtype=np.int32)) == 0


def test_a_state_saved_without_eviction_is_refused_and_nothing_changes(tiny):
    """A cache shared with a context without eviction (or a state from one) must not break this one:
    the native library refuses the state and the context keeps what it held."""
    plain = metered_class()(model_path=tiny, n_ctx=1024, n_threads=1, seed=0, verbose=False)
    ask(plain, DOC_B[:300])
    foreign = plain.save_state()
    assert foreign.scores.shape[0] > 0  # llama-cpp-python's own state, with its logits table
    llm = make(tiny)
    ask(llm, DOC_A)
    before = (llm.n_tokens, llm.input_ids[: llm.n_tokens].copy(), llm.adakv_kvcache.footprint())
    with pytest.raises(RuntimeError, match="not saved by a context with adakv-local eviction enabled; the KV cache "
                                           "was left as it was"):
        llm.load_state(foreign)
    assert (llm.n_tokens, llm.adakv_kvcache.footprint()) == (before[0], before[2])
    np.testing.assert_array_equal(llm.input_ids[: llm.n_tokens], before[1])
    answer, prefill = ask(llm, DOC_A + " and then?")
    assert answer and prefill < 20  # the compressed conversation is still there
