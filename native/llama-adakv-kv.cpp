// llama-adakv-kv.cpp - enabling eviction on a context, compaction, guards, state save/load

#include "adakv-impl.h"
#include "llama-adakv-access.h"
#include "llama-adakv-hooks.h"
#include "llama-adakv-state.h"
#include "llama-adakv.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <typeinfo>

static const uint32_t ADAKV_STATE_MAGIC = 0x564b4441; // "ADKV"
// 3: the block's layout, width and per-head counts (2, before the pooled layout: start cells)
static const uint32_t ADAKV_STATE_VERSION = 3;

llama_adakv::~llama_adakv() {
    llama_adakv_free_capture(*this);
    for (auto & it : backends) {
        ggml_backend_free(it.second);
    }
    for (auto * b : bufs) {
        ggml_backend_buffer_free(b);
    }
    for (auto * c : ctxs) {
        ggml_free(c);
    }
}

void llama_adakv_reset_table(llama_adakv & ak) {
    llama_adakv_set_counts(ak, {}, 0);
    for (auto & l : ak.layers) {
        l.kept_pos.clear();
    }
    ak.footprint = 0;
    ak.pos_lo    = -1;
    ak.pos_hi    = -1;
    ak.pos_first = -1;
    llama_adakv_upload_starts(ak);
    ak.epoch++;
}

void llama_adakv_set_counts(llama_adakv & ak, const std::vector<int32_t> & counts, int32_t width) {
    const int32_t H = ak.n_head_kv;
    for (size_t i = 0; i < ak.layers.size(); ++i) {
        auto & l = ak.layers[i];
        l.count.assign(H, 0);
        l.start.assign(H, 0);
        l.row0.assign(H, 0);
        int32_t row = 0;
        for (int32_t h = 0; h < H && !counts.empty(); ++h) {
            l.count[h] = counts[i * H + h];
            l.start[h] = width - l.count[h];
            l.row0[h]  = row;
            row += l.count[h];
        }
    }
    ak.width = width;
}

int64_t llama_adakv_view_row(const llama_adakv & ak, const llama_adakv_layer & l, int32_t h, int64_t c) {
    const int64_t H = ak.n_head_kv;
    if (c >= ak.width) {
        return (ak.footprint + (c - ak.width)) * H + h; // the cache cell footprint + (c - width)
    }
    const int64_t L = l.count[h];
    const int64_t j = c - (ak.width - L); // the head's j-th kept token
    if (j < 0) {
        return -1;
    }
    if (ak.layout == LLAMA_ADAKV_LAYOUT_POOLED) {
        return l.row0[h] + j;
    }
    return (ak.footprint - L + j) * H + h; // rect: footprint == width
}

void llama_adakv_upload_starts(llama_adakv & ak) {
    ak.lctx->synchronize();
    const bool pooled = ak.layout == LLAMA_ADAKV_LAYOUT_POOLED && ak.footprint > 0;
    std::vector<float> f;
    std::vector<int32_t> kernel_start;
    std::vector<int32_t> pool;
    std::vector<ggml_fp16_t> mask;
    std::vector<int32_t> rows;
    for (auto & l : ak.layers) {
        // the kernel reads the pooled rows, then the cells from the footprint on
        kernel_start.assign(l.start.size(), ak.footprint);
        ggml_backend_tensor_set(
                l.start_i32, pooled ? kernel_start.data() : l.start.data(), 0, l.start.size() * sizeof(int32_t));
        ggml_backend_tensor_set(l.vstart_i32, l.start.data(), 0, l.start.size() * sizeof(int32_t));
        f.assign(l.start.begin(), l.start.end());
        ggml_backend_tensor_set(l.start_f32, f.data(), 0, f.size() * sizeof(float));
        if (!pooled) {
            continue;
        }
        pool.clear();
        rows.assign((size_t) ak.view_cap * ak.n_head_kv, 0);
        for (int32_t h = 0; h < ak.n_head_kv; ++h) {
            pool.push_back(l.row0[h]);
            pool.push_back(l.count[h]);
            // the pool mask's block part of head h: its own rows [row0, row0 + L) of the block's
            mask.assign((size_t) ak.footprint * ak.n_head_kv, ggml_fp32_to_fp16(-INFINITY));
            std::fill(mask.begin() + l.row0[h], mask.begin() + l.row0[h] + l.count[h], ggml_fp32_to_fp16(0.0f));
            ggml_backend_tensor_set(
                    l.pool_mask, mask.data(), (size_t) h * l.pool_mask->nb[1], mask.size() * sizeof(ggml_fp16_t));
            // rows of cells outside the cache (never read) and below the start (masked) are row 0
            for (uint32_t c = 0; c < ak.view_cap; ++c) {
                const int64_t r = llama_adakv_view_row(ak, l, h, c);
                if (r >= 0 && r < (int64_t) ak.kv_size * ak.n_head_kv) {
                    rows[(size_t) c * ak.n_head_kv + h] = (int32_t) r;
                }
            }
        }
        ggml_backend_tensor_set(l.pool_i32, pool.data(), 0, pool.size() * sizeof(int32_t));
        ggml_backend_tensor_set(l.view_rows, rows.data(), 0, rows.size() * sizeof(int32_t));
    }
}

ggml_backend_dev_t llama_adakv_dev_of(const ggml_tensor * t) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    return dev ? dev : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

//
// hooks (patch 0002)
//

void llama_adakv_free(llama_adakv * ak) {
    delete ak;
}

bool llama_adakv_is_compacted(const llama_adakv * ak) {
    return ak != nullptr && ak->footprint > 0;
}

void llama_adakv_on_clear(llama_adakv * ak) {
    if (ak != nullptr && ak->footprint > 0) {
        llama_adakv_reset_table(*ak);
    }
}

void llama_adakv_on_decode_end(llama_adakv * ak, int32_t ret) {
    if (ak == nullptr || ret == 0 || ak->armed_window == 0) {
        return;
    }
    LLAMA_LOG_DEBUG("%s: llama_decode returned %d: window scoring disarmed (arm it again)\n", __func__, ret);
    ak->armed_window  = 0;
    ak->scored_tokens = 0;
    ak->scored.assign(ak->layers.size(), false);
    ak->disarmed_ret = ret;
    ak->epoch++;
}

