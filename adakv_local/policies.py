"""Ada-KV allocation policies: which prompt cells every KV head keeps after prefill.

Pure numpy functions of the (already window-summed, GQA-reduced) SnapKV scores and an
:class:`AllocationConfig`; no model, no native code.  This module imports nothing from
the rest of ``adakv_local`` except its sibling :mod:`adakv_local.pooling`.

Vocabulary
----------
* ``N`` cells were prefilled.  The last ``w = cfg.window`` cells (the observation window,
  positions ``N-w .. N-1``; all cells when ``w >= N``) are kept by every head and are not
  part of the selectable budget.  The window's own scores are ignored.
* The *selectable* cells are ``0 .. N-w-1``.  A cell is invalid for a head when its score
  is ``-inf`` or its index is ``< valid_from[h]``; invalid cells are never kept (window
  cells below ``valid_from[h]`` included).  ``NaN`` scores are rejected.
* ``B = cfg.budget`` is the average number of cells kept per KV head, window included;
  ``B' = B - w`` is the average selectable budget per head (``B' <= 0``: only the window
  is kept).  A layer with ``H`` KV heads has ``H * B'`` selectable slots.
* ``cfg.sinks``: the first ``sinks`` valid cells of every head (its first tokens: after a
  compaction they begin at the head's start cell) are kept and count against its budget:
  :meth:`Policy.rank` gives them a ``+inf`` ranking score, so every allocation below takes
  them before any scored cell.  They are the first cells of the
  budget: with ``B' < sinks`` a head keeps only the first ``B'`` sinks.

Pipeline (:func:`keep_sets`): pool the selectable prefix (:mod:`adakv_local.pooling`),
``ranked = policy.rank(pooled, cfg)``, ``counts = policy.allocate(ranked, cfg)``,
``select(ranked, counts)``, then add the window.

Ties are broken by the lower index everywhere: inside a head by the lower cell, and in
Ada's layer-wide top-k by the lower flattened index (lower head, then lower cell).  This
makes every kept set a prefix of its head's order (score descending, cell ascending), so
``select`` reproduces exactly the cells that won the allocation.

Rounding rules
--------------
* Products of a float option and an integer (``floor(alpha * B')``,
  ``floor(max_ratio * B')``, PyramidKV's ``B' / beta``) are computed exactly on the
  shortest decimal form of the float (``Fraction(repr(x))``), so ``floor(0.29 * 100)``
  is 29 (binary floating point would give 28).
* PyramidKV layer budgets: exact rationals, floored, then the remainder
  ``L*B' - sum(floors)`` (an integer in ``[0, L)``) goes one cell each to the layers with
  the largest fractional parts (ties: lower layer).  The sum over layers is ``L*B'``.

Performance
-----------
Measured on this project's 2-core CPU build machine (numpy 2.4.6, Python 3.11.7, while a
C++ build ran in the background, load ~2): ``keep_sets`` for 32 layers x 8 KV heads x
131072 cells (float32 scores), window 32, kernel 7, max pooling, budget 1024, three runs:
ada-snapkv 0.65-0.91 s (the pooling alone 0.19-0.43 s), snapkv 0.44-0.53 s, ada-pyramid
0.70-0.89 s, pyramidkv 0.34-0.56 s, streamingllm 0.70-1.1 s, full 0.33-0.52 s; ada-snapkv
with ``max_ratio=2`` 1.6-1.8 s (one more per-head partition for the caps).
Command::

    python3 -c "import time,numpy as np; from adakv_local.policies import *; \
rng=np.random.default_rng(0); s=[rng.random((8,131072),dtype=np.float32) for _ in range(32)]; \
cfg=AllocationConfig(budget=1024); t=time.perf_counter(); keep_sets(s,131072,'ada-snapkv',cfg); \
print(time.perf_counter()-t)"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .pooling import check_kernel, check_pooling, pool_scores, raise_spans

__all__ = [
    "METHODS",
    "AdaPyramid",
    "AdaSnapKV",
    "AllocationConfig",
    "Full",
    "Policy",
    "PyramidKV",
    "SnapKV",
    "StreamingLLM",
    "ada_allocate",
    "keep_sets",
    "pyramid_schedule",
    "select",
    "spread_rank",
    "uniform_allocate",
]


# ---------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _check_real(name: str, value: object, lo: float, hi: float | None, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or value < lo or (hi is not None and value > hi) or math.isinf(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _exact(x: float) -> Fraction:
    """The shortest decimal form of ``x`` as an exact fraction (``0.29 -> 29/100``)."""
    return Fraction(repr(float(x)))


def _floor_mul(x: float, n: int) -> int:
    return math.floor(_exact(x) * n)


def _check_layer(name: str, arr: object, n_cells: int | None = None) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_head_kv, n_cells], got shape {a.shape}")
    if n_cells is not None and a.shape[1] != n_cells:
        raise ValueError(f"{name} must have n_cells={n_cells} columns, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return a


def _check_no_nan(name: str, a: np.ndarray) -> None:
    if np.isnan(a).any():
        raise ValueError(f"{name} must not contain NaN (use -inf for invalid cells)")


def _check_layers(name: str, layers: object) -> list[np.ndarray]:
    if isinstance(layers, np.ndarray) and layers.ndim == 3:
        layers = list(layers)
    if isinstance(layers, np.ndarray) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be a list of per-layer 2-D arrays, got {type(layers).__name__}")
    out = []
    for i, layer in enumerate(layers):
        a = _check_layer(f"{name}[{i}]", layer)
        _check_no_nan(f"{name}[{i}]", a)
        out.append(a)
    return out


def _check_valid_from(valid_from: object, heads: list[int], n_cells: int) -> list[np.ndarray]:
    """Per-layer int64 arrays [H] of each head's first valid cell, in [0, n_cells]."""
    if valid_from is None:
        return [np.zeros(h, dtype=np.int64) for h in heads]
    if isinstance(valid_from, np.ndarray) or not isinstance(valid_from, Sequence):
        raise TypeError(f"valid_from must be None or a list of per-layer int arrays, got {type(valid_from).__name__}")
    if len(valid_from) != len(heads):
        raise ValueError(f"valid_from must have one entry per layer ({len(heads)}), got {len(valid_from)}")
    out = []
    for i, (vf, h) in enumerate(zip(valid_from, heads)):
        a = np.asarray(vf)
        if a.ndim == 0:
            a = np.full(h, a)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"valid_from[{i}] must be an integer array, got dtype {a.dtype}")
        if a.shape != (h,):
            raise ValueError(f"valid_from[{i}] must have shape ({h},) (one start per KV head), got {a.shape}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > n_cells):
            raise ValueError(f"valid_from[{i}] values must be in [0, n_cells={n_cells}], got {a.tolist()}")
        out.append(a)
    return out


def _mask_before(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``a`` with the cells before each row's start set to -inf (a copy only if needed)."""
    if a.shape[1] == 0 or not (starts > 0).any():
        return a
    cols = np.arange(a.shape[1])
    return np.where(cols[None, :] < starts[:, None], -np.inf, a)


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AllocationConfig:
    """Cache budget and Ada-KV options shared by every policy.

    budget:    B, average cells kept per KV head, observation window included (int >= 1).
    window:    w, the observation window (the last w prompt cells, kept by every head; int >= 0).
    alpha:     Ada-KV safeguard (Feng et al., 2024, arXiv 2407.11550; kvpress
               ``AdaKVPress.alpha_safeguard``): every head first keeps its own top
               floor(alpha * B') cells (float in [0, 1]).
    max_ratio: None, or a float >= 1: no head keeps more than floor(max_ratio * B')
               selectable cells (max_h B_h + w, the width of the block; its memory is the sum).
    sinks:     the first ``sinks`` cells are always kept and count against the budget (int >= 0).
    """

    budget: int
    window: int = 32
    alpha: float = 0.2
    max_ratio: float | None = None
    sinks: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", _check_int("budget", self.budget, 1))
        object.__setattr__(self, "window", _check_int("window", self.window, 0))
        object.__setattr__(self, "alpha", _check_real("alpha", self.alpha, 0.0, 1.0, "a float in [0, 1]"))
        if self.max_ratio is not None:
            object.__setattr__(
                self,
                "max_ratio",
                _check_real("max_ratio", self.max_ratio, 1.0, None, "None or a finite float >= 1"),
            )
        object.__setattr__(self, "sinks", _check_int("sinks", self.sinks, 0))

    @property
    def selectable(self) -> int:
        """B' = budget - window, the average selectable budget per head (may be <= 0)."""
        return self.budget - self.window


# ---------------------------------------------------------------------------- top-k


def _topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the top ``k`` entries of 1-D ``x``, ties broken by the lower index.

    O(n): one ``np.partition`` finds the k-th largest value t; every entry > t is kept and
    the lowest-index entries == t fill the rest.  Callers keep k <= #(x > -inf).
    """
    n = x.shape[0]
    if k <= 0:
        return np.zeros(n, dtype=bool)
    if k >= n:
        return np.ones(n, dtype=bool)
    t = np.partition(x, n - k)[n - k]
    mask = x > t
    need = k - int(np.count_nonzero(mask))
    if need > 0:
        mask[np.flatnonzero(x == t)[:need]] = True
    return mask


# ---------------------------------------------------------------------------- allocations


def uniform_allocate(pooled: np.ndarray, selectable: int) -> np.ndarray:
    """SnapKV's uniform allocation of one layer: ``B_h = min(B', valid cells of head h)``.

    pooled: [H, n_sel] ranking scores (-inf = invalid).  Returns int64 [H].
    """
    p = _check_layer("pooled", pooled)
    _check_no_nan("pooled", p)
    n_valid = np.count_nonzero(p != -np.inf, axis=1).astype(np.int64)
    return np.minimum(n_valid, max(int(selectable), 0))


def ada_allocate(
    pooled: np.ndarray, selectable: int, alpha: float = 0.2, max_ratio: float | None = None
) -> np.ndarray:
    """Ada-KV adaptive allocation of one layer (Feng et al., 2024, arXiv 2407.11550, Alg. 1;
    the safeguarded form of NVIDIA kvpress ``AdaKVPress``).

    With ``f = floor(alpha * B')``: every head first reserves its own top ``f`` valid cells;
    the remaining ``H*B' - sum(reserved)`` slots go to the layer-wide top-k of all heads'
    other valid cells; ``B_h = reserved_h + slots won by head h``.  So ``sum_h B_h = H*B'``
    exactly, unless the layer has fewer valid cells, in which case all of them are kept (a
    head with fewer than ``f`` valid cells reserves what it has; its excess goes to the
    next-best scores of the other heads through the top-k).

    ``max_ratio``: no head takes more than ``cap = floor(max_ratio * B')`` cells; the top-k
    then runs over each head's top-``cap`` cells only, which hands a capped head's excess to
    the next-best scores of the other heads.  Caps win over the exact total (sum < H*B' only
    when the heads' capped valid counts cannot fill the layer).

    With alpha = 0 and no cap this maximizes the retained pooled score: the kept cells are
    the layer's top ``H*B'``.  Returns int64 [H].
    """
    p = _check_layer("pooled", pooled)
    _check_no_nan("pooled", p)
    n_heads, n = p.shape
    selectable = int(selectable)
    if selectable <= 0 or n_heads == 0 or n == 0:
        return np.zeros(n_heads, dtype=np.int64)
    valid = p != -np.inf
    n_valid = np.count_nonzero(valid, axis=1)
    total = n_heads * selectable
    floor_b = _floor_mul(alpha, selectable)
    cap = None if max_ratio is None else _floor_mul(max_ratio, selectable)
    if cap is None and int(n_valid.sum()) <= total:
        return n_valid.astype(np.int64)

    reserved = np.zeros(n_heads, dtype=np.int64)
    eligible = valid  # valid, not reserved, inside the head's cap
    res_mask = None
    if floor_b > 0:
        res_mask = np.zeros_like(valid)
        for h in range(n_heads):
            r = min(floor_b, int(n_valid[h]))
            reserved[h] = r
            if 0 < r < n_valid[h]:
                res_mask[h] = _topk_mask(p[h], r)
            elif r:
                res_mask[h] = valid[h]
        eligible = valid & ~res_mask
    if cap is not None:
        capped = [h for h in range(n_heads) if cap < n_valid[h]]
        if capped:
            if eligible is valid:
                eligible = valid.copy()
            for h in capped:
                eligible[h] &= _topk_mask(p[h], cap)
    slots = total - int(reserved.sum())
    n_eligible = int(np.count_nonzero(eligible))
    k = min(slots, n_eligible)
    if k >= n_eligible:
        won = np.count_nonzero(eligible, axis=1)
    else:
        x = np.where(eligible, p, -np.inf).ravel()
        won = np.count_nonzero(_topk_mask(x, k).reshape(n_heads, n), axis=1)
    return (reserved + won).astype(np.int64)


def pyramid_schedule(
    selectable: int, n_layers: int, beta: float = 20, n_selectable_cells: int | None = None
) -> np.ndarray:
    """PyramidKV per-layer selectable budgets (Cai et al., 2024, arXiv 2406.02069, eq. 6-7;
    KVCache-Factory ``PyramidKVCluster``).

    With the average ``C = B'``: ``min = C/beta``, ``max = 2C - min``,
    ``steps = (max - min)/(L-1)``, layer ``l`` gets ``max - l*steps`` (the arithmetic
    sequence averages exactly C).  If ``n_selectable_cells`` is given and ``max`` exceeds it,
    PyramidKV's own clamp applies: ``max = n_selectable_cells``, ``min = 2C - max``, which
    keeps the average at C; if ``C >= n_selectable_cells`` every layer gets all cells.
    Rounding: floor, then one more cell to each of the ``L*C - sum(floors)`` layers with the
    largest fractional parts (ties: lower layer), so the sum is exactly ``L*C`` (when
    ``C < n_selectable_cells``).  ``L = 1`` gives ``[C]``.  Returns int64 [L], each in
    ``[0, n_selectable_cells]``.
    """
    n_layers = _check_int("n_layers", n_layers, 0)
    beta = _check_real("beta", beta, 1.0, None, "a finite float >= 1")
    c = max(int(selectable), 0)
    limit = None if n_selectable_cells is None else _check_int("n_selectable_cells", n_selectable_cells, 0)
    if n_layers == 0:
        return np.zeros(0, dtype=np.int64)
    if limit is not None and c >= limit:
        return np.full(n_layers, limit, dtype=np.int64)
    if n_layers == 1:
        return np.array([c], dtype=np.int64)
    lo = Fraction(c) / _exact(beta)
    hi = 2 * c - lo
    if limit is not None and hi > limit:
        hi = Fraction(limit)
        lo = 2 * c - hi
    steps = (hi - lo) / (n_layers - 1)
    values = [hi - i * steps for i in range(n_layers)]
    floors = [math.floor(v) for v in values]
    remainder = n_layers * c - sum(floors)
    order = sorted(range(n_layers), key=lambda i: (-(values[i] - floors[i]), i))
    for i in order[:remainder]:
        floors[i] += 1
    out = np.array(floors, dtype=np.int64)
    if limit is not None:
        out = np.minimum(out, limit)
    return out


# ---------------------------------------------------------------------------- policies


@runtime_checkable
class Policy(Protocol):
    """An allocation method.

    ``rank`` turns the pooled scores into the ranking scores the method selects by (the
    score-based methods give the sink cells +inf; StreamingLLM ranks by position), and
    ``allocate`` turns ranking scores into per-head counts B_h: per layer an int array [H].
    ``needs_scores`` is False for methods that ignore the scores (pooling is skipped).
    """

    name: str
    needs_scores: bool

    def rank(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]: ...

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]: ...


def _with_sinks(layers: list[np.ndarray], sinks: int) -> list[np.ndarray]:
    """The first ``sinks`` valid cells of every head ranked +inf: its first tokens. After a
    compaction a head's valid cells begin at its start cell, where the first tokens it kept
    (its sinks among them) were moved, so the sinks are found there, not at cell 0."""
    if sinks <= 0:
        return layers
    out = []
    for a in layers:
        a = np.array(a, dtype=np.result_type(a.dtype, np.float32), copy=True)
        for row in a:
            row[np.flatnonzero(row != -np.inf)[:sinks]] = np.inf
        out.append(a)
    return out


class _ScoreRanked:
    needs_scores: ClassVar[bool] = True

    def rank(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        """Ranking scores: the pooled scores, with the first ``cfg.sinks`` valid cells at +inf."""
        _check_cfg(cfg)
        return _with_sinks(_check_layers("pooled", pooled), cfg.sinks)


@dataclass(frozen=True)
class AdaSnapKV(_ScoreRanked):
    """Ada-SnapKV (Feng et al., 2024, arXiv 2407.11550): SnapKV scores, Ada-KV adaptive
    per-head budgets inside each layer: ``B_h = floor(alpha*B') + slots won in the layer's
    top-(H*B' - H*floor(alpha*B'))``, ``sum_h B_h = H*B'`` (see :func:`ada_allocate`)."""

    name: ClassVar[str] = "ada-snapkv"

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        _check_cfg(cfg)
        layers = _check_layers("pooled", pooled)
        return [ada_allocate(p, cfg.selectable, cfg.alpha, cfg.max_ratio) for p in layers]


@dataclass(frozen=True)
class SnapKV(_ScoreRanked):
    """SnapKV (Li et al., 2024, arXiv 2404.14469): every head keeps its top ``B' = B - w``
    pooled-score cells plus the observation window (uniform allocation)."""

    name: ClassVar[str] = "snapkv"

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        _check_cfg(cfg)
        return [uniform_allocate(p, cfg.selectable) for p in _check_layers("pooled", pooled)]


def _schedule_for(layers: list[np.ndarray], cfg: AllocationConfig, beta: float) -> np.ndarray:
    n_sel = max((p.shape[1] for p in layers), default=0)
    return pyramid_schedule(cfg.selectable, len(layers), beta, n_sel)


@dataclass(frozen=True)
class _PyramidScheduled(_ScoreRanked):
    """The PyramidKV layer schedule (:func:`pyramid_schedule`, ``beta``), shared by both pyramid methods."""

    beta: float = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_real("beta", self.beta, 1.0, None, "a finite float >= 1"))

    def _layers_and_schedule(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> tuple[list[np.ndarray], Any]:
        _check_cfg(cfg)
        layers = _check_layers("pooled", pooled)
        return layers, _schedule_for(layers, cfg, self.beta)


@dataclass(frozen=True)
class PyramidKV(_PyramidScheduled):
    """PyramidKV (Cai et al., 2024, arXiv 2406.02069): layer ``l`` of ``L`` gets the selectable
    budget ``max - l*(max-min)/(L-1)`` with ``min = B'/beta``, ``max = 2B' - min``
    (:func:`pyramid_schedule`); uniform across the heads of a layer."""

    name: ClassVar[str] = "pyramidkv"

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        layers, sched = self._layers_and_schedule(pooled, cfg)
        return [uniform_allocate(p, int(c)) for p, c in zip(layers, sched)]


@dataclass(frozen=True)
class AdaPyramid(_PyramidScheduled):
    """Ada-Pyramid (Feng et al., 2024, arXiv 2407.11550, Ada-KV applied to PyramidKV): the
    PyramidKV layer schedule (:func:`pyramid_schedule`), then Ada-KV allocation inside each
    layer with that layer's ``B'_l`` (floor ``floor(alpha*B'_l)``, cap ``floor(max_ratio*B'_l)``)."""

    name: ClassVar[str] = "ada-pyramid"

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        layers, sched = self._layers_and_schedule(pooled, cfg)
        return [ada_allocate(p, int(c), cfg.alpha, cfg.max_ratio) for p, c in zip(layers, sched)]


@dataclass(frozen=True)
class StreamingLLM:
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + recent cells.

    Every head keeps cells ``[0, sinks)`` and the last ``B - sinks`` cells (window included),
    scores ignored.  The effective sink count is ``max(self.sinks, cfg.sinks)``.  Implemented
    as a ranking by position (sinks +inf, then the most recent first) with uniform ``B'``.
    """

    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False
    sinks: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "sinks", _check_int("sinks", self.sinks, 0))

    def rank(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        _check_cfg(cfg)
        layers = _check_layers("pooled", pooled)
        ranked = []
        for p in layers:
            pos = np.broadcast_to(np.arange(p.shape[1], dtype=np.float64), p.shape)
            ranked.append(np.where(p == -np.inf, -np.inf, pos))
        return _with_sinks(ranked, max(self.sinks, cfg.sinks))

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        _check_cfg(cfg)
        return [uniform_allocate(p, cfg.selectable) for p in _check_layers("pooled", pooled)]


@dataclass(frozen=True)
class Full(_ScoreRanked):
    """Full cache (no eviction): every head keeps all its valid cells; the budget is ignored."""

    name: ClassVar[str] = "full"
    needs_scores: ClassVar[bool] = False

    def allocate(self, pooled: list[np.ndarray], cfg: AllocationConfig) -> list[np.ndarray]:
        _check_cfg(cfg)
        layers = _check_layers("pooled", pooled)
        return [np.count_nonzero(p != -np.inf, axis=1).astype(np.int64) for p in layers]


METHODS: dict[str, Policy] = {
    p.name: p for p in (AdaSnapKV(), AdaPyramid(), SnapKV(), PyramidKV(), StreamingLLM(), Full())
}


def _check_cfg(cfg: object) -> AllocationConfig:
    if not isinstance(cfg, AllocationConfig):
        raise TypeError(f"cfg must be an AllocationConfig, got {type(cfg).__name__}")
    return cfg


def _resolve(method: object) -> Policy:
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        return METHODS[method]
    if isinstance(method, Policy):
        return method
    raise TypeError(f"method must be a method name {sorted(METHODS)} or a Policy, got {type(method).__name__}")


# ---------------------------------------------------------------------------- spreading


def spread_rank(pooled: np.ndarray, selectable: int, kernel: int) -> np.ndarray:
    """Spread a quarter of each head's selection over the whole prompt (pooling ``"*-spread"``).

    A window's attention after a long document falls mostly on the document's last lines (a
    "summarize" instruction holds no words that point elsewhere; docs/SELECTION.md), so the top-k
    alone keeps one stretch of text. Here each head's valid cells are split, in order, into
    ``n_seg = selectable // (4 * kernel)`` contiguous segments of equal size (``np.array_split``),
    and in every segment the head's ``kernel`` best cells (by pooled score, ties to the lower cell)
    are ranked above all other cells: their score is raised by more than the layer's score range,
    so the allocation (uniform or Ada's top-k, whose totals stay exact) takes them first, and the
    rest of the budget goes by score as before. With max pooling those ``kernel`` cells are the
    neighbourhood of the segment's best cell: one phrase per segment, about a quarter of ``B'``.

    pooled: [H, n] (-inf = invalid). Returns float64 [H, n]; unchanged when ``n_seg == 0``.
    """
    p = _check_layer("pooled", pooled).astype(np.float64)
    n_seg = max(int(selectable), 0) // (4 * kernel)
    finite = p[np.isfinite(p)]
    if n_seg == 0 or finite.size == 0:
        return p
    offset = float(finite.max() - finite.min()) + 1.0
    out = p.copy()
    for h in range(p.shape[0]):
        valid = np.flatnonzero(p[h] != -np.inf)
        for seg in np.array_split(valid, min(n_seg, valid.size)) if valid.size else ():
            top = seg[_topk_mask(p[h, seg], min(kernel, seg.size))]
            out[h, top] += offset
    return out


# ---------------------------------------------------------------------------- selection


def _select_layer(p: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    out = []
    for h in range(p.shape[0]):
        row = p[h]
        k = int(counts[h])
        valid = row != -np.inf
        n_valid = int(np.count_nonzero(valid))
        if k > n_valid:
            raise ValueError(f"counts asks head {h} for {k} cells but it has only {n_valid} valid cells")
        mask = valid if k == n_valid else _topk_mask(row, k)
        out.append(np.flatnonzero(mask).astype(np.int64))
    return out


def select(
    pooled: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    valid_from: Sequence[np.ndarray] | None = None,
) -> list[list[np.ndarray]]:
    """Per layer, per head: the sorted indices of the top ``counts[l][h]`` cells of
    ``pooled[l][h]`` (ties broken by the lower index).

    Cells that are ``-inf`` or ``< valid_from[l][h]`` are never selected; asking a head for
    more cells than it has valid raises ValueError.
    """
    layers = _check_layers("pooled", pooled)
    if isinstance(counts, np.ndarray) and counts.ndim == 2:
        counts = list(counts)
    if not isinstance(counts, Sequence) or len(counts) != len(layers):
        raise ValueError(f"counts must be a list with one int array per layer ({len(layers)})")
    n_cells = max((p.shape[1] for p in layers), default=0)
    starts = _check_valid_from(valid_from, [p.shape[0] for p in layers], n_cells)
    out = []
    for i, (p, c, vf) in enumerate(zip(layers, counts, starts)):
        c = np.asarray(c)
        if c.shape != (p.shape[0],) or (c.size and not np.issubdtype(c.dtype, np.integer)):
            raise ValueError(f"counts[{i}] must be an int array of shape ({p.shape[0]},), got {c.dtype} {c.shape}")
        if c.size and c.min() < 0:
            raise ValueError(f"counts[{i}] must be >= 0, got {c.tolist()}")
        out.append(_select_layer(_mask_before(p, vf), c))
    return out


def _check_spans(spans: object, layers: list[np.ndarray], n_cells: int) -> list[np.ndarray | None]:
    """Per layer, the span ids to apply (an int array [n_cells] or [n_head_kv, n_cells]), or None."""
    if spans is None:
        return [None] * len(layers)
    if isinstance(spans, np.ndarray) and spans.ndim == 1:
        spans = [spans] * len(layers)
    if isinstance(spans, np.ndarray) and spans.ndim == 3:
        spans = list(spans)
    if not isinstance(spans, Sequence) or len(spans) != len(layers):
        raise ValueError(f"spans must be one int array [n_cells] or one per layer ({len(layers)}), got {spans!r:.80}")
    out = []
    for i, (ids, s) in enumerate(zip(spans, layers)):
        a = np.asarray(ids)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"spans[{i}] must hold integers, got dtype {a.dtype}")
        if a.shape not in ((n_cells,), (s.shape[0], n_cells)):
            raise ValueError(f"spans[{i}] must have shape ({n_cells},) or ({s.shape[0]}, {n_cells}), got {a.shape}")
        out.append(a)
    return out


def keep_sets(
    scores: Sequence[np.ndarray],
    n_cells: int,
    method: str | Policy,
    cfg: AllocationConfig,
    kernel: int = 7,
    pooling: str = "max",
    valid_from: Sequence[np.ndarray] | None = None,
    spans: np.ndarray | Sequence[np.ndarray] | None = None,
    span_share: float | None = None,
) -> list[list[np.ndarray]]:
    """The whole pipeline: the sorted cell indices every head of every layer keeps.

    scores:     per layer, [n_head_kv, n_cells] window-summed SnapKV scores (-inf = invalid).
    n_cells:    N, the number of prefilled cells.
    method:     a key of :data:`METHODS` (or a Policy instance).
    cfg:        the budget and options (:class:`AllocationConfig`).
    kernel, pooling: SnapKV pooling of the selectable prefix (:func:`pooling.pool_scores`); the
                ``"*-spread"`` modes then spread part of each head's selection over the prompt
                (:func:`spread_rank`, with the average selectable budget ``cfg.selectable``).
    valid_from: None, or per layer an int array [H]: cells before ``valid_from[l][h]`` are
                invalid for head h.
    spans:      None, or span ids of the cells (:mod:`adakv_local.spans`): one int array [n_cells]
                for every head, or per layer [n_head_kv, n_cells]; after the pooling, every cell
                of a span ranks with the span's best cell (:func:`pooling.raise_spans`).
    span_share: None or inf (every span), or the share of the average selectable budget B' that
                the raised spans of one head may hold: ``floor(span_share * B')`` cells, the spans
                with the best scores first (``raise_spans``' ``cap``).

    Each head keeps its allocated top cells of the selectable prefix ``0 .. N-w-1`` (ranked by
    ``policy.rank``: pooled score, sinks first) plus the window ``N-w .. N-1``; invalid cells
    (``-inf`` prefix scores, cells before ``valid_from``) are never kept.  Returns
    ``out[l][h]``: sorted, unique int64 arrays.
    """
    policy = _resolve(method)
    cfg = _check_cfg(cfg)
    kernel = check_kernel(kernel)
    pooling = check_pooling(pooling)
    n_cells = _check_int("n_cells", n_cells, 0)
    if isinstance(scores, np.ndarray) and scores.ndim == 3:
        scores = list(scores)
    if not isinstance(scores, Sequence):
        raise TypeError(f"scores must be a list of per-layer [n_head_kv, n_cells] arrays, got {type(scores).__name__}")
    layers = [_check_layer(f"scores[{i}]", s, n_cells) for i, s in enumerate(scores)]
    starts = _check_valid_from(valid_from, [s.shape[0] for s in layers], n_cells)
    n_sel = n_cells - min(cfg.window, n_cells)
    span_layers = _check_spans(spans, layers, n_cells)
    span_cap = None
    if span_share is not None and span_share != math.inf:  # None and inf: every span
        span_share = _check_real("span_share", span_share, 0.0, None, "None, inf or a float >= 0")
        span_cap = _floor_mul(span_share, max(cfg.selectable, 0))

    pooled = []
    for i, (s, vf, ids) in enumerate(zip(layers, starts, span_layers)):
        prefix = s[:, :n_sel]
        _check_no_nan(f"scores[{i}]", prefix)
        prefix = _mask_before(prefix, vf)
        if policy.needs_scores:
            prefix = pool_scores(prefix, kernel, pooling)
            if ids is not None:
                prefix = raise_spans(prefix, ids[..., :n_sel], span_cap)
            if pooling.endswith("-spread"):
                prefix = spread_rank(prefix, cfg.selectable, kernel)
        pooled.append(prefix)
    ranked = policy.rank(pooled, cfg)
    counts = policy.allocate(ranked, cfg)

    out = []
    for p, c, vf in zip(ranked, counts, starts):
        sel = _select_layer(p, np.asarray(c))
        heads = []
        for h, idx in enumerate(sel):
            win = np.arange(max(n_sel, int(vf[h])), n_cells, dtype=np.int64)
            heads.append(np.concatenate([idx, win]) if win.size else idx)
        out.append(heads)
    return out
