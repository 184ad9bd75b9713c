// K/V rows of chosen cells to and from host memory, and re-ordering a sequence's cells.
// This is what a host-memory tier is built on: rows are read out before their cells are
// evicted and written back into free cells later, at the position their keys were rotated
// at; infmllm_kv_seq_arrange then gives every cell its place in stream order, and
// llama.cpp's own K-shift re-rotates the keys that moved.  All transfers go through
// ggml_backend_tensor_get/set, so the cache may live on any backend.
#include "infmllm.h"
#include "infmllm-access.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace {

struct layer_rows {
    ggml_tensor * k;
    ggml_tensor * v;
    size_t        k_row;    // bytes of one cell's K row
    size_t        v_row;    // bytes of one cell's V row
    size_t        v_el;     // bytes of one V element (transposed V only)
    int64_t       n_embd_v;
};

struct rows_view {
    llama_kv_cache *        kv;
    uint32_t                stream;
    llama_kv_cells *        cells;
    bool                    v_trans;
    std::vector<layer_rows> layers;
    size_t                  k_bytes = 0; // summed over layers, per cell
    size_t                  v_bytes = 0;
};

int32_t resolve_rows(llama_context * ctx, llama_seq_id seq_id, rows_view & out) {
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, out.kv, out.stream); rc != INFMLLM_OK) {
        return rc;
    }
    llama_kv_cache * kv = out.kv;
    out.cells   = &infmllm_access::cells(*kv, out.stream);
    out.v_trans = infmllm_access::v_trans(*kv);
    const auto & hparams = infmllm_access::hparams(*kv);
    for (const auto & layer : infmllm_access::layers(*kv)) {
        ggml_tensor * k = layer.k_stream[out.stream];
        ggml_tensor * v = layer.v_stream[out.stream];
        if (k == nullptr || v == nullptr) {
            return INFMLLM_ERR_UNSUPPORTED; // MLA caches keep no V
        }
        layer_rows r;
        r.k        = k;
        r.v        = v;
        r.n_embd_v = hparams.n_embd_v_gqa(layer.il);
        r.k_row    = ggml_row_size(k->type, hparams.n_embd_k_gqa(layer.il));
        r.v_row    = ggml_row_size(v->type, r.n_embd_v);
        r.v_el     = ggml_type_size(v->type);
        out.k_bytes += r.k_row;
        out.v_bytes += r.v_row;
        out.layers.push_back(r);
    }
    return INFMLLM_OK;
}

// Runs [i, j) of entries whose cells are consecutive (cells[i + t] == cells[i] + t).
template <typename F>
void for_each_run(const std::vector<uint32_t> & cells, F && f) {
    for (size_t i = 0; i < cells.size();) {
        size_t j = i + 1;
        while (j < cells.size() && cells[j] == cells[j - 1] + 1) {
            ++j;
        }
        f(i, j);
        i = j;
    }
}

// Copy rows between the cache and host buffers laid out [layer][i][row] (to_host: read).
// K rows (and untransposed V rows) move one call per run of consecutive cells.  A transposed
// V keeps each channel of the cells apart (channel c of cell x at element x + c*kv_size), so
// per run it would take one call per channel: on a GPU thousands of small copies per layer.
// Instead its whole block moves in one call (and, to write, one more after patching it).
void transfer(const rows_view & rv, const std::vector<uint32_t> & cells, uint8_t * k_buf, uint8_t * v_buf,
        bool to_host) {
    const size_t n = cells.size();
    const size_t kv_size = rv.cells->size();
    std::vector<uint8_t> block;
    size_t k_off = 0;
    size_t v_off = 0;
    for (const auto & L : rv.layers) {
        uint8_t * kb = k_buf + k_off*n;
        uint8_t * vb = v_buf + v_off*n;
        for_each_run(cells, [&](size_t i, size_t j) {
            const size_t len = j - i;
            if (to_host) {
                ggml_backend_tensor_get(L.k, kb + i*L.k_row, cells[i]*L.k_row, len*L.k_row);
            } else {
                ggml_backend_tensor_set(L.k, kb + i*L.k_row, cells[i]*L.k_row, len*L.k_row);
            }
            if (rv.v_trans) {
                return;
            }
            if (to_host) {
                ggml_backend_tensor_get(L.v, vb + i*L.v_row, cells[i]*L.v_row, len*L.v_row);
            } else {
                ggml_backend_tensor_set(L.v, vb + i*L.v_row, cells[i]*L.v_row, len*L.v_row);
            }
        });
        if (rv.v_trans) {
            block.resize(ggml_nbytes(L.v)); // n_embd_v * kv_size elements
            ggml_backend_tensor_get(L.v, block.data(), 0, block.size());
            for (size_t i = 0; i < n; ++i) {
                for (int64_t c = 0; c < L.n_embd_v; ++c) {
                    uint8_t * cached = block.data() + (cells[i] + c*kv_size)*L.v_el;
                    uint8_t * host   = vb + i*L.v_row + c*L.v_el;
                    std::memcpy(to_host ? host : cached, to_host ? cached : host, L.v_el);
                }
            }
            if (!to_host) {
                ggml_backend_tensor_set(L.v, block.data(), 0, block.size());
            }
        }
        k_off += L.k_row;
        v_off += L.v_row;
    }
}

} // namespace

