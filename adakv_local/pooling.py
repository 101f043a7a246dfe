"""SnapKV score pooling: a 1-D pooling of attention scores along the cells.

SnapKV (Li et al., 2024, arXiv 2404.14469, section 4.2) smooths the observation-window
attention scores with a 1-D pooling (kernel 7 in its reference code) before the top-k,
so that a kept cell brings its neighbours' information with it.  The pooling here is a
pure-numpy equivalent of ``torch.nn.functional.max_pool1d`` / ``avg_pool1d`` with
``stride=1`` and ``padding=kernel // 2`` ("same" length output), vectorized with
:func:`numpy.lib.stride_tricks.sliding_window_view`.

Conventions (deliberate, documented choices):

* ``-inf`` marks an *invalid* cell (masked for that head: before the head's first valid
  cell, outside a sliding window, ...).  Invalid cells are treated exactly like the
  padding: they contribute nothing to their neighbours, and they stay ``-inf`` in the
  output, so pooling never makes an invalid cell selectable.
* ``mode="max"``: the padding is ``-inf`` (as in ``max_pool1d``).
* ``mode="avg"``: the mean over the *in-range, valid* elements of the window only
  (like ``avg_pool1d(..., count_include_pad=False)``; kvpress/PyramidKV use the default
  ``count_include_pad=True``, which divides the edge cells by the full kernel).  Dividing
  by the real count keeps the first and last cells comparable with the others.
* ``NaN`` is rejected (ValueError).  ``+inf`` is allowed and propagates.
* ``mode="max-fill"`` (and ``"max-fill-spread"``): :func:`fill_gaps` (reach ``kernel``) first,
  then max pooling.  ``"max-spread"`` pools like ``"max"`` here; the spreading is a selection
  step done by :mod:`adakv_local.policies`, which knows the budget.

This module imports nothing from the rest of ``adakv_local``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["POOLING_MODES", "check_kernel", "check_pooling", "fill_gaps", "pool_prefix", "pool_scores", "raise_spans"]

#: "max" and "avg": SnapKV's pooling. "max-fill": max pooling of the scores after
#: :func:`fill_gaps` with reach ``kernel``: a cell that lies between two high-scoring cells at
#: most ``2 * kernel`` cells apart ranks as high as the lower of the two, so a kept
#: phrase or number is kept whole (a 5-digit number, one token per digit, between the words the
#: question attends to). "max-spread" and "max-fill-spread": the same pooling, then each head's
#: selection is spread over the prompt (:func:`adakv_local.policies.spread_rank`).
#: "max2": pooling in two scales, ``max(max pool over kernel, max pool over 2 * kernel + 1 / 2)``:
#: the neighbourhood of a strong cell is twice as wide as that of a weak one (half its score
#: still outranks a weak cell), so what follows the words a question attends to is kept.
POOLING_MODES = ("max", "avg", "max-fill", "max-spread", "max-fill-spread", "max2")


def check_kernel(kernel: object) -> int:
    """Return ``kernel`` as an int, or raise: it must be an odd integer >= 1."""
    if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)):
        raise TypeError(f"kernel must be an odd integer >= 1, got {kernel!r} ({type(kernel).__name__})")
    kernel = int(kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd integer >= 1, got {kernel}")
    return kernel


def check_pooling(mode: object) -> str:
    """Return ``mode`` or raise: it must be one of ``"max"``, ``"avg"``."""
    if not isinstance(mode, str):
        raise TypeError(f"pooling must be one of {POOLING_MODES}, got {mode!r} ({type(mode).__name__})")
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    return mode


def _window_reduce(view: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """Reduce a ``sliding_window_view`` over its window axis, one window offset at a time.

    Equivalent to ``ufunc.reduce(view, axis=-1)`` (same left-to-right order), but each step
    is a contiguous-stride vector op over all cells: ~30x faster than reducing the short,
    innermost window axis directly (8 x 131040 float32, kernel 7: 3 ms vs 95 ms).
    """
    out = np.array(view[..., 0], copy=True)
    for j in range(1, view.shape[-1]):
        ufunc(out, view[..., j], out=out)
    return out


def fill_gaps(scores: np.ndarray, reach: int) -> np.ndarray:
    """Raise every cell to the lower of the highest scores within ``reach`` cells on its left and
    on its right (along the last axis): ``out[j] = max(x[j], min(max x[j-reach:j], max x[j+1:j+reach+1]))``.

    A cell between two high-scoring cells at most ``2 * reach`` apart ranks as high as the lower
    of them; a cell with nothing higher on one side (the edges included) keeps its score. Invalid
    (``-inf``) cells are ignored by their neighbours and stay ``-inf``.
    """
    if isinstance(reach, bool) or not isinstance(reach, (int, np.integer)) or reach < 0:
        raise ValueError(f"reach must be an integer >= 0, got {reach!r}")
    x = np.asarray(scores)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    n = x.shape[-1]
    if reach == 0 or n == 0:
        return np.array(x, copy=True)
    reach = int(reach)
    pad = [(0, 0)] * (x.ndim - 1)
    padded = np.pad(x, pad + [(reach, reach)], constant_values=-np.inf)
    view = sliding_window_view(padded, reach, axis=-1)  # view[..., i, :] = padded[i : i + reach]
    left = _window_reduce(view[..., :n, :], np.maximum)  # x[j-reach : j]
    right = _window_reduce(view[..., reach + 1 : reach + 1 + n, :], np.maximum)  # x[j+1 : j+reach+1]
    out = np.maximum(x, np.minimum(left, right))
    out[x == -np.inf] = -np.inf
    return out


def pool_scores(scores: np.ndarray, kernel: int = 7, mode: str = "max") -> np.ndarray:
    """Pool ``scores`` along its last axis with a centred window of ``kernel`` cells.

    Stride 1, same length as the input (any leading shape; works for fewer cells than
    ``kernel``, and for zero cells).  Returns float64 for ``"avg"``; ``"max"`` keeps a
    floating input dtype (it only selects values) and gives float64 for integer input.
    ``-inf`` inputs are invalid cells: ignored by their neighbours and kept ``-inf``.
    ``kernel=1`` returns a copy of the input (as float).
    """
    kernel = check_kernel(kernel)
    mode = check_pooling(mode)
    x = np.asarray(scores)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"scores must be a real numeric array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("scores must have at least one dimension (the cells)")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if mode == "avg":
        x = x.astype(np.float64, copy=False)
    if np.isnan(x).any():
        raise ValueError("scores must not contain NaN (use -inf for invalid cells)")
    n = x.shape[-1]
    if mode in ("max-fill", "max-fill-spread"):
        x = fill_gaps(x, kernel)
    if mode == "max2":
        return np.maximum(pool_scores(x, kernel, "max"), pool_scores(x, 2 * kernel + 1, "max") / 2)
    if mode != "avg":
        mode = "max"
    if kernel == 1 or n == 0:
        return np.array(x, copy=True)
    half = kernel // 2
    invalid = x == -np.inf
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    if mode == "max":
        padded = np.pad(x, pad, mode="constant", constant_values=-np.inf)
        out = _window_reduce(sliding_window_view(padded, kernel, axis=-1), np.maximum)
    else:
        vals = np.where(invalid, 0.0, x)
        present = (~invalid).astype(np.float64)
        sums = _window_reduce(sliding_window_view(np.pad(vals, pad), kernel, axis=-1), np.add)
        counts = _window_reduce(sliding_window_view(np.pad(present, pad), kernel, axis=-1), np.add)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = sums / counts  # counts >= 1 wherever the cell itself is valid
    out[invalid] = -np.inf
    return out


def pool_prefix(scores: np.ndarray, n_selectable: int, kernel: int = 7, mode: str = "max") -> np.ndarray:
    """Pool only the selectable prefix ``scores[..., :n_selectable]`` (the cells before the
    observation window); the window's own scores never leak into the prefix's pooled values.

    Returns an array of shape ``scores.shape[:-1] + (n_selectable,)``.
    """
    x = np.asarray(scores)
    if isinstance(n_selectable, bool) or not isinstance(n_selectable, (int, np.integer)):
        raise TypeError(f"n_selectable must be an integer, got {n_selectable!r}")
    if not 0 <= n_selectable <= x.shape[-1]:
        raise ValueError(f"n_selectable must be in [0, {x.shape[-1]}], got {n_selectable}")
    return pool_scores(x[..., : int(n_selectable)], kernel=kernel, mode=mode)


def raise_spans(scores: np.ndarray, ids: np.ndarray, cap: int | None = None) -> np.ndarray:
    """Raise every cell to the highest score of its span (along the last axis).

    ``ids`` (broadcast to ``scores``' shape, integers) names each cell's span: consecutive cells
    with the same id ``>= 0`` form one span, and each of them gets the span's highest score, so
    a span is ranked, and kept, as a whole (a number written one token per digit:
    :mod:`adakv_local.spans`). A cell with a negative id is a span of its own. Invalid
    (``-inf``) cells neither lend their score nor take one: they stay ``-inf``. The dtype of a
    floating input is kept.

    ``cap``: None (every span is raised), or the most cells the raised spans of one row (one
    head) may hold: the spans of two or more cells are taken by their best score, highest first
    (the earlier span on a tie), while their lengths add up to at most ``cap``; the others rank
    cell by cell as without spans. A table of numbers then does not give most of a head's budget
    to whole numbers (docs/SELECTION.md).
    """
    x = np.asarray(scores)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.ndim == 0:
        raise ValueError("scores must have at least one dimension (the cells)")
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"span ids must be integers, got dtype {ids.dtype}")
    try:
        ids = np.broadcast_to(ids, x.shape)
    except ValueError:
        raise ValueError(f"span ids of shape {ids.shape} do not match scores of shape {x.shape}") from None
    n = x.shape[-1]
    if n == 0 or x.size == 0:
        return np.array(x, copy=True)
    flat = x.reshape(-1, n)
    fid = ids.reshape(-1, n)
    new = np.ones(flat.shape, dtype=bool)  # True where a span starts (each row starts one)
    new[:, 1:] = (fid[:, 1:] != fid[:, :-1]) | (fid[:, 1:] < 0)
    starts = np.flatnonzero(new.ravel())
    best = np.maximum.reduceat(flat.ravel(), starts)
    lengths = np.diff(np.append(starts, flat.size))
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 0:
            raise ValueError(f"cap must be None or an integer >= 0, got {cap!r}")
        best = np.where(_taken_spans(starts // n, best, lengths, int(cap)), best, best.dtype.type(-np.inf))
    out = np.maximum(np.repeat(best, lengths).reshape(x.shape), x)
    out[x == -np.inf] = -np.inf
    return out


def _taken_spans(rows: np.ndarray, best: np.ndarray, lengths: np.ndarray, cap: int) -> np.ndarray:
    """Which spans raise_spans raises under ``cap``: per row, the spans of two or more cells in
    order of best score (highest first, the earlier on a tie) while their lengths add up to at most
    ``cap``. ``rows``, ``best``, ``lengths``: per span, in row-major order."""
    take = np.zeros(best.shape, dtype=bool)
    cand = np.flatnonzero((lengths > 1) & (best > -np.inf))
    # one stable sort for all rows: by row, then best score descending, then position
    order = cand[np.lexsort((cand, -best[cand], rows[cand]))]
    if order.size == 0:
        return take
    r = rows[order]
    total = np.cumsum(lengths[order])
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # where each row's candidates start
    before = np.repeat(total[first] - lengths[order][first], np.diff(np.r_[first, order.size]))
    take[order] = total - before <= cap
    return take
