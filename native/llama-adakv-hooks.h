// llama-adakv-hooks.h - the functions that patch 0002 calls from inside llama.cpp
//
// Every hook accepts a null state and then does nothing (or allows everything), so the
// patched files behave exactly like stock llama.cpp until llama_adakv_enable() is called.

#pragma once

#include "llama.h"

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;
struct llama_adakv;
class llama_io_write_i;
class llama_io_read_i;
class llama_kv_cache;
struct llama_memory_context_i;

// destroys the state (llama_context's destructor)
void llama_adakv_free(llama_adakv * ak);

// changes whenever the adakv part of the graph changes (graph reuse check)
uint64_t llama_adakv_graph_epoch(const llama_adakv * ak);

// graph nodes that the adakv part can add to one ubatch's graph at most (window scores, the
// per-head fallback, capture); llama_context::graph_max_nodes adds them to its budget
uint32_t llama_adakv_graph_extra_nodes(const llama_adakv * ak);

// llama_context::graph_reserve builds graphs that are never computed, to size the compute
// buffers: inside this scope the adakv part builds the largest graph it can build for the
// ubatch (window scoring armed, a compacted block whose per-head view is the widest the cache
// allows), and what it records while building one (which layers were scored or captured, for
// how many tokens) is put back as it was when the scope ends
class llama_adakv_reserve_scope {
  public:
    explicit llama_adakv_reserve_scope(llama_adakv * ak);
    ~llama_adakv_reserve_scope();

    llama_adakv_reserve_scope(const llama_adakv_reserve_scope &)             = delete;
    llama_adakv_reserve_scope & operator=(const llama_adakv_reserve_scope &) = delete;

  private:
    llama_adakv * ak;
    int32_t scored_tokens   = 0;
    uint32_t scored_n_kv    = 0;
    int32_t captured_tokens = 0;
    int32_t armed_window    = 0;
    int32_t footprint       = 0;
    int32_t width           = 0;
    std::vector<bool> scored;
    std::vector<bool> captured;
    std::vector<int32_t> attn_used;
};

// llama_context::sched_reserve, after its own graphs: reserves the graph of every variant of the
// adakv part (scoring armed or not, a block or none) for a ubatch of n_ubatch tokens, of
// ADAKV_POOL_MASK_MAX_TOKENS and of one token, so that the compute buffers hold the largest plan of
// any; false: an allocation failed
bool llama_adakv_reserve_variants(llama_adakv * ak, llama_context & ctx, const llama_memory_context_i * mctx);

// llama_context::process_ubatch, after building a new graph gf for a ubatch of n_tokens tokens:
// ggml's allocator reuses its plan for a graph of the same topology with smaller tensors, but
// plans a graph of another topology from its own shapes, and such a plan can outgrow the reserve.
// When gf's topology is not the one planned, the variant's reserved graph with the same topology
// is planned (as llama_adakv_reserve_variants did) and true is returned: the scheduler was reset
// and gf must be built again
bool llama_adakv_graph_plan(llama_adakv * ak, llama_context & ctx, ggml_cgraph * gf, uint32_t n_tokens);

// called with each flash-attention node right after build_attn_mha built it; returns the
// node to use instead (the same node with per-head start cells, or the per-head fallback),
// and adds the window-score nodes to gf when scoring is armed
ggml_tensor * llama_adakv_graph_attn(llama_adakv * ak, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * fa, int il);

// llama_decode, after the call: a failed call (ret != 0) disarms the window scoring armed for it
// (it may have stopped before the window's ubatch, and later calls must not score)
void llama_adakv_on_decode_end(llama_adakv * ak, int32_t ret);

// llama_kv_cache::seq_rm: false refuses the removal (it would cut into a compacted block)
bool llama_adakv_on_seq_rm(llama_adakv * ak, llama_seq_id seq_id, llama_pos p0, llama_pos p1);

// llama_kv_cache_iswa::seq_rm, before either cache removes anything: false refuses a removal
// after which the sliding-window cache `swa` would lack cells that the next token at p0 attends
// to (they already left its ring, swa_full = false); llama-cpp-python then evaluates again
bool llama_adakv_on_swa_seq_rm(
        const llama_adakv * ak, const llama_kv_cache & swa, llama_seq_id seq_id, llama_pos p0, llama_pos p1);

// llama_kv_cache::seq_add / seq_div (and the iSWA cache's, before either of its caches moves):
// false refuses the shift of a compacted sequence
bool llama_adakv_on_seq_shift(llama_adakv * ak, llama_seq_id seq_id, llama_pos p0, llama_pos p1);

// llama_kv_cache::clear
void llama_adakv_on_clear(llama_adakv * ak);

// true while the cache holds a compacted block
bool llama_adakv_is_compacted(const llama_adakv * ak);

// state save/load of llama_kv_cache: a small header with the start table, written before the
// cells; read_begin throws std::runtime_error (before anything is changed) when the blob
// cannot be restored, read_end applies the table once the cells are back
void llama_adakv_state_write(const llama_adakv * ak, llama_io_write_i & io, llama_seq_id seq_id);
void llama_adakv_state_read_begin(llama_adakv * ak, llama_io_read_i & io, llama_seq_id seq_id);
void llama_adakv_state_read_end(llama_adakv * ak, llama_seq_id seq_id);