bool llama_adakv_on_seq_rm(llama_adakv * ak, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (!llama_adakv_is_compacted(ak) || (seq_id > 0)) {
        return true;
    }
    // p0 >= 0 and p1 > p0 here (normalized by the caller). The block stands for the positions
    // [pos_first, pos_hi], not only for its labels [pos_lo, pos_hi]: compare with those
    if (p1 <= ak->pos_first || p0 > ak->pos_hi) {
        return true; // after (or before) the block
    }
    const auto & cells = llama_adakv_access::cells(*ak->kv);
    if (p0 <= ak->pos_first && p1 > cells.seq_pos_max(0)) {
        llama_adakv_reset_table(*ak); // the whole sequence goes
        return true;
    }
    LLAMA_LOG_DEBUG(
            "%s: refusing to remove positions [%d, %d) of sequence %d: they cut into the compacted "
            "block of positions [%d, %d]; remove the whole sequence instead\n",
            __func__, p0, p1, seq_id, ak->pos_first, ak->pos_hi + 1);
    return false;
}

bool llama_adakv_on_swa_seq_rm(
        const llama_adakv * ak, const llama_kv_cache & swa, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (ak == nullptr || seq_id > 0) {
        return true;
    }
    p0                  = std::max<llama_pos>(p0, 0);
    const llama_pos max = swa.seq_pos_max(0);
    if (max < 0 || p0 == 0 || p0 > max || (p1 >= 0 && p1 <= max)) {
        return true; // nothing of it, all of it, or not the tail: the ring keeps what the next token needs
    }
    // the next token is at p0: it attends to the positions [need, p0) that the SWA mask leaves visible
    const auto & hp = ak->lctx->get_model().hparams;
    llama_pos need  = p0;
    while (need > 0 && !llama_hparams::is_masked_swa(hp.n_swa, hp.swa_type, need - 1, p0)) {
        --need;
    }
    if (swa.seq_pos_min(0) <= need) {
        return true;
    }
    LLAMA_LOG_DEBUG(
            "%s: refusing to remove positions from %d of sequence %d: the sliding-window cache no longer "
            "holds positions [%d, %d) that the next token attends to; evaluate the sequence again\n",
            __func__, p0, seq_id, need, swa.seq_pos_min(0));
    return false;
}

bool llama_adakv_on_seq_shift(llama_adakv * ak, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (!llama_adakv_is_compacted(ak) || seq_id > 0) {
        return true;
    }
    p0 = std::max<llama_pos>(p0, 0);
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    // any moved cell of the sequence would need a K-shift, which a compacted cache cannot apply
    // (llama_kv_cache::update would abort), so every range holding cells of it is refused
    const auto & cells = llama_adakv_access::cells(*ak->kv);
    if (p0 >= p1 || p1 <= ak->pos_first || p0 > cells.seq_pos_max(0)) {
        return true;
    }
    LLAMA_LOG_ERROR(
            "%s: refusing to shift positions [%d, %d) of sequence %d: it holds a compacted block "
            "(positions [%d, %d]) and a compacted cache cannot be shifted; nothing was moved\n",
            __func__, p0, p1, seq_id, ak->pos_first, ak->pos_hi + 1);
    return false;
}

// header: magic, version, n_layer, n_head_kv; block: layout, footprint, width, pos_lo, pos_hi,
// pos_first; counts [n_layer][n_head_kv]; kept positions [n_layer][n_head_kv][width]
void llama_adakv_state_write(const llama_adakv * ak, llama_io_write_i & io, llama_seq_id seq_id) {
    if (ak == nullptr) {
        return;
    }
    GGML_UNUSED(seq_id);
    const uint32_t hdr[4] = { ADAKV_STATE_MAGIC, ADAKV_STATE_VERSION, (uint32_t) ak->layers.size(),
                              (uint32_t) ak->n_head_kv };
    io.write(hdr, sizeof(hdr));
    const int32_t blk[6] = { ak->layout, ak->footprint, ak->width, ak->pos_lo, ak->pos_hi, ak->pos_first };
    io.write(blk, sizeof(blk));
    for (const auto & l : ak->layers) {
        io.write(l.count.data(), l.count.size() * sizeof(int32_t));
    }
    for (const auto & l : ak->layers) {
        if (!l.kept_pos.empty()) { // no zero-size copy from a null pointer
            io.write(l.kept_pos.data(), l.kept_pos.size() * sizeof(llama_pos));
        }
    }
}

// a state blob that cannot be restored: the reason goes to llama_adakv_last_error() too, since
// llama_state_set_data only logs the exception
[[noreturn]] static void adakv_state_error(const char * msg) {
    llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s", msg);
    throw std::runtime_error(msg);
}

// the saved counts of every layer must describe a block of `width` (the most any head keeps) and
// `fp` cells in the context's layout, so that no head reads rows outside cells [0, fp)
static bool adakv_counts_ok(const llama_adakv & ak, const std::vector<int32_t> & counts, int32_t fp, int32_t width) {
    const int32_t H = ak.n_head_kv;
    int32_t most    = 0;
    for (size_t i = 0; i < ak.layers.size(); ++i) {
        int64_t sum = 0;
        for (int32_t h = 0; h < H; ++h) {
            const int32_t L = counts[i * H + h];
            if (fp > 0 ? (L < 1 || L > width) : L != 0) {
                return false;
            }
            sum += L;
            most = std::max(most, L);
        }
        if (ak.layout == LLAMA_ADAKV_LAYOUT_POOLED && sum > (int64_t) fp * H) {
            return false;
        }
    }
    return most == width && (ak.layout == LLAMA_ADAKV_LAYOUT_POOLED || width == fp);
}

// the saved block must be one that a compaction makes: fp cells labelled with the consecutive
// positions [lo, hi] (lo = hi - fp + 1), standing for [first, hi] (0 <= first <= lo); for every
// head, the view cells below its start hold nothing (-1) and the ones from it on the original
// positions of its kept tokens, strictly increasing inside [first, hi]. No block: all -1 and
// nothing kept. Returns what is wrong, or "" when nothing is
static std::string adakv_block_error(
        const llama_adakv & ak,
        int32_t fp,
        int32_t width,
        llama_pos lo,
        llama_pos hi,
        llama_pos first,
        const std::vector<int32_t> & counts,
        const std::vector<llama_pos> & kept) {
    if (fp == 0) {
        if (lo != -1 || hi != -1 || first != -1) {
            return format(
                    "the saved state holds no compacted block but its block positions are first %d, labels [%d, %d] "
                    "(all -1 without a block)",
                    first, lo, hi);
        }
        return "";
    }
    if (first < 0 || first > lo || lo > hi || (int64_t) hi - lo + 1 != fp) {
        return format(
                "the saved block's positions are inconsistent: first %d, labels [%d, %d] for a block of %d cells "
                "(0 <= first <= the first label, and one label per cell)",
                first, lo, hi, fp);
    }
    const int32_t H = ak.n_head_kv;
    for (size_t i = 0; i < ak.layers.size(); ++i) {
        for (int32_t h = 0; h < H; ++h) {
            const int32_t start   = width - counts[i * H + h];
            const llama_pos * pos = kept.data() + (i * H + h) * width;
            for (int32_t c = 0; c < width; ++c) {
                const bool ok = c < start ? pos[c] == -1
                                          : pos[c] >= first && pos[c] <= hi && (c == start || pos[c] > pos[c - 1]);
                if (!ok) {
                    return format(
                            "the saved kept positions of layer %d head %d are corrupt: view cell %d holds position "
                            "%d (-1 below the head's start cell %d, then strictly increasing inside [%d, %d])",
                            ak.layers[i].il, h, c, pos[c], start, first, hi);
                }
            }
        }
    }
    return "";
}

