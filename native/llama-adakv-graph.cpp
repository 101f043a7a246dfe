// llama-adakv-graph.cpp - the adakv part of the llama.cpp graph: window scores and per-head start cells

#include "adakv-fattn.h"
#include "llama-adakv-hooks.h"
#include "llama-adakv-state.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstring>

uint64_t llama_adakv_graph_epoch(const llama_adakv * ak) {
    return ak ? ak->epoch : 0;
}

uint32_t llama_adakv_graph_extra_nodes(const llama_adakv * ak) {
    if (ak == nullptr) {
        return 0;
    }
    // per evicted layer, generously: the fallback's 7 tensors per KV head (three views, the mask
    // view and its copy, the attention, the concat), the window scores' ~25 plus 4 per query head
    // of a group (max reduction), the capture's copy; tensors that are not nodes count against the
    // same budget (llm_graph_result sizes its tensor pool by it)
    const uint32_t n_gqa = (uint32_t) (ak->n_head / ak->n_head_kv);
    return (uint32_t) ak->layers.size() * (8u * (uint32_t) ak->n_head_kv + 4u * n_gqa + 64u);
}

llama_adakv_reserve_scope::llama_adakv_reserve_scope(llama_adakv * ak) : ak(ak) {
    if (ak != nullptr) {
        scored_tokens   = ak->scored_tokens;
        scored_n_kv     = ak->scored_n_kv;
        captured_tokens = ak->captured_tokens;
        scored          = ak->scored;
        captured        = ak->captured;
        for (const auto & l : ak->layers) {
            attn_used.push_back(l.attn_used);
        }
    }
}

llama_adakv_reserve_scope::~llama_adakv_reserve_scope() {
    if (ak != nullptr) {
        ak->scored_tokens   = scored_tokens;
        ak->scored_n_kv     = scored_n_kv;
        ak->captured_tokens = captured_tokens;
        ak->scored          = std::move(scored);
        ak->captured        = std::move(captured);
        for (size_t i = 0; i < attn_used.size(); ++i) {
            ak->layers[i].attn_used = attn_used[i];
        }
    }
}

// the per-head mask of one ubatch may take at most this much of the compute buffer; a larger
// ubatch (a long prompt after a compaction) takes the one-call-per-KV-head path instead
static const size_t ADAKV_HEAD_MASK_MAX_BYTES = 256u << 20;

// the attention of one layer with the start cells applied, best first: the stock node (nothing
// compacted), the same node with per-head starts (the backend's kernels honour them), the same
// node with a per-head mask (stock kernels), or one stock call per KV head
static ggml_tensor * llama_adakv_graph_heads(
        llama_adakv * ak, ggml_context * ctx, llama_adakv_layer & l, ggml_tensor * fa, float scale, float softcap) {
    if (ak->footprint == 0) {
        l.attn_used = LLAMA_ADAKV_USED_STOCK;
        return fa; // nothing compacted: stock attention
    }
    ggml_backend_dev_t dev = llama_adakv_dev_of(l.k);
    if (ak->attn_path == LLAMA_ADAKV_ATTN_AUTO) {
        ggml_flash_attn_ext_set_head_start(fa, l.start_i32);
        if (ggml_backend_dev_supports_op(dev, fa)) {
            l.attn_used = LLAMA_ADAKV_USED_KERNEL;
            return fa;
        }
        ggml_flash_attn_ext_set_head_start(fa, nullptr);
    }
    ggml_tensor * q    = fa->src[0];
    ggml_tensor * k    = fa->src[1];
    ggml_tensor * mask = fa->src[3];
    if (ak->attn_path != LLAMA_ADAKV_ATTN_HEADS && q->ne[3] == 1 &&
        llama_adakv_head_mask_bytes(k->ne[1], q->ne[1], q->ne[2]) <= ADAKV_HEAD_MASK_MAX_BYTES) {
        fa->src[3] = llama_adakv_head_mask(ctx, mask, l.start_f32, k->ne[1], mask ? mask->ne[1] : q->ne[1], q->ne[2]);
        if (ggml_backend_dev_supports_op(dev, fa)) {
            l.attn_used = LLAMA_ADAKV_USED_MASK;
            return fa;
        }
        fa->src[3] = mask;
    }
    GGML_ASSERT(fa->src[4] == nullptr && "adakv: the per-head fallback does not support attention sinks");
    l.attn_used = LLAMA_ADAKV_USED_HEADS;
    return llama_adakv_fa_fallback(ctx, q, k, fa->src[2], mask, l.start.data(), scale, softcap);
}

ggml_tensor * llama_adakv_graph_attn(llama_adakv * ak, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * fa, int il) {
    if (ak == nullptr || fa->op != GGML_OP_FLASH_ATTN_EXT || il < 0 || (size_t) il >= ak->layer_of_il.size() ||
        ak->layer_of_il[il] < 0) {
        return fa;
    }
    auto & l = ak->layers[ak->layer_of_il[il]];

    ggml_tensor * q    = fa->src[0];
    ggml_tensor * k    = fa->src[1];
    ggml_tensor * v    = fa->src[2];
    ggml_tensor * mask = fa->src[3];
    if (k->view_src != l.k || v->view_src != l.v) {
        return fa; // attention over something else than this layer's cache (e.g. cross attention)
    }

    float scale   = 1.0f;
    float softcap = 0.0f;
    memcpy(&scale, (const float *) fa->op_params + 0, sizeof(float));
    memcpy(&softcap, (const float *) fa->op_params + 2, sizeof(float));

    if (ak->armed_window > 0) {
        // the window is the ubatch's last w tokens: their rows of q [d_k, n_tokens, n_head] and of
        // the mask [n_kv, n_tokens (padded), 1, 1], so that the prompt's last ubatch scores it in passing
        const int64_t n_tokens = q->ne[1];
        const int64_t w        = std::min<int64_t>(ak->armed_window, n_tokens);
        ggml_tensor * q_w      = ggml_view_4d(
                ctx, q, q->ne[0], w, q->ne[2], q->ne[3], q->nb[1], q->nb[2], q->nb[3], (n_tokens - w) * q->nb[1]);
        ggml_tensor * mask_w = nullptr;
        if (mask != nullptr) {
            mask_w = ggml_view_4d(
                    ctx, mask, mask->ne[0], w, mask->ne[2], mask->ne[3], mask->nb[1], mask->nb[2], mask->nb[3],
                    (n_tokens - w) * mask->nb[1]);
        }
        // [n_kv, n_head_kv] into the persistent buffer, cells [0, n_kv) of every head
        ggml_tensor * s = llama_adakv_window_scores(
                ctx, q_w, k, mask_w, ak->footprint > 0 ? l.start_f32 : nullptr, ak->params.gqa_reduce, scale, softcap);
        ggml_tensor * dst = ggml_view_2d(ctx, l.scores, s->ne[0], s->ne[1], l.scores->nb[1], 0);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, s, dst));
        ak->scored_tokens               = (int32_t) w;
        ak->scored_n_kv                 = (uint32_t) k->ne[1];
        ak->scored[ak->layer_of_il[il]] = true;
    }

    ggml_tensor * out = llama_adakv_graph_heads(ak, ctx, l, fa, scale, softcap);
    llama_adakv_graph_capture(ak, ctx, gf, out, (size_t) ak->layer_of_il[il]);
    return out;
}
