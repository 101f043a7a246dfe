"""Ada-KV allocation policies and SnapKV pooling: worked example, plain-Python references,
invariants over a table of methods, hypothesis properties, input validation.

Pure numpy: needs neither the native library nor a model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adakv_local.policies import (
    METHODS,
    AdaPyramid,
    AllocationConfig,
    PyramidKV,
    StreamingLLM,
    ada_allocate,
    keep_sets,
    pyramid_schedule,
    select,
    spread_rank,
    uniform_allocate,
)
from adakv_local.pooling import POOLING_MODES, fill_gaps, pool_prefix, pool_scores

PROPS = settings(
    max_examples=60,
    derandomize=True,  # seeded: the same examples on every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
NEG = -np.inf

# ------------------------------------------------------------------ the method table


@dataclass(frozen=True)
class Case:
    """One row of the method table: a method and the options it runs with."""

    method: str
    opts: dict = field(default_factory=dict)

    @property
    def ada(self) -> bool:
        return self.method in ("ada-snapkv", "ada-pyramid")

    @property
    def pyramid(self) -> bool:
        return self.method in ("pyramidkv", "ada-pyramid")

    @property
    def score_ranked(self) -> bool:
        return self.method in ("ada-snapkv", "ada-pyramid", "snapkv", "pyramidkv")

    def cfg(self, budget: int, window: int) -> AllocationConfig:
        return AllocationConfig(budget=budget, window=window, **self.opts)

    def __str__(self) -> str:
        return self.method + "".join(f"-{k}{v}" for k, v in self.opts.items())


TABLE = [
    Case("ada-snapkv"),
    Case("ada-snapkv", {"alpha": 0.0}),
    Case("ada-snapkv", {"alpha": 0.5, "max_ratio": 1.5}),
    Case("ada-snapkv", {"alpha": 0.25, "sinks": 2}),
    Case("ada-pyramid"),
    Case("ada-pyramid", {"alpha": 0.0, "max_ratio": 2.0}),
    Case("snapkv"),
    Case("snapkv", {"sinks": 3}),
    Case("pyramidkv"),
    Case("streamingllm"),
    Case("streamingllm", {"sinks": 6}),
    Case("full"),
]
table = pytest.mark.parametrize("case", TABLE, ids=str)


def test_table_covers_every_method():
    assert {c.method for c in TABLE} == set(METHODS)


# ------------------------------------------------------------------ plain-Python references


def ref_fill(row, reach):
    """fill_gaps by loops: the lower of the best valid score within reach on each side, if higher."""
    n, out = len(row), []
    for i in range(n):
        if row[i] == NEG:
            out.append(NEG)
            continue
        left = max([row[j] for j in range(max(0, i - reach), i)], default=NEG)
        right = max([row[j] for j in range(i + 1, min(n, i + reach + 1))], default=NEG)
        out.append(max(row[i], min(left, right)))
    return np.array(out, dtype=np.float64)


def ref_spread(layer, bsel, kernel):
    """spread_rank by loops: per head, the valid cells in n_seg equal ordered segments; each
    segment's best `kernel` cells (score desc, cell asc) raised above every other cell."""
    out = np.array(layer, dtype=np.float64)
    n_seg = max(bsel, 0) // (4 * kernel)
    finite = [v for v in out.ravel() if math.isfinite(v)]
    if n_seg == 0 or not finite:
        return out
    offset = max(finite) - min(finite) + 1.0
    for h in range(out.shape[0]):
        valid = [c for c in range(out.shape[1]) if layer[h][c] != NEG]
        k = min(n_seg, len(valid))
        for g in range(k):  # np.array_split: the first len % k segments one longer
            size, extra = divmod(len(valid), k)
            lo = g * size + min(g, extra)
            seg = valid[lo : lo + size + (g < extra)]
            for c in sorted(seg, key=lambda c: (-layer[h][c], c))[:kernel]:
                out[h, c] += offset
    return out


def ref_pool(row, kernel, mode):
    """Pooling of one row by loops: -inf cells are padding and stay -inf."""
    if mode in ("max-fill", "max-fill-spread"):
        row = ref_fill(row, kernel)
    if mode == "max2":
        return np.maximum(ref_pool(row, kernel, "max"), ref_pool(row, 2 * kernel + 1, "max") / 2)
    mode = "avg" if mode == "avg" else "max"
    n, half, out = len(row), kernel // 2, []
    for i in range(n):
        if row[i] == NEG:
            out.append(NEG)
            continue
        win = [row[j] for j in range(max(0, i - half), min(n, i + half + 1)) if row[j] != NEG]
        out.append(max(win) if mode == "max" else sum(win) / len(win))
    return np.array(out, dtype=np.float64)