void llama_adakv_state_read_begin(llama_adakv * ak, llama_io_read_i & io, llama_seq_id seq_id) {
    if (ak == nullptr) {
        return;
    }
    ak->pending = false;
    // reads the adakv section; a blob that ends inside it is refused like any other bad section
    auto read = [&io](void * dst, size_t size) {
        try {
            io.read(dst, size);
        } catch (const std::exception &) {
            adakv_state_error(
                    "adakv: the saved state ends inside its eviction section (truncated or not a state of this "
                    "context): save it again from its context, or evaluate the prompt again");
        }
    };
    uint32_t hdr[4];
    read(hdr, sizeof(hdr));
    if (hdr[0] != ADAKV_STATE_MAGIC) {
        adakv_state_error("adakv: this state was not saved by a context with adakv-local eviction enabled");
    }
    if (hdr[1] == 2) {
        adakv_state_error(
                "adakv: this state was saved by adakv-local before the pooled block (state version 2), "
                "whose compacted cache this version cannot read; evaluate the prompt again");
    }
    if (hdr[1] != ADAKV_STATE_VERSION) {
        adakv_state_error("adakv: this state was saved by another version of adakv-local");
    }
    if (hdr[2] != ak->layers.size() || (int32_t) hdr[3] != ak->n_head_kv) {
        adakv_state_error("adakv: this state was saved from a model with another layer layout");
    }
    int32_t blk[6];
    read(blk, sizeof(blk));
    const int32_t fp    = blk[1];
    const int32_t width = blk[2];
    if (blk[0] != ak->layout) {
        adakv_state_error(
                ak->layout == LLAMA_ADAKV_LAYOUT_POOLED
                        ? "adakv: this state holds a block of the rect layout and this context uses the pooled one "
                          "(make the context with layout = LLAMA_ADAKV_LAYOUT_RECT, or ADAKV_LAYOUT=rect)"
                        : "adakv: this state holds a block of the pooled layout and this context uses the rect one "
                          "(make the context with layout = LLAMA_ADAKV_LAYOUT_POOLED)");
    }
    if (fp < 0 || (uint32_t) fp > ak->kv_size || width < 0 || (uint32_t) width > ak->kv_size ||
        (fp == 0) != (width == 0)) {
        adakv_state_error("adakv: the saved compacted block does not fit this context's cache");
    }
    std::vector<int32_t> counts(ak->layers.size() * ak->n_head_kv);
    read(counts.data(), counts.size() * sizeof(int32_t));
    if (!adakv_counts_ok(*ak, counts, fp, width)) {
        adakv_state_error(
                "adakv: the saved start table is corrupt (the state was damaged or edited): save it again from its "
                "context, or evaluate the prompt again");
    }
    std::vector<llama_pos> kept(counts.size() * width);
    if (!kept.empty()) {
        read(kept.data(), kept.size() * sizeof(llama_pos));
    }
    const std::string bad = adakv_block_error(*ak, fp, width, blk[3], blk[4], blk[5], counts, kept);
    if (!bad.empty()) {
        adakv_state_error(
                ("adakv: " + bad +
                 " (the state was damaged or edited): save it again from its context, or evaluate the prompt again")
                        .c_str());
    }

    if (seq_id != -1 && fp > 0) {
        adakv_state_error(
                "adakv: refusing to restore a compacted sequence: its per-head layout only "
                "holds in the context it was saved from (save and load the whole context instead)");
    }
    if (seq_id != -1 && ak->footprint > 0) {
        adakv_state_error("adakv: refusing to restore a sequence into a compacted cache");
    }
    ak->pending           = seq_id == -1;
    ak->pending_fp        = fp;
    ak->pending_width     = width;
    ak->pending_pos_lo    = blk[3];
    ak->pending_pos_hi    = blk[4];
    ak->pending_pos_first = blk[5];
    ak->pending_counts    = std::move(counts);
    ak->pending_kept      = std::move(kept);
}

// the restored cells must carry the block read by state_read_begin: sequence 0 alone in cells
// [0, fp), labelled lo .. hi, and every other cell of it after hi. Returns what is wrong, or ""
static std::string adakv_cells_error(llama_adakv & ak) {
    const auto & cells = llama_adakv_access::cells(*ak.kv);
    for (uint32_t c = 0; c < cells.size(); ++c) {
        const bool in_block = c < (uint32_t) ak.pending_fp;
        if (cells.is_empty(c)) {
            if (in_block) {
                return format("cell %u of the compacted block is empty", c);
            }
            continue;
        }
        const llama_pos pos = cells.pos_get(c);
        if (!cells.seq_has(c, 0) || cells.seq_get_all(c).count() != 1) {
            return format("cell %u does not belong to sequence 0 alone", c);
        }
        if (in_block ? pos != ak.pending_pos_lo + (llama_pos) c : pos <= ak.pending_pos_hi) {
            return format(
                    "cell %u has position %d; the compacted block labels cells [0, %d) with positions [%d, %d] "
                    "and the cells after it come later",
                    c, pos, ak.pending_fp, ak.pending_pos_lo, ak.pending_pos_hi);
        }
    }
    return "";
}

void llama_adakv_state_read_end(llama_adakv * ak, llama_seq_id seq_id) {
    if (ak == nullptr || !ak->pending || seq_id != -1) {
        return;
    }
    ak->pending = false;
    if (ak->pending_fp > 0) {
        const std::string bad = adakv_cells_error(*ak);
        if (!bad.empty()) {
            // the cells are already replaced: nothing of the context before the load is left to keep
            llama_memory_clear(ak->lctx->get_memory(), true);
            adakv_state_error(("adakv: the saved cells disagree with the saved compacted block: " + bad +
                               " (the state was damaged or edited); the KV cache was cleared")
                                      .c_str());
        }
    }
    const size_t n_kept = (size_t) ak->n_head_kv * ak->pending_width;
    llama_adakv_set_counts(*ak, ak->pending_fp > 0 ? ak->pending_counts : std::vector<int32_t>(), ak->pending_width);
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        ak->layers[i].kept_pos.assign(
                ak->pending_kept.begin() + i * n_kept, ak->pending_kept.begin() + (i + 1) * n_kept);
    }
    ak->footprint = ak->pending_fp;
    ak->pos_lo    = ak->pending_pos_lo;
    ak->pos_hi    = ak->pending_pos_hi;
    ak->pos_first = ak->pending_pos_first;
    ak->pending_kept.clear();
    llama_adakv_upload_starts(*ak);
    ak->epoch++;
}

