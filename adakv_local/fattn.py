"""Python face of the op-level attention check in the native library (tests use it).

:func:`flash_attn_cpu` runs ggml's flash attention with per-KV-head start cells on the CPU
backend, through the fast path (patch 0001), the portable per-head fallback (one call per KV
head) or the per-head mask path (one stock call with a mask plane per query head).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ._native import native

FA_FAST = 0
FA_FALLBACK = 1
FA_MASK = 2

# ggml_type ids of the KV cache types we support (checked against gguf's table in the tests)
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}


def _pointer(ffi: Any, a: np.ndarray | None, ctype: str = "float *") -> Any:
    """cffi pointer to a C-contiguous array's data, or NULL."""
    return ffi.NULL if a is None else ffi.cast(ctype, a.ctypes.data)


def _mask_arg(mask: np.ndarray | None, n_q: int, n_kv: int) -> np.ndarray | None:
    """The additive mask [n_q, n_kv] as float32, C-contiguous (or None)."""
    if mask is None:
        return None
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    if mask.shape != (n_q, n_kv):
        raise ValueError(f"mask has shape {mask.shape}, expected {(n_q, n_kv)}")
    return mask


def flash_attn_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None,
    starts: np.ndarray,
    scale: float,
    *,
    kv_type: str = "f16",
    path: int = FA_FAST,
    n_threads: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention of q [n_head, n_q, d_k] over k [n_head_kv, n_kv, d_k], v [n_head_kv, n_kv, d_v].

    KV head h only sees cells >= starts[h]. Returns (out [n_q, n_head, d_v], K and V as the
    kernel read them after conversion to kv_type).
    """
    if kv_type not in GGML_TYPES:
        raise ValueError(f"kv_type must be one of {sorted(GGML_TYPES)}, got {kv_type!r}")
    n = native()
    ffi = n.ffi
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    starts = np.ascontiguousarray(starts, dtype=np.int32)
    n_head, n_q, d_k = q.shape
    n_head_kv, n_kv, d_v = v.shape
    if k.shape != (n_head_kv, n_kv, d_k):
        raise ValueError(f"k has shape {k.shape}, expected {(n_head_kv, n_kv, d_k)}")
    if starts.shape != (n_head_kv,):
        raise ValueError(f"starts has shape {starts.shape}, expected {(n_head_kv,)}")
    mask = _mask_arg(mask, n_q, n_kv)
    out = np.empty((n_q, n_head, d_v), dtype=np.float32)
    k_used = np.empty_like(k)
    v_used = np.empty_like(v)

    fp = functools.partial(_pointer, ffi)
    rc = n.lib.llama_adakv_flash_attn_cpu(
        fp(q), fp(k), fp(v), fp(mask), fp(starts, "int32_t *"),
        n_q, n_kv, n_head, n_head_kv, d_k, d_v, GGML_TYPES[kv_type], float(scale), path, n_threads,
        fp(out), fp(k_used), fp(v_used),
    )  # fmt: skip
    n.check(rc)
    return out, k_used, v_used


def flash_attn_pooled_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray | None,
    starts: np.ndarray,
    pools: np.ndarray,
    scale: float,
    *,
    kv_type: str = "f16",
    n_threads: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention with the pooled rows of patch 0004: q [n_head, n_q, d_k] over k [n_kv, n_head_kv, d_k]
    and v [n_kv, n_head_kv, d_v] laid out as a KV cache (head row r = cell * n_head_kv + head).

    KV head h sees head rows ``pools[h, 0] .. pools[h, 0] + pools[h, 1] - 1`` (mask 0), then cells
    ``>= starts[h]``. Returns (out [n_q, n_head, d_v], K and V as the kernel read them).
    """
    if kv_type not in GGML_TYPES:
        raise ValueError(f"kv_type must be one of {sorted(GGML_TYPES)}, got {kv_type!r}")
    n = native()
    ffi = n.ffi
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    starts = np.ascontiguousarray(starts, dtype=np.int32)
    pools = np.ascontiguousarray(pools, dtype=np.int32)
    n_head, n_q, d_k = q.shape
    n_kv, n_head_kv, d_v = v.shape
    if k.shape != (n_kv, n_head_kv, d_k) or starts.shape != (n_head_kv,) or pools.shape != (n_head_kv, 2):
        raise ValueError("k must be [n_kv, n_head_kv, d_k], starts [n_head_kv] and pools [n_head_kv, 2]")
    mask = _mask_arg(mask, n_q, n_kv)
    out = np.empty((n_q, n_head, d_v), dtype=np.float32)
    k_used = np.empty_like(k)
    v_used = np.empty_like(v)

    fp = functools.partial(_pointer, ffi)
    rc = n.lib.llama_adakv_flash_attn_pooled_cpu(
        fp(q), fp(k), fp(v), fp(mask), fp(starts, "int32_t *"), fp(pools, "int32_t *"),
        n_q, n_kv, n_head, n_head_kv, d_k, d_v, GGML_TYPES[kv_type], float(scale), n_threads,
        fp(out), fp(k_used), fp(v_used),
    )  # fmt: skip
    n.check(rc)
    return out, k_used, v_used


def window_scores_cpu(
    q: np.ndarray,
    k: np.ndarray,
    mask: np.ndarray | None,
    starts: np.ndarray,
    scale: float,
    *,
    kv_type: str = "f16",
    gqa_reduce: str = "mean",
    n_threads: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Window scores (the graph the model uses) of q [n_head, n_q, d] over k [n_head_kv, n_kv, d].

    Returns (scores [n_head_kv, n_kv], K as read after conversion to kv_type).
    """
    from .kvcache import GQA_REDUCE

    if kv_type not in GGML_TYPES:
        raise ValueError(f"kv_type must be one of {sorted(GGML_TYPES)}, got {kv_type!r}")
    if gqa_reduce not in GQA_REDUCE:
        raise ValueError(f"gqa_reduce must be one of {sorted(GQA_REDUCE)}, got {gqa_reduce!r}")
    n = native()
    ffi = n.ffi
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    starts = np.ascontiguousarray(starts, dtype=np.int32)
    n_head, n_q, d = q.shape
    n_head_kv, n_kv, _ = k.shape
    if k.shape != (n_head_kv, n_kv, d) or starts.shape != (n_head_kv,):
        raise ValueError("k must be [n_head_kv, n_kv, d] and starts [n_head_kv]")
    mask = _mask_arg(mask, n_q, n_kv)
    out = np.empty((n_head_kv, n_kv), dtype=np.float32)
    k_used = np.empty_like(k)

    fp = functools.partial(_pointer, ffi)
    rc = n.lib.llama_adakv_window_scores_cpu(
        fp(q), fp(k), fp(mask), fp(starts, "int32_t *"), n_q, n_kv, n_head, n_head_kv, d,
        GGML_TYPES[kv_type], GQA_REDUCE[gqa_reduce], float(scale), n_threads, fp(out), fp(k_used),
    )  # fmt: skip
    n.check(rc)
    return out, k_used
