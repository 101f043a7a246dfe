// llama-adakv-graph.cpp - the adakv part of the llama.cpp graph: window scores and per-head start cells

#include "adakv-fattn.h"
#include "llama-adakv-hooks.h"
#include "llama-adakv-state.h"

#include "ggml-backend.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>

uint64_t llama_adakv_graph_epoch(const llama_adakv * ak) {
    return ak ? ak->epoch : 0;
}

uint32_t llama_adakv_graph_extra_nodes(const llama_adakv * ak) {
    if (ak == nullptr) {
        return 0;
    }
    // per evicted layer, generously: the fallback's 7 tensors per KV head (three views, the mask
    // view and its copy, the attention, the concat), the window scores' ~25 plus 4 per query head
    // of a group (max reduction), the capture's copy, the pooled layout's gathered view (K, V and
    // the mask: ~20) or its pool mask (~30); tensors that are not nodes count against the same budget (llm_graph_result
    // sizes its tensor pool by it)
    const uint32_t n_gqa = (uint32_t) (ak->n_head / ak->n_head_kv);
    return (uint32_t) ak->layers.size() * (8u * (uint32_t) ak->n_head_kv + 4u * n_gqa + 128u);
}

llama_adakv_reserve_scope::llama_adakv_reserve_scope(llama_adakv * ak) : ak(ak) {
    if (ak != nullptr) {
        scored_tokens   = ak->scored_tokens;
        scored_n_kv     = ak->scored_n_kv;
        captured_tokens = ak->captured_tokens;
        scored          = ak->scored;
        captured        = ak->captured;
        armed_window    = ak->armed_window;
        footprint       = ak->footprint;
        width           = ak->width;
        for (const auto & l : ak->layers) {
            attn_used.push_back(l.attn_used);
        }
        // the worst graph (or the variant asked for, at its largest shapes): scoring armed, and a
        // block (the graph reads only the shapes of the persistent tensors here, never their
        // values). Pooled: the view of the graph's n_kv cells has W + n_kv - R cells, the most
        // with a head keeping the whole cache (W = kv_size) in the fewest cells a block of such a
        // head can have, R = ceil(W / H); rect: a block of one cell (its view has n_kv cells
        // whatever its width)
        const int32_t H  = ak->n_head_kv;
        const int32_t W  = (int32_t) ak->kv_size;
        const int32_t v  = ak->reserve_variant;
        const bool armed = v < 0 || (v & LLAMA_ADAKV_VARIANT_ARMED);
        const bool block = v < 0 || (v & LLAMA_ADAKV_VARIANT_BLOCK);
        ak->armed_window = armed ? std::max(ak->armed_window, ak->reserve_window) : 0;
        if (!block) {
            ak->footprint = 0;
        } else if (ak->layout == LLAMA_ADAKV_LAYOUT_POOLED) {
            ak->width     = W;
            ak->footprint = (W + H - 1) / H;
        } else {
            ak->width     = std::max(ak->width, 1);
            ak->footprint = ak->width;
        }
        ak->plan_signature = 0; // the scheduler's plan is this graph's now (llama_adakv_graph_plan)
        if (ak->scored.size() != ak->layers.size()) {
            ak->scored.assign(ak->layers.size(), false);
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
        ak->armed_window    = armed_window;
        ak->footprint       = footprint;
        ak->width           = width;
        ak->view_masks      = {}; // tensors of the reserve's graph
        for (size_t i = 0; i < attn_used.size(); ++i) {
            ak->layers[i].attn_used = attn_used[i];
        }
    }
}

// the per-head mask of one ubatch may take at most this much of the compute buffer; a larger
// ubatch (a long prompt after a compaction) takes the one-call-per-KV-head path instead
static const size_t ADAKV_HEAD_MASK_MAX_BYTES = 256u << 20;

// a view of the bytes of t as a tensor of another type (ne: its shape, contiguous), for byte-exact
// row moves with stock ops: a GGML_OP_VIEW node like ggml_view_*'s, so that every backend and the
// graph allocator see it as a view of t (its data, its dependencies)
static ggml_tensor * adakv_view_as(ggml_context * ctx, ggml_tensor * t, ggml_type type, int64_t ne0, int64_t ne1) {
    GGML_ASSERT(ggml_row_size(type, ne0) * ne1 <= ggml_nbytes(t));
    ggml_tensor * v   = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    v->view_src       = t->view_src ? t->view_src : t;
    v->view_offs      = t->view_src ? t->view_offs : 0;
    v->op             = GGML_OP_VIEW;
    v->src[0]         = t;
    const size_t offs = 0; // from t, as ggml_view_* notes it
    memcpy(v->op_params, &offs, sizeof(offs));
    ggml_format_name(v, "%s (as %s)", t->name, ggml_type_name(type));
    return v;
}

// The per-head view of a pooled block, gathered with stock ops for one ubatch (the routes that do
// not read the pooled rows in the kernel, and the window scores): K or V of view cells [0, n_view),
// [d, n_view, n_head_kv], cell-major as the cache itself. One get_rows over the persistent
// cell-major row table moves the head rows' bytes as I32 words (llama_adakv_enable refuses caches
// whose head rows are not whole words), so the view holds the cache's own type and bytes: the
// stock kernels read exactly what they read in the rect layout.
static ggml_tensor * adakv_view_kv(
        ggml_context * ctx,
        const llama_adakv & ak,
        const llama_adakv_layer & l,
        ggml_tensor * t,
        int64_t d,
        int64_t n_view) {
    const int64_t H    = ak.n_head_kv;
    const size_t bytes = ggml_row_size(t->type, d); // one head row
    GGML_ASSERT(bytes % 4 == 0);
    const int64_t w    = (int64_t) bytes / 4;
    ggml_tensor * idx  = ggml_view_1d(ctx, l.view_rows, n_view * H, 0);                     // [n_view*H]
    ggml_tensor * rows = adakv_view_as(ctx, t, GGML_TYPE_I32, w, (int64_t) ak.kv_size * H); // [w, kv_size*H]
    ggml_tensor * g    = ggml_get_rows(ctx, rows, idx);                                     // I32 [w, n_view*H]
    ggml_tensor * kv   = adakv_view_as(ctx, g, t->type, d, n_view * H);                     // [d, n_view*H]
    return ggml_view_3d(ctx, kv, d, n_view, H, H * bytes, bytes, 0);
}

// the entry of the per-graph mask cache for a mask input (a free one if it has none yet; null when
// the cache is full: then nothing is shared)
static llama_adakv::view_mask_entry * adakv_mask_entry(llama_adakv & ak, const ggml_tensor * mask) {
    for (auto & e : ak.view_masks) {
        if (e.src == mask) {
            return &e;
        }
    }
    for (auto & e : ak.view_masks) {
        if (e.src == nullptr) {
            e.src = mask;
            return &e;
        }
    }
    return nullptr;
}

// the mask of the view: F16 [n_kv, n_q] of the cache cells -> F16 [width + n_kv - footprint, n_q],
// 0 for the block's view cells (the past: always visible), then the mask of the cells after the
// block; built once per graph and mask input, and shared by the layers that read the same mask
static ggml_tensor * adakv_view_mask(ggml_context * ctx, llama_adakv & ak, ggml_tensor * mask) {
    auto * e = adakv_mask_entry(ak, mask);
    if (e != nullptr && e->view != nullptr) {
        return e->view;
    }
    const int64_t n_kv = mask->ne[0];
    const int64_t n_q  = mask->ne[1];
    ggml_tensor * tail =
            ggml_view_2d(ctx, mask, n_kv - ak.footprint, n_q, mask->nb[1], (size_t) ak.footprint * mask->nb[0]);
    ggml_tensor * tmpl = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ak.width, n_q);
    ggml_tensor * zero = ggml_scale(ctx, ggml_repeat(ctx, ggml_arange(ctx, 0.0f, (float) ak.width, 1.0f), tmpl), 0.0f);
    ggml_tensor * view = ggml_cast(ctx, ggml_concat(ctx, zero, ggml_cast(ctx, tail, GGML_TYPE_F32), 0), GGML_TYPE_F16);
    if (e != nullptr) {
        e->view = view;
    }
    return view;
}

