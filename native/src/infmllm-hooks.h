// infmllm-hooks.h - the only header the patches include into llama.cpp sources.
//
// Declares the per-context state and the two hooks called from llama.cpp: one while the
// attention graph is built (scores, query capture), one after each ubatch has been computed
// (their read-back).
#pragma once

#include <cstdint>
#include <vector>

struct ggml_tensor;
struct llama_context;
struct llm_graph_context;
class  llm_graph_result;
struct llama_memory_context_i;

// Latest attention scores per KV stream and cell, and the newest query rows per KV stream,
// owned by llama_context.
struct infmllm_state {
    std::vector<std::vector<float>> scores;       // [stream][cell]
    std::vector<uint64_t>           stream_decode; // decode counter that last wrote each stream
    std::vector<int32_t>            scored_rows;   // [stream] query rows behind its scores
    uint64_t                        n_decode = 0;

    // query capture (infmllm_set_query_capture): per stream [layer][head][row][head_dim],
    // layers in cache order, rows oldest first
    std::vector<std::vector<float>> queries;
    std::vector<int32_t>            query_rows_held;  // [stream]
    std::vector<int64_t>            query_offset;     // [model layer] -> float offset, -1: none
    int64_t                         query_head_dim = 0;
};

// Grants native/ access to private members of llama.cpp classes (declared friend there).
struct infmllm_access;

// Called in llm_graph_context::build_attn_mha.  probs: the softmaxed KQ of the non-flash
// path (reused), or nullptr to compute the scored rows (flash attention).
void infmllm_graph_attn(
        const llm_graph_context & gctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * kq_mask,
        ggml_tensor * sinks,
        ggml_tensor * probs,
        float         kq_scale,
        int           il);

// Called in llama_context::decode after a ubatch's graph has been computed.
void infmllm_ubatch_done(
        llama_context                & lctx,
        const llm_graph_result       & res,
        const llama_memory_context_i * mctx,
        bool                           first_ubatch);
