"""Eviction on a GPU backend (CUDA), checked against the CPU.

Patch 0003 makes the CUDA vec kernel (up to 2 queries) and tile kernel (any batch) honour the
per-KV-head start cells, patch 0005 the pooled rows of the pooled block (patch 0004), and CUDA's
supports_op accept exactly those shapes; the rest takes the portable routes. Checked here, on a
machine with a GPU (``scripts/device_check.sh``):

* op level, through ggml's own C API (cffi over libggml, no adakv entry point): one
  ggml_flash_attn_ext with starts, K/V in the KV cache's layout (cells outermost), random Q/K/V,
  starts including 0, the last cell a query sees and cells inside a tile; f16/q8_0/q4_0 K/V,
  head sizes 64/128, GQA 1/4/8; 1, 2 and 32 queries; n_kv a multiple of 256 (vec kernel for
  decode) or not (tile kernel); against the float64 reference of test_fattn_op.py. The same
  harness also runs on the CPU backend, everywhere, so that CI tests the harness itself;
* the same with pooled rows (head rows below the start, runs of 0, 1, a tile +-1 and ~300 rows)
  against the float64 reference of test_fattn_pooled.py;
* supports_op: accepted for the extended shapes, refused for the others, while the same op
  without starts is accepted (so the refusal is the starts'), with and without pooled rows;
* model level: window scores and continuations after the same compaction match the CPU path
  (tiny64, and 32 layers with 8 KV heads of 128), for the pooled and the rect block; the scoring
  graph adds no CPU split (K never
  goes to the host); the GPU fast path equals the GPU fallback. Compaction (bitwise) and "keep
  every cell == no eviction" run on the GPU as the ``gpu`` cases of tests/test_eviction.py.
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
import zlib

import numpy as np
import pytest
from test_eviction import ALL_LAYERS, CONT, PROMPT, WINDOW, make, needs_gpu, prefill, random_kept
from test_fattn_op import TOL, causal_mask, reference

import adakv_local  # noqa: F401  (binds llama_cpp to our libllama)
from adakv_local._lib import lib_dir
from adakv_local.fattn import FA_FAST, GGML_TYPES, flash_attn_cpu

# --- ggml's C API, the few calls an op test needs (ggml.h, ggml-alloc.h, ggml-backend.h) -----------

_GGML_CDEF = """
typedef struct ggml_context ggml_context;
typedef struct ggml_tensor ggml_tensor;
typedef struct ggml_cgraph ggml_cgraph;
typedef struct ggml_backend * ggml_backend_t;
typedef struct ggml_backend_buffer * ggml_backend_buffer_t;
struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
size_t ggml_tensor_overhead(void);
size_t ggml_graph_overhead(void);
ggml_context * ggml_init(struct ggml_init_params params);
void ggml_free(ggml_context * ctx);
ggml_tensor * ggml_new_tensor_2d(ggml_context * ctx, int type, int64_t ne0, int64_t ne1);
ggml_tensor * ggml_new_tensor_4d(ggml_context * ctx, int type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);
ggml_tensor * ggml_permute(ggml_context * ctx, ggml_tensor * a, int axis0, int axis1, int axis2, int axis3);
ggml_tensor * ggml_flash_attn_ext(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * mask, float scale, float max_bias, float logit_softcap);
void ggml_flash_attn_ext_set_prec(ggml_tensor * a, int prec);
void ggml_flash_attn_ext_set_head_start(ggml_tensor * a, ggml_tensor * starts);
void ggml_flash_attn_ext_set_head_pool(ggml_tensor * a, ggml_tensor * pools);
ggml_cgraph * ggml_new_graph(ggml_context * ctx);
void ggml_build_forward_expand(ggml_cgraph * cgraph, ggml_tensor * tensor);
size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);
void ggml_fp32_to_fp16_row(const float * x, uint16_t * y, int64_t n);
ggml_backend_t ggml_backend_init_by_name(const char * name, const char * params);
bool ggml_backend_supports_op(ggml_backend_t backend, const ggml_tensor * op);
ggml_backend_buffer_t ggml_backend_alloc_ctx_tensors(ggml_context * ctx, ggml_backend_t backend);
void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
void ggml_backend_tensor_set(ggml_tensor * tensor, const void * data, size_t offset, size_t size);
void ggml_backend_tensor_get(const ggml_tensor * tensor, void * data, size_t offset, size_t size);
int ggml_backend_graph_compute(ggml_backend_t backend, ggml_cgraph * cgraph);
"""
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
GGML_PREC_F32 = 10


@functools.cache
def _ggml():
    """(ffi, lib) of the libggml that libllama uses (the same file, so the same backends)."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_GGML_CDEF)
    name = {"win32": "ggml.dll", "darwin": "libggml.dylib"}.get(sys.platform, "libggml.so")
    return ffi, ffi.dlopen(str(lib_dir() / name))


