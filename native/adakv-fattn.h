// adakv-fattn.h - attention with per-KV-head start cells: the portable fallback
//
// A KV head h whose kept cells were compacted to [start[h], n_kv) must not see the
// cells below start[h]. Backends that implement ggml_flash_attn_ext_set_head_start
// (patch 0001) do it in one op; for every other backend this builds one stock
// flash-attention call per KV head over the view [start[h], n_kv) and concatenates
// the results, which is exact and slower.

#pragma once

#include "ggml.h"

#include <cstdint>

// Same contract as ggml_flash_attn_ext + ggml_flash_attn_ext_set_head_start, with the
// start cells known on the host when the graph is built (one stream: q->ne[3] == 1).
//   q      : [d_k, n_q,  n_head,    1]  (may be a permuted view)
//   k      : [d_k, n_kv, n_head_kv, 1]
//   v      : [d_v, n_kv, n_head_kv, 1]  (not transposed)
//   mask   : F16 [n_kv, n_q_pad, 1, 1] or NULL
//   starts : host array [n_head_kv], each in [0, n_kv)
//   result : F32 [d_v, n_head, n_q, 1]  (permuted, as ggml_flash_attn_ext)
// No ALiBi (max_bias) and no attention sinks: the callers refuse such models.
ggml_tensor * llama_adakv_fa_fallback(
        ggml_context * ctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * mask,
        const int32_t * starts,
        float scale,
        float logit_softcap);

// The per-head mask path: the layer's mask with, for every query head, -inf added below the start
// cell of its KV head, so that one stock ggml_flash_attn_ext per layer (mask->ne[2] == n_head)
// honours the start cells on every backend whose kernels read such a mask (CPU, Metal, ...).
//   mask      : F16 [n_kv, n_q, 1, 1] or NULL (then only the starts mask)
//   start_f32 : F32 [1, n_head_kv] start cell of each KV head
//   result    : F16 [n_kv, n_q, n_head, 1]; in the compute buffer it costs about
//               llama_adakv_head_mask_bytes(n_kv, n_q, n_head): the bias is made in the graph from
//               start_f32 (no memory that lives longer than the ubatch)
ggml_tensor * llama_adakv_head_mask(
        ggml_context * ctx, ggml_tensor * mask, ggml_tensor * start_f32, int64_t n_kv, int64_t n_q, int64_t n_head);

// bytes of the intermediate tensors of llama_adakv_head_mask: the F32 repeat and sum, the F16 result
size_t llama_adakv_head_mask_bytes(int64_t n_kv, int64_t n_q, int64_t n_head);

// Window scores (SnapKV): for every cell c and KV head h,
//   scores[c, h] = reduce over the query heads j of KV head h (mean or max) of
//                  sum over window queries i of softmax_c(scale * q_i,j . k_c,h + mask[i, c] + bias[c, h])
// with bias[c, h] = -inf below the head's start cell (cells invalid for a head score nothing).
//   q         : [d_k, n_tokens, n_head,    1]  (post-RoPE; may be a permuted view)
//   k         : [d_k, n_kv,     n_head_kv, 1]
//   mask      : F16 [n_kv, n_tokens_pad, 1, 1] or NULL
//   start_f32 : F32 [1, n_head_kv] start cell of each KV head, or NULL for all 0
//   result    : F32 [n_kv, n_head_kv]
ggml_tensor * llama_adakv_window_scores(
        ggml_context * ctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * mask,
        ggml_tensor * start_f32,
        int32_t gqa_reduce,
        float scale,
        float logit_softcap);
