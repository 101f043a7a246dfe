// llama-adakv-testing.h - op-level entry points of adakv-local, for its own exactness tests
//
// Not part of the API that applications use (llama-adakv.h is): these run single ggml ops on
// the CPU backend so that the tests can compare the fast path, the portable fallback and a
// plain reference on random inputs. Same conventions as llama-adakv.h: extern "C", no
// exceptions, a return code and llama_adakv_last_error(). The block between
// ADAKV_CDEF_BEGIN and ADAKV_CDEF_END is read by the Python binding (cffi, ABI mode).

#pragma once

#include "llama-adakv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ADAKV_CDEF_BEGIN */

// how llama_adakv_flash_attn_cpu evaluates the op
enum llama_adakv_fa_path {
    LLAMA_ADAKV_FA_FAST     = 0, // one ggml_flash_attn_ext with per-head starts (patch 0001)
    LLAMA_ADAKV_FA_FALLBACK = 1, // one stock ggml_flash_attn_ext per KV head over cells [start[h], n_kv)
    LLAMA_ADAKV_FA_MASK     = 2, // one stock ggml_flash_attn_ext with a per-query-head mask (-inf below the start)
};

// Computes out = softmax(scale * q k^T + mask) v per query head, where query head i uses
// KV head i / (n_head / n_head_kv) and KV head h sees only cells >= starts[h].
// K and V are first converted to kv_type (a ggml_type: F16, Q8_0, Q4_0, ...), exactly as a
// KV cache of that type stores them.
//   q      : F32 [n_head][n_q][d_k]        (row-major, last index fastest)
//   k      : F32 [n_head_kv][n_kv][d_k]
//   v      : F32 [n_head_kv][n_kv][d_v]
//   mask   : F32 [n_q][n_kv] added to the scores (-INFINITY allowed), or NULL for none
//   starts : I32 [n_head_kv]; FALLBACK and MASK need each in [0, n_kv); the fast path takes any
//            value, as the kernels clamp it: below 0 acts as 0, n_kv or more leaves the head
//            no cell (its outputs are 0, as for a fully masked row)
//   out    : F32 [n_q][n_head][d_v]
//   k_used, v_used: if not NULL, receive K and V as the kernel read them (after conversion)
// Returns LLAMA_ADAKV_OK or an error code (out untouched on INVALID / ALLOC).
LLAMA_API int32_t llama_adakv_flash_attn_cpu(
        const float * q,
        const float * k,
        const float * v,
        const float * mask,
        const int32_t * starts,
        int32_t n_q,
        int32_t n_kv,
        int32_t n_head,
        int32_t n_head_kv,
        int32_t d_k,
        int32_t d_v,
        int32_t kv_type,
        float scale,
        int32_t path,
        int32_t n_threads,
        float * out,
        float * k_used,
        float * v_used);

// The pooled rows of patch 0004 (one ggml_flash_attn_ext with starts and pools): K and V laid out
// as a KV cache holds them, cell after cell with the heads of a cell one after the other, so that
// head row r (r = cell * n_head_kv + head in ordinary cells) is the r-th row of d values. KV head h
// attends to head rows pools[2h] .. pools[2h] + pools[2h+1] - 1 (mask 0), then to cells >= starts[h]
// (with the mask); the rows are clamped to the cells below starts[h], as in the kernel.
//   k      : F32 [n_kv][n_head_kv][d_k],  v : F32 [n_kv][n_head_kv][d_v]
//   starts : I32 [n_head_kv] in [0, n_kv];  pools : I32 [n_head_kv][2] (first row, rows)
//   q, mask, out, k_used, v_used as above (k_used, v_used in the layout of k and v)
LLAMA_API int32_t llama_adakv_flash_attn_pooled_cpu(
        const float * q,
        const float * k,
        const float * v,
        const float * mask,
        const int32_t * starts,
        const int32_t * pools,
        int32_t n_q,
        int32_t n_kv,
        int32_t n_head,
        int32_t n_head_kv,
        int32_t d_k,
        int32_t d_v,
        int32_t kv_type,
        float scale,
        int32_t n_threads,
        float * out,
        float * k_used,
        float * v_used);

// Window scores (see llama_adakv_read_scores) of queries q over keys k on the CPU backend, with
// the same graph the model uses: q F32 [n_head][n_q][d_k], k F32 [n_head_kv][n_kv][d_k] (converted
// to kv_type first), mask F32 [n_q][n_kv] or NULL, starts I32 [n_head_kv] in [0, n_kv) (cells
// below score 0), gqa_reduce an enum llama_adakv_gqa_reduce; out F32 [n_head_kv][n_kv]; k_used as above.
LLAMA_API int32_t llama_adakv_window_scores_cpu(
        const float * q,
        const float * k,
        const float * mask,
        const int32_t * starts,
        int32_t n_q,
        int32_t n_kv,
        int32_t n_head,
        int32_t n_head_kv,
        int32_t d_k,
        int32_t kv_type,
        int32_t gqa_reduce,
        float scale,
        int32_t n_threads,
        float * out,
        float * k_used);

// Fault injection: the n-th allocation point of adakv's own code reached from now on (ggml_init,
// ggml_new_graph_custom, the graph allocator and its buffers, in compaction, enabling and the
// capture) fails as if memory ran out (1: the next one; 0 or less: none). For the tests of the
// error paths only; process-wide.
LLAMA_API void llama_adakv_test_fail_alloc(int32_t n);

/* ADAKV_CDEF_END */

#ifdef __cplusplus
}
#endif