def ref_floor(x, n):
    return math.floor(Fraction(repr(float(x))) * n)


def ref_order(row):
    """A head's valid cells, best first: score descending, then cell ascending."""
    return sorted((c for c in range(len(row)) if row[c] != NEG), key=lambda c: (-row[c], c))


def ref_ada(layer, bsel, alpha, max_ratio):
    """Ada-KV by a greedy loop: per-head reserve, then layer-wide best-first with caps."""
    n_heads, n = layer.shape
    if bsel <= 0:
        return [[] for _ in range(n_heads)]
    orders = [ref_order(layer[h]) for h in range(n_heads)]
    f = ref_floor(alpha, bsel)
    cap = math.inf if max_ratio is None else ref_floor(max_ratio, bsel)
    counts = [min(f, len(o)) for o in orders]
    slots = n_heads * bsel - sum(counts)
    rest = sorted(
        ((-layer[h, c], h * n + c, h) for h in range(n_heads) for c in orders[h][counts[h] :]),
    )
    for _, _, h in rest:
        if slots == 0:
            break
        if counts[h] < cap:
            counts[h] += 1
            slots -= 1
    return [sorted(orders[h][: counts[h]]) for h in range(n_heads)]


def ref_uniform(layer, bsel):
    return [sorted(ref_order(layer[h])[: max(bsel, 0)]) for h in range(layer.shape[0])]


def ref_pyramid(bsel, n_layers, n_sel, beta=20):
    """The PyramidKV schedule by the formula, in exact rationals (see pyramid_schedule)."""
    c = max(bsel, 0)
    if c >= n_sel:
        return [n_sel] * n_layers
    if n_layers == 1:
        return [c]
    lo = Fraction(c) / Fraction(repr(float(beta)))
    hi = 2 * c - lo
    if hi > n_sel:
        hi, lo = Fraction(n_sel), 2 * c - n_sel
    vals = [hi - i * (hi - lo) / (n_layers - 1) for i in range(n_layers)]
    fl = [math.floor(v) for v in vals]
    for i in sorted(range(n_layers), key=lambda i: (fl[i] - vals[i], i))[: n_layers * c - sum(fl)]:
        fl[i] += 1
    return fl


def ref_masked_prefix(scores, n_cells, window, valid_from):
    n_sel = n_cells - min(window, n_cells)
    out = []
    for i, s in enumerate(scores):
        p = np.array(s[:, :n_sel], dtype=np.float64)
        if valid_from is not None:
            for h in range(p.shape[0]):
                p[h, : valid_from[i][h]] = NEG
        out.append(p)
    return out, n_sel


def ref_ranked(case, scores, n_cells, cfg, kernel, pooling, valid_from):
    prefix, n_sel = ref_masked_prefix(scores, n_cells, cfg.window, valid_from)
    ranked = []
    for p in prefix:
        if case.method == "streamingllm":
            r = np.where(p == NEG, NEG, np.arange(n_sel, dtype=np.float64)[None, :])
            sinks = max(4, cfg.sinks)  # StreamingLLM's own 4 sinks, or more from cfg
        else:
            r = np.array([ref_pool(row, kernel, pooling) for row in p]).reshape(p.shape)
            if pooling.endswith("-spread") and case.method != "full":
                r = ref_spread(r, cfg.budget - cfg.window, kernel)
            sinks = cfg.sinks
        for row in r:  # the first `sinks` valid cells of the head (from its start on)
            row[np.flatnonzero(row != NEG)[:sinks]] = np.inf
        ranked.append(r)
    return ranked, n_sel


def ref_keep_sets(case, scores, n_cells, cfg, kernel=7, pooling="max", valid_from=None):
    ranked, n_sel = ref_ranked(case, scores, n_cells, cfg, kernel, pooling, valid_from)
    bsel = cfg.budget - cfg.window
    if case.pyramid:
        sched = ref_pyramid(bsel, len(scores), n_sel)
    out = []
    for i, r in enumerate(ranked):
        b = sched[i] if case.pyramid else bsel
        if case.method == "full":
            sel = [[c for c in range(n_sel) if r[h, c] != NEG] for h in range(r.shape[0])]
        elif case.ada:
            sel = ref_ada(r, b, cfg.alpha, cfg.max_ratio)
        else:
            sel = ref_uniform(r, b)
        heads = []
        for h, cells in enumerate(sel):
            start = n_sel if valid_from is None else max(n_sel, valid_from[i][h])
            heads.append(list(cells) + list(range(start, n_cells)))
        out.append(heads)
    return out