@functools.cache
def _backend(name: str):
    """A ggml backend by device name ("CPU", "CUDA0"), kept for the session; None if absent."""
    ffi, lib = _ggml()
    be = lib.ggml_backend_init_by_name(name.encode(), ffi.NULL)
    return None if be == ffi.NULL else be


def _kv_bytes(a: np.ndarray, kv_type: str) -> np.ndarray:
    """Rows of a (last axis) as a KV cache of kv_type stores them, as bytes."""
    ffi, lib = _ggml()
    a = np.ascontiguousarray(a, dtype=np.float32)
    n_per_row = a.shape[-1]
    if kv_type == "f16":
        out = np.empty(a.shape, dtype=np.uint16)
        lib.ggml_fp32_to_fp16_row(ffi.from_buffer("float[]", a), ffi.from_buffer("uint16_t[]", out), a.size)
        return out.view(np.uint8)
    out = np.empty(a.size * 2, dtype=np.uint8)  # any block type of ours takes less than 2 bytes a value
    n = lib.ggml_quantize_chunk(GGML_TYPES[kv_type], ffi.from_buffer("float[]", a), ffi.from_buffer(out), 0,
                                a.size // n_per_row, n_per_row, ffi.NULL)  # fmt: skip
    return out[:n]


class _FaOp:
    """One ggml_flash_attn_ext with per-head starts, built in its own ggml context (no data yet).

    q [n_head, n_q, d_k] per stream; K and V in the KV cache's layout [n_kv][n_head_kv][d] (cells
    outermost), seen by the op as the view [d, n_kv, n_head_kv]; starts I32 [n_head_kv, n_starts]
    or no starts at all (n_starts 0); with ``pools``, the pooled rows of patch 0004, I32 [2, n_head_kv]."""

    def __init__(self, n_head, n_q, d_k, d_v, n_head_kv, n_kv, kv_type, *, scale=1.0, mask=True, n_seq=1, n_starts=1,
                 pools=False):
        ffi, lib = _ggml()
        self.ffi, self.lib = ffi, lib
        params = ffi.new("struct ggml_init_params *", [16 * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead()])
        params.no_alloc = True
        self.ctx = lib.ggml_init(params[0])
        t = GGML_TYPES[kv_type]
        self.q = lib.ggml_new_tensor_4d(self.ctx, GGML_TYPE_F32, d_k, n_q, n_head, n_seq)
        self.k = lib.ggml_new_tensor_4d(self.ctx, t, d_k, n_head_kv, n_kv, n_seq)
        self.v = lib.ggml_new_tensor_4d(self.ctx, t, d_v, n_head_kv, n_kv, n_seq)
        k_view = lib.ggml_permute(self.ctx, self.k, 0, 2, 1, 3)
        v_view = lib.ggml_permute(self.ctx, self.v, 0, 2, 1, 3)
        self.mask = lib.ggml_new_tensor_4d(self.ctx, GGML_TYPE_F16, n_kv, n_q, 1, 1) if mask else ffi.NULL
        self.op = lib.ggml_flash_attn_ext(self.ctx, self.q, k_view, v_view, self.mask, scale, 0.0, 0.0)
        lib.ggml_flash_attn_ext_set_prec(self.op, GGML_PREC_F32)
        self.starts = ffi.NULL
        if n_starts:
            self.starts = lib.ggml_new_tensor_2d(self.ctx, GGML_TYPE_I32, n_head_kv, n_starts)
            lib.ggml_flash_attn_ext_set_head_start(self.op, self.starts)
        self.pools = ffi.NULL
        if pools:
            self.pools = lib.ggml_new_tensor_2d(self.ctx, GGML_TYPE_I32, 2, n_head_kv)
            lib.ggml_flash_attn_ext_set_head_pool(self.op, self.pools)

    def supported_by(self, backend_name: str) -> bool:
        return bool(self.lib.ggml_backend_supports_op(_backend(backend_name), self.op))

    def close(self) -> None:
        self.lib.ggml_free(self.ctx)


def flash_attn_on(backend_name, q, k, v, mask, starts, scale, kv_type, pools=None):
    """ggml_flash_attn_ext with starts (and the pooled rows ``pools`` [n_head_kv, 2], if given) on one
    backend; out [n_q, n_head, d_v], or None if the backend refuses the op. q [n_head, n_q, d_k],
    k/v [n_head_kv, n_kv, d], mask [n_q, n_kv]."""
    n_head, n_q, d_k = q.shape
    n_head_kv, n_kv, d_v = v.shape
    fa = _FaOp(n_head, n_q, d_k, d_v, n_head_kv, n_kv, kv_type, scale=scale, mask=mask is not None,
               pools=pools is not None)
    ffi, lib = fa.ffi, fa.lib
    try:
        be = _backend(backend_name)
        if not lib.ggml_backend_supports_op(be, fa.op):
            return None
        gf = lib.ggml_new_graph(fa.ctx)
        lib.ggml_build_forward_expand(gf, fa.op)
        buf = lib.ggml_backend_alloc_ctx_tensors(fa.ctx, be)
        assert buf != ffi.NULL
        try:
            inputs = [(fa.q, np.ascontiguousarray(q, dtype=np.float32)),
                      (fa.k, _kv_bytes(k.transpose(1, 0, 2), kv_type)),
                      (fa.v, _kv_bytes(v.transpose(1, 0, 2), kv_type)),
                      (fa.starts, np.ascontiguousarray(starts, dtype=np.int32))]  # fmt: skip
            if pools is not None:
                inputs.append((fa.pools, np.ascontiguousarray(pools, dtype=np.int32)))
            if mask is not None:
                m16 = np.empty(mask.shape, dtype=np.uint16)
                lib.ggml_fp32_to_fp16_row(ffi.from_buffer("float[]", np.ascontiguousarray(mask, dtype=np.float32)),
                                          ffi.from_buffer("uint16_t[]", m16), mask.size)  # fmt: skip
                inputs.append((fa.mask, m16))
            for t, a in inputs:
                lib.ggml_backend_tensor_set(t, ffi.from_buffer(a), 0, a.nbytes)
            assert lib.ggml_backend_graph_compute(be, gf) == 0
            out = np.empty((n_q, n_head, d_v), dtype=np.float32)
            lib.ggml_backend_tensor_get(fa.op, ffi.from_buffer(out), 0, out.nbytes)
            return out
        finally:
            lib.ggml_backend_buffer_free(buf)
    finally:
        fa.close()


def _has_cuda() -> bool:
    try:
        return _backend("CUDA0") is not None
    except OSError:
        return False


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="this libggml has no CUDA device")
BACKENDS = [pytest.param("CPU", id="cpu"), pytest.param("CUDA0", id="cuda", marks=needs_cuda)]

