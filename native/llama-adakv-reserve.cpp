// llama-adakv-reserve.cpp - compute buffers reserved for every graph the adakv part can build
//
// ggml's graph allocator keeps one allocation plan. A graph with the same topology as the planned
// one (the same nodes in the same order) and tensors no larger reuses it; any other graph is
// planned again from its own shapes, and the allocator's greedy plan for smaller tensors can need
// more memory than the plan for the largest ones (a 96 MiB logits tensor placed after a few MiB of
// other tensors): the compute buffer then grows in the middle of a prompt. Stock llama.cpp never
// meets this (its graphs keep one topology); adakv has four (window scoring armed or not, a block
// or none), and its routes may depend on the ubatch's size. So: every variant is reserved at its
// largest shapes when llama.cpp reserves, and a graph of a topology that is not the planned one
// gets the plan of its variant's reserved graph before it is allocated.

#include "llama-adakv-access.h"
#include "llama-adakv-hooks.h"
#include "llama-adakv-state.h"

#include "llama-impl.h"

#include <algorithm>
#include <vector>

// what the allocator compares between two graphs, without the shapes: the number of nodes, and
// each node's op and which of its sources are set (FNV-1a)
static uint64_t llama_adakv_graph_signature(ggml_cgraph * gf) {
    uint64_t h = 1469598103934665603ull;
    auto mix   = [&h](uint64_t x) {
        h ^= x;
        h *= 1099511628211ull;
    };
    const int n = ggml_graph_n_nodes(gf);
    mix((uint64_t) n);
    for (int i = 0; i < n; ++i) {
        const ggml_tensor * t = ggml_graph_node(gf, i);
        uint64_t srcs         = 0;
        for (int j = 0; j < GGML_MAX_SRC; ++j) {
            srcs |= (uint64_t) (t->src[j] != nullptr) << j;
        }
        mix((uint64_t) t->op);
        mix(srcs);
    }
    return h;
}

// the ubatch sizes reserved for each variant, smallest first: one token per sequence (decoding),
// the most tokens the pool mask serves, n_ubatch
static std::vector<uint32_t> llama_adakv_reserve_sizes(const llama_cparams & cp) {
    const uint32_t n_seqs     = cp.n_seq_max;
    const uint32_t n_ubatch   = std::min(cp.n_ctx, cp.n_ubatch);
    std::vector<uint32_t> res = { n_seqs };
    if ((uint32_t) ADAKV_POOL_MASK_MAX_TOKENS > n_seqs && (uint32_t) ADAKV_POOL_MASK_MAX_TOKENS < n_ubatch) {
        res.push_back((uint32_t) ADAKV_POOL_MASK_MAX_TOKENS);
    }
    if (n_ubatch > n_seqs) {
        res.push_back(n_ubatch);
    }
    return res;
}

// the variant's graph for ubatches of n_tokens, built (and split) at its largest shapes, and with
// plan its allocation planned (nullptr: the allocation failed)
static ggml_cgraph * llama_adakv_reserve_one(
        llama_adakv * ak,
        llama_context & ctx,
        const llama_memory_context_i * mctx,
        int32_t variant,
        uint32_t n_tokens,
        bool plan) {
    const llama_cparams & cp = llama_adakv_access::cparams(ctx);
    // as llama_context::sched_reserve: all tokens outputs (one per sequence when decoding)
    const uint32_t n_outputs = n_tokens <= cp.n_seq_max ? cp.n_seq_max : std::min(n_tokens, cp.n_outputs_max);
    ak->reserve_variant      = variant;
    ggml_cgraph * gf         = llama_adakv_access::graph_reserve(ctx, n_tokens, n_outputs, mctx, !plan);
    ak->reserve_variant      = -1;
    return gf;
}

bool llama_adakv_reserve_variants(llama_adakv * ak, llama_context & ctx, const llama_memory_context_i * mctx) {
    if (ak == nullptr) {
        return true;
    }
    const auto sizes = llama_adakv_reserve_sizes(llama_adakv_access::cparams(ctx));
    // the last graph planned stays planned: no block, not armed, n_ubatch tokens (a first prompt)
    for (int32_t variant = LLAMA_ADAKV_VARIANT_ARMED | LLAMA_ADAKV_VARIANT_BLOCK; variant >= 0; --variant) {
        for (uint32_t n_tokens : sizes) {
            ggml_cgraph * gf = llama_adakv_reserve_one(ak, ctx, mctx, variant, n_tokens, true);
            if (gf == nullptr) {
                LLAMA_LOG_ERROR(
                        "%s: failed to allocate the compute buffers for adakv variant %d, %u tokens\n", __func__,
                        variant, n_tokens);
                return false;
            }
            ak->plan_signature = llama_adakv_graph_signature(gf);
        }
    }
    return true;
}

bool llama_adakv_graph_plan(llama_adakv * ak, llama_context & ctx, ggml_cgraph * gf, uint32_t n_tokens) {
    if (ak == nullptr) {
        return false;
    }
    const uint64_t sig = llama_adakv_graph_signature(gf);
    if (sig == ak->plan_signature) {
        return false; // planned at its largest shapes already: the allocator reuses the plan
    }
    const int32_t variant = (ak->armed_window > 0 ? LLAMA_ADAKV_VARIANT_ARMED : 0) |
                            (ak->footprint > 0 ? LLAMA_ADAKV_VARIANT_BLOCK : 0);
    const auto mctx       = llama_adakv_access::init_full(ctx);
    for (uint32_t n : llama_adakv_reserve_sizes(llama_adakv_access::cparams(ctx))) {
        if (n < n_tokens) {
            continue;
        }
        ggml_cgraph * gr = llama_adakv_reserve_one(ak, ctx, mctx.get(), variant, n, false);
        if (gr == nullptr || llama_adakv_graph_signature(gr) != sig) {
            continue; // another topology (a route that depends on the ubatch's size)
        }
        if (llama_adakv_reserve_one(ak, ctx, mctx.get(), variant, n, true) != nullptr) {
            ak->plan_signature = sig;
            return true;
        }
        break;
    }
    // no reserved graph has this topology (an armed capture; the per-head mask of a view narrower
    // than the widest, which takes the one-call-per-head route): the allocator plans the graph from
    // its own shapes, and the compute buffers may grow (said once per context)
    if (!ak->plan_warned) {
        ak->plan_warned = true;
        LLAMA_LOG_WARN(
                "%s: no reserved adakv graph has the topology of this ubatch (variant %d, %u tokens); the "
                "compute buffers may grow past the reserve\n",
                __func__, variant, n_tokens);
    }
    ak->plan_signature = sig;
    return true;
}