# ------------------------------------------------------------------ random scenarios


@dataclass
class Scenario:
    scores: list
    n_cells: int
    budget: int
    window: int
    kernel: int
    pooling: str
    valid_from: list | None

    @property
    def n_sel(self):
        return self.n_cells - min(self.window, self.n_cells)


@st.composite
def scenarios(draw, all_valid=False, max_cells=36, max_layers=3, max_heads=4):
    """Small random problems; scores are small non-negative integers (many ties) and -inf."""
    seed = draw(st.integers(0, 2**32 - 1))
    n_layers = draw(st.integers(1, max_layers))
    n_heads = draw(st.integers(1, max_heads))
    n_cells = draw(st.integers(0, max_cells))
    window = draw(st.integers(0, 8))
    budget = draw(st.integers(1, 40))
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    pooling = draw(st.sampled_from(POOLING_MODES))
    rng = np.random.default_rng(seed)
    scores = [rng.integers(0, draw(st.sampled_from([3, 10, 1000])), size=(n_heads, n_cells)).astype(np.float32)
              for _ in range(n_layers)]
    valid_from = None
    if not all_valid:
        p_inf = draw(st.sampled_from([0.0, 0.1, 0.5]))
        for s in scores:
            s[rng.random(s.shape) < p_inf] = NEG
        if draw(st.booleans()):
            valid_from = [rng.integers(0, n_cells + 1, size=n_heads) for _ in range(n_layers)]
    return Scenario(scores, n_cells, budget, window, kernel, pooling, valid_from)


def run(case, sc, budget=None):
    cfg = case.cfg(sc.budget if budget is None else budget, sc.window)
    return keep_sets(sc.scores, sc.n_cells, case.method, cfg, sc.kernel, sc.pooling, sc.valid_from), cfg


def pooled_of(sc):
    """What the score-ranked methods rank by (without sinks): masked, pooled prefix."""
    prefix, _ = ref_masked_prefix(sc.scores, sc.n_cells, sc.window, sc.valid_from)
    return [spread_rank(pool_scores(p, sc.kernel, sc.pooling), sc.budget - sc.window, sc.kernel)
            if sc.pooling.endswith("-spread") else pool_scores(p, sc.kernel, sc.pooling) for p in prefix]


def selected(out, n_sel):
    """Per layer, per head: the kept selectable cells (the window removed)."""
    return [[k[k < n_sel] for k in layer] for layer in out]


def layer_budgets(case, sc, cfg):
    bsel = cfg.budget - cfg.window
    if case.pyramid:
        return pyramid_schedule(bsel, len(sc.scores), 20, sc.n_sel)
    return [bsel] * len(sc.scores)


# ------------------------------------------------------------------ the worked example

SEED_WEIGHTS = np.array(
    [
        [0.89, 0.05, 0.01, 0.02, 0.01],
        [0.32, 0.22, 0.19, 0.01, 0.08],
        [0.68, 0.10, 0.08, 0.04, 0.09],
    ]
)


def retained(weights, counts):
    return sum(np.sort(weights[h])[::-1][:c].sum() for h, c in enumerate(counts))


def test_worked_example_counts_and_retained_weight():
    counts = ada_allocate(SEED_WEIGHTS, 2, alpha=0.0)
    assert counts.tolist() == [1, 3, 2]
    assert retained(SEED_WEIGHTS, counts) == pytest.approx(2.40)
    assert retained(SEED_WEIGHTS, [2, 2, 2]) == pytest.approx(2.26)
    assert uniform_allocate(SEED_WEIGHTS, 2).tolist() == [2, 2, 2]


def test_worked_example_is_the_best_allocation_of_six():
    best = max(
        retained(SEED_WEIGHTS, c) for c in itertools.product(range(6), repeat=3) if sum(c) == 6
    )
    assert best == pytest.approx(2.40)
    assert retained(SEED_WEIGHTS, ada_allocate(SEED_WEIGHTS, 2, alpha=0.0)) == pytest.approx(best)


