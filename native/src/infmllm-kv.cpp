// Per-cell bookkeeping, arbitrary-set eviction and position compaction of one sequence.
// Cells are never moved: eviction frees them for reuse, compaction only changes their
// positions and lets llama.cpp's K-shift re-rotate the keys on the next decode.  The same
// (cell, position) view is what a host-memory tier would copy K/V rows out of.
//
// In an iSWA cache the cells are those of the full-attention half; the sliding-window half
// holds the newest of them again (fewer, where llama.cpp has reused the cells of positions
// outside the window) and follows by position: an evicted position leaves it too, and
// compaction gives its cells the positions their twins get.
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
    llama_kv_cache * swa       = nullptr; // iSWA: the sliding-window half
    llama_kv_cells * swa_cells = nullptr;
};

int32_t resolve(llama_context * ctx, llama_seq_id seq_id, seq_view & out) {
    infmllm_kv_pair pair;
    if (int32_t rc = infmllm_resolve_seq_pair(ctx, seq_id, pair, out.stream); rc != INFMLLM_OK) {
        return rc;
    }
    out.kv    = pair.main;
    out.cells = &infmllm_access::cells(*out.kv, out.stream);
    if (pair.swa != nullptr) {
        out.swa       = pair.swa;
        out.swa_cells = &infmllm_access::cells(*pair.swa, out.stream);
    }
    return INFMLLM_OK;
}

// Remove seq_id from a cell (validated by the caller); a cell left empty is free for reuse.
void free_cell(llama_context * ctx, const seq_view & v, llama_seq_id seq_id, uint32_t cell) {
    const llama_pos pos = v.cells->pos_get(cell);
    if (v.cells->seq_rm(cell, seq_id)) { // the cell is free now
        uint32_t & head = infmllm_access::head(*v.kv, v.stream);
        head = std::min(head, cell);     // let find_slot refill holes first
        auto & scores = ctx->infmllm.scores;
        if (!scores.empty()) {
            scores[v.stream][cell] = 0.0f;
        }
    }
    if (v.swa_cells != nullptr) { // the position's twin in the sliding window, if still held
        const auto & sp = v.swa_cells->seq_pos_get(seq_id);
        auto it = sp.lower_bound({pos, 0u});
        if (it != sp.end() && it->first == pos) {
            const uint32_t twin = it->second;
            if (v.swa_cells->seq_rm(twin, seq_id)) {
                uint32_t & head = infmllm_access::head(*v.swa, v.stream);
                head = std::min(head, twin);
            }
        }
    }
}

} // namespace

int32_t infmllm_kv_size(llama_context * ctx) {
    if (ctx == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    const llama_kv_cache * kv = infmllm_kv_caches(ctx).main;
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
    if (!v.kv->get_can_shift() || (v.swa != nullptr && !v.swa->get_can_shift())) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    const auto & sp = v.cells->seq_pos_get(seq_id);
    std::vector<std::pair<llama_pos, uint32_t>> order(sp.begin(), sp.end());
    for (const auto & [pos, cell] : order) {
        if (v.cells->seq_count(cell) > 1) {
            return INFMLLM_ERR_SHARED_CELLS;
        }
    }
    std::vector<std::pair<llama_pos, uint32_t>> twins;
    if (v.swa_cells != nullptr) {
        const auto & swa_sp = v.swa_cells->seq_pos_get(seq_id);
        twins.assign(swa_sp.begin(), swa_sp.end());
        for (const auto & [pos, cell] : twins) {
            if (v.swa_cells->seq_count(cell) > 1) {
                return INFMLLM_ERR_SHARED_CELLS;
            }
        }
    }
    for (size_t rank = 0; rank < order.size(); ++rank) {
        const auto [pos, cell] = order[rank];
        if (pos != (llama_pos) rank) {
            v.cells->pos_add(cell, (llama_pos) rank - pos); // K-shift applied at next decode
        }
    }
    for (const auto & [pos, cell] : twins) {
        // its twin's rank; a position the full cache no longer holds leaves the window too
        auto it = std::lower_bound(order.begin(), order.end(), std::make_pair(pos, 0u));
        if (it == order.end() || it->first != pos) {
            v.swa_cells->seq_rm(cell, seq_id);
            continue;
        }
        const llama_pos rank = (llama_pos) (it - order.begin());
        if (pos != rank) {
            v.swa_cells->pos_add(cell, rank - pos);
        }
    }
    return (int32_t) order.size();
}
