// Per-context switches (scoring, query capture) and the read-back of scores and queries
// after each computed ubatch.
#include "infmllm.h"
#include "infmllm-access.h"

#include "llama-graph.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>

llama_kv_cache * infmllm_kv_cache(llama_context * ctx) {
    return ctx == nullptr ? nullptr : dynamic_cast<llama_kv_cache *>(ctx->get_memory());
}

infmllm_kv_pair infmllm_kv_caches(llama_context * ctx) {
    if (ctx == nullptr) {
        return {};
    }
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return {kv, nullptr};
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return {iswa->get_base(), iswa->get_swa()};
    }
    return {};
}

const llama_kv_cache_context * infmllm_main_context(const llama_memory_context_i * mctx) {
    if (const auto * kv = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return kv;
    }
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return iswa->get_base();
    }
    return nullptr;
}

int32_t infmllm_resolve_seq_pair(llama_context * ctx, llama_seq_id seq_id, infmllm_kv_pair & kv, uint32_t & stream) {
    if (ctx == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    kv = infmllm_kv_caches(ctx);
    if (kv.main == nullptr) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= kv.main->get_n_seq_max()) {
        return INFMLLM_ERR_INVALID_SEQ;
    }
    stream = kv.main->get_stream(seq_id);
    return INFMLLM_OK;
}

int32_t infmllm_resolve_seq(llama_context * ctx, llama_seq_id seq_id, llama_kv_cache *& kv, uint32_t & stream) {
    infmllm_kv_pair pair;
    const int32_t rc = infmllm_resolve_seq_pair(ctx, seq_id, pair, stream);
    if (pair.swa != nullptr) {
        return INFMLLM_ERR_UNSUPPORTED; // an iSWA cache: not a plain one, whatever the sequence
    }
    kv = pair.main;
    return rc;
}

const char * infmllm_status_str(int32_t status) {
    switch (status) {
        case INFMLLM_OK:                   return "ok";
        case INFMLLM_ERR_INVALID_ARG:      return "invalid argument";
        case INFMLLM_ERR_UNSUPPORTED:      return "unsupported model or memory type (needs a plain KV cache; moving keys needs 1-D RoPE)";
        case INFMLLM_ERR_INVALID_SEQ:      return "invalid sequence id";
        case INFMLLM_ERR_POS_NOT_FOUND:    return "position not cached for that sequence (or repeated)";
        case INFMLLM_ERR_SHARED_CELLS:     return "cells are shared with other sequences";
        case INFMLLM_ERR_BUFFER_TOO_SMALL: return "buffer size does not match";
        case INFMLLM_ERR_NO_FREE_CELLS:    return "not enough free cells in the KV cache";
        default:                           return status >= 0 ? "ok" : "unknown error";
    }
}

int32_t infmllm_set_scoring(llama_context * ctx, int32_t n_score_queries) {
    if (ctx == nullptr || n_score_queries < INFMLLM_SCORE_ALL_ROWS) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_cparams & cparams = infmllm_access::cparams(*ctx);
    if (n_score_queries > (int32_t) cparams.n_ubatch) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_kv_cache * kv = infmllm_kv_caches(ctx).main;
    if (n_score_queries != INFMLLM_SCORE_OFF && kv == nullptr) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    if (kv != nullptr) {
        auto & st = ctx->infmllm;
        st.scores.assign(kv->get_n_stream(), std::vector<float>(kv->get_size(), 0.0f));
        st.stream_decode.assign(kv->get_n_stream(), 0);
        st.scored_rows.assign(kv->get_n_stream(), 0);
    }
    if (cparams.infmllm_score_rows != n_score_queries) {
        cparams.infmllm_score_rows = n_score_queries;
        infmllm_access::request_reserve(*ctx);
    }
    return INFMLLM_OK;
}

