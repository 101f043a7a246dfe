// llama-adakv-state.h - the per-context state of adakv-local (internal to libllama)
//
// The compacted block of sequence 0 (one stream), one layer, H KV heads keeping L[h] tokens;
// W = max L over all layers and heads (the width), R = the footprint (cache cells of the block):
//
//   pooled layout (default): the memory of cells [0, R) seen as R*H head rows
//     head rows:  0          row0[1]       row0[2]             sum L      R*H
//                 |-- h = 0 --|--- h = 1 ---|------ h = 2 ------|- unused -|
//     row0[h] = L[0] + .. + L[h-1];  R = max over layers of ceil(sum_h L[h] / H)
//
//   rect layout: cells [R - L[h], R) of head h, R = W
//     cell:    0                      R - L[h]                R
//              |---- invalid for h ----|---- kept rows of h ---|
//
//   both:  cells [R, n) hold the tokens that came after the block (ordinary cells); the per-head
//          view (the C API's cells) puts each head's kept rows at view cells [W - L[h], W) and
//          cache cell R + i at view cell W + i; start[h] = W - L[h] is the view's start cell.
//
//   - rows are moved by byte copies, in original order, so the observation window ends up last;
//   - cells [0, R) are relabelled with positions P - R + 1 .. P (P = last position), so
//     seq_pos_max is unchanged and decoding continues at P + 1; K keeps the RoPE of the
//     original positions;
//   - attention of head h reads its kept rows, then the cells from R on (in the kernel, or
//     through a per-ubatch gather of the view with stock ops: llama-adakv-graph.cpp).

#pragma once

#include "adakv-impl.h"
#include "llama-adakv.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <array>
#include <cstdint>
#include <map>
#include <vector>

class llama_kv_cache;
struct llama_context;

struct llama_adakv_layer {
    int32_t il  = -1; // layer index in the model
    int32_t ikv = -1; // layer index in the KV cache

    ggml_tensor * k = nullptr; // the layer's K storage in the cache: [n_embd_k_gqa, kv_size]
    ggml_tensor * v = nullptr; // the layer's V storage (not transposed): [n_embd_v_gqa, kv_size]

    // persistent tensors on the device of the layer's cache
    ggml_tensor * start_i32  = nullptr; // I32 [n_head_kv]         the kernel's start cell of each KV head
                                        //                         (pooled: R for every head)
    ggml_tensor * vstart_i32 = nullptr; // I32 [n_head_kv]         the view's start cell of each KV head
    ggml_tensor * start_f32  = nullptr; // F32 [1, n_head_kv]      the same, for the score and head masks
    ggml_tensor * pool_i32   = nullptr; // I32 [2, n_head_kv]      pooled layout: (row0, L) of each KV head
    ggml_tensor * pool_mask  = nullptr; // F16 [kv_size * n_head_kv, n_head_kv] pooled layout: the pool
                                        //                         mask's block part, 0 for the head rows
                                        //                         [row0, row0 + L) of each KV head, else -inf
    ggml_tensor * view_rows  = nullptr; // I32 [n_head_kv, view_cap] head row of every view cell (pooled),
                                        //                         cell-major: view cell c of head h at c * H + h
    ggml_tensor * scores     = nullptr; // F32 [view_cap, n_head_kv] window scores of each view cell

    std::vector<int32_t> start; // [n_head_kv] the view's start cells (host copy of vstart_i32)
    std::vector<int32_t> count; // [n_head_kv] L: tokens each head keeps in the block (0: none)
    std::vector<int32_t> row0;  // [n_head_kv] pooled layout: first head row of each head's pool

    int32_t attn_used = LLAMA_ADAKV_USED_STOCK; // enum llama_adakv_attn_used of the last graph built

    // original position of the token that view cell c < width holds for head h, at [h * width + c]
    // (-1 below the head's start); view cells from the width on hold the positions of their cache cells
    std::vector<llama_pos> kept_pos;
};

// the pool mask serves ubatches of at most this many tokens (decoding, short turns), where a copy of
// the block per ubatch would cost as much as the attention; a larger ubatch gathers the block once
// (its kernel then walks H times fewer columns per query than over the pool mask)
static const int64_t ADAKV_POOL_MASK_MAX_TOKENS = 32;

// the variants of the adakv part of a graph that the compute buffers are reserved for, as bits
// (llama_adakv::reserve_variant): window scoring armed, a compacted block
enum llama_adakv_variant {
    LLAMA_ADAKV_VARIANT_ARMED = 1,
    LLAMA_ADAKV_VARIANT_BLOCK = 2,
};

struct llama_adakv {
    llama_context * lctx    = nullptr;
    llama_kv_cache * kv     = nullptr; // the evicted cache (the non-SWA cache of an iSWA model)
    llama_kv_cache * kv_swa = nullptr; // the sliding-window cache of an iSWA model (not evicted), or null

    llama_adakv_params params = {};
    int32_t attn_path         = LLAMA_ADAKV_ATTN_AUTO;     // enum llama_adakv_attn_path, never ENV
    int32_t layout            = LLAMA_ADAKV_LAYOUT_POOLED; // enum llama_adakv_layout, never ENV

    uint32_t kv_size  = 0;
    uint32_t view_cap = 0; // view cells that fit the score and view-row buffers: 2 * kv_size
    int32_t n_head_kv = 0;
    int32_t n_head    = 0;

    std::vector<llama_adakv_layer> layers; // evicted layers, in model order
    std::vector<int32_t> layer_of_il;      // model layer -> index in layers, or -1

    // persistent tensors, one context + buffer per buffer type
    std::vector<ggml_context *> ctxs;
    std::vector<ggml_backend_buffer_t> bufs;
    // backends used for compaction, one per device
    std::map<ggml_backend_dev_t, ggml_backend_t> backends;

