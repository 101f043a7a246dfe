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

#define LLAMA_ADAKV_ABI_VERSION 7

#ifdef __cplusplus
extern "C" {
#endif

/* ADAKV_CDEF_BEGIN */

struct llama_context;

// return codes
enum llama_adakv_status {
    LLAMA_ADAKV_OK          = 0,
    LLAMA_ADAKV_ERR_INVALID = -1, // an argument is out of range; nothing was changed
    LLAMA_ADAKV_ERR_ALLOC   = -2, // out of memory; nothing was changed
    LLAMA_ADAKV_ERR_BACKEND = -3, // a ggml backend failed to compute; outputs are undefined
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

// message of the last failed call on this thread ("" if none); a state that llama_state_set_data
// refused because of its eviction layout also leaves its reason here
LLAMA_API const char * llama_adakv_last_error(void);

// forgets that message (e.g. before llama_state_set_data, to tell its reason from an older one)
LLAMA_API void llama_adakv_clear_last_error(void);

//
// per-head KV eviction on a context
//
// Flow for one prompt (sequence 0, the only one):
//   llama_adakv_enable(ctx, params)                     once, after the context is created
//   llama_decode(the prompt's tokens before its last ubatch)
//   llama_adakv_arm_scores(ctx, w); llama_decode(the last ubatch, which ends with the w window tokens)
//   llama_adakv_read_scores(ctx, scores, n_cells)     scores of every cell, head, layer
//   ... choose the kept cells of every (layer, KV head) ...
//   llama_adakv_compact(ctx, counts, cells)            then decode on as usual
//
// "Layer" below is an evicted layer: the layers of the (non-SWA) KV cache, in model order.
//
// The block. A compaction keeps L[l][h] tokens in head h of layer l. The cache's cells [0, R)
// hold them (R: the footprint) and the cells from R on hold the tokens that came after. The
// pooled layout (the default) stores head h's kept rows one after the other in the memory of
// cells [0, R), R = max over layers of ceil(sum_h L[l][h] / n_head_kv); the rect layout stores
// them in cells [R - L[l][h], R) of the head, R = max L.
// Cells in this API are the cells of the per-head view, the same in both layouts: with
// W = max L[l][h] (the block's width), view cell c < W of head h holds its kept token
// c - (W - L[l][h]) (none below start[l][h] = W - L[l][h]), view cell c >= W the cache cell
// R + (c - W). Before any compaction (W = R = 0) view cells are cache cells, and sequence 0
// occupies cells [0, n_cells) of the view. Scores, positions, starts and kept cells use the view.
//
// After a compaction the block stands for every position from the sequence's first to the
// last compacted one, [first, P]. The llama_memory_* calls keep to that: seq_rm removes the
// block only as a whole (p0 <= first, nothing of the sequence left after p1) and returns false
// for any range that starts inside it, without removing anything of this cache; seq_add and
// seq_div are refused (logged, nothing moved) for any range that holds cells of the
// sequence, since a K-shift cannot be applied to a compacted cache.
//
// Positions after a compaction. The R cells of the block are labelled P-R+1 .. P, so
// llama_memory_seq_pos_min reports P-R+1, not the sequence's first position: these are the
// positions that have a cell, and llama.h promises that every position of [pos_min, pos_max]
// has one, which would not hold for [first, P] (the block holds fewer than P-first+1 tokens, and
// different ones in each head). The labels keep seq_pos_max at P, so decoding continues at P+1
// (K keeps the RoPE of each token's original position, the labels are never used for RoPE). A
// caller that takes pos_min > 0 for "the earlier positions are gone" (llama.cpp's server does so
// for SWA caches) re-evaluates, which is right; prefix reuse that cuts with seq_rm (llama-cpp-
// python) is refused inside [first, P] and keeps the block only when the prompt goes on after it.
// The original positions of the kept tokens: llama_adakv_get_positions.
//

// how the scores of the query heads of one KV head are combined
enum llama_adakv_gqa_reduce {
    LLAMA_ADAKV_GQA_MEAN = 0,
    LLAMA_ADAKV_GQA_MAX  = 1,
};

// how attention honours the start cells after a compaction (all give the same result)
enum llama_adakv_attn_path {
    LLAMA_ADAKV_ATTN_ENV   = -1, // from the environment: ADAKV_ATTN_PATH=auto|heads|mask, or
                                 // ADAKV_FORCE_FALLBACK=1 for heads; else AUTO
    LLAMA_ADAKV_ATTN_AUTO  = 0,  // the best the backend supports: the start cells inside the flash-attention
                                 // kernel, else the per-head mask, else one call per KV head
    LLAMA_ADAKV_ATTN_HEADS = 1,  // one stock flash-attention call per KV head over [start, n_kv), everywhere
    LLAMA_ADAKV_ATTN_MASK  = 2,  // one stock call per layer with a mask that has one plane per query head
                                 // (-inf below its KV head's start) where supported, else one call per KV head
};

// how the last graph built for a layer applied the start cells (llama_adakv_get_attn_used)
enum llama_adakv_attn_used {
    LLAMA_ADAKV_USED_STOCK         = 0, // nothing compacted: stock attention (or no graph built yet)
    LLAMA_ADAKV_USED_KERNEL        = 1, // the block read inside the flash-attention kernel (start cells,
                                        // and the pooled rows of the pooled layout)
    LLAMA_ADAKV_USED_MASK          = 2, // one stock call with a per-head mask
    LLAMA_ADAKV_USED_HEADS         = 3, // one stock call per KV head
    LLAMA_ADAKV_USED_GATHER_KERNEL = 4, // pooled layout: the block gathered into a per-ubatch rectangle
                                        // (stock get_rows), read by the kernel with start cells
    LLAMA_ADAKV_USED_GATHER_MASK   = 5, // the same rectangle, one stock call with a per-head mask
    LLAMA_ADAKV_USED_GATHER_HEADS  = 6, // the same rectangle, one stock call per KV head
    LLAMA_ADAKV_USED_POOL_MASK     = 7, // pooled layout: one stock call over the block's memory as it
                                        // lies (every head row a column of one shared KV head), with a
                                        // per-head mask that leaves each head its own rows
};

// how the compacted block lies in the cache's memory (see "The block" above)
enum llama_adakv_layout {
    LLAMA_ADAKV_LAYOUT_ENV    = -1, // from the environment: ADAKV_LAYOUT=pooled|rect; else POOLED
    LLAMA_ADAKV_LAYOUT_POOLED = 0,  // each head's kept rows one after the other in the memory of the
                                    // block's first cells: the block costs the sum of the budgets
    LLAMA_ADAKV_LAYOUT_RECT   = 1,  // a rectangle as wide as the largest head, each head from its own
                                    // start cell: the block costs the largest budget in every head
};

struct llama_adakv_params {
    int32_t gqa_reduce; // enum llama_adakv_gqa_reduce (default: LLAMA_ADAKV_GQA_MEAN)
    int32_t attn_path;  // enum llama_adakv_attn_path (default: LLAMA_ADAKV_ATTN_ENV)
    int32_t layout;     // enum llama_adakv_layout (default: LLAMA_ADAKV_LAYOUT_ENV)
};

LLAMA_API struct llama_adakv_params llama_adakv_default_params(void);

// Enables per-head eviction. Refused (LLAMA_ADAKV_ERR_INVALID, context unchanged) when flash
// attention is off, n_seq_max > 1, or the model is not supported (recurrent, hybrid, MLA,
// ALiBi, attention sinks, M-RoPE, encoder-decoder, shared-cell caches); the message says which.
LLAMA_API int32_t llama_adakv_enable(struct llama_context * ctx, struct llama_adakv_params params);

// 1 if enabled on ctx, else 0
LLAMA_API int32_t llama_adakv_is_enabled(const struct llama_context * ctx);

// number of evicted layers (>= 1), or an error code
LLAMA_API int32_t llama_adakv_n_layer(const struct llama_context * ctx);

// KV heads per evicted layer (the same in every one), or an error code
LLAMA_API int32_t llama_adakv_n_head_kv(const struct llama_context * ctx);

// out[n_layer]: the model layer index of each evicted layer
LLAMA_API int32_t llama_adakv_layer_ids(const struct llama_context * ctx, int32_t * out);

// cells of the per-head view that sequence 0 holds (they are [0, n)), or an error code if its
// cells are not laid out so; the cache cells it uses are llama_adakv_get_block's cells_used
LLAMA_API int32_t llama_adakv_n_cells(const struct llama_context * ctx);

// the compacted block of sequence 0 (all zero but layout before a compaction)
struct llama_adakv_block {
    int32_t layout;     // enum llama_adakv_layout in force on the context
    int32_t cells;      // R: cache cells the block occupies (the footprint)
    int32_t width;      // W: the most tokens one head keeps; view cells [0, W) are the block's
    int32_t cells_used; // cache cells sequence 0 uses: the block and the cells after it
    int32_t view_cells; // cells of the per-head view: W + cells_used - R
};
LLAMA_API int32_t llama_adakv_get_block(const struct llama_context * ctx, struct llama_adakv_block * out);

// Arms window scoring for the next llama_decode, whose last ubatch ends with the observation
// window: its last n_window tokens (1 <= n_window <= n_ubatch, and <= that ubatch's tokens) are
// scored. Scoring them inside a larger ubatch (the prompt's last one) costs no separate decode.
// A llama_decode that fails (returns non-zero) disarms it: later decodes do not score, and
// llama_adakv_read_scores says that the decode failed.
LLAMA_API int32_t llama_adakv_arm_scores(struct llama_context * ctx, int32_t n_window);

// Reads the scores of that decode and disarms (a NULL out is refused and leaves them armed):
//   out: F32 [n_layer][n_head_kv][n_cells]; out[l][h][c] = sum over window queries of the
//   softmax attention of cell c, reduced over the query heads of KV head h (mean or max);
//   cells below a head's start score 0.
// INVALID if scoring was not armed or the decode's last ubatch had fewer than n_window tokens.
LLAMA_API int32_t llama_adakv_read_scores(struct llama_context * ctx, float * out, int32_t n_cells);

// Keeps, for every layer l and KV head h, counts[l*n_head_kv + h] cells, 1 <= count <= the
// cache size: the next that many entries of cells (all heads one after the other, layer-major;
// view cells), strictly increasing, each in [start[l][h], n_cells). Their rows are moved (byte
// copies, in order) into the block of the context's layout (see "The block"), the cache cells
// from R on are freed and [0, R) get positions P-R+1 .. P (P: last position, unchanged).
// INVALID, or ALLOC (no memory for the compaction graph): nothing changed. BACKEND (a graph
// failed, or memory ran out after some layers' rows had moved): the cache was cleared.
LLAMA_API int32_t llama_adakv_compact(struct llama_context * ctx, const int32_t * counts, const int32_t * cells);

// out[n_layer][n_head_kv]: the start cell of every head (all 0 before a compaction)
LLAMA_API int32_t llama_adakv_get_starts(const struct llama_context * ctx, int32_t * out);

// out[n_layer]: enum llama_adakv_attn_used, how the last graph that was computed or built for a
// decode applied the start cells in each layer (for tests and device checks)
LLAMA_API int32_t llama_adakv_get_attn_used(const struct llama_context * ctx, int32_t * out);

// what the KV cache of a context costs: cells and the bytes of K and V per cell (any context of
// this library, eviction enabled or not: a full cache's figures come from the same place)
struct llama_adakv_memory {
    int64_t cells;          // cells of the evicted cache (its size: n_ctx)
    int64_t cell_bytes;     // K and V bytes of one of its cells, all its layers and heads together
    int64_t swa_cells;      // cells of the sliding-window cache of an iSWA model (0 if there is none)
    int64_t swa_cell_bytes; // K and V bytes of one of those cells, all sliding-window layers together
    int64_t swa_used;       // cells the sliding-window cache holds now
};
LLAMA_API int32_t llama_adakv_get_memory(const struct llama_context * ctx, struct llama_adakv_memory * out);

// what the compute buffers of a context cost, all its backends together. llama.cpp reserves them
// for the largest graph the context can build when it is made and again when that graph changes
// (enabling eviction, arming a larger scoring window: at the next decode); with eviction on, every
// graph variant of the adakv part is part of that reserve, so allocated stays at reserved
struct llama_adakv_compute_memory {
    int64_t reserved;  // bytes the last reserve sized the compute buffers to
    int64_t allocated; // bytes of the compute buffers now (more than reserved: a graph outgrew it)
};
LLAMA_API int32_t
llama_adakv_get_compute_memory(const struct llama_context * ctx, struct llama_adakv_compute_memory * out);
// R, the cache cells of the compacted block (0 if nothing is compacted), or an error code
LLAMA_API int32_t llama_adakv_footprint(const struct llama_context * ctx);

// out[n_layer][n_head_kv][n_cells]: the original position of the token that each of the view
// cells [0, n_cells) holds for each head (the block holds different tokens in different heads),
// or -1 where the cell holds nothing for that head (below the head's start, or empty).
// 1 <= n_cells <= twice the cache size. This table is part of the context's state: it travels
// with llama_state_get_data / llama_state_set_data.
LLAMA_API int32_t llama_adakv_get_positions(const struct llama_context * ctx, int32_t * out, int32_t n_cells);

// bytes of one KV head's row of K (is_v = 0) or V (is_v = 1) in evicted layer `layer`, or an error code
LLAMA_API int64_t llama_adakv_row_size(const struct llama_context * ctx, int32_t layer, int32_t is_v);

// copies the raw rows of view cells [cell0, cell0 + n_cells) of K or V of an evicted layer into
// out, [n_cells][n_head_kv][row_size] bytes (out_size must be exactly that; zeros where a cell
// holds nothing for a head), for exactness checks
LLAMA_API int32_t llama_adakv_read_rows(
        struct llama_context * ctx,
        int32_t layer,
        int32_t is_v,
        int32_t cell0,
        int32_t n_cells,
        void * out,
        size_t out_size);

// Attention-output capture, for evaluation (the paper's objective is the L1 distance of these
// outputs to the full cache's): after arming with room for n_tokens (0 disarms and frees),
// every ubatch of at most n_tokens tokens copies each evicted layer's attention output (flash
// attention's result with the start cells applied, before the output projection) into a buffer
// on the layer's device; a later such ubatch overwrites it. Stays armed until disarmed.
LLAMA_API int32_t llama_adakv_arm_capture(struct llama_context * ctx, int32_t n_tokens);

// width of one token's captured output: n_head * d_v (or an error code)
LLAMA_API int64_t llama_adakv_capture_width(const struct llama_context * ctx);

// out: F32 [n_layer][n_tokens][width], the last captured ubatch, which must have had n_tokens tokens
LLAMA_API int32_t llama_adakv_read_capture(struct llama_context * ctx, float * out, int32_t n_tokens);

/* ADAKV_CDEF_END */

#ifdef __cplusplus
}
#endif
