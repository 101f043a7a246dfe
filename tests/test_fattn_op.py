"""Op level: flash attention with per-KV-head start cells (patch 0001 + native fallbacks).

The CPU fast path (one ggml_flash_attn_ext with starts), the per-head mask path (one stock call
with a mask plane per query head), the portable fallback (one stock call per KV head over
[start[h], n_kv)) and a float64 numpy reference of per-head masked attention must agree on
random inputs.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from adakv_local.fattn import FA_FALLBACK, FA_FAST, FA_MASK, GGML_TYPES, flash_attn_cpu

pytestmark = pytest.mark.exactness


def reference(q, k, v, mask, starts, scale):
    """float64 per-head masked attention; q [H, n_q, d], k/v [Hkv, n_kv, d], mask [n_q, n_kv]."""
    n_head, n_q, _ = q.shape
    n_head_kv, n_kv, d_v = v.shape
    g = n_head // n_head_kv
    out = np.zeros((n_q, n_head, d_v))
    for i in range(n_head):
        h = i // g
        s = scale * (q[i].astype(np.float64) @ k[h].astype(np.float64).T)  # [n_q, n_kv]
        if mask is not None:
            s = s + mask
        s[:, : starts[h]] = -np.inf
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        p /= p.sum(axis=1, keepdims=True)
        out[:, i, :] = p @ v[h].astype(np.float64)
    return out


def causal_mask(n_q, n_kv):
    """Queries are the last n_q cells: query i sees cells <= n_kv - n_q + i."""
    m = np.zeros((n_q, n_kv), dtype=np.float32)
    for i in range(n_q):
        m[i, n_kv - n_q + i + 1 :] = -np.inf
    return m


# (kv type, tolerance on |out - ref|). Outputs are convex combinations of V rows drawn from
# N(0, 1). Measured worst errors over CASES are written after each value.
# f32: exact arithmetic up to float32 rounding of the dot products and the online softmax
# (~1e-6 relative); 1e-5 leaves room for n_kv up to a few thousand (measured 6e-7). f16: the CPU kernel
# stores K/V in f16 (handled: the reference uses the converted K/V) but also converts Q to f16
# and accumulates V*softmax in an f16 accumulator: ~2^-11 relative per step, so 1e-2 (3e-3).
# q8_0 / q4_0: Q is quantized to q8_0 for the dot products (~1/127 of the block's max, i.e.
# ~2e-2 absolute on each score of size ~5); softmax turns that into < 4e-2 on the output
# (measured 1.2e-2 for q8_0, 6e-3 for q4_0).
TOL = {"f32": 1e-5, "f16": 1e-2, "q8_0": 4e-2, "q4_0": 4e-2}

CASES = [
    # (d, n_head, n_head_kv, n_q, n_kv)
    (64, 4, 4, 1, 96),  # GQA 1, decode
    (64, 9, 3, 7, 160),  # GQA 3, a small batch (SmolLM2's heads)
    (128, 8, 2, 1, 600),  # GQA 4, decode over >= 512 cells (split-KV path)
    (128, 4, 1, 40, 200),  # GQA 4, a prompt batch (tiled path for f32/f16)
    (64, 6, 2, 64, 300),  # GQA 3, tiled
]


@pytest.mark.parametrize("kv_type", list(TOL))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{}_h{}_kv{}_q{}_n{}".format(*c))
def test_fast_and_fallback_match_reference(case, kv_type):
    d, n_head, n_head_kv, n_q, n_kv = case
    rng = np.random.default_rng(zlib.crc32(repr((case, kv_type)).encode()))  # seeded per case
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    mask = causal_mask(n_q, n_kv)
    # random starts, always leaving each query at least one visible cell
    starts = rng.integers(1, n_kv - n_q + 1, size=n_head_kv).astype(np.int32)
    scale = 1.0 / np.sqrt(d)

    fast, k_used, v_used = flash_attn_cpu(q, k, v, mask, starts, scale, kv_type=kv_type, path=FA_FAST)
    fall, _, _ = flash_attn_cpu(q, k, v, mask, starts, scale, kv_type=kv_type, path=FA_FALLBACK)
    masked, _, _ = flash_attn_cpu(q, k, v, mask, starts, scale, kv_type=kv_type, path=FA_MASK)
    ref = reference(q, k_used, v_used, mask, starts, scale)

    info = f"case={case} kv_type={kv_type} starts={starts.tolist()}"
    tol = TOL[kv_type]
    assert np.all(np.isfinite(fast)), info
    err_fast = np.abs(fast - ref).max()
    err_fall = np.abs(fall - ref).max()
    assert err_fast <= tol, f"fast path vs reference: {err_fast:.3g} > {tol} ({info})"
    assert err_fall <= tol, f"fallback vs reference: {err_fall:.3g} > {tol} ({info})"
    # same kernels per head: only the tiled / one-chunk choice differs (float32 rounding)
    err_pair = np.abs(fast - fall).max()
    assert err_pair <= 1e-5, f"fast path vs fallback: {err_pair:.3g} > 1e-5 ({info})"
    # the mask path runs the stock kernel over every cell: exp(-inf) of the cells below a start
    # adds exactly 0, so only the tile boundaries of the online softmax differ (float32 rounding)
    err_mask = np.abs(masked - fast).max()
    assert err_mask <= 1e-5, f"mask path vs fast path: {err_mask:.3g} > 1e-5 ({info})"
    # the case can fail: a kernel that ignored the starts would be off by more than 2 * tol
    ref_no_starts = reference(q, k_used, v_used, mask, np.zeros_like(starts), scale)
    assert np.abs(ref_no_starts - ref).max() > 2 * tol, info


def test_all_starts_zero_equals_plain_attention():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((4, 3, 64)).astype(np.float32)
    k = rng.standard_normal((2, 50, 64)).astype(np.float32)
    v = rng.standard_normal((2, 50, 64)).astype(np.float32)
    z = np.zeros(2, dtype=np.int32)
    a, _, _ = flash_attn_cpu(q, k, v, None, z, 0.125, kv_type="f16", path=FA_FAST)
    b, _, _ = flash_attn_cpu(q, k, v, None, z, 0.125, kv_type="f16", path=FA_FALLBACK)
    # one head at a time runs the same kernel over the same cells in the same order
    np.testing.assert_array_equal(a, b)


def clamped_reference(q, k, v, mask, starts, scale):
    """reference() with each start clamped to [0, n_kv]; a head that sees no cell outputs 0."""
    n_kv = k.shape[1]
    clamped = np.clip(starts, 0, n_kv)
    visible = np.clip(clamped, 0, n_kv - 1)
    out = reference(q, k, v, mask, visible, scale)
    g = q.shape[0] // k.shape[0]
    for h in np.flatnonzero(clamped >= n_kv):
        out[:, h * g : (h + 1) * g, :] = 0.0
    return out


# (n_q, n_kv): decode (one-chunk path) and a batch that takes the tiled path for f16
@pytest.mark.parametrize("n_q, n_kv", [(1, 96), (1, 700), (40, 200)])
def test_fast_path_clamps_starts_outside_the_cells(n_q, n_kv):
    """The kernels clamp a start to [0, n_kv] (patch 0001): below 0 reads from cell 0, n_kv or
    more leaves the head no cell (outputs 0, as a fully masked row). The tiled path used to
    start its loop at the raw value and read before the tensor."""
    rng = np.random.default_rng(zlib.crc32(repr(("clamp", n_q, n_kv)).encode()))
    d, n_head, n_head_kv = 64, 8, 4
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    starts = np.array([-5, n_kv + 3, n_kv, -(2**31)], dtype=np.int32)
    out, k_used, v_used = flash_attn_cpu(q, k, v, None, starts, 0.125, kv_type="f16", path=FA_FAST)
    ref = clamped_reference(q, k_used, v_used, None, starts, 0.125)
    info = f"n_q={n_q} n_kv={n_kv} starts={starts.tolist()}"
    assert np.all(np.isfinite(out)), info
    err = np.abs(out - ref).max()
    assert err <= TOL["f16"], f"{err:.3g} > {TOL['f16']} ({info})"
    # heads 1 and 2 see no cell: exactly 0, not merely small
    assert not out[:, 2:6, :].any(), info


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"starts": np.array([0, 50], dtype=np.int32), "path": FA_FALLBACK}, "outside"),
        ({"starts": np.array([-1, 0], dtype=np.int32), "path": FA_FALLBACK}, "outside"),
        ({"starts": np.array([0, 50], dtype=np.int32), "path": FA_MASK}, "outside"),
        ({"kv_type": "q4_0", "d": 48}, "not a usable KV cache type"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    from adakv_local.errors import NativeInvalidArgument

    d = kwargs.pop("d", 64)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 1, d)).astype(np.float32)
    k = rng.standard_normal((2, 50, d)).astype(np.float32)
    v = rng.standard_normal((2, 50, d)).astype(np.float32)
    starts = kwargs.pop("starts", np.zeros(2, dtype=np.int32))
    with pytest.raises(NativeInvalidArgument, match=match):
        flash_attn_cpu(q, k, v, None, starts, 0.1, **kwargs)


def test_ggml_type_ids_match_the_gguf_package():
    import gguf

    for name, tid in GGML_TYPES.items():
        assert gguf.GGMLQuantizationType[name.upper()].value == tid
