// llama-adakv.h - the C API of adakv-local (Ada-KV per-head KV-cache eviction for llama.cpp)
//
// Compiled into libllama. Every function is extern "C", never throws, and reports
// failure through its return value; llama_adakv_last_error() then says what went wrong.
//
// The block between ADAKV_CDEF_BEGIN and ADAKV_CDEF_END is read by the Python binding
// (cffi, ABI mode): keep it free of preprocessor directives and macros other than
// LLAMA_API, and use only fixed-width C types there.

#pragma once

#include "llama.h"

#include <stdint.h>

#define LLAMA_ADAKV_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

/* ADAKV_CDEF_BEGIN */

// return codes
enum llama_adakv_status {
    LLAMA_ADAKV_OK            =  0,
    LLAMA_ADAKV_ERR_INVALID   = -1, // an argument is out of range; nothing was changed
    LLAMA_ADAKV_ERR_ALLOC     = -2, // out of memory; nothing was changed
    LLAMA_ADAKV_ERR_BACKEND   = -3, // a ggml backend failed to compute; outputs are undefined
};

//
// version and build information
//

// version of adakv-local, "MAJOR.MINOR.PATCH"
LLAMA_API const char * llama_adakv_version(void);

// LLAMA_ADAKV_ABI_VERSION of the library; the Python binding refuses a mismatch
LLAMA_API int32_t llama_adakv_abi_version(void);

// git commit of the pinned llama.cpp this library was built from ("unknown (...)" for a custom source)
LLAMA_API const char * llama_adakv_llama_cpp_commit(void);

// message of the last failed call on this thread ("" if none)
LLAMA_API const char * llama_adakv_last_error(void);

//
// flash attention with per-KV-head start cells, on the CPU backend (op-level checks)
//

// how llama_adakv_flash_attn_cpu evaluates the op
enum llama_adakv_fa_path {
    LLAMA_ADAKV_FA_FAST     = 0, // one ggml_flash_attn_ext with per-head starts (patch 0001)
    LLAMA_ADAKV_FA_FALLBACK = 1, // one stock ggml_flash_attn_ext per KV head over cells [start[h], n_kv)
};

// Computes out = softmax(scale * q k^T + mask) v per query head, where query head i uses
// KV head i / (n_head / n_head_kv) and KV head h sees only cells >= starts[h].
// K and V are first converted to kv_type (a ggml_type: F16, Q8_0, Q4_0, ...), exactly as a
// KV cache of that type stores them.
//   q      : F32 [n_head][n_q][d_k]        (row-major, last index fastest)
//   k      : F32 [n_head_kv][n_kv][d_k]
//   v      : F32 [n_head_kv][n_kv][d_v]
//   mask   : F32 [n_q][n_kv] added to the scores (-INFINITY allowed), or NULL for none
//   starts : I32 [n_head_kv], each in [0, n_kv)
//   out    : F32 [n_q][n_head][d_v]
//   k_used, v_used: if not NULL, receive K and V as the kernel read them (after conversion)
// Returns LLAMA_ADAKV_OK or an error code (out untouched on INVALID / ALLOC).
LLAMA_API int32_t llama_adakv_flash_attn_cpu(
        const float   * q,
        const float   * k,
        const float   * v,
        const float   * mask,
        const int32_t * starts,
        int32_t         n_q,
        int32_t         n_kv,
        int32_t         n_head,
        int32_t         n_head_kv,
        int32_t         d_k,
        int32_t         d_v,
        int32_t         kv_type,
        float           scale,
        int32_t         path,
        int32_t         n_threads,
        float         * out,
        float         * k_used,
        float         * v_used);

/* ADAKV_CDEF_END */

#ifdef __cplusplus
}
#endif