//
// C API
//

llama_adakv * llama_adakv_of(const llama_context * ctx) {
    return ctx ? ctx->adakv : nullptr;
}

struct llama_adakv_params llama_adakv_default_params(void) {
    llama_adakv_params p;
    p.gqa_reduce = LLAMA_ADAKV_GQA_MEAN;
    p.attn_path  = LLAMA_ADAKV_ATTN_ENV;
    p.layout     = LLAMA_ADAKV_LAYOUT_ENV;
    return p;
}

// ADAKV_LAYOUT=pooled|rect; anything else is pooled
static int32_t adakv_layout_from_env() {
    const char * layout = getenv("ADAKV_LAYOUT");
    if (layout != nullptr && strcmp(layout, "rect") == 0) {
        return LLAMA_ADAKV_LAYOUT_RECT;
    }
    if (layout != nullptr && strcmp(layout, "pooled") != 0 && layout[0] != '\0') {
        LLAMA_LOG_WARN("%s: ignoring ADAKV_LAYOUT=%s (expected pooled or rect)\n", __func__, layout);
    }
    return LLAMA_ADAKV_LAYOUT_POOLED;
}

// ADAKV_ATTN_PATH=auto|heads|mask, or ADAKV_FORCE_FALLBACK=1 (heads); anything else is auto
static int32_t adakv_attn_path_from_env() {
    const char * path = getenv("ADAKV_ATTN_PATH");
    if (path != nullptr && strcmp(path, "heads") == 0) {
        return LLAMA_ADAKV_ATTN_HEADS;
    }
    if (path != nullptr && strcmp(path, "mask") == 0) {
        return LLAMA_ADAKV_ATTN_MASK;
    }
    if (path != nullptr && strcmp(path, "auto") != 0 && path[0] != '\0') {
        LLAMA_LOG_WARN("%s: ignoring ADAKV_ATTN_PATH=%s (expected auto, heads or mask)\n", __func__, path);
    }
    const char * fallback = getenv("ADAKV_FORCE_FALLBACK");
    return fallback != nullptr && atoi(fallback) != 0 ? LLAMA_ADAKV_ATTN_HEADS : LLAMA_ADAKV_ATTN_AUTO;
}

static const char * adakv_unsupported_model(const llama_model & model) {
    const auto & hp = model.hparams;
    if (llama_model_is_recurrent(&model) || llama_model_is_hybrid(&model)) {
        return "recurrent and hybrid models have no per-token KV cache to evict";
    }
    if (llama_model_has_encoder(&model)) {
        return "encoder-decoder models are not supported";
    }
    if (hp.is_mla()) {
        return "models with multi-head latent attention (MLA) are not supported";
    }
    if (hp.use_alibi || hp.f_max_alibi_bias > 0.0f) {
        return "models with ALiBi position biases are not supported";
    }
    if (hp.n_pos_per_embd() > 1) {
        return "models with multi-dimensional positions (M-RoPE) are not supported";
    }
    for (const auto & layer : model.layers) {
        if (layer.attn_sinks != nullptr) {
            return "models with attention sinks (learned per-head logits, e.g. gpt-oss) are not supported";
        }
    }
    return nullptr;
}

// the KV caches of a context: the one eviction applies to and, for an interleaved-SWA model, its
// sliding-window cache (nullptr otherwise); kv is nullptr when the context's memory is neither a
// plain nor an interleaved-SWA KV cache. Returns whether it is the plain one.
static bool adakv_kv_caches(llama_context * ctx, llama_kv_cache *& kv, llama_kv_cache *& kv_swa) {
    llama_memory_t mem = ctx->get_memory();
    kv = kv_swa = nullptr;
    if (mem != nullptr && typeid(*mem) == typeid(llama_kv_cache)) {
        kv = static_cast<llama_kv_cache *>(mem);
        return true;
    }
    if (mem != nullptr && typeid(*mem) == typeid(llama_kv_cache_iswa)) {
        kv     = static_cast<llama_kv_cache_iswa *>(mem)->get_base();
        kv_swa = static_cast<llama_kv_cache_iswa *>(mem)->get_swa();
    }
    return false;
}

