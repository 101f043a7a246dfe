"""Op level: flash attention with pooled rows (patch 0004) against a float64 numpy reference.

K and V are laid out as a KV cache holds them (cell after cell, the heads of a cell one after the
other), each KV head gets a random run of pooled head rows below its start cell and its own start
cell; the reference attends to exactly those rows (mask 0) and to the cells from the start on (with
the mask). The cases reach the kernels' three loops: one-chunk, split-KV (one query over >= 512
cells, f16) and tiled (>= the tile's queries, f16).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_fattn_op import TOL, causal_mask

from adakv_local.fattn import flash_attn_pooled_cpu

pytestmark = pytest.mark.exactness


def reference(q, k, v, mask, starts, pools, scale):
    """float64; q [H, n_q, d], k/v [n_kv, Hkv, d] (cache layout), pools [Hkv, 2] in head rows."""
    n_head, n_q, _ = q.shape
    n_kv, n_head_kv, d_v = v.shape
    g = n_head // n_head_kv
    k_rows, v_rows = k.reshape(n_kv * n_head_kv, -1), v.reshape(n_kv * n_head_kv, -1)
    out = np.zeros((n_q, n_head, d_v))
    for i in range(n_head):
        h = i // g
        s0 = int(starts[h])
        r0 = min(int(pools[h, 0]), s0 * n_head_kv)
        r1 = r0 + min(int(pools[h, 1]), s0 * n_head_kv - r0)
        keys = np.concatenate([k_rows[r0:r1], k[s0:, h]]).astype(np.float64)
        vals = np.concatenate([v_rows[r0:r1], v[s0:, h]]).astype(np.float64)
        m = np.zeros((n_q, r1 - r0))
        if mask is not None:
            m = np.concatenate([m, mask[:, s0:]], axis=1)
        s = scale * (q[i].astype(np.float64) @ keys.T) + m
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, i, :] = (p / p.sum(axis=1, keepdims=True)) @ vals
    return out


CASES = [
    # (d, n_head, n_head_kv, n_q, n_kv, block): the block is the start cell of every head
    (64, 9, 3, 1, 300, 120),  # SmolLM2's heads, decode (one-chunk)
    (128, 8, 2, 1, 700, 256),  # decode over >= 512 cells (split-KV path for f16)
    (64, 9, 3, 40, 260, 100),  # a prompt batch (tiled path for f16)
    (128, 32, 8, 5, 200, 64),  # Llama-3-8B's heads, a small batch
]


def make_case(case, kv_type, *, pooled_seed_salt=""):
    d, n_head, n_head_kv, n_q, n_kv, block = case
    rng = np.random.default_rng(zlib.crc32(repr((case, kv_type, pooled_seed_salt)).encode()))
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    mask = causal_mask(n_q, n_kv)
    starts = np.full(n_head_kv, block, np.int32)
    # consecutive runs of random lengths (>= 1) that fill at most the block's head rows
    lengths = rng.integers(1, 2 * block, size=n_head_kv)
    lengths = np.maximum(1, (lengths * (block * n_head_kv) // max(int(lengths.sum()), 1))).astype(np.int32)
    row0 = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    pools = np.stack([row0, lengths], axis=1).astype(np.int32)
    return q, k, v, mask, starts, pools, 1.0 / np.sqrt(d)


@pytest.mark.parametrize("kv_type", list(TOL))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{}_h{}_kv{}_q{}_n{}_b{}".format(*c))
def test_pooled_rows_match_reference(case, kv_type):
    q, k, v, mask, starts, pools, scale = make_case(case, kv_type)
    out, k_used, v_used = flash_attn_pooled_cpu(q, k, v, mask, starts, pools, scale, kv_type=kv_type)
    ref = reference(q, k_used, v_used, mask, starts, pools, scale)
    err = float(np.abs(out - ref).max())
    assert err <= TOL[kv_type], f"{err:.3g} > {TOL[kv_type]} ({case}, {kv_type}, pools {pools.tolist()})"


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "d{}_h{}_kv{}_q{}_n{}_b{}".format(*c))
def test_pools_are_read(case):
    """The pooled rows change the result (the test above can fail): without them the heads see
    only their cells from the start on."""
    q, k, v, mask, starts, pools, scale = make_case(case, "f16")
    with_pools, k_used, v_used = flash_attn_pooled_cpu(q, k, v, mask, starts, pools, scale)
    empty = pools.copy()
    empty[:, 1] = 0
    without, _, _ = flash_attn_pooled_cpu(q, k, v, mask, starts, empty, scale)
    np.testing.assert_allclose(without, reference(q, k_used, v_used, mask, starts, empty, scale), atol=TOL["f16"])
    assert np.abs(with_pools - without).max() > 0.1


def test_pools_outside_the_block_are_clamped():
    """Rows past the cells below the start are never read: a run that reaches past them is cut."""
    case = (64, 4, 2, 1, 200, 50)
    q, k, v, mask, starts, _, scale = make_case(case, "f16")
    pools = np.array([[60, 1000], [-5, 30]], np.int32)  # head 0 runs past the block, head 1 starts below 0
    out, k_used, v_used = flash_attn_pooled_cpu(q, k, v, mask, starts, pools, scale)
    clamped = np.array([[60, 40], [0, 30]], np.int32)
    np.testing.assert_allclose(out, reference(q, k_used, v_used, mask, starts, clamped, scale), atol=TOL["f16"])
