"""Option ``spans``: numbers (and words) ranked as a whole, against plain loop references on seeded
random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from adakv_local.config import AdaKVConfig, ConfigError
from adakv_local.policies import AllocationConfig, keep_sets
from adakv_local.pooling import pool_scores, raise_spans
from adakv_local.spans import SpanFinder


def raise_reference(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Plain loops: each maximal run of equal ids >= 0 takes its highest finite score."""
    out = np.array(x, dtype=np.float64, copy=True)
    n = x.shape[-1]
    for row in np.ndindex(x.shape[:-1]):
        i = 0
        while i < n:
            j = i + 1
            if ids[row + (i,)] >= 0:
                while j < n and ids[row + (j,)] == ids[row + (i,)]:
                    j += 1
            best = max(float(x[row + (k,)]) for k in range(i, j))
            for k in range(i, j):
                if x[row + (k,)] != -np.inf:
                    out[row + (k,)] = best
            i = j
    return out


@pytest.mark.parametrize("seed", range(6))
def test_raise_spans_matches_the_loop_reference(seed):
    rng = np.random.default_rng(seed)
    shape = (3, 4, int(rng.integers(1, 60)))
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.15] = -np.inf
    ids = np.cumsum(rng.random(shape) < 0.4, axis=-1)  # runs of 1-6 cells
    ids[rng.random(shape) < 0.1] = -1
    got = raise_spans(x, ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, raise_reference(x, ids).astype(np.float32))
    # one row of ids for every head broadcasts
    np.testing.assert_array_equal(raise_spans(x, ids[0, 0]), raise_reference(x, np.broadcast_to(ids[0, 0], shape)))


def test_raise_spans_rejects_bad_ids():
    with pytest.raises(ValueError, match="do not match"):
        raise_spans(np.ones((2, 5)), np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        raise_spans(np.ones(5), np.zeros(5))


def number_ids_reference(pieces: list[str], words: bool = False) -> list[int]:
    """The rules of adakv_local.spans written out token by token."""

    def digit(p: str) -> bool:
        b = p.lstrip()
        return bool(b) and b.isascii() and b.isdigit()

    def tight(p: str) -> bool:
        return digit(p) and not p[0].isspace()

    ids, cur = [], -1
    for i, p in enumerate(pieces):
        prev = pieces[i - 1] if i else ""
        sep_in = (p in (".", ",", ":", "-", "/") and i > 0 and digit(prev) and i + 1 < len(pieces)
                  and tight(pieces[i + 1]))
        after_sep = (i > 1 and prev in (".", ",", ":", "-", "/") and digit(pieces[i - 2]))
        cont = sep_in or (tight(p) and i > 0 and (digit(prev) or after_sep))
        # the token right after a number's last token ends the number
        number_before = i > 0 and digit(prev)
        if number_before and not cont and not digit(p):
            cont = True
        if words and p and i > 0 and not p[0].isspace() and p[0].isalnum() and prev and prev[-1].isalnum():
            cont = True
        if not cont:
            cur += 1
        ids.append(cur)
    return ids


PIECES = [" key", " is", " ", "3", "0", "4", "1", "7", ".", " Remember", " 3", ".", "1", "4", " on", " 2024",
          "-", "0", "1", "-", "1", "5", ",", " ", "1", ",", " and", " ", "5", ":", " Hild", "eg", "ard", "'s",
          " x", "1", "2", "<|im_end|>", "", "\n", "9", "9", "-", " 1"]


@pytest.mark.parametrize("mode", ["none", "numbers", "words"])
def test_span_ids_follow_the_rules(mode):
    vocab = {i: p.encode() for i, p in enumerate(PIECES)}
    finder = SpanFinder(vocab.__getitem__)
    got = finder.ids(list(range(len(PIECES))), mode)
    want = list(range(len(PIECES))) if mode == "none" else number_ids_reference(PIECES, words=mode == "words")
    assert got.tolist() == want
    if mode == "numbers":  # spelled out once: what a number is
        groups: dict[int, str] = {}
        for i, p in zip(got.tolist(), PIECES):
            groups[i] = groups.get(i, "") + p
        assert {"30417.", " 3.14 on", " 2024-01-15,", "1,", "5:", "12<|im_end|>", "99-", " 1"} <= set(groups.values())


def test_span_ids_on_random_sequences_match_the_reference():
    rng = np.random.default_rng(7)
    alphabet = ["1", "22", " 3", " 44", ".", ",", "-", ":", "/", " a", "b", "c1", " ", "\n", "x.", ""]
    vocab = {i: p.encode() for i, p in enumerate(alphabet)}
    finder = SpanFinder(vocab.__getitem__)
    for _ in range(50):
        toks = rng.integers(0, len(alphabet), size=int(rng.integers(1, 40)))
        pieces = [alphabet[t] for t in toks]
        assert finder.ids(toks, "numbers").tolist() == number_ids_reference(pieces)
        assert finder.ids(toks, "words").tolist() == number_ids_reference(pieces, words=True)


def as_lists(kept: list[list[np.ndarray]]) -> list[list[list[int]]]:
    return [[h.tolist() for h in layer] for layer in kept]


@pytest.mark.parametrize("method", ["ada-snapkv", "snapkv", "ada-pyramid", "pyramidkv"])
def test_keep_sets_with_spans_ranks_the_raised_pooled_scores(method):
    """keep_sets(spans=ids) keeps what the plain pipeline keeps from pooled scores raised by hand
    (pooling by kernel 1 is the identity), and the budget's totals do not move."""
    rng = np.random.default_rng(3)
    n, w, heads, layers = 300, 16, 4, 3
    scores = [rng.random((heads, n)).astype(np.float32) for _ in range(layers)]
    ids = np.cumsum(rng.random(n) < 0.3)
    cfg = AllocationConfig(budget=64, window=w)
    got = as_lists(keep_sets(scores, n, method, cfg, kernel=7, spans=ids))
    row = np.broadcast_to(ids[: n - w], (heads, n - w))
    raised = [np.concatenate([raise_reference(pool_scores(s[:, : n - w], 7), row), s[:, n - w :]], axis=1)
              for s in scores]
    assert got == as_lists(keep_sets(raised, n, method, cfg, kernel=1))
    plain = as_lists(keep_sets(scores, n, method, cfg, kernel=7))
    assert sum(len(h) for layer in got for h in layer) == sum(len(h) for layer in plain for h in layer)
    assert got != plain  # the spans moved something


def test_keep_sets_rejects_spans_of_the_wrong_shape():
    scores = [np.random.default_rng(0).random((2, 50))]
    with pytest.raises(ValueError, match="spans"):
        keep_sets(scores, 50, "snapkv", AllocationConfig(budget=20, window=4), spans=np.zeros(49, dtype=np.int64))


def test_config_checks_spans():
    assert AdaKVConfig(budget=64).spans == "numbers"  # the default since docs/SELECTION.md's measurements
    assert AdaKVConfig(budget=64, spans="none").spans == "none"
    with pytest.raises(ConfigError, match="spans must be one of none, numbers, words"):
        AdaKVConfig(budget=64, spans="digits")


# -- the live model: cells of the compacted block hold other positions in every head --------------------------

from test_chunked import WINDOW, kept_positions, llama, reference_chunked, stock_eval  # noqa: E402
from words import text  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.models.testmodel import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=3, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, n_ctx_train=2048, seed=31))


