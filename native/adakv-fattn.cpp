// adakv-fattn.cpp - per-KV-head start cells in attention: fallback graph and CPU op check

#include "adakv-fattn.h"

#include "adakv-impl.h"
#include "llama-adakv-testing.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

ggml_tensor * llama_adakv_fa_fallback(
        ggml_context * ctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * mask,
        const int32_t * starts,
        float scale,
        float logit_softcap) {
    const int64_t n_kv      = k->ne[1];
    const int64_t n_head    = q->ne[2];
    const int64_t n_head_kv = k->ne[2];

    GGML_ASSERT(q->ne[3] == 1 && k->ne[3] == 1 && v->ne[3] == 1);
    GGML_ASSERT(n_head % n_head_kv == 0);
    GGML_ASSERT(mask == nullptr || (mask->ne[2] == 1 && mask->ne[3] == 1));

    const int64_t n_gqa = n_head / n_head_kv;

    ggml_tensor * res = nullptr;
    for (int64_t h = 0; h < n_head_kv; ++h) {
        const int64_t s = starts[h];
        GGML_ASSERT(s >= 0 && s < n_kv);

        // query heads of this KV head: [d_k, n_q, n_gqa, 1]
        ggml_tensor * q_h =
                ggml_view_4d(ctx, q, q->ne[0], q->ne[1], n_gqa, 1, q->nb[1], q->nb[2], q->nb[3], h * n_gqa * q->nb[2]);
        // cells [s, n_kv) of this KV head: [d, n_kv - s, 1, 1]
        ggml_tensor * k_h = ggml_view_4d(
                ctx, k, k->ne[0], n_kv - s, 1, 1, k->nb[1], k->nb[2], k->nb[3], s * k->nb[1] + h * k->nb[2]);
        ggml_tensor * v_h = ggml_view_4d(
                ctx, v, v->ne[0], n_kv - s, 1, 1, v->nb[1], v->nb[2], v->nb[3], s * v->nb[1] + h * v->nb[2]);

        ggml_tensor * m_h = nullptr;
        if (mask) {
            // columns [s, n_kv) of the mask, made contiguous as flash attention requires
            m_h = ggml_view_2d(ctx, mask, n_kv - s, mask->ne[1], mask->nb[1], s * mask->nb[0]);
            m_h = ggml_cont(ctx, m_h);
        }

        // [d_v, n_gqa, n_q, 1]
        ggml_tensor * o_h = ggml_flash_attn_ext(ctx, q_h, k_h, v_h, m_h, scale, 0.0f, logit_softcap);
        ggml_prec_set_acc(o_h, GGML_PREC_F32);

        res = res ? ggml_concat(ctx, res, o_h, 1) : o_h;
    }
    return res;
}

// bias[c, 0, 0, h] = log(step(c - start[h] + 0.5)): 0 from KV head h's start cell on, -inf below it;
// start_f32: F32 [1, H]; result: F32 [n_kv, 1, 1, H], to broadcast over the tokens and the query heads
// of each KV head
static ggml_tensor * adakv_start_bias(ggml_context * ctx, ggml_tensor * start_f32, int64_t n_kv) {
    const int64_t H    = start_f32->ne[1];
    ggml_tensor * c    = ggml_arange(ctx, 0.0f, (float) n_kv, 1.0f); // [n_kv]
    ggml_tensor * tmpl = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, H);
    ggml_tensor * d    = ggml_add(ctx, ggml_repeat(ctx, c, tmpl), ggml_scale(ctx, start_f32, -1.0f));
    ggml_tensor * bias = ggml_log(ctx, ggml_step(ctx, ggml_scale_bias(ctx, d, 1.0f, 0.5f))); // [n_kv, H]
    return ggml_reshape_4d(ctx, bias, n_kv, 1, 1, H);
}

// F32 [1, n_head_kv]: the start cells of the op checks, as the persistent start_f32 tensors hold them
static ggml_tensor * adakv_starts_f32(ggml_context * ctx, const int32_t * starts, int32_t n_head_kv) {
    ggml_tensor * ts = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_head_kv);
    for (int32_t h = 0; h < n_head_kv; ++h) {
        ((float *) ts->data)[h] = (float) starts[h];
    }
    return ts;
}

