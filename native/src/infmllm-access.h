// infmllm-access.h - the one place native/ reaches into private llama.cpp state.
// The patches declare `friend struct infmllm_access;` in the classes used here.
#pragma once

#include "infmllm-hooks.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <utility>
#include <vector>

struct infmllm_access {
    static llama_cparams & cparams(llama_context & ctx) { return ctx.cparams; }

    static std::pair<ggml_abort_callback, void *> abort_callback(const llama_context & ctx) {
        return {ctx.abort_callback, ctx.abort_callback_data};
    }

    // the scoring ops change the worst-case graph: re-reserve compute buffers
    static void request_reserve(llama_context & ctx) { ctx.sched_need_reserve = true; }

    static llama_kv_cells & cells(llama_kv_cache & kv, uint32_t stream) { return kv.v_cells[stream]; }

    static uint32_t & head(llama_kv_cache & kv, uint32_t stream) { return kv.v_heads[stream]; }

    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }

    static const std::vector<llama_kv_cache::kv_layer> & layers(const llama_kv_cache & kv) { return kv.layers; }

    static bool v_trans(const llama_kv_cache & kv) { return kv.v_trans; }

    static const llama_kv_cache & cache(const llama_kv_cache_context & kv_ctx) { return *kv_ctx.kv; }

    static const llama_kv_cache::slot_info & slot(const llama_kv_cache_context & kv_ctx) {
        return kv_ctx.sinfos[kv_ctx.i_cur];
    }

    // true when t is the K storage tensor of one of the cache's layers
    static bool is_k_storage(const llama_kv_cache & kv, const ggml_tensor * t) {
        for (const auto & layer : kv.layers) {
            if (layer.k == t) {
                return true;
            }
        }
        return false;
    }
};

// The plain KV cache of a context, or nullptr (recurrent, hybrid, iSWA): what the row
// transfers and query capture work on.
llama_kv_cache * infmllm_kv_cache(llama_context * ctx);

// The plain KV cache of ctx and the KV stream holding seq_id: INFMLLM_OK, or
// INFMLLM_ERR_INVALID_ARG (NULL ctx), INFMLLM_ERR_UNSUPPORTED, INFMLLM_ERR_INVALID_SEQ.
int32_t infmllm_resolve_seq(llama_context * ctx, llama_seq_id seq_id, llama_kv_cache *& kv, uint32_t & stream);

// The caches that cells are scored, evicted and compacted in.  `main` holds every cell of
// every sequence: the plain KV cache, or the full-attention half of an iSWA cache.  `swa` is
// the sliding-window half of an iSWA cache (else nullptr): it holds the newest cells of each
// sequence again, for its layers, and must follow every eviction and compaction of `main`.
struct infmllm_kv_pair {
    llama_kv_cache * main = nullptr;
    llama_kv_cache * swa  = nullptr;
};

infmllm_kv_pair infmllm_kv_caches(llama_context * ctx);

// As infmllm_resolve_seq, for the pair of caches (the stream index is the same in both).
int32_t infmllm_resolve_seq_pair(llama_context * ctx, llama_seq_id seq_id, infmllm_kv_pair & kv, uint32_t & stream);

// The graph-side view of `main` for a ubatch: the plain cache's context, or the base context
// of an iSWA cache's; nullptr for other memory.
const llama_kv_cache_context * infmllm_main_context(const llama_memory_context_i * mctx);
