// llama-adakv-state.h - the per-context state of adakv-local (internal to libllama)
//
// Cache layout of the evicted sequence after a compaction (one stream, sequence 0):
//
//   cell:    0                      R - L[h]                R              N
//            |---- invalid for h ----|---- kept rows of h ---|--- free ... |
//   head h:  start[h] = R - L[h]  (L[h] = cells head h keeps, R = max over heads = footprint)
//
//   - every layer and KV head keeps its own cells, moved (byte copies) in original order to
//     the top of the block, so that the observation window ends up last in every head;
//   - the cells [0, R) are relabelled with positions P - R + 1 .. P (P = last position), so
//     seq_pos_max is unchanged and decoding continues at P + 1; K keeps the RoPE of the
//     original positions;
//   - new tokens are appended at R and after; attention of head h reads cells >= start[h].

#pragma once

#include "adakv-impl.h"
#include "llama-adakv.h"

#include "ggml-backend.h"
#include "ggml.h"

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
    ggml_tensor * start_i32 = nullptr; // I32 [n_head_kv]          start cell of each KV head
    ggml_tensor * start_f32 = nullptr; // F32 [1, n_head_kv]       the same, for the score mask
    ggml_tensor * scores    = nullptr; // F32 [kv_size, n_head_kv] window scores of each cell

    std::vector<int32_t> start; // host copy of start_i32

    int32_t attn_used = LLAMA_ADAKV_USED_STOCK; // enum llama_adakv_attn_used of the last graph built

    // original position of the token that cell c < footprint holds for head h, at [h * footprint + c]
    // (-1 below the head's start); cells from the footprint on keep their own positions
    std::vector<llama_pos> kept_pos;
};

struct llama_adakv {
    llama_context * lctx    = nullptr;
    llama_kv_cache * kv     = nullptr; // the evicted cache (the non-SWA cache of an iSWA model)
    llama_kv_cache * kv_swa = nullptr; // the sliding-window cache of an iSWA model (not evicted), or null

    llama_adakv_params params = {};
    int32_t attn_path         = LLAMA_ADAKV_ATTN_AUTO; // enum llama_adakv_attn_path, never ENV

    uint32_t kv_size  = 0;
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
    // a removal or a shift of any of those positions cuts into it
    int32_t footprint   = 0;
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

    uint64_t epoch = 1;

    // a state blob read by state_read_begin, applied by state_read_end
    bool pending                = false;
    int32_t pending_fp          = 0;
    llama_pos pending_pos_lo    = -1;
    llama_pos pending_pos_hi    = -1;
    llama_pos pending_pos_first = -1;
    std::vector<int32_t> pending_starts; // [n_layer * n_head_kv]
    std::vector<llama_pos> pending_kept; // [n_layer * n_head_kv * pending_fp]

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

// writes the host start table of every layer into the persistent tensors, after the context's
// queued work is done (a graph still running on an asynchronous backend may be reading them)
void llama_adakv_upload_starts(llama_adakv & ak);

// the device holding an allocated tensor (host buffer types have none: the CPU device)
ggml_backend_dev_t llama_adakv_dev_of(const ggml_tensor * t);