# --- op level ------------------------------------------------------------------------------------

# (n_q, n_kv): decode over a multiple of 256 cells (CUDA: vec kernel), 2 queries (vec, 2 columns),
# decode over 600 cells (not a multiple of 256: tile kernel, bounds-checked path), 32 queries (tile)
SHAPES = [(1, 512), (2, 768), (1, 600), (32, 512)]
OP_CASES = [
    (kv_type, d, gqa, n_q, n_kv)
    for kv_type in ("f16", "q8_0", "q4_0")
    for d in (64, 128)
    for gqa in (1, 4, 8)
    for n_q, n_kv in SHAPES
]


def _op_inputs(case):
    kv_type, d, gqa, n_q, n_kv = case
    n_head_kv = 4
    rng = np.random.default_rng(zlib.crc32(repr(("gpu-op", case)).encode()))  # seeded per case
    q = rng.standard_normal((n_head_kv * gqa, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    last = n_kv - n_q  # the last start that leaves every query a cell (causal mask)
    inside = 128 * int(rng.integers(1, last // 128)) + int(rng.integers(1, 128))  # not on a tile edge
    starts = rng.permutation([0, last, min(inside, last), int(rng.integers(1, last + 1))]).astype(np.int32)
    return q, k, v, causal_mask(n_q, n_kv), starts


@pytest.mark.exactness
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "{}_d{}_gqa{}_q{}_n{}".format(*c))
def test_flash_attn_with_starts_matches_reference(backend_name, case):
    kv_type = case[0]
    q, k, v, mask, starts = _op_inputs(case)
    scale = 1.0 / np.sqrt(q.shape[-1])
    out = flash_attn_on(backend_name, q, k, v, mask, starts, scale, kv_type)
    info = f"backend={backend_name} case={case} starts={starts.tolist()}"
    assert out is not None, f"supports_op refused an extended shape ({info})"

    # K and V as the kernels read them (the same conversion as adakv's CPU op check)
    _, k_used, v_used = flash_attn_cpu(q, k, v, mask, starts, scale, kv_type=kv_type, path=FA_FAST)
    ref = reference(q, k_used, v_used, mask, starts, scale)
    tol = TOL[kv_type]  # the CPU's bounds (see test_fattn_op.py); CUDA converts Q to f16 or q8_1 alike
    assert np.all(np.isfinite(out)), info
    err = np.abs(out - ref).max()
    assert err <= tol, f"{backend_name} vs reference: {err:.3g} > {tol} ({info})"
    # the case can fail: a kernel that ignored the starts would be off by more than 2 * tol
    assert np.abs(reference(q, k_used, v_used, mask, np.zeros_like(starts), scale) - ref).max() > 2 * tol, info


@pytest.mark.exactness
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n_kv", [512, 600])
def test_negative_starts_read_from_cell_zero(backend_name, n_kv):
    """Starts are clamped to [0, n_kv] as on the CPU (a head with no cell is not tested: the CPU
    writes 0 there, CUDA NaN, as for a fully masked row; adakv never produces such a start)."""
    rng = np.random.default_rng(zlib.crc32(repr(("gpu-clamp", n_kv)).encode()))
    q = rng.standard_normal((8, 1, 128)).astype(np.float32)
    k = rng.standard_normal((4, n_kv, 128)).astype(np.float32)
    v = rng.standard_normal((4, n_kv, 128)).astype(np.float32)
    starts = np.array([-5, -(2**31), n_kv - 1, 0], dtype=np.int32)
    out = flash_attn_on(backend_name, q, k, v, None, starts, 0.09, "f16")
    _, k_used, v_used = flash_attn_cpu(q, k, v, None, starts, 0.09, kv_type="f16", path=FA_FAST)
    ref = reference(q, k_used, v_used, None, np.clip(starts, 0, n_kv), 0.09)
    err = np.abs(out - ref).max()
    assert err <= TOL["f16"], f"{backend_name} n_kv={n_kv}: {err:.3g}"


# pooled rows (patch 0004 on the CPU, 0005 on CUDA): (kv_type, d, gqa, n_q, n_kv, pool rows of head 0):
# the vec kernel (1-2 queries over a multiple of 256 cells), the tile kernel (a batch, or a length
# that is not a multiple of 256); runs of 0, 1, a tile -1 / +1 (vec 128, tile 64) and ~300 rows
POOL_CASES = [
    ("f16", 128, 4, 1, 512, 127), ("f16", 128, 4, 2, 768, 129), ("q8_0", 64, 8, 1, 512, 1),
    ("q4_0", 128, 1, 1, 512, 300), ("f16", 128, 4, 32, 512, 65), ("q8_0", 64, 4, 3, 600, 63),
    ("f16", 64, 1, 40, 300, 0), ("f16", 256, 4, 1, 512, 200),
]  # fmt: skip


def _pool_inputs(case):
    """q, K/V in the cache's layout, the mask, starts (the block's end, shared) and pools [4, 2]."""
    kv_type, d, gqa, n_q, n_kv, first = case
    n_head_kv = 4
    rng = np.random.default_rng(zlib.crc32(repr(("gpu-pool", case)).encode()))
    block = max(2 * n_q, (n_kv - n_q) // 2)  # cells below the start hold the pooled rows
    rows = [first] + [int(r) for r in rng.integers(1, block, size=n_head_kv - 1)]
    rows = [min(r, block) for r in rows]  # head h's run lies in head rows [h * block, (h + 1) * block)
    pools = np.array([[h * block, r] for h, r in enumerate(rows)], np.int32)
    q = rng.standard_normal((n_head_kv * gqa, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    return q, k, v, causal_mask(n_q, n_kv), np.full(n_head_kv, block, np.int32), pools


@pytest.mark.exactness
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "{}_d{}_gqa{}_q{}_n{}_p{}".format(*c))
def test_flash_attn_with_pools_matches_reference(backend_name, case):
    from test_fattn_pooled import reference as pooled_reference

    from adakv_local.fattn import flash_attn_pooled_cpu

    kv_type = case[0]
    q, k, v, mask, starts, pools = _pool_inputs(case)
    scale = 1.0 / np.sqrt(q.shape[-1])
    # the harness takes K/V head-major and lays them out as the cache does (cells outermost)
    out = flash_attn_on(backend_name, q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), mask, starts, scale, kv_type,
                        pools=pools)  # fmt: skip
    info = f"backend={backend_name} case={case} pools={pools.tolist()}"
    assert out is not None, f"supports_op refused pooled rows ({info})"
    _, k_used, v_used = flash_attn_pooled_cpu(q, k, v, mask, starts, pools, scale, kv_type=kv_type)
    ref = pooled_reference(q, k_used, v_used, mask, starts, pools, scale)
    assert np.all(np.isfinite(out)), info
    err = np.abs(out - ref).max()
    assert err <= TOL[kv_type], f"{backend_name} vs reference: {err:.3g} > {TOL[kv_type]} ({info})"
    no_pools = pools.copy()
    no_pools[:, 1] = 0  # the case can fail: without the pooled rows the result is another one
    assert np.abs(pooled_reference(q, k_used, v_used, mask, starts, no_pools, scale) - ref).max() > 2 * TOL[kv_type]


# (d_k, d_v, n_head, n_head_kv, n_q, kv_type, n_seq, n_starts): True where CUDA's kernels honour
# the starts; every case is accepted without starts, so a refusal is the starts'
SUPPORT_CASES = [
    ((64, 64, 8, 2, 1, "f16", 1, 1), True),  # vec
    ((128, 128, 32, 8, 1, "f16", 1, 1), True),  # vec, the 8B shape
    ((128, 128, 32, 8, 1, "q8_0", 1, 1), True),
    ((128, 128, 32, 8, 2, "q4_0", 1, 1), True),  # vec, 2 columns
    ((128, 128, 32, 8, 32, "f16", 1, 1), True),  # tile
    ((256, 256, 8, 2, 512, "q8_0", 1, 1), True),  # tile
    ((80, 80, 8, 8, 1, "f16", 1, 1), True),  # tile (no vec kernel for 80)
    ((128, 128, 8, 2, 1, "f16", 2, 1), True),  # 2 streams sharing one start table
    ((128, 128, 8, 2, 1, "f16", 2, 2), False),  # one start table per stream
    ((192, 128, 16, 2, 1, "f16", 1, 1), False),  # DK != DV (mma only)
    ((576, 512, 16, 1, 1, "f16", 1, 1), False),  # MLA (mma only)
]
# the same with pooled rows (patch 0005): the vec and tile shapes above, one table for all streams
POOL_SUPPORT_CASES = [
    ((64, 64, 8, 2, 1, "f16", 1, 1), True),
    ((128, 128, 32, 8, 1, "q8_0", 1, 1), True),
    ((128, 128, 32, 8, 2, "q4_0", 1, 1), True),
    ((128, 128, 32, 8, 32, "f16", 1, 1), True),
    ((128, 128, 8, 2, 1, "f16", 2, 2), False),
    ((192, 128, 16, 2, 1, "f16", 1, 1), False),
]


@needs_cuda
@pytest.mark.parametrize("pools", [False, True])
@pytest.mark.parametrize("case, expected", SUPPORT_CASES + POOL_SUPPORT_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_cuda_supports_op_exactly_the_extended_shapes(case, expected, pools):
    if pools and (case, expected) not in POOL_SUPPORT_CASES:
        pytest.skip("a shape of the start cells only")
    d_k, d_v, n_head, n_head_kv, n_q, kv_type, n_seq, n_starts = case
    ops = {s: _FaOp(n_head, n_q, d_k, d_v, n_head_kv, 512, kv_type, n_seq=n_seq, n_starts=s, pools=pools and s > 0)
           for s in (0, n_starts)}  # fmt: skip
    try:
        assert ops[0].supported_by("CUDA0"), f"the stock op is refused: {case}"
        assert ops[n_starts].supported_by("CUDA0") == expected, case
        assert ops[n_starts].supported_by("CPU"), case
    finally:
        for op in ops.values():
            op.close()


# --- model level ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny32x8(tmp_path_factory):
    """32 layers, 32 query / 8 KV heads of 128 (Llama-3-8B's attention shape), narrow otherwise."""
    from adakv_local.testing import write_llama_gguf

    path = tmp_path_factory.mktemp("models") / "tiny32x8.gguf"
    return write_llama_gguf(path, n_layer=32, n_embd=256, n_head=32, n_head_kv=8, head_dim=128, n_ff=256,
                            dtype="f16", seed=13)  # fmt: skip


@needs_gpu
@pytest.mark.exactness
@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_gpu_window_scores_match_the_cpu(tiny64, type_kv, gqa):
    out = []
    for n_gpu_layers in (0, ALL_LAYERS):
        llm, kv = make(tiny64, type_kv=type_kv, n_gpu_layers=n_gpu_layers, gqa_reduce=gqa)
        out.append(prefill(llm, kv, llm.tokenize(PROMPT)))
    cpu, gpu = out
    assert cpu.shape == gpu.shape
    # each column is a sum of WINDOW probabilities: errors are relative to that scale (a quantized K
    # meets Q rounded to q8_0 on the CPU, to q8_1 on CUDA: ~1% of scores of ~1/n_kv each)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3 * WINDOW, err_msg=f"{type_kv}, gqa {gqa}")


def _after_compaction(path, type_kv, n_gpu_layers, *, compact=True, force_fallback=None, layout="pooled"):
    """Attention outputs (captured, every layer) and logits of a continuation after the same random
    compaction: a prompt batch (CUDA: tile kernel), then one-token decodes (vec kernel).
    Returns (attention [n_layer, n_tokens, n_head * d_v], logits [n_tokens, n_vocab], the routes
    the layers took for the batch and for the last decode (KVCache.attn_used))."""
    llm, kv = make(path, type_kv=type_kv, n_gpu_layers=n_gpu_layers, force_fallback=force_fallback, layout=layout)
    prefill(llm, kv, llm.tokenize(PROMPT))
    if compact:
        kv.compact(random_kept(kv, kv.n_cells(), WINDOW, seed=5))
    n0 = llm.n_tokens
    toks = llm.tokenize(CONT * 2, add_bos=False)
    batches = [toks] + [[t] for t in llm.tokenize(b" and then", add_bos=False)]
    att, used = [], set()
    for i, b in enumerate(batches):
        kv.arm_capture(len(b))
        llm.eval(b)
        att.append(kv.read_capture(len(b)))
        if i in (0, len(batches) - 1):
            used |= set(kv.attn_used())
    kv.arm_capture(0)
    return np.concatenate(att, axis=1), np.array(llm.scores[n0 : llm.n_tokens]), used


# tiny64 with every cache type; the 32-layer model (slow on the CPU side) with f16
CONTINUATION_CASES = [("tiny64", "f16"), ("tiny64", "q8_0"), ("tiny64", "q4_0"), ("tiny32x8", "f16")]


@needs_gpu
@pytest.mark.exactness
@pytest.mark.parametrize("layout", ["pooled", "rect"])
@pytest.mark.parametrize("model, type_kv", CONTINUATION_CASES)
def test_gpu_continuation_matches_the_cpu(model, type_kv, layout, request):
    path = request.getfixturevalue(model)
    (att_cpu, logits_cpu, _), (att_gpu, logits_gpu, used) = (
        _after_compaction(path, type_kv, n, layout=layout) for n in (0, ALL_LAYERS)
    )
    att_full, _, _ = _after_compaction(path, type_kv, 0, compact=False)
    info = f"model={model} type_kv={type_kv} layout={layout}"
    assert used == {"kernel"}, f"CUDA did not run the starts in its kernels: {used} ({info})"
    # attention outputs of every layer: the kernels' own error (f16 or q8_1 Q, f16 accumulators) and
    # what earlier layers pass on; on the CPU alone the fast path and the fallback differ by up to
    # 0.6% of the scale after 32 layers (f16 accumulators in one of them): 2e-2 of the scale
    scale = np.abs(att_cpu).max()
    err = np.abs(att_gpu - att_cpu).max()
    assert err <= 2e-2 * scale, f"attention: GPU vs CPU {err:.3g} > 2e-2 * {scale:.3g} ({info})"
    # the case can fail: in the first layer (nothing passed on) eviction changes the attention far
    # more than the device does (a kernel that ignored the starts would be off by that much)
    err0, effect0 = np.abs(att_gpu[0] - att_cpu[0]).max(), np.abs(att_full[0] - att_cpu[0]).max()
    assert effect0 > 5 * err0, f"layer 0: eviction changes {effect0:.3g}, the device {err0:.3g} ({info})"
    lscale = max(1.0, np.abs(logits_cpu).max())
    lerr = np.abs(logits_gpu - logits_cpu).max()
    assert lerr <= 2e-2 * lscale, f"logits: GPU vs CPU {lerr:.3g} > 2e-2 * {lscale:.3g} ({info})"


@needs_gpu
@pytest.mark.exactness
def test_gpu_fast_path_equals_the_fallback(tiny64):
    (fast, _, used_fast), (fallback, _, used_fallback) = (
        _after_compaction(tiny64, "f16", ALL_LAYERS, force_fallback=f) for f in (False, True)
    )
    assert used_fast == {"kernel"} and used_fallback == {"gather-heads"}, (used_fast, used_fallback)
    scale = np.abs(fallback).max()
    err = np.abs(fast - fallback).max()
    assert err <= 1e-2 * scale, (err, scale)  # different CUDA kernels (vec/tile vs per-head views)


_SPLIT = re.compile(r"## SPLIT #(\d+): (\S+)")


def _graphs(log: str) -> list[list[str]]:
    """The backends of the splits of every graph that the scheduler printed (GGML_SCHED_DEBUG)."""
    graphs: list[list[str]] = []
    for m in _SPLIT.finditer(log):
        if m.group(1) == "0":
            graphs.append([])
        if graphs:
            graphs[-1].append(m.group(2))
    return graphs


@needs_gpu
@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_gpu_scoring_adds_no_cpu_split(tiny64, type_kv, monkeypatch):
    """The window scores run on the GPU: the scored window's graph has no more CPU splits than a
    plain prompt batch (a CPU split would mean K copied to the host). Compaction runs on the
    backend of the cache by construction (ggml_backend_graph_compute there)."""
    import llama_cpp
    import llama_cpp._logger

    monkeypatch.setenv("GGML_SCHED_DEBUG", "1")  # read when the context's scheduler is created
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        llm, kv = make(tiny64, type_kv=type_kv, n_gpu_layers=ALL_LAYERS)
        toks = llm.tokenize(PROMPT)
        mark = len(lines)
        llm.eval(toks[:-WINDOW])
        plain = _graphs("".join(lines[mark:]))
        mark = len(lines)
        kv.arm_scores(WINDOW)
        llm.eval(toks[-WINDOW:])
        kv.read_scores()
        scored = _graphs("".join(lines[mark:]))
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    assert plain and scored, "GGML_SCHED_DEBUG printed no graph"
    assert any(b.startswith("CUDA") for b in scored[-1]), scored[-1]
    assert scored[-1].count("CPU") <= plain[-1].count("CPU"), (plain[-1], scored[-1])
