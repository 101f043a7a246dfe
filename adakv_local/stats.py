"""The stats of one prompt evaluation: :class:`AdaKVStats`, the record ``Llama.adakv_stats`` holds,
the per-call tally :class:`StatsRun` it is made from, and :func:`record`, which makes it.

A record belongs to the evaluation that made it (STYLE.md rule 13): ``Llama.eval`` starts a fresh
``StatsRun`` per prompt and replaces ``adakv_stats`` with a fresh record, compressed or not. Bytes
come from the native memory figures (``KVCache.memory``), the one source of every KV figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .inspection import kept_matrix
from .kvcache import KVCache


@dataclass(frozen=True)
class AdaKVStats:
    """What the last prompt evaluation did to the cache: a fresh record per evaluation of a prompt
    (the tokens of one ``eval`` call; not the tokens ``generate`` decodes after it, nor those
    evaluated under ``adakv_suspended()``), whether it compressed or not; None while eviction is off
    (``adakv_config`` None) and after ``reset()``.

    ``compressed`` (``compressions > 0``): whether this evaluation evicted anything; when not,
    ``reason`` says why in words (the budget exceeds the prompt, the heads hold no more than the
    budget, the method "full"), and ``seconds`` are zeros.

    kept: int ``[n_layer, n_head_kv]`` cells each head holds after it (every model layer; layers
    that are not evicted, such as sliding-window layers, show the full length); ``kept_mean`` their
    mean over the evicted layers. footprint: R, the cache cells of the compacted block (0 when
    there is none): each layer's kept tokens are packed into its memory, so R is the sum of the
    per-head budgets divided by the number of KV heads (rounded up; the fullest layer's). For
    Ada-SnapKV and SnapKV that is the budget. ``cells_before`` / ``cells_after``: the cells the
    cache held (per layer) before this evaluation's compression (the compacted block of earlier
    turns plus the new tokens: the prompt's length on a first turn) and after it; ``freed`` the
    difference. ``budget``: in cells per head (None with the method "full").

    A prompt that does not fit the cache is read in ``chunks`` with a compression between them
    (``compressions`` counts them all, the final one included). ``peak_cells``: the most cells the
    evicted cache held at once while the prompt was read. Bytes, all from the native memory
    figures (K and V as the cache stores them: f16, q8_0, ...; sliding-window layers included):
    ``kv_bytes_before`` / ``kv_bytes`` of ``cells_before`` / ``cells_after``, ``kv_bytes_peak`` at
    the peak, ``kv_bytes_allocated`` for the context's whole KV cache (n_ctx cells).
    ``chunk_tokens`` / ``chunk_seconds`` / ``chunk_cpu_seconds``: the prompt tokens of each chunk
    and the wall time and process CPU time it took, its compression included (one entry when the
    prompt fit; with one thread, CPU time is the work done, whatever else the machine runs).

    seconds: ``scored_ubatch`` the decodes of the ubatches that carried the window: prompt reading,
    with the window's scores computed in their graph (the scoring's own extra cost is a small part
    of it, about 1% of a prefill: ``adakv-local bench --direct`` measures it), ``allocate`` the
    policy, ``compact`` the compaction (these two are eviction's own cost), each summed over the
    compressions.

    A turn of fewer new tokens than the window that takes the cache more than a window above the
    budget is compressed too: its window is completed with the cache's last ``reevaluated`` tokens,
    taken back and evaluated again. A generation that fills the cache compresses it (its last ``window`` tokens
    evaluated again as the window) and goes on: ``decode_compressions`` counts those compressions
    since this record was made, ``decode_seconds`` their wall time.
    """

    prompt_tokens: int
    budget: int | None
    method: str
    window: int
    kept: np.ndarray
    footprint: int
    freed: int
    cells_before: int
    cells_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    compressions: int = 0
    chunks: int = 1
    peak_cells: int = 0
    kv_bytes: int = 0
    kv_bytes_peak: int = 0
    kv_bytes_allocated: int = 0
    chunk_tokens: tuple[int, ...] = ()
    chunk_seconds: tuple[float, ...] = ()
    chunk_cpu_seconds: tuple[float, ...] = ()
    kv_bytes_before: int = 0
    kept_mean: float = 0.0
    reason: str = ""
    reevaluated: int = 0
    decode_compressions: int = 0
    decode_seconds: float = 0.0

    @property
    def compressed(self) -> bool:
        """Whether this evaluation evicted anything (else ``reason`` says why not)."""
        return self.compressions > 0


@dataclass
class StatsRun:
    """What the compressions of one ``eval`` call did so far: the tally :func:`record` turns into an
    :class:`AdaKVStats` (one per call, started afresh by ``Llama.eval``)."""

    peak_cells: int = 0
    peak_bytes: int = 0
    total_cells: int = 0
    compressions: int = 0
    chunks: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"scored_ubatch": 0.0, "allocate": 0.0, "compact": 0.0})
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_cpu_seconds: list[float] = field(default_factory=list)
    reevaluated: int = 0
    t_mark: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))

    def end_chunk(self, n_tokens: int) -> None:
        now = (time.perf_counter(), time.process_time())
        self.chunks += 1
        self.chunk_tokens.append(n_tokens)
        self.chunk_seconds.append(now[0] - self.t_mark[0])
        self.chunk_cpu_seconds.append(now[1] - self.t_mark[1])
        self.t_mark = now

    def note_peak(self, kv: KVCache) -> None:
        """Record the cells (and bytes) the cache holds now if that is the most so far."""
        n = kv.n_cells()
        if n >= self.peak_cells or self.peak_bytes == 0:
            self.peak_cells = max(self.peak_cells, n)
            self.peak_bytes = kv.memory().used_bytes(self.peak_cells)


def record(kv: KVCache, run: StatsRun, *, n_layer: int, n_tokens: int, budget: int | None, method: str,
           window: int, cells_before: int, reason: str) -> AdaKVStats:
    """A fresh AdaKVStats of the evaluation ``run`` tallied, from what the cache holds now (``n_tokens``:
    the tokens of the sequence; ``n_layer``: the model's layers). Bytes from the native memory figures."""
    mem = kv.memory()
    n = kv.n_cells()
    kept = kept_matrix(kv, n_layer, n_tokens)
    peak = max(run.peak_cells, n)
    return AdaKVStats(
        prompt_tokens=n_tokens,
        budget=budget,
        method=method,
        window=window,
        kept=kept,
        footprint=kv.footprint(),
        freed=cells_before - n,
        cells_before=cells_before,
        cells_after=n,
        seconds=dict(run.seconds),
        compressions=run.compressions,
        chunks=max(1, run.chunks),
        peak_cells=peak,
        kv_bytes=mem.used_bytes(n),
        kv_bytes_peak=max(run.peak_bytes, mem.used_bytes(peak)),
        kv_bytes_allocated=mem.allocated_bytes,
        chunk_tokens=tuple(run.chunk_tokens),
        chunk_seconds=tuple(run.chunk_seconds),
        chunk_cpu_seconds=tuple(run.chunk_cpu_seconds),
        kv_bytes_before=mem.used_bytes(cells_before),
        kept_mean=float(kept[list(kv.layout.layer_ids)].mean()) if kv.n_layer else float(n),
        reason=reason,
        reevaluated=run.reevaluated,
    )