int32_t infmllm_get_scoring(const llama_context * ctx, int32_t * n_score_queries) {
    if (ctx == nullptr || n_score_queries == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    *n_score_queries = ctx->get_cparams().infmllm_score_rows;
    return INFMLLM_OK;
}

int32_t infmllm_kv_seq_scored_rows(llama_context * ctx, llama_seq_id seq_id) {
    infmllm_kv_pair kv;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq_pair(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    const auto & rows = ctx->infmllm.scored_rows;
    return stream < rows.size() ? rows[stream] : 0;
}

int32_t infmllm_set_query_capture(llama_context * ctx, int32_t n_rows) {
    if (ctx == nullptr || n_rows < 0) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_cparams & cparams = infmllm_access::cparams(*ctx);
    if (n_rows > (int32_t) cparams.n_ubatch) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_kv_cache * kv = infmllm_kv_cache(ctx);
    if (kv == nullptr) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    auto & st = ctx->infmllm;
    const auto & hparams = infmllm_access::hparams(*kv);
    st.query_offset.assign(hparams.n_layer(), -1);
    st.query_head_dim = hparams.n_embd_head_k();
    int64_t n_floats = 0;
    for (const auto & layer : infmllm_access::layers(*kv)) {
        st.query_offset[layer.il] = n_floats;
        n_floats += (int64_t) hparams.n_head(layer.il) * n_rows * st.query_head_dim;
    }
    st.queries.assign(kv->get_n_stream(), std::vector<float>(n_floats, 0.0f));
    st.query_rows_held.assign(kv->get_n_stream(), 0);
    if (cparams.infmllm_query_rows != n_rows) {
        cparams.infmllm_query_rows = n_rows;
        infmllm_access::request_reserve(*ctx);
    }
    return INFMLLM_OK;
}

int32_t infmllm_get_queries(llama_context * ctx, llama_seq_id seq_id, float * out, size_t n_floats) {
    llama_kv_cache * kv = nullptr;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    if (out == nullptr && n_floats > 0) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    const auto & st = ctx->infmllm;
    if (st.queries.empty()) {
        return n_floats == 0 ? 0 : INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    const auto & q = st.queries[stream];
    if (n_floats != q.size()) {
        return INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    std::copy(q.begin(), q.end(), out);
    return st.query_rows_held[stream];
}

int32_t infmllm_clear_queries(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = nullptr;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    auto & st = ctx->infmllm;
    if (!st.queries.empty()) {
        std::fill(st.queries[stream].begin(), st.queries[stream].end(), 0.0f);
        st.query_rows_held[stream] = 0;
    }
    return INFMLLM_OK;
}

int32_t infmllm_set_queries(
        llama_context * ctx, llama_seq_id seq_id, const float * in, size_t n_floats, int32_t n_held) {
    llama_kv_cache * kv = nullptr;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    auto & st = ctx->infmllm;
    const size_t size = st.queries.empty() ? 0 : st.queries[stream].size();
    if (n_floats != size) {
        return INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    const int32_t n_rows = ctx->get_cparams().infmllm_query_rows;
    if (n_held < 0 || n_held > n_rows || (in == nullptr && n_floats > 0)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    if (size > 0) {
        std::copy(in, in + n_floats, st.queries[stream].begin());
        st.query_rows_held[stream] = n_held;
    }
    return INFMLLM_OK;
}

// Append the ubatch's captured rows to each stream's kept window, oldest rows dropping out.
static void infmllm_queries_extract(llama_context & lctx, const llm_graph_result & res, uint32_t s0) {
    auto & st = lctx.infmllm;
    const int64_t n_keep = lctx.get_cparams().infmllm_query_rows;
    const int64_t d      = st.query_head_dim;
    std::vector<float> buf;
    int64_t n_rows = 0;
    int64_t n_ns   = 0;
    for (size_t il = 0; il < res.t_infmllm_queries.size(); ++il) {
        ggml_tensor * t = res.t_infmllm_queries[il];
        if (t == nullptr || il >= st.query_offset.size() || st.query_offset[il] < 0) {
            continue;
        }
        // t: [head_dim, rows, n_head, n_streams]
        n_rows = t->ne[1];
        n_ns   = t->ne[3];
        const int64_t n_head = t->ne[2];
        buf.resize(ggml_nelements(t));
        ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(lctx.get_sched(), t);
        ggml_backend_tensor_get_async(backend, t, buf.data(), 0, buf.size()*sizeof(float));
        ggml_backend_synchronize(backend);
        for (int64_t s = 0; s < n_ns; ++s) {
            float * dst = st.queries[s0 + s].data() + st.query_offset[il];
            for (int64_t h = 0; h < n_head; ++h) {
                float * win = dst + h*n_keep*d;
                // shift the window up by n_rows rows, then the new rows at its end
                std::copy(win + n_rows*d, win + n_keep*d, win);
                const float * src = buf.data() + ((s*n_head + h)*n_rows)*d;
                std::copy(src, src + n_rows*d, win + (n_keep - n_rows)*d);
            }
        }
    }
    for (int64_t s = 0; s < n_ns; ++s) {
        int32_t & held = st.query_rows_held[s0 + s];
        held = (int32_t) std::min<int64_t>(n_keep, held + n_rows);
    }
}

void infmllm_ubatch_done(
        llama_context                & lctx,
        const llm_graph_result       & res,
        const llama_memory_context_i * mctx,
        bool                           first_ubatch) {
    const llama_kv_cache_context * kv_ctx = infmllm_main_context(mctx);
    if (kv_ctx == nullptr) {
        return;
    }
    const uint32_t s0 = infmllm_access::slot(*kv_ctx).s0;
    if (!res.t_infmllm_queries.empty() && !lctx.infmllm.queries.empty()) {
        infmllm_queries_extract(lctx, res, s0);
    }
    ggml_tensor * t = res.t_infmllm_scores;
    if (t == nullptr) {
        return;
    }
    auto & st = lctx.infmllm;
    if (first_ubatch) {
        st.n_decode++;
    }

    // t: [n_kv, 1, 1, n_streams], streams s0..s1 of the current slot, each with the same
    // number of query rows in this ubatch (llama.cpp splits several streams' tokens equally)
    const int64_t n_kv = t->ne[0];
    const int64_t n_ns = t->ne[3];
    const int32_t mode = lctx.get_cparams().infmllm_score_rows;
    const int32_t rows_ub = (int32_t) (mctx->get_ubatch().n_tokens / n_ns);
    const int32_t rows = mode == INFMLLM_SCORE_ALL_ROWS ? rows_ub : std::min(mode, rows_ub);
    std::vector<float> buf(n_kv*n_ns);
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(lctx.get_sched(), t);
    ggml_backend_tensor_get_async(backend, t, buf.data(), 0, buf.size()*sizeof(float));
    ggml_backend_synchronize(backend);

    const bool accumulate = lctx.get_cparams().infmllm_score_rows == INFMLLM_SCORE_ALL_ROWS;
    for (int64_t s = 0; s < n_ns; ++s) {
        const uint32_t stream = s0 + (uint32_t) s;
        auto & dst = st.scores[stream];
        const bool fresh = !accumulate || st.stream_decode[stream] != st.n_decode;
        if (fresh) {
            std::fill(dst.begin(), dst.end(), 0.0f);
            st.stream_decode[stream] = st.n_decode;
            st.scored_rows[stream] = 0;
        }
        st.scored_rows[stream] += rows;
        const float * src = buf.data() + s*n_kv;
        for (int64_t j = 0; j < n_kv; ++j) {
            dst[j] += src[j];
        }
    }
}
