"""Low-level handle on a context's per-head KV eviction (the ``llama_adakv_*`` C API).

:class:`KVCache` wraps one ``llama_context`` of llama-cpp-python. It does not decide what to
keep: it scores the observation window, compacts the cache with the kept cells it is given
and reports the layout. Policies (:mod:`adakv_local.policies`) decide.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._native import Native, native
from .errors import ClosedError

GQA_REDUCE = {"mean": 0, "max": 1}
# enum llama_adakv_attn_path: how attention honours the start cells (None: from the environment)
ATTN_PATHS = {None: -1, "auto": 0, "heads": 1, "mask": 2}
# enum llama_adakv_layout: how the compacted block lies in memory (None: ADAKV_LAYOUT, else pooled)
LAYOUTS = {None: -1, "pooled": 0, "rect": 1}
# enum llama_adakv_attn_used
ATTN_USED = ("stock", "kernel", "mask", "heads", "gather-kernel", "gather-mask", "gather-heads", "pool-mask")


@dataclass(frozen=True)
class KVCacheLayout:
    """Shape of the evicted part of the cache."""

    layer_ids: tuple[int, ...]  # model layer of each evicted layer (SWA layers are not evicted)
    n_head_kv: int


@dataclass(frozen=True)
class KVMemory:
    """The KV cache of a context: its cells and the bytes of K and V per cell.

    ``cells``/``cell_bytes``: the evicted cache (every layer of most models; the global layers of
    an iSWA model such as Gemma 3). ``swa_*``: the sliding-window cache of an iSWA model (zeros
    otherwise), ``swa_used`` the cells it holds now.
    """

    cells: int
    cell_bytes: int
    swa_cells: int
    swa_cell_bytes: int
    swa_used: int

    @property
    def allocated_bytes(self) -> int:
        """Bytes of K and V allocated for the whole context (what the cache costs in memory)."""
        return self.cells * self.cell_bytes + self.swa_cells * self.swa_cell_bytes

    def used_bytes(self, n_cells: int) -> int:
        """Bytes of K and V that hold tokens when the evicted cache holds ``n_cells`` cells."""
        return n_cells * self.cell_bytes + self.swa_used * self.swa_cell_bytes


@dataclass(frozen=True)
class ComputeMemory:
    """The compute buffers of a context, all its backends together, in bytes.

    ``reserved``: what llama.cpp's last reserve sized them to (for the largest graph the context
    can build; with eviction on, every variant of the adakv part of the graph: scoring armed or
    not, a compacted block or none). ``allocated``: their size now; larger than ``reserved`` only
    if a graph outgrew the reserve (on a GPU, memory taken in the middle of a prompt).
    """

    reserved: int
    allocated: int


@dataclass(frozen=True)
class KVBlock:
    """The compacted block of the sequence (zeros but ``layout`` before a compaction).

    ``cells``: R, the cache cells the block occupies (its footprint: the pooled layout packs every
    head's kept tokens into them, so R is the sum of the per-head budgets divided by the number of
    KV heads, rounded up; the rect layout pays the largest head's budget in every head). ``width``: the most tokens one
    head keeps. ``cells_used``: cache cells the sequence uses (the block and the cells after it).
    ``view_cells``: cells of the per-head view that scores, positions and kept cells index
    (``width + cells_used - cells``).
    """

    layout: str
    cells: int
    width: int
    cells_used: int
    view_cells: int


def context_memory(llm: Any) -> KVMemory:
    """What the KV cache of a ``llama_cpp.Llama``'s context costs, eviction enabled or not (the same
    native figures as :meth:`KVCache.memory`, for a full-cache context too)."""
    n = native()
    ptr = llm.ctx.value if isinstance(llm.ctx, ctypes.c_void_p) else llm.ctx
    if not ptr:
        raise ValueError("the Llama has no llama_context (closed?)")
    return _read_memory(n, n.ffi.cast("struct llama_context *", int(ptr)))


def _read_memory(n: Native, ctx: Any) -> KVMemory:
    out = n.ffi.new("struct llama_adakv_memory *")
    n.check(n.lib.llama_adakv_get_memory(ctx, out))
    return KVMemory(out.cells, out.cell_bytes, out.swa_cells, out.swa_cell_bytes, out.swa_used)


class KVCache:
    """Per-head eviction on one llama.cpp context (sequence 0).

    Enabling is refused with :class:`~adakv_local.errors.NativeInvalidArgument` (message from the
    C library) when flash attention is off, the context holds more than one sequence, or the
    model is not supported.

    ``attn_path``: "auto" (the start cells inside the flash-attention kernel where the backend has
    them, else the per-head mask, else one call per KV head), "heads", "mask", or None to read
    ``ADAKV_ATTN_PATH`` (or ``ADAKV_FORCE_FALLBACK=1``, heads) from the environment.
    ``force_fallback=True`` is ``attn_path="heads"``, ``False`` is "auto". ``layout``: "pooled" (the
    block costs the sum of the per-head budgets), "rect" (the largest head's budget in every head;
    kept for comparisons), or None to read ``ADAKV_LAYOUT`` (default pooled).
    """

    def __init__(
        self, ctx: Any, *, gqa_reduce: str = "mean", force_fallback: bool | None = None, attn_path: str | None = None,
        layout: str | None = None,
    ) -> None:
        if gqa_reduce not in GQA_REDUCE:
            raise ValueError(f"gqa_reduce must be one of {sorted(GQA_REDUCE)}, got {gqa_reduce!r}")
        if attn_path not in ATTN_PATHS:
            raise ValueError(f"attn_path must be one of auto, heads, mask or None, got {attn_path!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of pooled, rect or None, got {layout!r}")
        if force_fallback is not None:
            if attn_path is not None:
                raise ValueError("give attn_path or force_fallback, not both")
            attn_path = "heads" if force_fallback else "auto"
        self._n: Native = native()
        ptr = ctx.value if isinstance(ctx, ctypes.c_void_p) else ctx
        if not ptr:
            raise ValueError("ctx is a NULL llama_context pointer")
        self._ctx_ptr: Any = self._n.ffi.cast("struct llama_context *", int(ptr))
        lib = self._n.lib
        #: the GQA reduction this handle enabled the context with; None when the context was
        #: enabled before (by another handle), whose reduction and attention path stay in force
        self.gqa_reduce: str | None = None
        if not lib.llama_adakv_is_enabled(self._ctx):
            params = lib.llama_adakv_default_params()
            params.gqa_reduce = GQA_REDUCE[gqa_reduce]
            params.attn_path = ATTN_PATHS[attn_path]
            params.layout = LAYOUTS[layout]
            self._n.check(lib.llama_adakv_enable(self._ctx, params))
            self.gqa_reduce = gqa_reduce
        n_layer = self._count(lib.llama_adakv_n_layer(self._ctx))
        ids = np.zeros(n_layer, dtype=np.int32)
        self._n.check(lib.llama_adakv_layer_ids(self._ctx, self._ptr(ids, "int32_t *")))
        self.layout = KVCacheLayout(tuple(int(i) for i in ids), self._count(lib.llama_adakv_n_head_kv(self._ctx)))

    @classmethod
    def from_llama(cls, llm: Any, **kwargs: Any) -> KVCache:
        """Handle on the context of a ``llama_cpp.Llama``."""
        return cls(llm.ctx, **kwargs)

    @property
    def _ctx(self) -> Any:
        """The llama_context, or ClosedError once :meth:`close` has been called (its owner freed it)."""
        if self._ctx_ptr is None:
            raise ClosedError("this KV-cache handle was closed with its Llama (close()): its llama_context is "
                              "freed; make a new Llama and take its adakv_kvcache")
        return self._ctx_ptr

    @property
    def closed(self) -> bool:
        return self._ctx_ptr is None

    def close(self) -> None:
        """Forget the context (its owner is about to free it): every later call raises ClosedError
        instead of reaching freed memory. Idempotent; the context itself is not touched."""
        self._ctx_ptr = None

    # helpers

    def _ptr(self, a: np.ndarray, ctype: str) -> Any:
        if not a.flags.c_contiguous:
            raise ValueError("array must be C-contiguous")
        return self._n.ffi.cast(ctype, a.ctypes.data)

    def _count(self, rc: int) -> int:
        if rc < 0:
            self._n.check(rc)
        return int(rc)

    # layout

    @property
    def n_layer(self) -> int:
        return len(self.layout.layer_ids)

    @property
    def n_head_kv(self) -> int:
        return self.layout.n_head_kv

    @functools.cached_property
    def block_layout(self) -> str:
        """How the compacted block lies in memory ("pooled" or "rect"): fixed when eviction is
        enabled, so read once."""
        return self.block().layout

    def block(self) -> KVBlock:
        """The compacted block and the cells the sequence uses."""
        out = self._n.ffi.new("struct llama_adakv_block *")
        self._n.check(self._n.lib.llama_adakv_get_block(self._ctx, out))
        layout = next(k for k, v in LAYOUTS.items() if v == out.layout)
        return KVBlock(str(layout), out.cells, out.width, out.cells_used, out.view_cells)

    def n_cells(self) -> int:
        """Cache cells the sequence uses (memory: the compacted block and the cells after it)."""
        return self.block().cells_used

    def view_cells(self) -> int:
        """Cells of the per-head view held by the sequence, ``[0, view_cells)``: what scores,
        positions, starts and kept cells index (the block's width, then the cells after the block)."""
        return self._count(self._n.lib.llama_adakv_n_cells(self._ctx))

    def footprint(self) -> int:
        """R: cache cells of the compacted block (0 if nothing is compacted)."""
        return self._count(self._n.lib.llama_adakv_footprint(self._ctx))

    def starts(self) -> np.ndarray:
        """int32 ``[n_layer, n_head_kv]``: first valid view cell of every head."""
        out = np.zeros((self.n_layer, self.n_head_kv), dtype=np.int32)
        self._n.check(self._n.lib.llama_adakv_get_starts(self._ctx, self._ptr(out, "int32_t *")))
        return out

    def attn_used(self) -> list[str]:
        """Per evicted layer, how the last graph built applied the block: "stock" (nothing
        compacted), "kernel" (inside the flash-attention kernel), "mask" (a per-head mask on the
        stock kernel) or "heads" (one stock call per KV head); "gather-" before the last three: a
        pooled block gathered into a rectangle for the ubatch with stock ops first."""
        out = np.zeros(self.n_layer, dtype=np.int32)
        self._n.check(self._n.lib.llama_adakv_get_attn_used(self._ctx, self._ptr(out, "int32_t *")))
        return [ATTN_USED[int(i)] for i in out]

    def positions(self, n_cells: int | None = None) -> np.ndarray:
        """int32 ``[n_layer, n_head_kv, n_cells]``: the original position of the token each cell holds
        for each head (the compacted block holds different tokens per head), -1 where it holds none
        for that head. Kept by the library, so it is part of a saved state."""
        n_cells = self.view_cells() if n_cells is None else n_cells
        out = np.zeros((self.n_layer, self.n_head_kv, n_cells), dtype=np.int32)
        self._n.check(self._n.lib.llama_adakv_get_positions(self._ctx, self._ptr(out, "int32_t *"), int(n_cells)))
        return out

    def memory(self) -> KVMemory:
        """What the context's KV cache costs, in cells and bytes (sliding-window layers included)."""
        return _read_memory(self._n, self._ctx)

    def compute_memory(self) -> ComputeMemory:
        """What the context's compute buffers cost, reserved and allocated now (see ComputeMemory)."""
        out = self._n.ffi.new("struct llama_adakv_compute_memory *")
        self._n.check(self._n.lib.llama_adakv_get_compute_memory(self._ctx, out))
        return ComputeMemory(out.reserved, out.allocated)

    def clear_last_error(self) -> None:
        """Forget the library's last error message (of this thread)."""
        self._n.lib.llama_adakv_clear_last_error()

    def last_error(self) -> str:
        """The library's last error message of this thread ("" if none)."""
        return self._n.ffi.string(self._n.lib.llama_adakv_last_error()).decode("utf-8", "replace")

    # scores

    def arm_scores(self, window: int) -> None:
        """Score the next decode call: the last ``window`` tokens of its last ubatch are the
        observation window (that ubatch may hold more tokens before them)."""
        self._n.check(self._n.lib.llama_adakv_arm_scores(self._ctx, int(window)))

    def read_scores(self, n_cells: int | None = None) -> np.ndarray:
        """float32 ``[n_layer, n_head_kv, n_cells]`` window scores of the armed decode; disarms."""
        n_cells = self.view_cells() if n_cells is None else n_cells
        out = np.zeros((self.n_layer, self.n_head_kv, n_cells), dtype=np.float32)
        self._n.check(self._n.lib.llama_adakv_read_scores(self._ctx, self._ptr(out, "float *"), int(n_cells)))
        return out

    # compaction

    def compact(self, kept: Sequence[Sequence[np.ndarray]]) -> int:
        """Keep ``kept[layer][head]`` (increasing view cells) and compact; returns the footprint R."""
        if len(kept) != self.n_layer or any(len(k) != self.n_head_kv for k in kept):
            raise ValueError(f"kept must be [n_layer={self.n_layer}][n_head_kv={self.n_head_kv}] arrays of cells")
        counts = np.array([[len(c) for c in layer] for layer in kept], dtype=np.int32)
        cells = np.concatenate([np.asarray(c, dtype=np.int32).ravel() for layer in kept for c in layer])
        cells = np.ascontiguousarray(cells, dtype=np.int32)
        self._n.check(
            self._n.lib.llama_adakv_compact(self._ctx, self._ptr(counts, "int32_t *"), self._ptr(cells, "int32_t *"))
        )
        return self.footprint()

    def read_rows(self, layer: int, which: str, cell0: int, n_cells: int) -> np.ndarray:
        """Raw bytes ``uint8 [n_cells, n_head_kv, row_size]`` of K (``which="k"``) or V rows of view cells
        ``[cell0, cell0 + n_cells)`` (zeros where a view cell holds nothing for a head)."""
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v', got {which!r}")
        is_v = int(which == "v")
        row = self._count(self._n.lib.llama_adakv_row_size(self._ctx, layer, is_v))
        out = np.zeros((n_cells, self.n_head_kv, row), dtype=np.uint8)
        self._n.check(
            self._n.lib.llama_adakv_read_rows(
                self._ctx, layer, is_v, cell0, n_cells, self._ptr(out, "void *"), out.nbytes
            )
        )
        return out

    # attention-output capture (evaluation)

    def arm_capture(self, n_tokens: int) -> None:
        """Copy every evicted layer's attention output of each later ubatch of at most ``n_tokens``
        tokens (0 disarms and frees the buffers)."""
        self._n.check(self._n.lib.llama_adakv_arm_capture(self._ctx, int(n_tokens)))

    def read_capture(self, n_tokens: int) -> np.ndarray:
        """float32 ``[n_layer, n_tokens, n_head * d_v]``: the attention outputs (before the output
        projection) of the last captured ubatch, which must have had ``n_tokens`` tokens."""
        width = self._count(self._n.lib.llama_adakv_capture_width(self._ctx))
        out = np.zeros((self.n_layer, n_tokens, width), dtype=np.float32)
        self._n.check(self._n.lib.llama_adakv_read_capture(self._ctx, self._ptr(out, "float *"), int(n_tokens)))
        return out