ggml_tensor * llama_adakv_head_mask(
        ggml_context * ctx, ggml_tensor * mask, ggml_tensor * start_f32, int64_t n_kv, int64_t n_q, int64_t n_head) {
    const int64_t H = start_f32->ne[1];
    const int64_t g = n_head / H;
    GGML_ASSERT(n_head % H == 0);
    GGML_ASSERT(mask == nullptr || (mask->ne[0] == n_kv && mask->ne[1] == n_q && mask->ne[2] == 1 && mask->ne[3] == 1));

    // [n_kv, n_q, g, H]: the layer's mask for every query head, plus its KV head's start bias
    ggml_tensor * bias = adakv_start_bias(ctx, start_f32, n_kv);
    ggml_tensor * full = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_kv, n_q, g, H);
    ggml_tensor * m    = mask ? ggml_add(ctx, ggml_repeat(ctx, ggml_cast(ctx, mask, GGML_TYPE_F32), full), bias)
                              : ggml_repeat(ctx, bias, full);
    return ggml_cast(ctx, ggml_reshape_4d(ctx, m, n_kv, n_q, n_head, 1), GGML_TYPE_F16);
}

size_t llama_adakv_head_mask_bytes(int64_t n_kv, int64_t n_q, int64_t n_head) {
    return (size_t) n_kv * n_q * n_head * (2 * sizeof(float) + sizeof(ggml_fp16_t));
}

ggml_tensor * llama_adakv_window_scores(
        ggml_context * ctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * mask,
        ggml_tensor * start_f32,
        int32_t gqa_reduce,
        float scale,
        float logit_softcap) {
    const int64_t n_kv     = k->ne[1];
    const int64_t n_tokens = q->ne[1];
    const int64_t n_head   = q->ne[2];
    const int64_t H        = k->ne[2];
    const int64_t g        = n_head / H;

    GGML_ASSERT(n_head % H == 0);

    // [n_kv, n_tokens, n_head]; query head j reads KV head j / g
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q);
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    if (logit_softcap != 0.0f) {
        kq    = ggml_scale(ctx, kq, scale / logit_softcap);
        kq    = ggml_tanh(ctx, kq);
        kq    = ggml_scale(ctx, kq, logit_softcap);
        scale = 1.0f;
    }

    if (start_f32) {
        kq = ggml_reshape_4d(ctx, kq, n_kv, n_tokens, g, H);
        kq = ggml_add(ctx, kq, adakv_start_bias(ctx, start_f32, n_kv));
        kq = ggml_reshape_3d(ctx, kq, n_kv, n_tokens, n_head);
    }

    ggml_tensor * p = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);    // [n_kv, n_tokens, n_head]
    p               = ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)); // [n_tokens, n_kv, n_head]
    p               = ggml_sum_rows(ctx, p);                            // [1, n_kv, n_head]
    p               = ggml_reshape_3d(ctx, p, n_kv, g, H);              // [n_kv, g, H]

    if (gqa_reduce == LLAMA_ADAKV_GQA_MEAN) {
        p = ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)); // [g, n_kv, H]
        p = ggml_sum_rows(ctx, p);                            // [1, n_kv, H]
        p = ggml_scale(ctx, p, 1.0f / (float) g);
        return ggml_reshape_2d(ctx, p, n_kv, H);
    }
    // max(a, b) = b + relu(a - b), over the g query heads
    ggml_tensor * m = ggml_view_3d(ctx, p, n_kv, 1, H, p->nb[1], p->nb[2], 0);
    for (int64_t j = 1; j < g; ++j) {
        ggml_tensor * x = ggml_view_3d(ctx, p, n_kv, 1, H, p->nb[1], p->nb[2], j * p->nb[1]);
        m               = ggml_add(ctx, x, ggml_relu(ctx, ggml_sub(ctx, m, x)));
    }
    return ggml_cont_2d(ctx, m, n_kv, H);
}

static bool adakv_kv_type_ok(int32_t kv_type, int32_t d_k, int32_t d_v) {
    if (kv_type < 0 || kv_type >= GGML_TYPE_COUNT) {
        return false;
    }
    const ggml_type t   = (ggml_type) kv_type;
    const auto * traits = ggml_get_type_traits(t);
    if (t != GGML_TYPE_F32 && (traits->to_float == nullptr || ggml_quantize_requires_imatrix(t))) {
        return false;
    }
    const int64_t blck = ggml_blck_size(t);
    return blck > 0 && d_k % blck == 0 && d_v % blck == 0 && traits->type_size > 0;
}

