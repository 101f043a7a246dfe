"""What the compressed cache holds, per model layer and KV head: plain functions over a
:class:`~adakv_local.kvcache.KVCache` handle and the sequence's ``n_tokens`` (llama-cpp-python's token
history: positions at or past it are not the sequence's, e.g. after ``reset()``).

``Llama.adakv_kept_positions()`` and the ``kept`` matrix of ``AdaKVStats`` are made here. Layers
that are not evicted (sliding-window layers) hold every position of the sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .kvcache import KVCache


def model_n_layer(model: Any) -> int:
    """The model's layers (every one, evicted or not) of a llama.cpp model pointer (``Llama.model``)."""
    import llama_cpp  # bound to our libllama by whoever made the model

    return int(llama_cpp.llama_model_n_layer(model))


def cell_positions(kv: KVCache, n_cells: int) -> list[list[np.ndarray]]:
    """Original position of every valid cell [start, n_cells) of each evicted layer and head,
    as the native library records them (the compacted block, then the tokens after it)."""
    positions, starts = kv.positions(n_cells).astype(np.int64), kv.starts()
    return [[positions[i, h, starts[i, h] :] for h in range(kv.n_head_kv)] for i in range(kv.n_layer)]


def kept_positions(kv: KVCache, n_layer: int, n_tokens: int) -> list[list[np.ndarray]]:
    """Per model layer (``n_layer`` of them), per KV head: the sorted original token positions the
    cache holds, those below ``n_tokens`` only."""
    per_layer = [[p[p < n_tokens] for p in layer] for layer in cell_positions(kv, kv.view_cells())]
    everything = np.arange(n_tokens, dtype=np.int64)
    out: list[list[np.ndarray]] = [[everything] * kv.n_head_kv for _ in range(n_layer)]
    for i, il in enumerate(kv.layout.layer_ids):
        out[il] = per_layer[i]
    return out


def kept_matrix(kv: KVCache, n_layer: int, n_tokens: int) -> np.ndarray:
    """int64 ``[n_layer, n_head_kv]``: the cells each head holds (``n_tokens`` in layers not evicted)."""
    kept = np.full((n_layer, kv.n_head_kv), n_tokens, dtype=np.int64)
    n, starts = kv.view_cells(), kv.starts()
    for i, il in enumerate(kv.layout.layer_ids):
        kept[il] = n - starts[i]
    return kept