// The pool mask: the route that reads a pooled block where it lies with one stock call. K and V are
// the layer's first n_kv cells seen as n_kv * H head rows of one shared KV head, and the mask leaves
// each query head the rows of its own KV head: its pooled rows [row0, row0 + L) (the persistent
// block part, written with the block), then its row of every cell after the block (where the
// layer's mask allows that cell). The kernel skips the other rows (-inf) and meets the same rows in
// the same order as the rect layout's routes.
//
// The part of the cells after the block, shared by the layers that read the same mask input:
// F16 [H * n_tail, n_q, 1, H], row c * H + h' of KV head h is the mask of cell footprint + c if
// h' == h, else -inf.
static ggml_tensor *
adakv_pool_tail_mask(ggml_context * ctx, llama_adakv & ak, ggml_tensor * mask, int64_t n_kv, int64_t n_q) {
    auto * e = mask ? adakv_mask_entry(ak, mask) : nullptr;
    if (e != nullptr && e->tail != nullptr) {
        return e->tail;
    }
    const int64_t H      = ak.n_head_kv;
    const int64_t n_tail = n_kv - ak.footprint;
    // [H, 1, 1, H]: 0 where the row's head h' is the KV head h, -inf elsewhere
    ggml_tensor * a     = ggml_arange(ctx, 0.0f, (float) H, 1.0f);
    ggml_tensor * tmpl  = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, H, 1, 1, H);
    ggml_tensor * rows  = ggml_repeat(ctx, ggml_reshape_4d(ctx, a, H, 1, 1, 1), tmpl);
    ggml_tensor * heads = ggml_repeat(ctx, ggml_reshape_4d(ctx, a, 1, 1, 1, H), tmpl);
    ggml_tensor * diag =
            ggml_log(ctx, ggml_step(ctx, ggml_scale_bias(ctx, ggml_abs(ctx, ggml_sub(ctx, rows, heads)), -1.0f, 0.5f)));
    ggml_tensor * full = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, H, n_tail, n_q, H);
    ggml_tensor * t    = nullptr;
    if (mask != nullptr) {
        ggml_tensor * cells = ggml_view_2d(ctx, mask, n_tail, n_q, mask->nb[1], (size_t) ak.footprint * mask->nb[0]);
        cells               = ggml_reshape_4d(ctx, ggml_cast(ctx, cells, GGML_TYPE_F32), 1, n_tail, n_q, 1);
        t                   = ggml_add(ctx, ggml_repeat(ctx, cells, full), diag);
    } else {
        t = ggml_repeat(ctx, diag, full);
    }
    t = ggml_cast(ctx, ggml_reshape_4d(ctx, t, H * n_tail, n_q, 1, H), GGML_TYPE_F16);
    if (e != nullptr) {
        e->tail = t;
    }
    return t;
}

