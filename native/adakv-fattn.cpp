// adakv-fattn.cpp - per-KV-head start cells in attention: fallback graph and CPU op check

#include "adakv-fattn.h"

#include "adakv-impl.h"
#include "llama-adakv.h"

#include "ggml-cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

ggml_tensor * llama_adakv_fa_fallback(
        ggml_context  * ctx,
        ggml_tensor   * q,
        ggml_tensor   * k,
        ggml_tensor   * v,
        ggml_tensor   * mask,
        const int32_t * starts,
        float           scale,
        float           logit_softcap) {
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
        ggml_tensor * q_h = ggml_view_4d(ctx, q, q->ne[0], q->ne[1], n_gqa, 1,
                q->nb[1], q->nb[2], q->nb[3], h*n_gqa*q->nb[2]);
        // cells [s, n_kv) of this KV head: [d, n_kv - s, 1, 1]
        ggml_tensor * k_h = ggml_view_4d(ctx, k, k->ne[0], n_kv - s, 1, 1,
                k->nb[1], k->nb[2], k->nb[3], s*k->nb[1] + h*k->nb[2]);
        ggml_tensor * v_h = ggml_view_4d(ctx, v, v->ne[0], n_kv - s, 1, 1,
                v->nb[1], v->nb[2], v->nb[3], s*v->nb[1] + h*v->nb[2]);

        ggml_tensor * m_h = nullptr;
        if (mask) {
            // columns [s, n_kv) of the mask, made contiguous as flash attention requires
            m_h = ggml_view_2d(ctx, mask, n_kv - s, mask->ne[1], mask->nb[1], s*mask->nb[0]);
            m_h = ggml_cont(ctx, m_h);
        }

        // [d_v, n_gqa, n_q, 1]
        ggml_tensor * o_h = ggml_flash_attn_ext(ctx, q_h, k_h, v_h, m_h, scale, 0.0f, logit_softcap);
        ggml_prec_set_acc(o_h, GGML_PREC_F32);

        res = res ? ggml_concat(ctx, res, o_h, 1) : o_h;
    }
    return res;
}

static bool adakv_kv_type_ok(int32_t kv_type, int32_t d_k, int32_t d_v) {
    if (kv_type < 0 || kv_type >= GGML_TYPE_COUNT) {
        return false;
    }
    const ggml_type t = (ggml_type) kv_type;
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
        memcpy(dst, src, nrows*n_per_row*sizeof(float));
    } else if (t == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(src, (ggml_fp16_t *) dst, nrows*n_per_row);
    } else {
        ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, nullptr);
    }
}

static void adakv_rows_to_float(ggml_type t, const void * src, float * dst, int64_t n) {
    if (t == GGML_TYPE_F32) {
        memcpy(dst, src, n*sizeof(float));
    } else {
        ggml_get_type_traits(t)->to_float(src, dst, n);
    }
}

int32_t llama_adakv_flash_attn_cpu(
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
        float         * v_used) {
    llama_adakv_clear_error();

    if (!q || !k || !v || !starts || !out) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: q, k, v, starts and out must not be NULL", __func__);
    }
    if (n_q < 1 || n_kv < 1 || n_head < 1 || n_head_kv < 1 || d_k < 1 || d_v < 1 || n_threads < 1) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: sizes and n_threads must be >= 1", __func__);
    }
    if (n_head % n_head_kv != 0) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: n_head (%d) is not a multiple of n_head_kv (%d)",
                __func__, n_head, n_head_kv);
    }
    if (!adakv_kv_type_ok(kv_type, d_k, d_v)) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID,
                "%s: kv_type %d is not a usable KV cache type for head sizes %d/%d", __func__, kv_type, d_k, d_v);
    }
    if (path != LLAMA_ADAKV_FA_FAST && path != LLAMA_ADAKV_FA_FALLBACK) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: unknown path %d", __func__, path);
    }
    for (int32_t h = 0; h < n_head_kv; ++h) {
        if (starts[h] < 0 || starts[h] >= n_kv) {
            return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: starts[%d] = %d is outside [0, %d)",
                    __func__, h, starts[h], n_kv);
        }
    }

    const ggml_type t = (ggml_type) kv_type;

    const size_t n_q_el  = (size_t) n_q*n_head*d_k;
    const size_t n_k_el  = (size_t) n_kv*n_head_kv*d_k;
    const size_t n_v_el  = (size_t) n_kv*n_head_kv*d_v;
    const size_t n_o_el  = (size_t) n_q*n_head*d_v;
    const size_t n_m_el  = (size_t) n_q*n_kv;
    // tensors, the fallback's per-head copies and results, and the CPU work buffer
    const size_t mem_size = 4*sizeof(float)*(n_q_el + n_k_el + n_v_el + 2*n_o_el + (size_t) (n_head_kv + 1)*n_m_el)
                          + (size_t) n_threads*(1 << 20) + 16*n_head_kv*ggml_tensor_overhead()
                          + ggml_graph_overhead() + (32u << 20);

    ggml_init_params ip = { mem_size, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate %zu bytes", __func__, mem_size);
    }

    // q: [d_k, n_q, n_head, 1], k: [d_k, n_kv, n_head_kv, 1], v: [d_v, n_kv, n_head_kv, 1]
    ggml_tensor * tq = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d_k, n_q, n_head, 1);
    ggml_tensor * tk = ggml_new_tensor_4d(ctx, t, d_k, n_kv, n_head_kv, 1);
    ggml_tensor * tv = ggml_new_tensor_4d(ctx, t, d_v, n_kv, n_head_kv, 1);
    memcpy(tq->data, q, n_q_el*sizeof(float));
    adakv_convert_rows(t, k, tk->data, (int64_t) n_kv*n_head_kv, d_k);
    adakv_convert_rows(t, v, tv->data, (int64_t) n_kv*n_head_kv, d_v);

    // mask: F16 [n_kv, n_q, 1, 1]
    ggml_tensor * tm = nullptr;
    if (mask) {
        tm = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, n_q, 1, 1);
        ggml_fp32_to_fp16_row(mask, (ggml_fp16_t *) tm->data, (int64_t) n_m_el);
    }

    ggml_tensor * res;
    if (path == LLAMA_ADAKV_FA_FAST) {
        ggml_tensor * ts = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_head_kv);
        memcpy(ts->data, starts, n_head_kv*sizeof(int32_t));
        res = ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(res, GGML_PREC_F32);
        ggml_flash_attn_ext_set_head_start(res, ts);
    } else {
        res = llama_adakv_fa_fallback(ctx, tq, tk, tv, tm, starts, scale, 0.0f);
    }

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, res);
    const ggml_status st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
    if (st != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_BACKEND, "%s: graph compute failed (status %d)", __func__, (int) st);
    }

    // res: [d_v, n_head, n_q, 1] == out[n_q][n_head][d_v]
    memcpy(out, res->data, n_o_el*sizeof(float));
    if (k_used) {
        adakv_rows_to_float(t, tk->data, k_used, (int64_t) n_k_el);
    }
    if (v_used) {
        adakv_rows_to_float(t, tv->data, v_used, (int64_t) n_v_el);
    }

    ggml_free(ctx);
    return LLAMA_ADAKV_OK;
}