// converts n rows of n_per_row floats into dst of type t, as a KV cache of that type stores them
static void adakv_convert_rows(ggml_type t, const float * src, void * dst, int64_t nrows, int64_t n_per_row) {
    if (t == GGML_TYPE_F32) {
        memcpy(dst, src, nrows * n_per_row * sizeof(float));
    } else if (t == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(src, (ggml_fp16_t *) dst, nrows * n_per_row);
    } else {
        ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, nullptr);
    }
}

static void adakv_rows_to_float(ggml_type t, const void * src, float * dst, int64_t n) {
    if (t == GGML_TYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else {
        ggml_get_type_traits(t)->to_float(src, dst, n);
    }
}

// inputs of the CPU op checks, converted as a KV cache of kv_type stores them
struct adakv_op_inputs {
    ggml_context * ctx = nullptr;
    ggml_tensor * q    = nullptr; // F32 [d_k, n_q, n_head, 1]
    ggml_tensor * k    = nullptr; // kv_type [d_k, n_kv, n_head_kv, 1]
    ggml_tensor * v    = nullptr; // kv_type [d_v, n_kv, n_head_kv, 1], or NULL
    ggml_tensor * m    = nullptr; // F16 [n_kv, n_q, 1, 1], or NULL

    ~adakv_op_inputs() {
        if (ctx) {
            ggml_free(ctx);
        }
    }
};

// checks the arguments shared by the op checks; returns LLAMA_ADAKV_OK or an error code
static int32_t adakv_op_check(
        const char * func,
        const float * q,
        const float * k,
        const int32_t * starts,
        const float * out,
        int32_t n_q,
        int32_t n_kv,
        int32_t n_head,
        int32_t n_head_kv,
        int32_t d_k,
        int32_t d_v,
        int32_t kv_type,
        int32_t n_threads,
        bool any_start) {
    if (!q || !k || !starts || !out) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: q, k, starts and out must not be NULL", func);
    }
    if (n_q < 1 || n_kv < 1 || n_head < 1 || n_head_kv < 1 || d_k < 1 || d_v < 1 || n_threads < 1) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: sizes and n_threads must be >= 1", func);
    }
    if (n_head % n_head_kv != 0) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: n_head (%d) is not a multiple of n_head_kv (%d)", func, n_head,
                n_head_kv);
    }
    if (!adakv_kv_type_ok(kv_type, d_k, d_v)) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: kv_type %d is not a usable KV cache type for head sizes %d/%d", func,
                kv_type, d_k, d_v);
    }
    for (int32_t h = 0; h < n_head_kv && !any_start; ++h) {
        if (starts[h] < 0 || starts[h] >= n_kv) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID, "%s: starts[%d] = %d is outside [0, %d)", func, h, starts[h], n_kv);
        }
    }
    return LLAMA_ADAKV_OK;
}

// a CPU context holding the converted inputs, with room for graphs of n_tmp_floats intermediate floats
static bool adakv_op_init(
        adakv_op_inputs & in,
        const float * q,
        const float * k,
        const float * v,
        const float * mask,
        int32_t n_q,
        int32_t n_kv,
        int32_t n_head,
        int32_t n_head_kv,
        int32_t d_k,
        int32_t d_v,
        ggml_type t,
        size_t n_tmp_floats,
        int32_t n_threads) {
    const size_t n_in     = (size_t) n_q * n_head * d_k + (size_t) n_kv * n_head_kv * (d_k + d_v) + (size_t) n_q * n_kv;
    const size_t mem_size = 4 * sizeof(float) * (n_in + n_tmp_floats) + (size_t) n_threads * (1 << 20) +
                            64 * (size_t) (n_head + 16) * ggml_tensor_overhead() + ggml_graph_overhead() + (32u << 20);
    ggml_init_params ip   = { mem_size, nullptr, false };
    in.ctx                = ggml_init(ip);
    if (!in.ctx) {
        return false;
    }
    in.q = ggml_new_tensor_4d(in.ctx, GGML_TYPE_F32, d_k, n_q, n_head, 1);
    in.k = ggml_new_tensor_4d(in.ctx, t, d_k, n_kv, n_head_kv, 1);
    memcpy(in.q->data, q, ggml_nbytes(in.q));
    adakv_convert_rows(t, k, in.k->data, (int64_t) n_kv * n_head_kv, d_k);
    if (v) {
        in.v = ggml_new_tensor_4d(in.ctx, t, d_v, n_kv, n_head_kv, 1);
        adakv_convert_rows(t, v, in.v->data, (int64_t) n_kv * n_head_kv, d_v);
    }
    if (mask) {
        in.m = ggml_new_tensor_4d(in.ctx, GGML_TYPE_F16, n_kv, n_q, 1, 1);
        ggml_fp32_to_fp16_row(mask, (ggml_fp16_t *) in.m->data, (int64_t) n_q * n_kv);
    }
    return true;
}