def test_worked_example_through_keep_sets():
    cfg = AllocationConfig(budget=2, window=0, alpha=0.0)
    ada = keep_sets([SEED_WEIGHTS], 5, "ada-snapkv", cfg, kernel=1)
    snap = keep_sets([SEED_WEIGHTS], 5, "snapkv", cfg, kernel=1)
    assert [k.tolist() for k in ada[0]] == [[0], [0, 1, 2], [0, 1]]
    assert [k.tolist() for k in snap[0]] == [[0, 1], [0, 1], [0, 1]]
    # with the default safeguard alpha=0.2, floor(0.2*2) = 0: the same allocation
    assert [len(k) for k in keep_sets([SEED_WEIGHTS], 5, "ada-snapkv", AllocationConfig(2, 0), kernel=1)[0]] == [
        1, 3, 2
    ]


# ------------------------------------------------------------------ pooling


@given(st.integers(0, 2**32 - 1), st.integers(0, 20), st.sampled_from([1, 3, 5, 7, 9]),
       st.sampled_from(POOLING_MODES), st.sampled_from([0.0, 0.3]))
@PROPS
def test_pool_matches_loops(seed, n, kernel, mode, p_inf):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, n))
    x[rng.random(x.shape) < p_inf] = NEG
    got = pool_scores(x, kernel, mode)
    assert got.shape == x.shape
    want = np.array([ref_pool(r, kernel, mode) for r in x]).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert ((got == NEG) == (x == NEG)).all()  # invalid cells stay invalid, valid stay valid


@given(st.integers(0, 2**32 - 1), st.integers(0, 30), st.integers(0, 9), st.sampled_from([0.0, 0.3]))
@PROPS
def test_fill_gaps_matches_loops(seed, n, reach, p_inf):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=(2, n)).astype(np.float64)
    x[rng.random(x.shape) < p_inf] = NEG
    got = fill_gaps(x, reach)
    want = np.array([ref_fill(r, reach) for r in x]).reshape(x.shape)
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} n={n} reach={reach} p_inf={p_inf}")
    assert (got >= x).all() and ((got == NEG) == (x == NEG)).all()


def test_fill_keeps_a_number_between_the_words_around_it():
    # "... key is 3 0 4 1 7 . Remember ...": the question attends to the words around the number
    x = np.zeros(24)
    x[2] = x[12] = 9.0  # " key", " Remember"
    x[[3, 4, 10, 11]] = 2.0
    x[5:10] = 1.0  # the digits
    x[20] = 5.0  # elsewhere
    plain, filled = pool_scores(x, 7, "max"), pool_scores(x, 7, "max-fill")
    top = 17  # the two 7-cell neighbourhoods of the words, and 3 more cells
    assert not set(range(5, 10)) <= set(np.argsort(-plain, kind="stable")[:top].tolist())
    assert set(range(5, 10)) <= set(np.argsort(-filled, kind="stable")[:top].tolist())


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 60), st.integers(0, 80),
       st.sampled_from([1, 3, 7]), st.sampled_from([0.0, 0.3]))
@PROPS
def test_spread_rank_matches_loops(seed, n_heads, n, bsel, kernel, p_inf):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=(n_heads, n)).astype(np.float64)
    x[rng.random(x.shape) < p_inf] = NEG
    np.testing.assert_array_equal(spread_rank(x, bsel, kernel), ref_spread(x, bsel, kernel),
                                  err_msg=f"seed={seed} heads={n_heads} n={n} bsel={bsel} kernel={kernel}")


def test_spread_keeps_a_share_of_every_segment():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.random(700) * 0.01, rng.random(300) + 1.0])[None, :]  # the last 30% dominates
    cfg = AllocationConfig(budget=32 + 224, window=32)
    plain = keep_sets([np.concatenate([x, np.zeros((1, 32))], axis=1)], 1032, "snapkv", cfg, 7, "max")[0][0]
    spread = keep_sets([np.concatenate([x, np.zeros((1, 32))], axis=1)], 1032, "snapkv", cfg, 7, "max-spread")[0][0]
    assert len(plain) == len(spread) == 256
    assert (plain[plain < 1000] >= 700).all()  # the top-k keeps only the last stretch
    n_seg = 224 // 28
    for g in range(n_seg):  # one phrase (kernel cells) in each of the 8 segments
        assert ((spread >= g * 125) & (spread < (g + 1) * 125)).sum() >= 7