int32_t llama_adakv_enable(struct llama_context * ctx, struct llama_adakv_params params) {
    llama_adakv_clear_error();
    if (ctx == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: ctx is NULL", __func__);
    }
    if (ctx->adakv != nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: eviction is already enabled on this context", __func__);
    }
    if (params.attn_path < LLAMA_ADAKV_ATTN_ENV || params.attn_path > LLAMA_ADAKV_ATTN_MASK) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: attn_path must be -1 (environment), 0 (auto), 1 (heads) or 2 (mask), got %d", __func__,
                params.attn_path);
    }
    if (params.layout < LLAMA_ADAKV_LAYOUT_ENV || params.layout > LLAMA_ADAKV_LAYOUT_RECT) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: layout must be -1 (environment), 0 (pooled) or 1 (rect), got %d",
                __func__, params.layout);
    }
    if (params.gqa_reduce != LLAMA_ADAKV_GQA_MEAN && params.gqa_reduce != LLAMA_ADAKV_GQA_MAX) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: gqa_reduce must be 0 (mean) or 1 (max), got %d", __func__,
                params.gqa_reduce);
    }
    const auto & model   = ctx->get_model();
    const auto & cparams = ctx->get_cparams();
    const auto & hp      = model.hparams;

    if (const char * why = adakv_unsupported_model(model)) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: unsupported model architecture '%s': %s", __func__,
                llm_arch_name(model.arch), why);
    }
    if (!cparams.flash_attn) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: flash attention is off on this context; per-head "
                "eviction needs it (create the context with flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED)",
                __func__);
    }
    if (cparams.n_seq_max != 1) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: the context has n_seq_max = %u; eviction supports one "
                "sequence per context",
                __func__, cparams.n_seq_max);
    }

    llama_kv_cache * kv     = nullptr;
    llama_kv_cache * kv_swa = nullptr;
    const bool plain        = adakv_kv_caches(ctx, kv, kv_swa);
    if (kv != nullptr && plain) {
        if (hp.is_swa_any()) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID,
                    "%s: sliding-window layers in a single cache "
                    "(swa_full) are not supported; create the context with swa_full = false",
                    __func__);
        }
    } else if (kv == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: unsupported model architecture '%s': its memory is "
                "not a plain (or interleaved-SWA) KV cache",
                __func__, llm_arch_name(model.arch));
    }
    if (llama_adakv_access::shares_cells(*kv) || llama_adakv_access::v_trans(*kv) ||
        llama_adakv_access::n_stream(*kv) != 1) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: this KV cache layout (shared cells, transposed V "
                "or several streams) is not supported",
                __func__);
    }

    auto ak       = std::make_unique<llama_adakv>();
    ak->lctx      = ctx;
    ak->kv        = kv;
    ak->kv_swa    = kv_swa;
    ak->params    = params;
    ak->kv_size   = kv->get_size();
    ak->attn_path = params.attn_path == LLAMA_ADAKV_ATTN_ENV ? adakv_attn_path_from_env() : params.attn_path;
    ak->layout    = params.layout == LLAMA_ADAKV_LAYOUT_ENV ? adakv_layout_from_env() : params.layout;
    ak->view_cap  = 2 * ak->kv_size;

    ak->layers = llama_adakv_access::layers(*kv);
    if (ak->layers.empty()) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: the KV cache has no layers", __func__);
    }
    ak->n_head_kv = (int32_t) hp.n_head_kv(ak->layers[0].il);
    ak->n_head    = (int32_t) hp.n_head(ak->layers[0].il);
    ak->layer_of_il.assign(hp.n_layer(), -1);
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        auto & l         = ak->layers[i];
        const int64_t dk = hp.n_embd_head_k(l.il);
        const int64_t dv = hp.n_embd_head_v(l.il);
        if ((int32_t) hp.n_head_kv(l.il) != ak->n_head_kv || (int32_t) hp.n_head(l.il) != ak->n_head) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID,
                    "%s: layers with different head counts are not "
                    "supported (layer %d)",
                    __func__, l.il);
        }
        if (l.k->type == GGML_TYPE_F32 || l.v->type == GGML_TYPE_F32) {
            // flash attention reads an f32 cache through a cast, which the hooks would not see
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID,
                    "%s: an f32 KV cache is not supported; use f16, "
                    "q8_0 or q4_0 (type_k / type_v)",
                    __func__);
        }
        if (ggml_row_size(l.k->type, dk) % 4 != 0 || ggml_row_size(l.v->type, dv) % 4 != 0) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID,
                    "%s: a head's row of the %s/%s cache is not a "
                    "multiple of 4 bytes; use an f16 or q8_0 cache",
                    __func__, ggml_type_name(l.k->type), ggml_type_name(l.v->type));
        }
        ak->layer_of_il[l.il] = (int32_t) i;
    }
    llama_adakv_set_counts(*ak, {}, 0);

    // persistent tensors next to each layer's cache
    std::map<ggml_backend_buffer_type_t, std::vector<size_t>> by_buft;
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        by_buft[ggml_backend_buffer_get_type(ak->layers[i].k->buffer)].push_back(i);
    }
    for (auto & [buft, ids] : by_buft) {
        // the persistent tensors of each layer (llama_adakv_layer: 7)
        ggml_init_params ip = { 8 * ids.size() * ggml_tensor_overhead(), nullptr, true };
        ggml_context * tctx = llama_adakv_alloc_fails() ? nullptr : ggml_init(ip);
        if (!tctx) {
            return llama_adakv_set_error(LLAMA_ADAKV_ERR_ALLOC, "%s: ggml_init failed", __func__);
        }
        ak->ctxs.push_back(tctx);
        for (size_t i : ids) {
            auto & l          = ak->layers[i];
            l.start_i32       = ggml_new_tensor_1d(tctx, GGML_TYPE_I32, ak->n_head_kv);
            l.vstart_i32      = ggml_new_tensor_1d(tctx, GGML_TYPE_I32, ak->n_head_kv);
            l.start_f32       = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, 1, ak->n_head_kv);
            l.pool_i32        = ggml_new_tensor_2d(tctx, GGML_TYPE_I32, 2, ak->n_head_kv);
            const bool pooled = ak->layout == LLAMA_ADAKV_LAYOUT_POOLED;
            l.pool_mask       = ggml_new_tensor_2d(
                    tctx, GGML_TYPE_F16, pooled ? (int64_t) ak->kv_size * ak->n_head_kv : 1, ak->n_head_kv);
            l.view_rows = ggml_new_tensor_2d(
                    tctx, GGML_TYPE_I32, ak->n_head_kv, ak->layout == LLAMA_ADAKV_LAYOUT_POOLED ? ak->view_cap : 1);
            l.scores = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, ak->view_cap, ak->n_head_kv);
            ggml_format_name(l.scores, "adakv_scores-%d", l.il);
        }
        ggml_backend_buffer_t buf =
                llama_adakv_alloc_fails() ? nullptr : ggml_backend_alloc_ctx_tensors_from_buft(tctx, buft);
        if (!buf) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_ALLOC, "%s: could not allocate the score buffers (%s)", __func__,
                    ggml_backend_buft_name(buft));
        }
        ggml_backend_buffer_clear(buf, 0);
        ak->bufs.push_back(buf);
    }
    llama_adakv_upload_starts(*ak);

    kv->adakv  = ak.get();
    ctx->adakv = ak.release();
    // the graph budget now includes what the adakv part adds (llama_adakv_graph_extra_nodes)
    llama_adakv_access::request_reserve(*ctx);
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_is_enabled(const struct llama_context * ctx) {
    return llama_adakv_of(ctx) != nullptr ? 1 : 0;
}

int32_t llama_adakv_n_layer(const struct llama_context * ctx) {
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    return (int32_t) ak->layers.size();
}

int32_t llama_adakv_n_head_kv(const struct llama_context * ctx) {
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    return ak->n_head_kv;
}

int32_t llama_adakv_layer_ids(const struct llama_context * ctx, int32_t * out) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass an array of llama_adakv_n_layer() ints", __func__);
    }
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        out[i] = ak->layers[i].il;
    }
    return LLAMA_ADAKV_OK;
}

// number of cells of sequence 0 if they are exactly [0, n), else -1
static int32_t adakv_seq_cells(llama_adakv & ak) {
    auto & cells     = llama_adakv_access::cells(*ak.kv);
    const uint32_t n = cells.used_max_p1();
    if (cells.get_used() != n) {
        return -1;
    }
    for (uint32_t i = 0; i < n; ++i) {
        if (!cells.seq_has(i, 0) || cells.seq_get_all(i).count() != 1) {
            return -1;
        }
    }
    return (int32_t) n;
}