    // compacted block: cells [0, footprint) of sequence 0, labelled with positions [pos_lo, pos_hi];
    // it stands for the tokens at positions [pos_first, pos_hi] (pos_first <= pos_lo), so that
    // a removal or a shift of any of those positions cuts into it; width: the most tokens a head keeps
    int32_t footprint   = 0;
    int32_t width       = 0;
    llama_pos pos_lo    = -1;
    llama_pos pos_hi    = -1;
    llama_pos pos_first = -1;

    // attention-output capture (evaluation): armed with room for capture_tokens tokens
    int32_t capture_tokens  = 0;
    int32_t captured_tokens = 0;        // tokens of the last ubatch whose outputs were captured
    std::vector<bool> captured;         // [layers] the layer added its capture to the graph since arming
    std::vector<ggml_tensor *> capture; // [layers] F32 [n_head * d_v, capture_tokens]
    std::vector<ggml_context *> capture_ctxs;
    std::vector<ggml_backend_buffer_t> capture_bufs;

    // scoring: armed for the next decode call with n_window tokens
    int32_t armed_window  = 0;
    int32_t scored_tokens = 0; // tokens of the ubatch whose scores were added to the graph
    uint32_t scored_n_kv  = 0; // cells those scores cover
    std::vector<bool> scored;  // [layers] the layer added its scores to the graph since arming
    int32_t disarmed_ret = 0;  // what the llama_decode that disarmed the scoring returned (0: none did)

    // the compute buffers are reserved for scoring a window of this many tokens (arming a larger
    // one asks llama.cpp to reserve again); see llama_adakv_reserve_scope
    int32_t reserve_window = 32;

    // the graph llama_adakv_reserve_scope builds: -1 the worst (scoring armed, a block), else the
    // LLAMA_ADAKV_VARIANT_* bits of the variant to build at its largest shapes
    int32_t reserve_variant = -1;
    // the topology (llama_adakv_graph_signature) of the graph that the scheduler's allocation plan
    // was made for at its reserved shapes; 0: unknown (another reserve replaced it)
    uint64_t plan_signature = 0;
    bool plan_warned        = false; // a graph had no reserved variant (llama_adakv_graph_plan warned)

    uint64_t epoch = 1;

    // the graph being built: the last model layer whose attention the graph hook saw (a layer at or
    // below it starts a new graph), and the view masks built in this graph, one per distinct mask
    // input (an iSWA model has two), shared by every evicted layer that reads that mask
    int32_t graph_il = -1;
    struct view_mask_entry {
        const ggml_tensor * src = nullptr; // the layer's mask input
        ggml_tensor * view      = nullptr; // its view: F16 [width + n_kv - footprint, n_q]
        ggml_tensor * tail      = nullptr; // the pool mask's cells after the block: F16
                                           // [n_head_kv * (n_kv - footprint), n_q, 1, n_head_kv]
    };
    std::array<view_mask_entry, 2> view_masks = {};

    // a state blob read by state_read_begin, applied by state_read_end
    bool pending                = false;
    int32_t pending_fp          = 0;
    int32_t pending_width       = 0;
    llama_pos pending_pos_lo    = -1;
    llama_pos pending_pos_hi    = -1;
    llama_pos pending_pos_first = -1;
    std::vector<int32_t> pending_counts; // [n_layer * n_head_kv]
    std::vector<llama_pos> pending_kept; // [n_layer * n_head_kv * pending_width]

    ~llama_adakv();
};

// access to llama_kv_cache internals (friend of llama_kv_cache, patch 0002)
struct llama_adakv_access;

// the state of ctx, or null when eviction is not enabled on it
llama_adakv * llama_adakv_of(const llama_context * ctx);

// the start of a C API function that needs eviction enabled: declares ak or returns INVALID
#define ADAKV_REQUIRE_ENABLED(ctx, ak)                                                                                 \
    llama_adakv * ak = llama_adakv_of(ctx);                                                                            \
    if (ak == nullptr) {                                                                                               \
        return llama_adakv_set_error(                                                                                  \
                LLAMA_ADAKV_ERR_INVALID,                                                                               \
                "%s: eviction is not enabled on this "                                                                 \
                "context (call llama_adakv_enable first)",                                                             \
                __func__);                                                                                             \
    }

// frees the capture buffers (disarms the capture)
void llama_adakv_free_capture(llama_adakv & ak);

// adds the copy of layer i's attention output `out` to gf when the capture is armed and the
// ubatch fits (llama-adakv-capture.cpp)
void llama_adakv_graph_capture(llama_adakv * ak, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * out, size_t i);

// resets the start table to zeros and forgets the compacted block
void llama_adakv_reset_table(llama_adakv & ak);

// sets the block's per-head counts of every layer ([n_layer * n_head_kv], or empty for no block)
// and width, and derives the starts and the pooled rows (row0) from them
void llama_adakv_set_counts(llama_adakv & ak, const std::vector<int32_t> & counts, int32_t width);

// the head row (row r at byte r * row size of K or V, r = cell * n_head_kv + head in ordinary
// cells) that view cell c of head h of layer l holds, or -1 if it holds nothing for that head
int64_t llama_adakv_view_row(const llama_adakv & ak, const llama_adakv_layer & l, int32_t h, int64_t c);

// writes the host start table of every layer (with the pooled rows and the view rows) into the
// persistent tensors, after the context's queued work is done (a graph still running on an
// asynchronous backend may be reading them)
void llama_adakv_upload_starts(llama_adakv & ak);

// the device holding an allocated tensor (host buffer types have none: the CPU device)
ggml_backend_dev_t llama_adakv_dev_of(const ggml_tensor * t);
