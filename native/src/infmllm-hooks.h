// infmllm-hooks.h - the only header the patches include into llama.cpp sources.
//
// Declares the per-context state and the two hooks called from llama.cpp: one while the
// attention graph is built, one after each ubatch has been computed.
#pragma once

#include <cstdint>
#include <vector>

struct ggml_tensor;
struct llama_context;
struct llm_graph_context;
class  llm_graph_result;
struct llama_memory_context_i;

// Latest attention scores per KV stream and cell, owned by llama_context.
struct infmllm_state {
    std::vector<std::vector<float>> scores;       // [stream][cell]
    std::vector<uint64_t>           stream_decode; // decode counter that last wrote each stream
    uint64_t                        n_decode = 0;
};

// Grants native/ access to private members of llama.cpp classes (declared friend there).
struct infmllm_access;

// Called in llm_graph_context::build_attn_mha.  probs: the softmaxed KQ of the non-flash
// path (reused), or nullptr to compute the scored rows (flash attention).
void infmllm_graph_scores(
        const llm_graph_context & gctx,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * kq_mask,
        ggml_tensor * sinks,
        ggml_tensor * probs,
        float         kq_scale,
        int           il);

// Called in llama_context::decode after a ubatch's graph has been computed.
void infmllm_scores_extract(
        llama_context                & lctx,
        const llm_graph_result       & res,
        const llama_memory_context_i * mctx,
        bool                           first_ubatch);
