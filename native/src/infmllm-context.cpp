// Per-context scoring switch and the read-back of scores after each computed ubatch.
#include "infmllm.h"
#include "infmllm-access.h"

#include "llama-graph.h"
#include "llama-model.h"

#include <algorithm>

llama_kv_cache * infmllm_kv_cache(llama_context * ctx) {
    return ctx == nullptr ? nullptr : dynamic_cast<llama_kv_cache *>(ctx->get_memory());
}

const char * infmllm_status_str(int32_t status) {
    switch (status) {
        case INFMLLM_OK:                   return "ok";
        case INFMLLM_ERR_INVALID_ARG:      return "invalid argument";
        case INFMLLM_ERR_UNSUPPORTED:      return "unsupported model or memory type (needs a plain KV cache and 1-D RoPE)";
        case INFMLLM_ERR_INVALID_SEQ:      return "invalid sequence id";
        case INFMLLM_ERR_POS_NOT_FOUND:    return "position not cached for that sequence (or repeated)";
        case INFMLLM_ERR_SHARED_CELLS:     return "cells are shared with other sequences";
        case INFMLLM_ERR_BUFFER_TOO_SMALL: return "output buffer too small";
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
    llama_kv_cache * kv = infmllm_kv_cache(ctx);
    if (n_score_queries != INFMLLM_SCORE_OFF && (kv == nullptr || !kv->get_can_shift())) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    if (kv != nullptr) {
        auto & st = ctx->infmllm;
        st.scores.assign(kv->get_n_stream(), std::vector<float>(kv->get_size(), 0.0f));
        st.stream_decode.assign(kv->get_n_stream(), 0);
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

void infmllm_scores_extract(
        llama_context                & lctx,
        const llm_graph_result       & res,
        const llama_memory_context_i * mctx,
        bool                           first_ubatch) {
    ggml_tensor * t = res.t_infmllm_scores;
    const auto * kv_ctx = dynamic_cast<const llama_kv_cache_context *>(mctx);
    if (t == nullptr || kv_ctx == nullptr) {
        return;
    }
    auto & st = lctx.infmllm;
    if (first_ubatch) {
        st.n_decode++;
    }

    // t: [n_kv, 1, 1, n_streams], streams s0..s1 of the current slot
    const int64_t n_kv = t->ne[0];
    const int64_t n_ns = t->ne[3];
    std::vector<float> buf(n_kv*n_ns);
    ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(lctx.get_sched(), t);
    ggml_backend_tensor_get_async(backend, t, buf.data(), 0, buf.size()*sizeof(float));
    ggml_backend_synchronize(backend);

    const bool accumulate = lctx.get_cparams().infmllm_score_rows == INFMLLM_SCORE_ALL_ROWS;
    const uint32_t s0 = infmllm_access::slot(*kv_ctx).s0;
    for (int64_t s = 0; s < n_ns; ++s) {
        const uint32_t stream = s0 + (uint32_t) s;
        auto & dst = st.scores[stream];
        const bool fresh = !accumulate || st.stream_decode[stream] != st.n_decode;
        if (fresh) {
            std::fill(dst.begin(), dst.end(), 0.0f);
            st.stream_decode[stream] = st.n_decode;
        }
        const float * src = buf.data() + s*n_kv;
        for (int64_t j = 0; j < n_kv; ++j) {
            dst[j] += src[j];
        }
    }
}