def test_pool_short_inputs_and_dtypes():
    x = np.array([3.0, 1.0], dtype=np.float32)
    assert pool_scores(x, 7, "max").tolist() == [3.0, 3.0]
    assert pool_scores(x, 7, "max").dtype == np.float32
    assert pool_scores(x, 7, "avg").tolist() == [2.0, 2.0]
    assert pool_scores(np.zeros((2, 0)), 7).shape == (2, 0)
    assert pool_scores(np.array([1, 5, 2]), 3).tolist() == [5.0, 5.0, 5.0]  # ints become float64
    # avg over in-range elements only: the edges are not diluted by padding
    assert pool_scores(np.array([4.0, 4.0, 4.0]), 3, "avg").tolist() == [4.0, 4.0, 4.0]


def test_pool_prefix_ignores_the_window():
    x = np.array([[1.0, 0.0, 0.0, 100.0]])
    assert pool_prefix(x, 3, kernel=3).tolist() == [[1.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"kernel": 4}, ValueError, "kernel"),
        ({"kernel": 0}, ValueError, "kernel"),
        ({"kernel": 3.0}, TypeError, "kernel"),
        ({"mode": "min"}, ValueError, "pooling"),
    ],
)
def test_pool_rejects_bad_options(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        pool_scores(np.ones(5), **kwargs)


def test_pool_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        pool_scores(np.array([1.0, np.nan]))


# ------------------------------------------------------------------ the pipeline against references


@table
@given(sc=scenarios())
@PROPS
def test_keep_sets_match_the_reference(case, sc):
    out, cfg = run(case, sc)
    want = ref_keep_sets(case, sc.scores, sc.n_cells, cfg, sc.kernel, sc.pooling, sc.valid_from)
    assert [[k.tolist() for k in layer] for layer in out] == want


# ------------------------------------------------------------------ invariants over the table


@table
@given(sc=scenarios())
@PROPS
def test_sorted_unique_valid_window_kept(case, sc):
    out, cfg = run(case, sc)
    assert len(out) == len(sc.scores)
    n_sel = sc.n_sel
    for i, layer in enumerate(out):
        assert len(layer) == sc.scores[i].shape[0]
        for h, keep in enumerate(layer):
            assert keep.dtype == np.int64
            assert (np.diff(keep) > 0).all()  # sorted, unique
            start = 0 if sc.valid_from is None else int(sc.valid_from[i][h])
            assert keep.size == 0 or (keep.min() >= start and keep.max() < sc.n_cells)
            pre = keep[keep < n_sel]
            assert (sc.scores[i][h, pre] != NEG).all()  # never an invalid cell
            window = np.arange(max(n_sel, start), sc.n_cells)
            assert np.isin(window, keep).all()  # the window is always kept


@table
@given(sc=scenarios(all_valid=True))
@PROPS
def test_totals_exact(case, sc):
    if case.method == "full":
        pytest.skip("full has no budget")
    out, cfg = run(case, sc)
    bsel = cfg.budget - cfg.window
    n_heads = sc.scores[0].shape[0]
    got = [sum(len(k) for k in layer) for layer in selected(out, sc.n_sel)]
    for layer in out:
        for keep in layer:  # window cells on top of the selectable budget
            assert (keep >= sc.n_sel).sum() == sc.n_cells - sc.n_sel
    if bsel <= 0:
        assert got == [0] * len(out)  # only the window
    elif bsel > sc.n_sel:
        assert got == [n_heads * sc.n_sel] * len(out)  # fewer cells than slots: keep all
    elif case.pyramid:
        assert sum(got) == n_heads * bsel * len(out)  # exact over the layers
    else:
        assert got == [n_heads * bsel] * len(out)  # exact in every layer


@table
@given(sc=scenarios())
@PROPS
def test_safeguard_floors(case, sc):
    if not case.ada:
        pytest.skip("the alpha safeguard applies to the Ada methods only")
    out, cfg = run(case, sc)
    for i, (layer, b) in enumerate(zip(selected(out, sc.n_sel), layer_budgets(case, sc, cfg))):
        floor_b = ref_floor(cfg.alpha, b) if b > 0 else 0
        prefix, _ = ref_masked_prefix([sc.scores[i]], sc.n_cells, sc.window, None if sc.valid_from is None
                                      else [sc.valid_from[i]])
        for h, keep in enumerate(layer):
            n_valid = int((prefix[0][h] != NEG).sum())
            assert len(keep) >= min(floor_b, n_valid)


@table
@given(sc=scenarios())
@PROPS
def test_max_ratio_respected(case, sc):
    if not case.ada or case.opts.get("max_ratio") is None:
        pytest.skip("max_ratio is an Ada option and this row has none")
    out, cfg = run(case, sc)
    for layer, b in zip(selected(out, sc.n_sel), layer_budgets(case, sc, cfg)):
        cap = ref_floor(cfg.max_ratio, b) if b > 0 else 0
        assert max(len(k) for k in layer) <= cap
        # hence the footprint R = max_h B_h + w is bounded by floor(max_ratio*B') + w


@table
@given(sc=scenarios())
@PROPS
def test_kept_cells_are_the_best_of_their_head(case, sc):
    if not case.score_ranked:
        pytest.skip(f"{case.method} does not select by score")
    out, cfg = run(case, sc)
    pooled = pooled_of(sc)
    for i, layer in enumerate(selected(out, sc.n_sel)):
        for h, keep in enumerate(layer):
            row = pooled[i][h]
            sink = np.zeros(row.size, dtype=bool)
            sink[np.flatnonzero(row != NEG)[: cfg.sinks]] = True
            kept = np.zeros(row.size, dtype=bool)
            kept[keep] = True
            inside, outside = row[kept & ~sink], row[~kept & ~sink & (row != NEG)]
            if inside.size and outside.size:
                assert inside.min() >= outside.max()
                # ties: a dropped cell never precedes a kept cell of the same score
                t = inside.min()
                if outside.max() == t:
                    assert np.flatnonzero(kept & ~sink & (row == t)).max() < np.flatnonzero(
                        ~kept & ~sink & (row == t)).min()


@table
@given(sc=scenarios(), extra=st.integers(1, 6))
@PROPS
def test_monotone_in_budget(case, sc, extra):
    if case.pyramid:
        pytest.skip("PyramidKV's rounded layer schedule is not monotone per layer in the budget")
    if case.opts.get("max_ratio") is not None:
        pytest.skip("with max_ratio the cap grows in steps of up to ceil(max_ratio): a capped head "
                    "can take several slots from another when the budget grows by one")
    if sc.pooling.endswith("-spread"):
        pytest.skip("the -spread segments are cut by the budget: a larger budget moves their bounds")
    small, _ = run(case, sc)
    big, _ = run(case, sc, budget=sc.budget + extra)
    for layer_s, layer_b in zip(small, big):
        for ks, kb in zip(layer_s, layer_b):
            assert len(ks) <= len(kb)
            assert np.isin(ks, kb).all()  # the kept set only grows


@table
@given(sc=scenarios())
@PROPS
def test_ada_retains_at_least_uniform(case, sc):
    if not case.ada:
        pytest.skip("compares an Ada method with its uniform counterpart")
    if case.opts.get("sinks"):
        pytest.skip("sink cells are forced, not ranked by score")
    out, cfg = run(case, sc)
    uniform = "pyramidkv" if case.pyramid else "snapkv"
    base = keep_sets(sc.scores, sc.n_cells, uniform, cfg, sc.kernel, sc.pooling, sc.valid_from)
    pooled = pooled_of(sc)
    for i in range(len(out)):
        ada_mass = sum(pooled[i][h, k].sum() for h, k in enumerate(selected(out, sc.n_sel)[i]))
        uni_mass = sum(pooled[i][h, k].sum() for h, k in enumerate(selected(base, sc.n_sel)[i]))
        assert ada_mass >= uni_mass - 1e-9 * max(1.0, abs(uni_mass))


# ------------------------------------------------------------------ Ada-KV details


@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4),
       st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.sampled_from([None, 1.0, 1.5, 2.0]))