def reference_cell_ids(llm, n_cells: int) -> np.ndarray:
    """Span ids of every layer's and head's cells from the positions they hold, by loops."""
    pos = llm.adakv_kvcache.positions(n_cells)
    pieces = [llm._model.detokenize([int(t)]).decode("utf-8", errors="replace")
              for t in llm.input_ids[: int(pos.max()) + 1]]
    by_pos = number_ids_reference(pieces)
    out = np.full(pos.shape, -1, dtype=np.int64)
    for idx in np.ndindex(pos.shape):
        if pos[idx] >= 0:
            out[idx] = by_pos[pos[idx]]
    return out


def numbers_prompt(llm, n_words: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    words = text(n_words, seed).split()
    for i in range(0, n_words, 4):
        words[i] = str(int(rng.integers(10_000, 100_000)))
    return llm.tokenize(" ".join(words).encode())


def test_numbers_one_shot_equal_the_reference_and_stay_whole(tiny):
    # kernel 1: no pooling, so that single cells are ranked and the spans decide what stays together
    llm, ref = llama(tiny, adakv_spans="numbers", adakv_kernel=1), llama(tiny, adakv_spans="numbers", adakv_kernel=1)
    plain = llama(tiny, adakv_kernel=1, adakv_spans="none")
    toks = numbers_prompt(llm, 36, 5)
    assert llm.adakv_config.budget < len(toks) <= llm.n_ctx()
    llm.eval(toks)
    plain.eval(toks)
    kv = ref.adakv_kvcache
    stock_eval(ref, toks[:-WINDOW])
    kv.arm_scores(WINDOW)
    stock_eval(ref, toks[-WINDOW:])
    kv.compact(keep_sets(list(kv.read_scores(len(toks))), len(toks), "ada-snapkv",
                         AllocationConfig(llm.adakv_config.budget, WINDOW), kernel=1,
                         spans=reference_cell_ids(ref, len(toks))))
    got = kept_positions(llm)
    assert got == kept_positions(ref)
    assert got != kept_positions(plain)
    # every head keeps each number of the selectable prefix whole or not at all (at most one cut:
    # the top-k boundary may fall inside a span's tied scores)
    pieces = [llm._model.detokenize([t]).decode() for t in toks]
    by_pos = number_ids_reference(pieces)
    n_sel = len(toks) - WINDOW
    numbers: dict[int, list[int]] = {}
    for i in range(n_sel):
        numbers.setdefault(by_pos[i], []).append(i)
    numbers = {k: v for k, v in numbers.items() if len(v) > 1 and v[-1] < n_sel - 1}
    assert len(numbers) >= 5

    def cut(kept: list[list[list[int]]]) -> list[int]:
        return [sum(0 < len(set(h) & set(span)) < len(span) for span in numbers.values())
                for layer in kept for h in layer]

    assert max(cut(got)) <= 1


def test_numbers_in_chunks_equal_the_reference(tiny):
    llm, ref = llama(tiny, adakv_spans="numbers"), llama(tiny, adakv_spans="numbers")
    toks = numbers_prompt(llm, 100, 6)
    assert len(toks) > 2 * llm.n_ctx()
    llm.eval(toks)
    reference_chunked(ref, toks, span_ids=reference_cell_ids)
    assert kept_positions(llm) == kept_positions(ref)
    assert llm.adakv_stats.compressions > 2
