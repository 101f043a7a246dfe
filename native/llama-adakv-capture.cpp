// llama-adakv-capture.cpp - copies of the attention outputs, for evaluation (the paper's L1 objective)
//
// Armed with room for n tokens, every evicted layer's attention output (what flash attention,
// with start cells or the fallback, returns: before the output projection) of each ubatch of at
// most n tokens is copied into a buffer next to the layer's cache; a later ubatch overwrites it.

#include "adakv-impl.h"
#include "llama-adakv-hooks.h"
#include "llama-adakv-state.h"
#include "llama-adakv.h"

#include "llama-context.h"

#include <algorithm>
#include <map>

void llama_adakv_free_capture(llama_adakv & ak) {
    for (auto * b : ak.capture_bufs) {
        ggml_backend_buffer_free(b);
    }
    for (auto * c : ak.capture_ctxs) {
        ggml_free(c);
    }
    ak.capture_bufs.clear();
    ak.capture_ctxs.clear();
    ak.capture.clear();
    ak.captured.clear();
    ak.capture_tokens  = 0;
    ak.captured_tokens = 0;
}

// d_v * n_head: the width of one token's attention output
static int64_t adakv_capture_width(const llama_adakv & ak, const llama_adakv_layer & l) {
    return l.v->ne[0] / ak.n_head_kv * ak.n_head;
}

void llama_adakv_graph_capture(llama_adakv * ak, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * out, size_t i) {
    if (ak->capture_tokens == 0 || out->ne[2] > ak->capture_tokens || out->ne[3] != 1) {
        return;
    }
    const int64_t width = out->ne[0] * out->ne[1];
    ggml_tensor * dst   = ak->capture[i];
    GGML_ASSERT(width == dst->ne[0]);
    ggml_tensor * src = ggml_reshape_2d(ctx, ggml_is_contiguous(out) ? out : ggml_cont(ctx, out), width, out->ne[2]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, src, ggml_view_2d(ctx, dst, width, out->ne[2], dst->nb[1], 0)));
    ak->captured_tokens = (int32_t) out->ne[2];
    ak->captured[i]     = true;
}

int32_t llama_adakv_arm_capture(struct llama_context * ctx, int32_t n_tokens) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    const uint32_t n_ubatch = ctx->get_cparams().n_ubatch;
    if (n_tokens < 0 || (uint32_t) n_tokens > n_ubatch) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: n_tokens must be in [0, n_ubatch = %u], got %d", __func__, n_ubatch,
                n_tokens);
    }
    for (const auto & l : ak->layers) {
        if (adakv_capture_width(*ak, l) != adakv_capture_width(*ak, ak->layers[0])) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID, "%s: the evicted layers differ in attention width; not supported",
                    __func__);
        }
    }
    llama_adakv_free_capture(*ak);
    ak->epoch++;
    if (n_tokens == 0) {
        return LLAMA_ADAKV_OK;
    }
    ak->capture.assign(ak->layers.size(), nullptr);
    ak->captured.assign(ak->layers.size(), false);
    std::map<ggml_backend_buffer_type_t, std::vector<size_t>> by_buft;
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        by_buft[ggml_backend_buffer_get_type(ak->layers[i].k->buffer)].push_back(i);
    }
    for (auto & [buft, ids] : by_buft) {
        ggml_init_params ip = { ids.size() * ggml_tensor_overhead(), nullptr, true };
        ggml_context * tctx = llama_adakv_alloc_fails() ? nullptr : ggml_init(ip);
        if (!tctx) {
            llama_adakv_free_capture(*ak);
            return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: ggml_init failed", __func__);
        }
        ak->capture_ctxs.push_back(tctx);
        for (size_t i : ids) {
            const auto & l = ak->layers[i];
            ak->capture[i] = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, adakv_capture_width(*ak, l), n_tokens);
            ggml_format_name(ak->capture[i], "adakv_capture-%d", l.il);
        }
        ggml_backend_buffer_t buf =
                llama_adakv_alloc_fails() ? nullptr : ggml_backend_alloc_ctx_tensors_from_buft(tctx, buft);
        if (!buf) {
            llama_adakv_free_capture(*ak);
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate the capture buffers (%s)", __func__,
                    ggml_backend_buft_name(buft));
        }
        ak->capture_bufs.push_back(buf);
    }
    ak->capture_tokens = n_tokens;
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_read_capture(struct llama_context * ctx, float * out, int32_t n_tokens) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass an array of n_layer * n_tokens * width floats",
                __func__);
    }
    if (ak->capture_tokens == 0) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: the capture was not armed", __func__);
    }
    const bool all = std::find(ak->captured.begin(), ak->captured.end(), false) == ak->captured.end();
    if (!all || ak->captured_tokens != n_tokens) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: asked for %d tokens, but the last ubatch captured %d (every ubatch of at most %d "
                "tokens is captured after arming)",
                __func__, n_tokens, all ? ak->captured_tokens : 0, ak->capture_tokens);
    }
    ctx->synchronize();
    size_t off = 0;
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        const int64_t width = ak->capture[i]->ne[0];
        ggml_backend_tensor_get(ak->capture[i], out + off, 0, (size_t) width * n_tokens * sizeof(float));
        off += (size_t) width * n_tokens;
    }
    return LLAMA_ADAKV_OK;
}

int64_t llama_adakv_capture_width(const struct llama_context * ctx) {
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    return adakv_capture_width(*ak, ak->layers[0]);
}