int32_t llama_adakv_n_cells(const struct llama_context * ctx) {
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    const int32_t n = adakv_seq_cells(*ak);
    if (n < 0) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: sequence 0 does not occupy a contiguous range "
                "of cells from cell 0",
                __func__);
    }
    return ak->width + n - ak->footprint;
}

int32_t llama_adakv_get_block(const struct llama_context * ctx, struct llama_adakv_block * out) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass the struct to fill", __func__);
    }
    const int32_t n = adakv_seq_cells(*ak);
    if (n < 0) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: sequence 0 does not occupy a contiguous range of cells from cell 0",
                __func__);
    }
    out->layout     = ak->layout;
    out->cells      = ak->footprint;
    out->width      = ak->width;
    out->cells_used = n;
    out->view_cells = ak->width + n - ak->footprint;
    return LLAMA_ADAKV_OK;
}

// original position of the token that view cell c holds for head h of layer l, or -1 (see kept_pos)
static llama_pos adakv_cell_pos(
        const llama_adakv & ak, const llama_adakv_layer & l, const llama_kv_cells & cells, int32_t h, int64_t c) {
    if (c < ak.width) {
        return l.kept_pos[(size_t) h * ak.width + c];
    }
    const uint32_t cell = (uint32_t) (ak.footprint + (c - ak.width));
    return cell >= cells.size() || cells.is_empty(cell) ? -1 : cells.pos_get(cell);
}

int32_t llama_adakv_get_positions(const struct llama_context * ctx, int32_t * out, int32_t n_cells) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr || n_cells < 1 || (uint32_t) n_cells > ak->view_cap) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out must not be NULL and n_cells must be in [1, %u], got %d", __func__,
                ak->view_cap, n_cells);
    }
    const auto & cells = llama_adakv_access::cells(*ak->kv);
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        for (int32_t h = 0; h < ak->n_head_kv; ++h) {
            int32_t * dst = out + ((size_t) i * ak->n_head_kv + h) * n_cells;
            for (int32_t c = 0; c < n_cells; ++c) {
                dst[c] = adakv_cell_pos(*ak, ak->layers[i], cells, h, c);
            }
        }
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_get_attn_used(const struct llama_context * ctx, int32_t * out) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass an array of llama_adakv_n_layer() ints", __func__);
    }
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        out[i] = ak->layers[i].attn_used;
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_get_starts(const struct llama_context * ctx, int32_t * out) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass an array of n_layer * n_head_kv ints", __func__);
    }
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        memcpy(out + i * ak->n_head_kv, ak->layers[i].start.data(), ak->n_head_kv * sizeof(int32_t));
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_footprint(const struct llama_context * ctx) {
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    return ak->footprint;
}

int32_t llama_adakv_arm_scores(struct llama_context * ctx, int32_t n_window) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    const uint32_t n_ubatch = ctx->get_cparams().n_ubatch;
    if (n_window < 1 || (uint32_t) n_window > n_ubatch) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: n_window must be in [1, n_ubatch = %u], got %d", __func__, n_ubatch,
                n_window);
    }
    if (n_window > ak->reserve_window) {
        // the compute buffers were sized for a smaller window: reserve again before the next decode
        ak->reserve_window = n_window;
        llama_adakv_access::request_reserve(*ctx);
    }
    ak->armed_window  = n_window;
    ak->disarmed_ret  = 0;
    ak->scored_tokens = 0;
    ak->scored.assign(ak->layers.size(), false);
    ak->epoch++;
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_get_compute_memory(const struct llama_context * ctx, struct llama_adakv_compute_memory * out) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass the struct to fill", __func__);
    }
    *out = {};
    llama_adakv_access::compute_bytes(*ctx, out->reserved, out->allocated);
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_get_memory(const struct llama_context * ctx, struct llama_adakv_memory * out) {
    llama_adakv_clear_error();
    if (ctx == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: ctx is NULL", __func__);
    }
    if (out == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass the struct to fill", __func__);
    }
    // eviction enabled or not: a full-cache context's figures come from the same place
    const llama_adakv * ak  = llama_adakv_of(ctx);
    llama_kv_cache * kv     = ak != nullptr ? ak->kv : nullptr;
    llama_kv_cache * kv_swa = ak != nullptr ? ak->kv_swa : nullptr;
    if (ak == nullptr) {
        adakv_kv_caches(const_cast<llama_context *>(ctx), kv, kv_swa);
        if (kv == nullptr) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_INVALID, "%s: this context's memory is not a plain or interleaved-SWA KV cache",
                    __func__);
        }
    }
    // bytes of K and V of one cell, summed over the layers of a cache
    auto cell_bytes = [](const llama_kv_cache & kv) {
        size_t bytes = 0;
        for (const auto & l : llama_adakv_access::layers(kv)) {
            bytes += ggml_nbytes(l.k) + ggml_nbytes(l.v);
        }
        return (int64_t) (bytes / kv.get_size());
    };
    *out            = {};
    out->cells      = kv->get_size();
    out->cell_bytes = cell_bytes(*kv);
    if (kv_swa != nullptr) {
        out->swa_cells      = kv_swa->get_size();
        out->swa_cell_bytes = cell_bytes(*kv_swa);
        out->swa_used       = llama_adakv_access::cells(*kv_swa).get_used();
    }
    return LLAMA_ADAKV_OK;
}

int32_t llama_adakv_read_scores(struct llama_context * ctx, float * out, int32_t n_cells) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (out == nullptr) {
        // an argument error leaves the scores armed: the call can be made again with an array
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass an array of n_layer * n_head_kv * n_cells floats",
                __func__);
    }
    const int32_t window = ak->armed_window;
    const int32_t failed = ak->disarmed_ret;
    ak->armed_window     = 0;
    ak->disarmed_ret     = 0;
    ak->epoch++;
    if (window == 0 && failed != 0) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: the llama_decode call after arming failed (it returned %d) and disarmed the scoring; arm it "
                "again and decode the window",
                __func__, failed);
    }
    if (window == 0) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: scoring was not armed", __func__);
    }
    const bool all_scored = std::find(ak->scored.begin(), ak->scored.end(), false) == ak->scored.end();
    if (ak->scored_tokens != window || !all_scored) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: the decode call after arming scored %d tokens of its last ubatch; "
                "that ubatch must end with the %d window tokens",
                __func__, ak->scored_tokens, window);
    }
    if (n_cells < 1 || (uint32_t) n_cells > ak->scored_n_kv) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: n_cells must be in [1, %u], got %d", __func__, ak->scored_n_kv, n_cells);
    }
    ctx->synchronize();
    for (size_t i = 0; i < ak->layers.size(); ++i) {
        const auto & l = ak->layers[i];
        for (int32_t h = 0; h < ak->n_head_kv; ++h) {
            float * dst = out + ((size_t) i * ak->n_head_kv + h) * n_cells;
            ggml_backend_tensor_get(l.scores, dst, (size_t) h * l.scores->nb[1], (size_t) n_cells * sizeof(float));
        }
    }
    return LLAMA_ADAKV_OK;
}