int32_t infmllm_kv_layers(llama_context * ctx, infmllm_kv_layer * out, int32_t n_max) {
    if (ctx == nullptr || n_max < 0 || (out == nullptr && n_max > 0)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_kv_cache * kv = infmllm_kv_cache(ctx);
    if (kv == nullptr) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    const auto & hparams = infmllm_access::hparams(*kv);
    const auto & layers  = infmllm_access::layers(*kv);
    for (size_t i = 0; i < layers.size() && (int32_t) i < n_max; ++i) {
        const uint32_t il = layers[i].il;
        const ggml_tensor * k = layers[i].k;
        const ggml_tensor * v = layers[i].v;
        infmllm_kv_layer & o = out[i];
        o.il          = (int32_t) il;
        o.type_k      = k ? (int32_t) k->type : -1;
        o.type_v      = v ? (int32_t) v->type : -1;
        o.n_head      = (int32_t) hparams.n_head(il);
        o.n_head_kv   = (int32_t) hparams.n_head_kv(il);
        o.head_dim    = (int32_t) hparams.n_embd_head_k(il);
        o.n_embd_k    = (int32_t) hparams.n_embd_k_gqa(il);
        o.n_embd_v    = (int32_t) hparams.n_embd_v_gqa(il);
        o.k_row_bytes = k ? (int32_t) ggml_row_size(k->type, o.n_embd_k) : 0;
        o.v_row_bytes = v ? (int32_t) ggml_row_size(v->type, o.n_embd_v) : 0;
    }
    return (int32_t) layers.size();
}

int32_t infmllm_kv_rope(llama_context * ctx, infmllm_rope * out) {
    if (ctx == nullptr || out == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    llama_kv_cache * kv = infmllm_kv_cache(ctx);
    if (kv == nullptr) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    const auto & cparams = infmllm_access::cparams(*ctx);
    const auto & hparams = infmllm_access::hparams(*kv);
    const auto & layers  = infmllm_access::layers(*kv);
    out->rope_type  = (int32_t) hparams.rope_type;
    out->n_rot      = (int32_t) hparams.n_rot(layers.empty() ? 0 : layers[0].il);
    out->freq_base  = cparams.rope_freq_base;
    out->freq_scale = cparams.rope_freq_scale;
    return INFMLLM_OK;
}

int32_t infmllm_kv_seq_read(
        llama_context   * ctx,
        llama_seq_id      seq_id,
        const llama_pos * positions,
        int32_t           n,
        void            * k_out,
        size_t            k_size,
        void            * v_out,
        size_t            v_size) {
    rows_view rv;
    if (int32_t rc = resolve_rows(ctx, seq_id, rv); rc != INFMLLM_OK) {
        return rc;
    }
    if (n < 0 || (n > 0 && (positions == nullptr || k_out == nullptr || v_out == nullptr))) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    if (k_size != (size_t) n*rv.k_bytes || v_size != (size_t) n*rv.v_bytes) {
        return INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    const auto & sp = rv.cells->seq_pos_get(seq_id);
    std::vector<uint32_t> cells(n);
    for (int32_t i = 0; i < n; ++i) {
        auto it = sp.lower_bound({positions[i], 0u});
        if (it == sp.end() || it->first != positions[i]) {
            return INFMLLM_ERR_POS_NOT_FOUND;
        }
        cells[i] = it->second;
    }
    transfer(rv, cells, static_cast<uint8_t *>(k_out), static_cast<uint8_t *>(v_out), true);
    return n;
}

int32_t infmllm_kv_seq_write(
        llama_context   * ctx,
        llama_seq_id      seq_id,
        const llama_pos * positions,
        int32_t           n,
        const void      * k_rows,
        size_t            k_size,
        const void      * v_rows,
        size_t            v_size,
        int32_t         * cells_out) {
    rows_view rv;
    if (int32_t rc = resolve_rows(ctx, seq_id, rv); rc != INFMLLM_OK) {
        return rc;
    }
    if (!rv.kv->get_can_shift()) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    if (n < 0 || (n > 0 && (positions == nullptr || k_rows == nullptr || v_rows == nullptr))) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (positions[i] < 0) {
            return INFMLLM_ERR_INVALID_ARG;
        }
    }
    if (k_size != (size_t) n*rv.k_bytes || v_size != (size_t) n*rv.v_bytes) {
        return INFMLLM_ERR_BUFFER_TOO_SMALL;
    }
    // the lowest free cells: holes left by eviction, which later batches would fill anyway
    std::vector<uint32_t> cells;
    cells.reserve(n);
    for (uint32_t c = 0; c < rv.cells->size() && cells.size() < (size_t) n; ++c) {
        if (rv.cells->is_empty(c)) {
            cells.push_back(c);
        }
    }
    if (cells.size() < (size_t) n) {
        return INFMLLM_ERR_NO_FREE_CELLS;
    }
    // rows first: a cell becomes part of the sequence only once its keys are in place
    transfer(rv, cells, static_cast<uint8_t *>(const_cast<void *>(k_rows)),
            static_cast<uint8_t *>(const_cast<void *>(v_rows)), false);
    auto & st = ctx->infmllm;
    for (int32_t i = 0; i < n; ++i) {
        rv.cells->pos_set(cells[i], positions[i]);
        rv.cells->seq_add(cells[i], seq_id);
        if (!st.scores.empty()) {
            st.scores[rv.stream][cells[i]] = 0.0f;
        }
        if (cells_out) {
            cells_out[i] = (int32_t) cells[i];
        }
    }
    return n;
}

int32_t infmllm_kv_seq_arrange(llama_context * ctx, llama_seq_id seq_id, const int32_t * cells, int32_t n) {
    llama_kv_cache * kv = nullptr;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    if (!kv->get_can_shift()) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    llama_kv_cells & kc = infmllm_access::cells(*kv, stream);
    const auto & sp = kc.seq_pos_get(seq_id);
    if (n < 0 || (size_t) n != sp.size() || (n > 0 && cells == nullptr)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    std::vector<uint8_t> seen(kc.size(), 0);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t c = cells[i];
        if (c < 0 || (uint32_t) c >= kc.size() || seen[c] || kc.is_empty(c) || !kc.seq_has(c, seq_id)) {
            return INFMLLM_ERR_INVALID_ARG;
        }
        if (kc.seq_count(c) > 1) {
            return INFMLLM_ERR_SHARED_CELLS;
        }
        seen[c] = 1;
    }
    for (int32_t i = 0; i < n; ++i) {
        const llama_pos d = (llama_pos) i - kc.pos_get(cells[i]);
        if (d != 0) {
            kc.pos_add(cells[i], d); // K-shift applied at the next update
        }
    }
    return n;
}

int32_t infmllm_kv_seq_head(llama_context * ctx, llama_seq_id seq_id) {
    infmllm_kv_pair kv;
    uint32_t stream = 0;
    if (int32_t rc = infmllm_resolve_seq_pair(ctx, seq_id, kv, stream); rc != INFMLLM_OK) {
        return rc;
    }
    return (int32_t) infmllm_access::head(*kv.main, stream);
}

int32_t infmllm_kv_seq_place(
        llama_context * ctx, llama_seq_id seq_id, const int32_t * cells, int32_t n, int32_t head) {
    rows_view rv;
    if (int32_t rc = resolve_rows(ctx, seq_id, rv); rc != INFMLLM_OK) {
        return rc;
    }
    if (infmllm_access::hparams(*rv.kv).n_pos_per_embd() > 1) {
        return INFMLLM_ERR_UNSUPPORTED;
    }
    llama_kv_cells & kc = *rv.cells;
    const auto & sp = kc.seq_pos_get(seq_id);
    if (n < 0 || (size_t) n != sp.size() || (n > 0 && cells == nullptr) || head < -1 ||
            head >= (int32_t) kc.size() || kc.get_has_shift()) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    std::vector<uint32_t> from;
    std::vector<llama_pos> pos;
    from.reserve(n);
    pos.reserve(n);
    for (const auto & [p, c] : sp) { // ordered by position
        if (kc.seq_count(c) > 1) {
            return INFMLLM_ERR_SHARED_CELLS;
        }
        from.push_back(c);
        pos.push_back(p);
    }
    std::vector<uint32_t> to(n);
    std::vector<uint8_t> seen(kc.size(), 0);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t c = cells[i];
        if (c < 0 || (uint32_t) c >= kc.size() || seen[c] || !(kc.is_empty(c) || kc.seq_has(c, seq_id))) {
            return INFMLLM_ERR_INVALID_ARG;
        }
        seen[c] = 1;
        to[i] = (uint32_t) c;
    }
    auto & st = ctx->infmllm;
    if (from != to) { // already on its cells (a session restored where it was saved): no copy
        std::vector<uint8_t> k_buf((size_t) n*rv.k_bytes);
        std::vector<uint8_t> v_buf((size_t) n*rv.v_bytes);
        transfer(rv, from, k_buf.data(), v_buf.data(), true);
        for (uint32_t c : from) {
            kc.rm(c);
        }
        transfer(rv, to, k_buf.data(), v_buf.data(), false);
        for (int32_t i = 0; i < n; ++i) {
            kc.pos_set(to[i], pos[i]);
            kc.seq_add(to[i], seq_id);
        }
    }
    for (int32_t i = 0; i < n; ++i) {
        if (!st.scores.empty()) {
            st.scores[rv.stream][to[i]] = 0.0f;
        }
    }
    if (head >= 0) {
        infmllm_access::head(*rv.kv, rv.stream) = (uint32_t) head;
    }
    return n;
}