static int32_t adakv_op_compute(const char * func, adakv_op_inputs & in, ggml_tensor * res, int32_t n_threads) {
    ggml_cgraph * gf = ggml_new_graph_custom(in.ctx, 4096, false);
    ggml_build_forward_expand(gf, res);
    const ggml_status st = ggml_graph_compute_with_ctx(in.ctx, gf, n_threads);
    if (st != GGML_STATUS_SUCCESS) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_BACKEND, "%s: graph compute failed (status %d)", func, (int) st);
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_flash_attn_cpu(
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
        float * v_used) {
    llama_adakv_clear_error();
    // the fast path's kernels clamp the starts (patch 0001); the fallback needs them in range
    int32_t rc = adakv_op_check(
            __func__, q, k, starts, out, n_q, n_kv, n_head, n_head_kv, d_k, d_v, kv_type, n_threads,
            path == LLAMA_ADAKV_FA_FAST);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }
    if (!v) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: v must not be NULL", __func__);
    }
    if (path != LLAMA_ADAKV_FA_FAST && path != LLAMA_ADAKV_FA_FALLBACK && path != LLAMA_ADAKV_FA_MASK) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: unknown path %d", __func__, path);
    }
    const ggml_type t = (ggml_type) kv_type;
    // the fallback's per-head mask copies and results, the mask path's per-head mask
    const size_t n_tmp = (size_t) (n_head_kv + 1) * n_q * n_kv + 2 * (size_t) n_q * n_head * d_v +
                         (size_t) n_kv * (n_q + 1) * n_head * 3 + (size_t) n_head_kv;
    adakv_op_inputs in;
    if (!adakv_op_init(in, q, k, v, mask, n_q, n_kv, n_head, n_head_kv, d_k, d_v, t, n_tmp, n_threads)) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate the op context", __func__);
    }

    ggml_tensor * res;
    if (path == LLAMA_ADAKV_FA_FAST) {
        ggml_tensor * ts = ggml_new_tensor_1d(in.ctx, GGML_TYPE_I32, n_head_kv);
        memcpy(ts->data, starts, n_head_kv * sizeof(int32_t));
        res = ggml_flash_attn_ext(in.ctx, in.q, in.k, in.v, in.m, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(res, GGML_PREC_F32);
        ggml_flash_attn_ext_set_head_start(res, ts);
    } else if (path == LLAMA_ADAKV_FA_MASK) {
        ggml_tensor * hm =
                llama_adakv_head_mask(in.ctx, in.m, adakv_starts_f32(in.ctx, starts, n_head_kv), n_kv, n_q, n_head);
        res = ggml_flash_attn_ext(in.ctx, in.q, in.k, in.v, hm, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(res, GGML_PREC_F32);
    } else {
        res = llama_adakv_fa_fallback(in.ctx, in.q, in.k, in.v, in.m, starts, scale, 0.0f);
    }
    rc = adakv_op_compute(__func__, in, res, n_threads);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }

    // res: [d_v, n_head, n_q, 1] == out[n_q][n_head][d_v]
    memcpy(out, res->data, ggml_nbytes(res));
    if (k_used) {
        adakv_rows_to_float(t, in.k->data, k_used, ggml_nelements(in.k));
    }
    if (v_used) {
        adakv_rows_to_float(t, in.v->data, v_used, ggml_nelements(in.v));
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_flash_attn_pooled_cpu(
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
        float * v_used) {
    llama_adakv_clear_error();
    int32_t rc = adakv_op_check(
            __func__, q, k, starts, out, n_q, n_kv, n_head, n_head_kv, d_k, d_v, kv_type, n_threads, true);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }
    if (!v || !pools) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: v and pools must not be NULL", __func__);
    }
    const ggml_type t = (ggml_type) kv_type;
    adakv_op_inputs in;
    // q and the mask from the shared init; K and V in the cache's layout below
    if (!adakv_op_init(
                in, q, k, v, mask, n_q, n_kv, n_head, n_head_kv, d_k, d_v, t, (size_t) n_q * n_head * d_v, n_threads)) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate the op context", __func__);
    }
    // [d * n_head_kv, n_kv]: a cache tensor, viewed [d, n_kv, n_head_kv] as llama.cpp's attention does
    ggml_tensor * kc = ggml_new_tensor_2d(in.ctx, t, (int64_t) d_k * n_head_kv, n_kv);
    ggml_tensor * vc = ggml_new_tensor_2d(in.ctx, t, (int64_t) d_v * n_head_kv, n_kv);
    adakv_convert_rows(t, k, kc->data, (int64_t) n_kv * n_head_kv, d_k);
    adakv_convert_rows(t, v, vc->data, (int64_t) n_kv * n_head_kv, d_v);
    ggml_tensor * kv_k = ggml_view_3d(in.ctx, kc, d_k, n_kv, n_head_kv, kc->nb[1], kc->nb[1] / n_head_kv, 0);
    ggml_tensor * kv_v = ggml_view_3d(in.ctx, vc, d_v, n_kv, n_head_kv, vc->nb[1], vc->nb[1] / n_head_kv, 0);

    ggml_tensor * ts = ggml_new_tensor_1d(in.ctx, GGML_TYPE_I32, n_head_kv);
    ggml_tensor * tp = ggml_new_tensor_2d(in.ctx, GGML_TYPE_I32, 2, n_head_kv);
    memcpy(ts->data, starts, n_head_kv * sizeof(int32_t));
    memcpy(tp->data, pools, 2 * n_head_kv * sizeof(int32_t));
    ggml_tensor * res = ggml_flash_attn_ext(in.ctx, in.q, kv_k, kv_v, in.m, scale, 0.0f, 0.0f);
    ggml_prec_set_acc(res, GGML_PREC_F32);
    ggml_flash_attn_ext_set_head_start(res, ts);
    ggml_flash_attn_ext_set_head_pool(res, tp);
    rc = adakv_op_compute(__func__, in, res, n_threads);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }
    memcpy(out, res->data, ggml_nbytes(res));
    if (k_used) {
        adakv_rows_to_float(t, kc->data, k_used, ggml_nelements(kc));
    }
    if (v_used) {
        adakv_rows_to_float(t, vc->data, v_used, ggml_nelements(vc));
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_window_scores_cpu(
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
        float * k_used) {
    llama_adakv_clear_error();
    int32_t rc = adakv_op_check(
            __func__, q, k, starts, out, n_q, n_kv, n_head, n_head_kv, d_k, d_k, kv_type, n_threads, false);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }
    if (gqa_reduce != LLAMA_ADAKV_GQA_MEAN && gqa_reduce != LLAMA_ADAKV_GQA_MAX) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: unknown gqa_reduce %d", __func__, gqa_reduce);
    }
    const ggml_type t = (ggml_type) kv_type;
    // scores, probabilities and their transposes, the mask bias
    const size_t n_tmp = 6 * (size_t) n_q * n_kv * n_head + 8 * (size_t) n_kv * n_head_kv;
    adakv_op_inputs in;
    if (!adakv_op_init(in, q, k, nullptr, mask, n_q, n_kv, n_head, n_head_kv, d_k, d_k, t, n_tmp, n_threads)) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate the op context", __func__);
    }
    // all zero: no start tensor, as the model's graph before any compaction
    const bool any   = std::any_of(starts, starts + n_head_kv, [](int32_t s) { return s != 0; });
    ggml_tensor * ts = any ? adakv_starts_f32(in.ctx, starts, n_head_kv) : nullptr;
    // [n_kv, n_head_kv] == out[n_head_kv][n_kv]
    ggml_tensor * res = llama_adakv_window_scores(in.ctx, in.q, in.k, in.m, ts, gqa_reduce, scale, 0.0f);
    rc                = adakv_op_compute(__func__, in, res, n_threads);
    if (rc != LLAMA_ADAKV_OK) {
        return rc;
    }
    memcpy(out, res->data, ggml_nbytes(res));
    if (k_used) {
        adakv_rows_to_float(t, in.k->data, k_used, ggml_nelements(in.k));
    }
    return LLAMA_ADAKV_OK;
}