@PROPS
def test_ada_is_the_best_allocation_under_floor_and_cap(seed, n_heads, n, bsel, alpha, max_ratio):
    rng = np.random.default_rng(seed)
    p = rng.random((n_heads, n))
    counts = ada_allocate(p, bsel, alpha, max_ratio)
    lo = min(ref_floor(alpha, bsel), n)
    hi = n if max_ratio is None else min(n, ref_floor(max_ratio, bsel))
    target = min(n_heads * bsel, n_heads * hi)
    feasible = [c for c in itertools.product(range(lo, hi + 1), repeat=n_heads) if sum(c) == target]
    best = max(retained(p, c) for c in feasible)
    assert tuple(counts) in feasible
    assert retained(p, counts) == pytest.approx(best)


def test_ada_floor_uses_the_decimal_product():
    # floor(0.29 * 100) is 29 here (binary floating point would give 28)
    p = np.vstack([np.full(300, 10.0), np.full(300, 1.0)])
    assert ada_allocate(p, 100, alpha=0.29).tolist() == [171, 29]
    assert ada_allocate(p, 100, alpha=0.0).tolist() == [200, 0]
    assert ada_allocate(p, 100, alpha=0.0, max_ratio=1.5).tolist() == [150, 50]


def test_ada_short_head_gives_its_excess_to_others():
    p = np.array([[5.0, 4.0, NEG, NEG, NEG, NEG], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert ada_allocate(p, 3, alpha=1.0).tolist() == [2, 4]
    assert ada_allocate(p, 5, alpha=1.0).tolist() == [2, 6]  # fewer cells than slots: all kept
    assert ada_allocate(p, 0).tolist() == [0, 0]


def test_select_breaks_ties_by_lower_index():
    p = [np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])]
    assert select(p, [np.array([2])])[0][0].tolist() == [1, 2]
    assert select(p, [np.array([2])], valid_from=[np.array([2])])[0][0].tolist() == [2, 3]
    with pytest.raises(ValueError, match="counts"):
        select(p, [np.array([5])], valid_from=[np.array([2])])


