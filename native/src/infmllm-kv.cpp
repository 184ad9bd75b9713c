// Per-cell bookkeeping, arbitrary-set eviction and position compaction of one sequence.
// Cells are never moved: eviction frees them for reuse, compaction only changes their
// positions and lets llama.cpp's K-shift re-rotate the keys on the next decode.  The same
// (cell, position) view is what a host-memory tier would copy K/V rows out of.
#include "infmllm.h"
#include "infmllm-access.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace {

struct seq_view {
    llama_kv_cache * kv;
    uint32_t         stream;
    llama_kv_cells * cells;
};

int32_t resolve(llama_context * ctx, llama_seq_id seq_id, seq_view & out) {
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, out.kv, out.stream); rc != INFMLLM_OK) {
        return rc;
    }
    out.cells = &infmllm_access::cells(*out.kv, out.stream);
    return INFMLLM_OK;
}

// Remove seq_id from a cell (validated by the caller); a cell left empty is free for reuse.
void free_cell(llama_context * ctx, const seq_view & v, llama_seq_id seq_id, uint32_t cell) {
    if (v.cells->seq_rm(cell, seq_id)) { // the cell is free now
        uint32_t & head = infmllm_access::head(*v.kv, v.stream);
        head = std::min(head, cell);     // let find_slot refill holes first
        auto & scores = ctx->infmllm.scores;
        if (!scores.empty()) {
            scores[v.stream][cell] = 0.0f;
        }
    }
}

} // namespace

int32_t infmllm_kv_size(llama_context * ctx) {
    if (ctx == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    const llama_kv_cache * kv = infmllm_kv_cache(ctx);
    return kv == nullptr ? INFMLLM_ERR_UNSUPPORTED : (int32_t) kv->get_size();
}

int32_t infmllm_kv_seq_n_cells(llama_context * ctx, llama_seq_id seq_id) {
    seq_view v;
    if (int32_t rc = resolve(ctx, seq_id, v); rc != INFMLLM_OK) {
        return rc;
    }
    return (int32_t) v.cells->seq_pos_get(seq_id).size();
}

int32_t infmllm_kv_seq_cells(
        llama_context * ctx,
        llama_seq_id    seq_id,
        int32_t       * cells,
        llama_pos     * positions,
        float         * scores,
        int32_t         n_max) {
    seq_view v;
    if (int32_t rc = resolve(ctx, seq_id, v); rc != INFMLLM_OK) {
        return rc;
    }
    const auto & sp = v.cells->seq_pos_get(seq_id); // ordered by (pos, cell)
    if (n_max < 0 || (size_t) n_max < sp.size()) {
        return INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    const auto & st = ctx->infmllm;
    const float * sc = st.scores.empty() ? nullptr : st.scores[v.stream].data();
    int32_t i = 0;
    for (const auto & [pos, cell] : sp) {
        if (cells)     { cells[i]     = (int32_t) cell; }
        if (positions) { positions[i] = pos; }
        if (scores)    { scores[i]    = sc ? sc[cell] : 0.0f; }
        ++i;
    }
    return i;
}

int32_t infmllm_kv_seq_evict(
        llama_context   * ctx,
        llama_seq_id      seq_id,
        const llama_pos * positions,
        int32_t           n_positions) {
    seq_view v;
    if (int32_t rc = resolve(ctx, seq_id, v); rc != INFMLLM_OK) {
        return rc;
    }
    if (n_positions < 0 || (n_positions > 0 && positions == nullptr)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    // validate everything first: each position cached exactly once for seq_id, no repeats
    const auto & sp = v.cells->seq_pos_get(seq_id);
    std::vector<std::pair<llama_pos, uint32_t>> victims;
    victims.reserve(n_positions);
    for (int32_t i = 0; i < n_positions; ++i) {
        auto it = sp.lower_bound({positions[i], 0u});
        if (it == sp.end() || it->first != positions[i]) {
            return INFMLLM_ERR_POS_NOT_FOUND;
        }
        victims.push_back(*it);
    }
    std::sort(victims.begin(), victims.end());
    if (std::adjacent_find(victims.begin(), victims.end()) != victims.end()) {
        return INFMLLM_ERR_POS_NOT_FOUND;
    }

    for (const auto & [pos, cell] : victims) {
        free_cell(ctx, v, seq_id, cell);
    }
    return (int32_t) victims.size();
}

int32_t infmllm_kv_seq_evict_cells(
        llama_context * ctx,
        llama_seq_id    seq_id,
        const int32_t * cells,
        int32_t         n) {
    seq_view v;
    if (int32_t rc = resolve(ctx, seq_id, v); rc != INFMLLM_OK) {
        return rc;
    }
    if (n < 0 || (n > 0 && cells == nullptr)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    std::vector<uint32_t> victims(cells, cells + n);
    std::sort(victims.begin(), victims.end());
    if (std::adjacent_find(victims.begin(), victims.end()) != victims.end()) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    for (const uint32_t cell : victims) {
        if (cell >= v.cells->size() || !v.cells->seq_has(cell, seq_id)) {
            return INFMLLM_ERR_INVALID_ARG;
        }
    }
    for (const uint32_t cell : victims) {
        free_cell(ctx, v, seq_id, cell);
    }
    return n;
}

int32_t infmllm_kv_seq_compact(llama_context * ctx, llama_seq_id seq_id) {
    seq_view v;
    if (int32_t rc = resolve(ctx, seq_id, v); rc != INFMLLM_OK) {
        return rc;
    }
    if (!v.kv->get_can_shift()) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    const auto & sp = v.cells->seq_pos_get(seq_id);
    std::vector<std::pair<llama_pos, uint32_t>> order(sp.begin(), sp.end());
    for (const auto & [pos, cell] : order) {
        if (v.cells->seq_count(cell) > 1) {
            return INFMLLM_ERR_SHARED_CELLS;
        }
    }
    for (size_t rank = 0; rank < order.size(); ++rank) {
        const auto [pos, cell] = order[rank];
        if (pos != (llama_pos) rank) {
            v.cells->pos_add(cell, (llama_pos) rank - pos); // K-shift applied at next decode
        }
    }
    return (int32_t) order.size();
}