static ggml_backend_t adakv_backend_for(llama_adakv & ak, ggml_tensor * t) {
    ggml_backend_dev_t dev = llama_adakv_dev_of(t);
    auto it                = ak.backends.find(dev);
    if (it != ak.backends.end()) {
        return it->second;
    }
    ggml_backend_t be = ggml_backend_dev_init(dev, nullptr);
    if (be) {
        ak.backends[dev] = be;
    }
    return be;
}

// I32 alias of a cache tensor (the same bytes), for byte-exact row moves
static ggml_tensor * adakv_alias_i32(ggml_context * ctx, ggml_tensor * t) {
    ggml_tensor * a = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, ggml_nbytes(t) / 4);
    a->data         = t->data;
    a->buffer       = t->buffer;
    return a;
}

// moves head rows of the cache tensor t (K or V of one layer, seen as kv_size * n_head_kv rows of
// head_bytes): destination row r (r < n_dst) gets source row idx[r] (see the layouts in
// llama-adakv-state.h); get_rows reads every source before cpy writes, so sources and destinations
// may overlap
static ggml_tensor *
adakv_build_move(ggml_context * ctx, ggml_tensor * t, int64_t head_bytes, int64_t n_rows, ggml_tensor * idx) {
    ggml_tensor * a     = adakv_alias_i32(ctx, t);
    ggml_tensor * rows  = ggml_view_2d(ctx, a, head_bytes / 4, n_rows, head_bytes, 0); // [head_bytes/4, n_rows]
    ggml_tensor * moved = ggml_get_rows(ctx, rows, idx);                               // [head_bytes/4, n_dst]
    ggml_tensor * dst   = ggml_view_2d(ctx, a, head_bytes / 4, idx->ne[0], head_bytes, 0);
    return ggml_cpy(ctx, moved, dst);
}

int32_t llama_adakv_compact(struct llama_context * ctx, const int32_t * counts, const int32_t * kept) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (counts == nullptr || kept == nullptr) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: counts and cells must not be NULL", __func__);
    }
    const int32_t N = adakv_seq_cells(*ak); // cache cells
    if (N <= 0) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID,
                "%s: sequence 0 must occupy cells [0, n) and nothing "
                "else (n >= 1)",
                __func__);
    }
    const int32_t NV     = ak->width + N - ak->footprint; // view cells
    const int32_t H      = ak->n_head_kv;
    const size_t NL      = ak->layers.size();
    const bool pooled    = ak->layout == LLAMA_ADAKV_LAYOUT_POOLED;
    const int32_t L_most = std::min<int32_t>(NV, (int32_t) ak->kv_size);

    // validate everything before anything changes
    int32_t W  = 0; // the new width
    int32_t R  = 0; // the new footprint
    size_t off = 0;
    for (size_t i = 0; i < NL; ++i) {
        int64_t sum = 0;
        for (int32_t h = 0; h < H; ++h) {
            const int32_t L = counts[i * H + h];
            const int32_t s = ak->layers[i].start[h];
            if (L < 1 || L > std::min(NV - s, L_most)) {
                return llama_adakv_set_error(
                        LLAMA_ADAKV_ERR_INVALID,
                        "%s: layer %d head %d keeps %d cells; it must "
                        "keep between 1 and %d",
                        __func__, ak->layers[i].il, h, L, std::min(NV - s, L_most));
            }
            for (int32_t j = 0; j < L; ++j) {
                const int32_t c = kept[off + j];
                if (c < s || c >= NV || (j > 0 && c <= kept[off + j - 1])) {
                    return llama_adakv_set_error(
                            LLAMA_ADAKV_ERR_INVALID,
                            "%s: layer %d head %d: kept cell #%d = %d "
                            "is not increasing inside [%d, %d)",
                            __func__, ak->layers[i].il, h, j, c, s, NV);
                }
            }
            W = std::max(W, L);
            sum += L;
            off += L;
        }
        R = std::max<int32_t>(R, pooled ? (int32_t) ((sum + H - 1) / H) : W);
    }
    R = pooled ? R : W;
    // a head keeps at most what it holds, so the block never needs more cells than the sequence uses
    GGML_ASSERT(R <= N);

    // per layer: the source head row of every destination head row, and the original positions of
    // the tokens that the view cells [0, W) will hold, [H, W], -1 below a head's start
    auto & cells = llama_adakv_access::cells(*ak->kv);
    std::vector<std::vector<int32_t>> idx(NL);
    std::vector<std::vector<llama_pos>> kept_pos(NL, std::vector<llama_pos>((size_t) W * H, -1));
    off = 0;
    for (size_t i = 0; i < NL; ++i) {
        const auto & l = ak->layers[i];
        auto & id      = idx[i];
        if (!pooled) {
            id.resize((size_t) R * H);
            for (int64_t r = 0; r < (int64_t) R * H; ++r) {
                id[r] = (int32_t) r; // below a head's start: left as it is
            }
        }
        for (int32_t h = 0; h < H; ++h) {
            const int32_t L = counts[i * H + h];
            for (int32_t j = 0; j < L; ++j) {
                const int64_t src = llama_adakv_view_row(*ak, l, h, kept[off + j]);
                GGML_ASSERT(src >= 0);
                if (pooled) {
                    id.push_back((int32_t) src); // rows of head h follow those of the heads before it
                } else {
                    id[(size_t) (R - L + j) * H + h] = (int32_t) src;
                }
                kept_pos[i][(size_t) h * W + (W - L) + j] = adakv_cell_pos(*ak, l, cells, h, kept[off + j]);
            }
            off += L;
        }
    }
    // the block stands for every position from the sequence's first one on (an earlier block included)
    const llama_pos first = ak->footprint > 0 ? ak->pos_first : cells.seq_pos_min(0);

    // one graph per device: get_rows + cpy of the I32 alias of K and V
    std::map<ggml_backend_t, std::vector<size_t>> by_backend;
    for (size_t i = 0; i < NL; ++i) {
        ggml_backend_t be = adakv_backend_for(*ak, ak->layers[i].k);
        if (!be) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_BACKEND,
                    "%s: could not start a backend for the cache of "
                    "layer %d",
                    __func__, ak->layers[i].il);
        }
        by_backend[be].push_back(i);
    }
    ctx->synchronize();
    const auto & hp      = ctx->get_model().hparams;
    const int64_t n_rows = (int64_t) ak->kv_size * H;
    bool moved           = false; // the rows of some layers moved already (an earlier backend's graph ran)
    for (auto & [be, ids] : by_backend) {
        // per layer: the index tensor, and for K and V an alias, two views, get_rows and cpy
        const size_t n_nodes = 16 * ids.size() + 16;
        ggml_init_params ip  = { n_nodes * ggml_tensor_overhead() + ggml_graph_overhead_custom(n_nodes, false), nullptr,
                                 true };
        ggml_context * gctx  = llama_adakv_alloc_fails() ? nullptr : ggml_init(ip);
        ggml_cgraph * gf =
                gctx == nullptr || llama_adakv_alloc_fails() ? nullptr : ggml_new_graph_custom(gctx, n_nodes, false);
        ggml_gallocr_t galloc = gf == nullptr || llama_adakv_alloc_fails()
                                        ? nullptr
                                        : ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
        const char * failed   = gctx == nullptr ? "ggml_init"
                                : gf == nullptr ? "ggml_new_graph_custom"
                                                : "ggml_gallocr_new";
        std::vector<ggml_tensor *> idx_t;
        if (galloc != nullptr) {
            for (size_t i : ids) {
                const auto & l      = ak->layers[i];
                ggml_tensor * t_idx = ggml_new_tensor_1d(gctx, GGML_TYPE_I32, (int64_t) idx[i].size());
                ggml_set_input(t_idx);
                idx_t.push_back(t_idx);
                ggml_build_forward_expand(
                        gf,
                        adakv_build_move(gctx, l.k, ggml_row_size(l.k->type, hp.n_embd_head_k(l.il)), n_rows, t_idx));
                ggml_build_forward_expand(
                        gf,
                        adakv_build_move(gctx, l.v, ggml_row_size(l.v->type, hp.n_embd_head_v(l.il)), n_rows, t_idx));
            }
            failed = "ggml_gallocr_alloc_graph";
        }
        const bool alloc_ok = galloc != nullptr && !llama_adakv_alloc_fails() && ggml_gallocr_alloc_graph(galloc, gf);
        bool ok             = alloc_ok;
        if (ok) {
            for (size_t j = 0; j < ids.size(); ++j) {
                ggml_backend_tensor_set(idx_t[j], idx[ids[j]].data(), 0, idx[ids[j]].size() * sizeof(int32_t));
            }
            ok = ggml_backend_graph_compute(be, gf) == GGML_STATUS_SUCCESS;
        }
        ggml_gallocr_free(galloc); // both accept NULL
        ggml_free(gctx);
        if (!alloc_ok && !moved) {
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_ALLOC,
                    "%s: out of memory for the compaction graph on %s (%s failed); nothing was changed: free "
                    "memory (a smaller n_ctx or n_ubatch) and compact again",
                    __func__, ggml_backend_name(be), failed);
        }
        if (!ok) {
            // the rows of some layers may have moved already: the cache content is undefined now
            llama_memory_clear(ctx->get_memory(), true);
            return llama_adakv_set_error(
                    LLAMA_ADAKV_ERR_BACKEND, "%s: the compaction graph failed on %s (%s); the KV cache was cleared",
                    __func__, ggml_backend_name(be), alloc_ok ? "compute" : failed);
        }
        moved = true;
    }

    // cells: [0, R) relabelled P - R + 1 .. P, [R, N) freed
    const llama_pos P = cells.seq_pos_max(0);
    for (int32_t c = 0; c < N; ++c) {
        cells.rm(c);
    }
    for (int32_t c = 0; c < R; ++c) {
        cells.pos_set(c, P - R + 1 + c);
        cells.seq_add(c, 0);
    }
    llama_adakv_access::head(*ak->kv) = R;

    llama_adakv_set_counts(*ak, std::vector<int32_t>(counts, counts + NL * H), W);
    for (size_t i = 0; i < NL; ++i) {
        ak->layers[i].kept_pos = std::move(kept_pos[i]);
    }
    ak->footprint = R;
    ak->pos_lo    = P - R + 1;
    ak->pos_hi    = P;
    ak->pos_first = first;
    llama_adakv_upload_starts(*ak);
    ak->epoch++;
    return LLAMA_ADAKV_OK;
}