// the pool mask of layer l: F16 [n_kv * H, n_q, n_head, 1] (see adakv_pool_tail_mask)
static ggml_tensor * adakv_pool_mask(
        ggml_context * ctx,
        llama_adakv & ak,
        const llama_adakv_layer & l,
        ggml_tensor * mask,
        int64_t n_kv,
        int64_t n_q,
        int64_t n_head) {
    const int64_t H  = ak.n_head_kv;
    const int64_t g  = n_head / H;
    const int64_t RH = (int64_t) ak.footprint * H; // the block's head rows
    GGML_ASSERT(n_head % H == 0);
    const size_t nb = l.pool_mask->nb[1];
    ggml_tensor * m = ggml_view_4d(ctx, l.pool_mask, RH, 1, 1, H, nb, nb, nb, 0); // [RH, 1, 1, H]
    if (n_q > 1) {
        m = ggml_repeat(ctx, m, ggml_new_tensor_4d(ctx, GGML_TYPE_F16, RH, n_q, 1, H));
    }
    m = ggml_concat(ctx, m, adakv_pool_tail_mask(ctx, ak, mask, n_kv, n_q), 0); // [n_kv * H, n_q, 1, H]
    if (g > 1) {
        m = ggml_repeat(ctx, m, ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv * H, n_q, g, H));
    }
    return ggml_reshape_4d(ctx, m, n_kv * H, n_q, n_head, 1);
}

