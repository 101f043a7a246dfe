"""Option ``spans``: numbers (and words) ranked as a whole, against plain loop references on seeded
random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from adakv_local.config import AdaKVConfig, ConfigError
from adakv_local.policies import AllocationConfig, keep_sets
from adakv_local.pooling import pool_scores, raise_spans
from adakv_local.spans import SpanFinder


def raise_reference(x: np.ndarray, ids: np.ndarray, cap: int | None = None) -> np.ndarray:
    """Plain loops: each maximal run of equal ids >= 0 takes its highest finite score; with a cap,
    only the runs of 2+ cells taken best first (the earlier on a tie) while their cells fit in it."""
    out = np.array(x, dtype=np.float64, copy=True)
    n = x.shape[-1]
    for row in np.ndindex(x.shape[:-1]):
        runs, i = [], 0
        while i < n:
            j = i + 1
            if ids[row + (i,)] >= 0:
                while j < n and ids[row + (j,)] == ids[row + (i,)]:
                    j += 1
            runs.append((max(float(x[row + (k,)]) for k in range(i, j)), i, j))
            i = j
        if cap is not None:
            room, taken = cap, []
            for best, i, j in sorted((r for r in runs if r[2] - r[1] > 1 and r[0] > -np.inf),
                                     key=lambda r: (-r[0], r[1])):
                if j - i > room:
                    break
                room -= j - i
                taken.append((best, i, j))
            runs = taken
        for best, i, j in runs:
            for k in range(i, j):
                if x[row + (k,)] != -np.inf:
                    out[row + (k,)] = best
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


@pytest.mark.parametrize("seed", range(8))
def test_raise_spans_with_a_cap_matches_the_loop_reference(seed):
    rng = np.random.default_rng([seed, 1])
    shape = (2, 3, int(rng.integers(1, 80)))
    x = rng.standard_normal(shape)
    if seed % 2:
        x = np.round(x * 2).astype(np.float32)  # many ties between the spans' best scores
    x[rng.random(shape) < 0.15] = -np.inf
    ids = np.cumsum(rng.random(shape) < 0.35, axis=-1)
    ids[rng.random(shape) < 0.1] = -1
    for cap in (0, 1, 2, 5, int(rng.integers(3, 30)), 10**6):
        got = raise_spans(x, ids, cap)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, raise_reference(x, ids, cap).astype(x.dtype), err_msg=f"cap {cap}")
    np.testing.assert_array_equal(raise_spans(x, ids, 0), x)  # no room: nothing raised
    np.testing.assert_array_equal(raise_spans(x, ids, x.shape[-1]), raise_spans(x, ids))  # room for all


def test_raise_spans_rejects_bad_ids():
    with pytest.raises(ValueError, match="do not match"):
        raise_spans(np.ones((2, 5)), np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        raise_spans(np.ones(5), np.zeros(5))
    for cap in (-1, 2.5, True):
        with pytest.raises(ValueError, match="cap must be None or an integer >= 0"):
            raise_spans(np.ones(5), np.zeros(5, dtype=np.int64), cap)


def number_ids_reference(pieces: list[str], words: bool = False, long: bool = False) -> list[int]:
    """The rules of adakv_local.spans written out token by token (long: spans="long-numbers")."""

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
    if long:  # a number of fewer than 4 digits falls apart into cells of their own
        out, cur = [], -1
        for i, k in enumerate(ids):
            members = [j for j in range(len(ids)) if ids[j] == k]
            n_digits = sum(len(pieces[j].lstrip()) for j in members if digit(pieces[j]))
            if i == members[0] or n_digits < 4:
                cur += 1
            out.append(cur)
        return out
    return ids


PIECES = [" key", " is", " ", "3", "0", "4", "1", "7", ".", " Remember", " 3", ".", "1", "4", " on", " 2024",
          "-", "0", "1", "-", "1", "5", ",", " ", "1", ",", " and", " ", "5", ":", " Hild", "eg", "ard", "'s",
          " x", "1", "2", "<|im_end|>", "", "\n", "9", "9", "-", " 1"]


@pytest.mark.parametrize("mode", ["none", "numbers", "long-numbers", "words"])
def test_span_ids_follow_the_rules(mode):
    vocab = {i: p.encode() for i, p in enumerate(PIECES)}
    finder = SpanFinder(vocab.__getitem__)
    got = finder.ids(list(range(len(PIECES))), mode)
    want = (list(range(len(PIECES))) if mode == "none"
            else number_ids_reference(PIECES, words=mode == "words", long=mode == "long-numbers"))
    assert got.tolist() == want
    groups: dict[int, str] = {}
    for i, p in zip(got.tolist(), PIECES):
        groups[i] = groups.get(i, "") + p
    if mode == "numbers":  # spelled out once: what a number is
        assert {"30417.", " 3.14 on", " 2024-01-15,", "1,", "5:", "12<|im_end|>", "99-", " 1"} <= set(groups.values())
    if mode == "long-numbers":  # and a long one: 4 digits or more
        assert {"30417.", " 2024-01-15,"} <= set(groups.values())
        assert not {" 3.14 on", "12<|im_end|>", "99-"} & set(groups.values())


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
        assert finder.ids(toks, "long-numbers").tolist() == number_ids_reference(pieces, long=True)


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


@pytest.mark.parametrize("method", ["ada-snapkv", "pyramidkv"])
def test_keep_sets_span_share_caps_the_raised_spans_of_every_head(method):
    """span_share s: every head raises its best spans while they fit in floor(s * B') cells, as
    raise_spans(cap=...) by hand; inf is no cap, 0 is no spans."""
    rng = np.random.default_rng(4)
    n, w, heads, layers = 400, 16, 4, 3
    scores = [rng.random((heads, n)).astype(np.float32) for _ in range(layers)]
    ids = np.cumsum(rng.random(n) < 0.3)
    cfg = AllocationConfig(budget=80, window=w)  # B' = 64
    row = np.broadcast_to(ids[: n - w], (heads, n - w))
    results = {}
    for share, cap in ((0.125, 8), (0.3, 19), (1.0, 64)):
        got = as_lists(keep_sets(scores, n, method, cfg, kernel=7, spans=ids, span_share=share))
        raised = [np.concatenate([raise_reference(pool_scores(s[:, : n - w], 7), row, cap), s[:, n - w :]], axis=1)
                  for s in scores]
        assert got == as_lists(keep_sets(raised, n, method, cfg, kernel=1)), share
        results[share] = got
    uncapped = as_lists(keep_sets(scores, n, method, cfg, kernel=7, spans=ids))
    assert as_lists(keep_sets(scores, n, method, cfg, kernel=7, spans=ids, span_share=float("inf"))) == uncapped
    plain = as_lists(keep_sets(scores, n, method, cfg, kernel=7))
    assert as_lists(keep_sets(scores, n, method, cfg, kernel=7, spans=ids, span_share=0)) == plain
    assert len({str(v) for v in [plain, uncapped, *results.values()]}) >= 4  # the cap moves something
    for bad in (-0.1, float("nan"), "a"):
        with pytest.raises((ValueError, TypeError), match="span_share"):
            keep_sets(scores, n, method, cfg, spans=ids, span_share=bad)


def test_keep_sets_rejects_spans_of_the_wrong_shape():
    scores = [np.random.default_rng(0).random((2, 50))]
    with pytest.raises(ValueError, match="spans"):
        keep_sets(scores, 50, "snapkv", AllocationConfig(budget=20, window=4), spans=np.zeros(49, dtype=np.int64))


def test_config_checks_spans():
    assert AdaKVConfig(budget=64).spans == "long-numbers"  # the default since docs/SELECTION.md's measurements
    assert AdaKVConfig(budget=64, spans="none").spans == "none"
    with pytest.raises(ConfigError, match="spans must be one of none, numbers, long-numbers, words"):
        AdaKVConfig(budget=64, spans="digits")


def test_config_checks_span_share():
    assert AdaKVConfig(budget=64, span_share=0).span_share == 0
    assert AdaKVConfig(budget=64, span_share=float("inf")).span_share == float("inf")
    for bad in (-0.5, float("nan"), float("-inf"), True, "0.25", None):
        with pytest.raises(ConfigError, match="span_share must be a number >= 0"):
            AdaKVConfig(budget=64, span_share=bad)


# -- the live model: cells of the compacted block hold other positions in every head --------------------------

from test_chunked import WINDOW, kept_positions, llama, reference_chunked, stock_eval  # noqa: E402
from words import text  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

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


@pytest.mark.parametrize("share", [float("inf"), 1.0])
def test_numbers_one_shot_equal_the_reference_and_stay_whole(tiny, share):
    # kernel 1: no pooling, so that single cells are ranked and the spans decide what stays together
    opts = dict(adakv_spans="numbers", adakv_kernel=1, adakv_span_share=share)
    llm, ref = llama(tiny, **opts), llama(tiny, **opts)
    plain = llama(tiny, adakv_kernel=1, adakv_spans="none")
    toks = numbers_prompt(llm, 36, 5)
    assert llm.adakv_config.budget < len(toks) <= llm.n_ctx()
    llm.eval(toks)
    plain.eval(toks)
    kv = ref.adakv_kvcache
    assert len(toks) <= ref.n_batch  # one ubatch, scored as the fast path scores it: the same scores bit for bit
    kv.arm_scores(WINDOW)
    stock_eval(ref, toks)
    kv.compact(keep_sets(list(kv.read_scores(len(toks))), len(toks), "ada-snapkv",
                         AllocationConfig(llm.adakv_config.budget, WINDOW), kernel=1,
                         spans=reference_cell_ids(ref, len(toks)), span_share=share))
    got = kept_positions(llm)
    assert got == kept_positions(ref)
    assert got != kept_positions(plain)
    if share != float("inf"):
        return  # the spans beyond the cap rank cell by cell
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


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("share", [float("inf"), 1.0])
def test_numbers_in_chunks_equal_the_reference(tiny, share, gqa):
    llm, ref = (llama(tiny, adakv_spans="numbers", adakv_span_share=share, adakv_gqa=gqa) for _ in range(2))
    toks = numbers_prompt(llm, 100, 6)
    assert len(toks) > 2 * llm.n_ctx()
    llm.eval(toks)
    # near ties (the max over query heads makes them likelier): the same ubatches as the fast path
    reference_chunked(ref, toks, alone=False, span_ids=reference_cell_ids, span_share=share)
    assert kept_positions(llm) == kept_positions(ref)
    assert llm.adakv_stats.compressions > 2