int64_t llama_adakv_row_size(const struct llama_context * ctx, int32_t layer, int32_t is_v) {
    llama_adakv * ak = llama_adakv_of(ctx);
    if (ak == nullptr || layer < 0 || (size_t) layer >= ak->layers.size()) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: eviction not enabled or layer out of range", __func__);
    }
    const auto & l  = ak->layers[layer];
    const auto & hp = ctx->get_model().hparams;
    return is_v ? (int64_t) ggml_row_size(l.v->type, hp.n_embd_head_v(l.il))
                : (int64_t) ggml_row_size(l.k->type, hp.n_embd_head_k(l.il));
}

int32_t llama_adakv_read_rows(
        struct llama_context * ctx,
        int32_t layer,
        int32_t is_v,
        int32_t cell0,
        int32_t n_cells,
        void * out,
        size_t out_size) {
    llama_adakv_clear_error();
    ADAKV_REQUIRE_ENABLED(ctx, ak);
    if (layer < 0 || (size_t) layer >= ak->layers.size() || cell0 < 0 || n_cells < 1 ||
        (int64_t) cell0 + n_cells > (int64_t) ak->view_cap) {
        return llama_adakv_set_error(LLAMA_ADAKV_ERR_INVALID, "%s: layer or cell range out of bounds", __func__);
    }
    const int64_t hb = llama_adakv_row_size(ctx, layer, is_v);
    if (out == nullptr) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out is NULL; pass n_cells * n_head_kv * %lld bytes", __func__,
                (long long) hb);
    }
    if (out_size != (size_t) n_cells * ak->n_head_kv * hb) {
        return llama_adakv_set_error(
                LLAMA_ADAKV_ERR_INVALID, "%s: out must hold n_cells * n_head_kv * %lld bytes", __func__,
                (long long) hb);
    }
    ctx->synchronize();
    const auto & l  = ak->layers[layer];
    ggml_tensor * t = is_v ? l.v : l.k;
    char * dst      = (char *) out;
    for (int32_t c = 0; c < n_cells; ++c) {
        for (int32_t h = 0; h < ak->n_head_kv; ++h, dst += hb) {
            const int64_t r = llama_adakv_view_row(*ak, l, h, cell0 + c);
            if (r < 0 || r >= (int64_t) ak->kv_size * ak->n_head_kv) {
                memset(dst, 0, hb); // nothing there for this head
            } else {
                ggml_backend_tensor_get(t, dst, (size_t) r * hb, hb);
            }
        }
    }
    return LLAMA_ADAKV_OK;
}