# ------------------------------------------------------------------ PyramidKV schedule


@pytest.mark.parametrize("n_layers", [1, 2, 3, 7, 32, 80])
@pytest.mark.parametrize("c", [0, 1, 5, 19, 100, 992])
def test_pyramid_schedule_sums_and_slopes(n_layers, c):
    sched = pyramid_schedule(c, n_layers)
    assert sched.sum() == n_layers * c
    assert (np.diff(sched) <= 0).all()
    if n_layers == 1:
        assert sched.tolist() == [c]
    else:
        lo = c / 20
        hi = 2 * c - lo
        real = hi - np.arange(n_layers) * (hi - lo) / (n_layers - 1)
        assert (np.abs(sched - real) < 1 + 1e-9).all()
    assert sched.tolist() == ref_pyramid(c, n_layers, 10**9)


def test_pyramid_schedule_clamps_like_pyramidkv():
    # max 2C - C/beta = 195 > 150 cells: PyramidKV sets max = 150, min = 2C - max = 50
    assert pyramid_schedule(100, 4, n_selectable_cells=150).tolist() == [150, 117, 83, 50]
    assert pyramid_schedule(100, 4, n_selectable_cells=80).tolist() == [80] * 4
    assert pyramid_schedule(100, 3, beta=1).tolist() == [100] * 3
    assert pyramid_schedule(-5, 3).tolist() == [0, 0, 0]


def test_policy_objects_with_other_options():
    sc = [np.arange(40, dtype=np.float64)[None, :].repeat(2, 0) for _ in range(3)]
    cfg = AllocationConfig(budget=12, window=4)
    flat = keep_sets(sc, 40, PyramidKV(beta=1), cfg)
    assert [len(layer[0]) for layer in flat] == [12, 12, 12]
    steep = keep_sets(sc, 40, AdaPyramid(beta=20), cfg)
    # C = 8: exact schedule 15.6, 8, 0.4 -> floors 15, 8, 0 + the remainder 1 to layer 0
    assert [len(layer[0]) for layer in steep] == [4 + 16, 4 + 8, 4 + 0]


def test_streamingllm_keeps_sinks_and_recent():
    scores = [np.random.default_rng(0).random((2, 50))]
    cfg = AllocationConfig(budget=20, window=8)
    for keep in keep_sets(scores, 50, "streamingllm", cfg)[0]:
        assert keep.tolist() == [0, 1, 2, 3, *range(34, 50)]  # first 4 + last B - 4 = 16
    for keep in keep_sets(scores, 50, StreamingLLM(sinks=2), cfg)[0]:
        assert keep.tolist() == [0, 1, *range(32, 50)]


def test_sinks_are_a_heads_first_valid_cells_after_a_compaction():
    """After a compaction a head's cells start at its start cell, where its first tokens (its
    sinks) were moved; the sinks used to be looked for at cells [0, sinks), invalid there, and
    the second compression lost them."""
    rng = np.random.default_rng(3)
    n, window = 40, 4
    scores = [rng.random((3, n)) for _ in range(2)]
    starts = [np.array([0, 7, 15]), np.array([22, 3, 0])]
    for method in ("ada-snapkv", "snapkv", "pyramidkv", "ada-pyramid", "streamingllm"):
        cfg = AllocationConfig(budget=12, window=window, sinks=3)
        out = keep_sets(scores, n, method, cfg, valid_from=starts)
        for i, layer in enumerate(out):
            for h, keep in enumerate(layer):
                s = int(starts[i][h])
                chosen = keep[keep < n - window]  # sinks are taken first, up to the head's budget
                want = set(range(s, s + min(3, len(chosen))))
                assert len(chosen) > 0 or method == "ada-pyramid" or method == "pyramidkv", (method, i, h)
                assert want <= set(chosen.tolist()), (method, i, h, keep.tolist())