// the attention of one layer over a block that is a rectangle with per-head start cells (the rect
// layout, or the gathered view of a pooled block), best first: the start cells inside the kernel,
// a per-head mask on the stock kernel, or one stock call per KV head
static ggml_tensor * llama_adakv_graph_rect(
        llama_adakv * ak,
        ggml_context * ctx,
        llama_adakv_layer & l,
        ggml_tensor * fa,
        float scale,
        float softcap,
        bool gathered) {
    ggml_backend_dev_t dev = llama_adakv_dev_of(l.k);
    if (ak->attn_path == LLAMA_ADAKV_ATTN_AUTO) {
        ggml_flash_attn_ext_set_head_start(fa, gathered ? l.vstart_i32 : l.start_i32);
        if (ggml_backend_dev_supports_op(dev, fa)) {
            l.attn_used = gathered ? LLAMA_ADAKV_USED_GATHER_KERNEL : LLAMA_ADAKV_USED_KERNEL;
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
            l.attn_used = gathered ? LLAMA_ADAKV_USED_GATHER_MASK : LLAMA_ADAKV_USED_MASK;
            return fa;
        }
        fa->src[3] = mask;
    }
    GGML_ASSERT(fa->src[4] == nullptr && "adakv: the per-head fallback does not support attention sinks");
    l.attn_used = gathered ? LLAMA_ADAKV_USED_GATHER_HEADS : LLAMA_ADAKV_USED_HEADS;
    return llama_adakv_fa_fallback(ctx, q, k, fa->src[2], mask, l.start.data(), scale, softcap);
}

// the attention of one layer with the block applied: the stock node (nothing compacted), the rect
// routes, or for a pooled block the same node with its pooled rows (the backend's kernels read
// them), else the rect routes over the block's view gathered for this ubatch
static ggml_tensor * llama_adakv_graph_heads(
        llama_adakv * ak,
        ggml_context * ctx,
        llama_adakv_layer & l,
        ggml_tensor * fa,
        float scale,
        float softcap,
        const std::function<std::array<ggml_tensor *, 3>()> & gather) {
    if (ak->footprint == 0) {
        l.attn_used = LLAMA_ADAKV_USED_STOCK;
        return fa; // nothing compacted: stock attention
    }
    if (ak->layout != LLAMA_ADAKV_LAYOUT_POOLED) {
        return llama_adakv_graph_rect(ak, ctx, l, fa, scale, softcap, false);
    }
    if (ak->attn_path == LLAMA_ADAKV_ATTN_AUTO) {
        ggml_flash_attn_ext_set_head_start(fa, l.start_i32);
        ggml_flash_attn_ext_set_head_pool(fa, l.pool_i32);
        if (ggml_backend_dev_supports_op(llama_adakv_dev_of(l.k), fa)) {
            l.attn_used = LLAMA_ADAKV_USED_KERNEL;
            return fa;
        }
        ggml_flash_attn_ext_set_head_pool(fa, nullptr);
        ggml_flash_attn_ext_set_head_start(fa, nullptr);
    }
    ggml_tensor * q    = fa->src[0];
    ggml_tensor * k    = fa->src[1];
    ggml_tensor * v    = fa->src[2];
    ggml_tensor * mask = fa->src[3];
    const int64_t H    = ak->n_head_kv;
    const int64_t n_kv = k->ne[1];
    const int64_t n_q  = mask ? mask->ne[1] : q->ne[1];
    if (ak->attn_path != LLAMA_ADAKV_ATTN_HEADS && q->ne[3] == 1 && n_q <= ADAKV_POOL_MASK_MAX_TOKENS &&
        llama_adakv_head_mask_bytes(n_kv * H, n_q, q->ne[2]) <= ADAKV_HEAD_MASK_MAX_BYTES) {
        // the block where it lies: every head row a column of one shared KV head
        const size_t kb = ggml_row_size(l.k->type, k->ne[0]);
        const size_t vb = ggml_row_size(l.v->type, v->ne[0]);
        fa->src[1]      = ggml_view_3d(ctx, l.k, k->ne[0], n_kv * H, 1, kb, kb * n_kv * H, 0);
        fa->src[2]      = ggml_view_3d(ctx, l.v, v->ne[0], n_kv * H, 1, vb, vb * n_kv * H, 0);
        fa->src[3]      = adakv_pool_mask(ctx, *ak, l, mask, n_kv, n_q, q->ne[2]);
        if (ggml_backend_dev_supports_op(llama_adakv_dev_of(l.k), fa)) {
            l.attn_used = LLAMA_ADAKV_USED_POOL_MASK;
            return fa;
        }
        fa->src[1] = k;
        fa->src[2] = v;
        fa->src[3] = mask;
    }
    const auto view = gather(); // K, V and the mask of the view
    fa->src[1]      = view[0];
    fa->src[2]      = view[1];
    fa->src[3]      = view[2];
    return llama_adakv_graph_rect(ak, ctx, l, fa, scale, softcap, true);
}

