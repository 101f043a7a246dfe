// llama-adakv-access.h - the private parts of llama.cpp that native/ reaches (not part of the C API)

#pragma once

#include "llama-adakv-state.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <vector>

// the parts of llama_kv_cache and llama_context that adakv needs (a friend of both, patch 0002)
struct llama_adakv_access {
    // the graph budget changed (llama_adakv_graph_extra_nodes): reserve again before the next decode
    static void request_reserve(llama_context & ctx) { ctx.sched_need_reserve = true; }

    // llama_context::graph_reserve with the full memory module (nullptr: the allocation failed); split_only
    // builds and splits the graph without planning its allocation
    static ggml_cgraph * graph_reserve(
            llama_context & ctx,
            uint32_t n_tokens,
            uint32_t n_outputs,
            const llama_memory_context_i * mctx,
            bool split_only) {
        return ctx.graph_reserve(n_tokens, ctx.cparams.n_seq_max, n_outputs, mctx, split_only);
    }
    static const llama_cparams & cparams(const llama_context & ctx) { return ctx.cparams; }
    static llama_memory_context_ptr init_full(llama_context & ctx) {
        return ctx.memory ? ctx.memory->init_full() : nullptr;
    }

    // bytes of the compute buffers of all backends: as the last reserve sized them, and now
    static void compute_bytes(const llama_context & ctx, int64_t & reserved, int64_t & allocated) {
        reserved  = 0;
        allocated = 0;
        for (size_t i = 0; i < ctx.backend_ptrs.size(); ++i) {
            reserved += (int64_t) ctx.backend_buf_exp_size[i];
            allocated += (int64_t) ggml_backend_sched_get_buffer_size(ctx.sched.get(), ctx.backend_ptrs[i]);
        }
    }

    static bool shares_cells(const llama_kv_cache & kv) { return kv.other != nullptr; }
    static bool v_trans(const llama_kv_cache & kv) { return kv.v_trans; }
    static uint32_t n_stream(const llama_kv_cache & kv) { return kv.n_stream; }
    static llama_kv_cells & cells(llama_kv_cache & kv) { return kv.v_cells[0]; }
    static uint32_t & head(llama_kv_cache & kv) { return kv.v_heads[0]; }

    // (model layer, K, V) of every layer of the cache
    static std::vector<llama_adakv_layer> layers(const llama_kv_cache & kv) {
        std::vector<llama_adakv_layer> res;
        for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
            llama_adakv_layer l;
            l.il  = (int32_t) kv.layers[ikv].il;
            l.ikv = (int32_t) ikv;
            l.k   = kv.layers[ikv].k;
            l.v   = kv.layers[ikv].v;
            res.push_back(l);
        }
        return res;
    }
};
