// In-graph attention-saddle scoring: for the last n_score_queries query rows of a ubatch,
// softmax(K·q·scale + mask) over every KV cell in view, summed over heads and rows, and
// accumulated over layers into one float per cell (llm_graph_result::t_infmllm_scores).
// And query capture: the newest query rows of each layer copied out as F32
// (llm_graph_result::t_infmllm_queries), for the recall tier to score stored keys with.
// Built from ggml ops only, so every backend computes them; every op is named "infmllm_*"
// (GGML_SCHED_DEBUG=2 lists each node with its backend, so a fallback to the CPU is visible).
#include "infmllm-hooks.h"

#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-cparams.h"
#include "llama-kv-cache.h"
#include "infmllm-access.h"

#include <algorithm>

// K must be a view of the KV-cache storage: no-cache (encoder) and cross attention
// also pass through build_attn_mha and are not scored, nor are the sliding-window layers of
// an iSWA cache (they see their window only; the full-attention layers score every cell).  The flash path casts an F32 cache
// to F16 first (a GGML_OP_CPY of the view): that copy holds the cached keys too, and is
// what flash attention itself reads, so the scores are computed from it.
static bool infmllm_k_is_cache(const llm_graph_context & gctx, const ggml_tensor * k) {
    const llama_kv_cache_context * kv_ctx = infmllm_main_context(gctx.mctx);
    if (kv_ctx == nullptr) {
        return false;
    }
    const ggml_tensor * root = k;
    if (root->op == GGML_OP_CPY && root->src[1] == root) { // ggml_cast: src[1] is itself
        root = root->src[0];
    }
    while (root->view_src != nullptr) {
        root = root->view_src;
    }
    return infmllm_access::is_k_storage(infmllm_access::cache(*kv_ctx), root);
}

// q: [head_dim, rows, n_head, n_stream]; its last n_keep rows, contiguous F32
static void infmllm_capture_queries(const llm_graph_context & gctx, ggml_tensor * q, int64_t n_keep, int il) {
    ggml_context * ctx0 = gctx.ctx0;
    const int64_t n_rows = std::min<int64_t>(n_keep, q->ne[1]);
    ggml_tensor * rows = ggml_view_4d(ctx0, q, q->ne[0], n_rows, q->ne[2], q->ne[3],
            q->nb[1], q->nb[2], q->nb[3], (q->ne[1] - n_rows)*q->nb[1]);
    ggml_tensor * t = rows->type == GGML_TYPE_F32 ? ggml_cont(ctx0, rows) : ggml_cast(ctx0, rows, GGML_TYPE_F32);
    gctx.cb(t, "infmllm_queries", il);
    ggml_set_output(t);
    ggml_build_forward_expand(gctx.gf, t);
    auto & kept = gctx.res->t_infmllm_queries;
    if (kept.size() <= (size_t) il) {
        kept.resize(il + 1, nullptr);
    }
    kept[il] = t;
}

void infmllm_graph_attn(
        const llm_graph_context & gctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * kq_mask,
        ggml_tensor * sinks,
        ggml_tensor * probs,
        float         kq_scale,
        int           il) {
    const int32_t mode   = gctx.cparams.infmllm_score_rows;
    const int32_t n_keep = gctx.cparams.infmllm_query_rows;
    if ((mode == 0 && n_keep == 0) || !infmllm_k_is_cache(gctx, k)) {
        return;
    }
    if (n_keep > 0) {
        infmllm_capture_queries(gctx, q, n_keep, il);
    }
    if (mode == 0) {
        return;
    }

    ggml_context * ctx0 = gctx.ctx0;
    const int64_t n_rows_ub = q->ne[1]; // query rows per stream in this ubatch
    const int64_t n_rows    = mode < 0 ? n_rows_ub : std::min<int64_t>(mode, n_rows_ub);
    const int64_t row0      = n_rows_ub - n_rows;

    ggml_tensor * p;
    if (probs != nullptr) {
        // non-flash path: the attention probabilities already exist
        p = ggml_view_4d(ctx0, probs, probs->ne[0], n_rows, probs->ne[2], probs->ne[3],
                probs->nb[1], probs->nb[2], probs->nb[3], row0*probs->nb[1]);
    } else {
        // flash path: the matrix is never materialised, so compute the scored rows only
        ggml_tensor * q_rows = ggml_view_4d(ctx0, q, q->ne[0], n_rows, q->ne[2], q->ne[3],
                q->nb[1], q->nb[2], q->nb[3], row0*q->nb[1]);
        ggml_tensor * kq = ggml_mul_mat(ctx0, k, q_rows);
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        gctx.cb(kq, "infmllm_kq", il);

        const auto & hparams = gctx.hparams;
        if (hparams.attn_soft_cap) {
            kq = ggml_scale(ctx0, kq, 1.0f / hparams.f_attn_logit_softcapping);
            gctx.cb(kq, "infmllm_kq_softcap", il);
            kq = ggml_tanh (ctx0, kq);
            gctx.cb(kq, "infmllm_kq_softcap", il);
            kq = ggml_scale(ctx0, kq, hparams.f_attn_logit_softcapping);
            gctx.cb(kq, "infmllm_kq_softcap", il);
        }

        ggml_tensor * mask = ggml_view_4d(ctx0, kq_mask, kq_mask->ne[0], n_rows, kq_mask->ne[2], kq_mask->ne[3],
                kq_mask->nb[1], kq_mask->nb[2], kq_mask->nb[3], row0*kq_mask->nb[1]);
        if (!ggml_is_contiguous(mask)) {
            mask = ggml_cont(ctx0, mask);
            gctx.cb(mask, "infmllm_kq_mask", il);
        }
        p = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, hparams.f_max_alibi_bias);
        ggml_soft_max_add_sinks(p, sinks);
        gctx.cb(p, "infmllm_probs", il);
    }

    // sum over rows and heads: [n_kv, rows, heads, streams] -> [n_kv, 1, 1, streams]
    // (repeat_back reduces over broadcast dims, reading the strided view in place)
    ggml_tensor * shape = ggml_new_tensor_4d(ctx0, GGML_TYPE_F32, p->ne[0], 1, 1, p->ne[3]);
    ggml_tensor * t = ggml_repeat_back(ctx0, p, shape);
    gctx.cb(t, "infmllm_layer_scores", il);

    llm_graph_result * res = gctx.res;
    if (res->t_infmllm_scores != nullptr) {
        // only the last layer's running sum is read back; earlier sums stay scratch memory
        res->t_infmllm_scores->flags &= ~GGML_TENSOR_FLAG_OUTPUT;
        t = ggml_add(ctx0, res->t_infmllm_scores, t);
        gctx.cb(t, "infmllm_scores", il);
    }
    ggml_set_output(t);
    ggml_build_forward_expand(gctx.gf, t);
    res->t_infmllm_scores = t;
}