ggml_tensor * llama_adakv_graph_attn(llama_adakv * ak, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * fa, int il) {
    if (ak == nullptr) {
        return fa;
    }
    if (il <= ak->graph_il) {
        ak->view_masks = {}; // a new graph: the tensors of the last one are gone
    }
    ak->graph_il = il;
    if (fa->op != GGML_OP_FLASH_ATTN_EXT || il < 0 || (size_t) il >= ak->layer_of_il.size() ||
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

    // a pooled block's view, gathered for this ubatch where something reads it (built lazily: the
    // in-kernel route of a decoded token needs none)
    const bool pooled       = ak->layout == LLAMA_ADAKV_LAYOUT_POOLED && ak->footprint > 0;
    const int64_t n_view    = ak->width + k->ne[1] - ak->footprint;
    ggml_tensor * k_view    = nullptr;
    ggml_tensor * v_view    = nullptr;
    ggml_tensor * mask_view = nullptr;
    auto gather             = [&]() -> std::array<ggml_tensor *, 3> {
        if (pooled && k_view == nullptr) {
            k_view    = adakv_view_kv(ctx, *ak, l, l.k, k->ne[0], n_view);
            v_view    = adakv_view_kv(ctx, *ak, l, l.v, v->ne[0], n_view);
            mask_view = mask ? adakv_view_mask(ctx, *ak, mask) : nullptr;
        }
        return { k_view, v_view, mask_view };
    };

    if (ak->armed_window > 0) {
        gather();
        ggml_tensor * k_s    = pooled ? k_view : k;
        ggml_tensor * mask_s = pooled ? mask_view : mask;
        // the window is the ubatch's last w tokens: their rows of q [d_k, n_tokens, n_head] and of
        // the mask [n_kv, n_tokens (padded), 1, 1], so that the prompt's last ubatch scores it in passing
        const int64_t n_tokens = q->ne[1];
        const int64_t w        = std::min<int64_t>(ak->armed_window, n_tokens);
        ggml_tensor * q_w      = ggml_view_4d(
                ctx, q, q->ne[0], w, q->ne[2], q->ne[3], q->nb[1], q->nb[2], q->nb[3], (n_tokens - w) * q->nb[1]);
        ggml_tensor * mask_w = nullptr;
        if (mask_s != nullptr) {
            mask_w = ggml_view_4d(
                    ctx, mask_s, mask_s->ne[0], w, mask_s->ne[2], mask_s->ne[3], mask_s->nb[1], mask_s->nb[2],
                    mask_s->nb[3], (n_tokens - w) * mask_s->nb[1]);
        }
        // [n_view, n_head_kv] into the persistent buffer, view cells [0, n_view) of every head
        ggml_tensor * s = llama_adakv_window_scores(
                ctx, q_w, k_s, mask_w, ak->footprint > 0 ? l.start_f32 : nullptr, ak->params.gqa_reduce, scale,
                softcap);
        ggml_tensor * dst = ggml_view_2d(ctx, l.scores, s->ne[0], s->ne[1], l.scores->nb[1], 0);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, s, dst));
        ak->scored_tokens               = (int32_t) w;
        ak->scored_n_kv                 = (uint32_t) k_s->ne[1];
        ak->scored[ak->layer_of_il[il]] = true;
    }

    ggml_tensor * out = llama_adakv_graph_heads(ak, ctx, l, fa, scale, softcap, gather);
    llama_adakv_graph_capture(ak, ctx, gf, out, (size_t) ak->layer_of_il[il]);
    return out;
}