def test_sinks_count_against_the_budget():
    scores = [np.array([[0.0, 0.0, 9.0, 8.0, 7.0, 6.0, 1.0, 1.0]])]
    cfg = AllocationConfig(budget=5, window=2, sinks=2, alpha=0.0)
    for method in ("snapkv", "ada-snapkv"):
        assert keep_sets(scores, 8, method, cfg, kernel=1)[0][0].tolist() == [0, 1, 2, 6, 7]


def test_full_keeps_every_valid_cell():
    s = np.ones((2, 10))
    s[1, 3] = NEG
    out = keep_sets([s], 10, "full", AllocationConfig(budget=1, window=2), valid_from=[np.array([0, 5])])
    assert out[0][0].tolist() == list(range(10))
    assert out[0][1].tolist() == [5, 6, 7, 8, 9]


def test_tiny_prompts():
    cfg = AllocationConfig(budget=8, window=4)
    for method in METHODS:
        assert keep_sets([np.zeros((2, 0))], 0, method, cfg)[0][0].tolist() == []
        assert keep_sets([np.zeros((2, 3))], 3, method, cfg)[0][1].tolist() == [0, 1, 2]
        assert keep_sets([], 3, method, cfg) == []


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"budget": 0}, ValueError, "budget"),
        ({"budget": -3}, ValueError, "budget"),
        ({"budget": 1.5}, TypeError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({"budget": 8, "window": -1}, ValueError, "window"),
        ({"budget": 8, "alpha": 1.5}, ValueError, "alpha"),
        ({"budget": 8, "alpha": -0.1}, ValueError, "alpha"),
        ({"budget": 8, "alpha": float("nan")}, ValueError, "alpha"),
        ({"budget": 8, "alpha": "0.2"}, TypeError, "alpha"),
        ({"budget": 8, "max_ratio": 0.5}, ValueError, "max_ratio"),
        ({"budget": 8, "max_ratio": float("inf")}, ValueError, "max_ratio"),
        ({"budget": 8, "sinks": -1}, ValueError, "sinks"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        AllocationConfig(**kwargs)


def test_config_accepts_numpy_scalars_and_is_frozen():
    cfg = AllocationConfig(budget=np.int64(64), window=np.int32(8), alpha=np.float32(0.5), max_ratio=2)
    assert (cfg.budget, cfg.window, cfg.alpha, cfg.max_ratio, cfg.selectable) == (64, 8, 0.5, 2.0, 56)
    assert type(cfg.budget) is int
    with pytest.raises(AttributeError):
        cfg.budget = 3


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"kernel": 6}, ValueError, "kernel"),
        ({"kernel": -1}, ValueError, "kernel"),
        ({"pooling": "sum"}, ValueError, "pooling"),
        ({"method": "h2o"}, ValueError, "method"),
        ({"method": 3}, TypeError, "method"),
        ({"n_cells": 9}, ValueError, "scores"),
        ({"n_cells": -1}, ValueError, "n_cells"),
        ({"cfg": {"budget": 4}}, TypeError, "cfg"),
        ({"valid_from": [np.array([0, 11])]}, ValueError, "valid_from"),
        ({"valid_from": [np.array([0])]}, ValueError, "valid_from"),
        ({"valid_from": []}, ValueError, "valid_from"),
        ({"scores": [np.ones(10)]}, ValueError, "scores"),
        ({"scores": [np.full((2, 10), np.nan)]}, ValueError, "NaN"),
    ],
)
def test_keep_sets_rejects_bad_input(kwargs, exc, word):
    args = {"scores": [np.ones((2, 10))], "n_cells": 10, "method": "ada-snapkv",
            "cfg": AllocationConfig(budget=4, window=2)}
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        keep_sets(**args)


def test_policy_options_are_checked():
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        AdaPyramid(beta=float("nan"))
    with pytest.raises(ValueError, match="sinks"):
        StreamingLLM(sinks=-2)
