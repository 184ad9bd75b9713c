// infmllm.h - public C API of infmllm-gguf's additions to libllama.
//
// Attention-saddle scoring computed inside the compute graph, per-cell bookkeeping,
// arbitrary-set eviction, position compaction, the InfMLLM selection rule, and the K/V row
// transfers and query capture a host-memory recall tier is built on, for llama.cpp's KV
// cache.  Every symbol carries the infmllm_ prefix.  Functions that return int32_t return a
// count (>= 0) or a negative INFMLLM_ERR_* code; on error nothing has been changed.
//
// Two kinds of cache are served.  A plain KV cache: everything.  An iSWA cache (full-attention
// layers plus sliding-window layers, e.g. Gemma 2/3): scoring, the cell calls, eviction and
// compaction, on the cells of its full-attention half, with the sliding-window half following
// by position; the row transfers, query capture, arrange and place need a plain cache.
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever a declaration below changes; Python refuses a mismatch.
#define INFMLLM_ABI_VERSION 7

enum infmllm_status {
    INFMLLM_OK                  =  0,
    INFMLLM_ERR_INVALID_ARG     = -1, // null pointer, negative count, bad parameter
    INFMLLM_ERR_UNSUPPORTED     = -2, // no KV cache (recurrent/hybrid): every call; an iSWA cache:
                                      // row transfers, query capture, arrange, place; keys that
                                      // cannot be re-rotated (M-RoPE): compaction, arrange, write
    INFMLLM_ERR_INVALID_SEQ     = -3, // seq_id outside the context's sequences
    INFMLLM_ERR_POS_NOT_FOUND   = -4, // a position is not cached for that sequence (or repeated)
    INFMLLM_ERR_SHARED_CELLS    = -5, // compaction would move cells other sequences share
    INFMLLM_ERR_BUFFER_TOO_SMALL = -6,
    INFMLLM_ERR_NO_FREE_CELLS   = -7, // fewer free cells than rows to write
};

// Scoring modes for infmllm_set_scoring(): n_score_queries > 0 scores the last n query
// rows of each ubatch (fresh scores, replaced per ubatch); INFMLLM_SCORE_ALL_ROWS scores
// every row and sums over the ubatches of one llama_decode (H2O accumulates across calls).
#define INFMLLM_SCORE_OFF       0
#define INFMLLM_SCORE_ALL_ROWS (-1)

LLAMA_API int32_t      infmllm_abi_version(void);
LLAMA_API const char * infmllm_patchset_version(void);
LLAMA_API const char * infmllm_status_str(int32_t status);

// Enable/disable in-graph attention scoring on a context.  Changing it rebuilds the graph
// on the next decode; while off, the graph is exactly llama.cpp's.
// n_score_queries: INFMLLM_SCORE_ALL_ROWS, INFMLLM_SCORE_OFF or 1..n_ubatch; anything else is
// INFMLLM_ERR_INVALID_ARG.  Scoring needs a plain or iSWA KV cache (INFMLLM_ERR_UNSUPPORTED);
// M-RoPE is fine: the scores come from the keys and queries as the attention rotated them.  In
// an iSWA cache only the full-attention layers are scored (the others see their window only).
LLAMA_API int32_t infmllm_set_scoring(struct llama_context * ctx, int32_t n_score_queries);

// The current mode, written to *n_score_queries (it may be INFMLLM_SCORE_ALL_ROWS, which is
// why it is not the return value).  Returns INFMLLM_OK, or INFMLLM_ERR_INVALID_ARG for a
// NULL pointer.
LLAMA_API int32_t infmllm_get_scoring(const struct llama_context * ctx, int32_t * n_score_queries);

// How many query rows the latest scores of seq_id's cells come from: the rows of seq_id in
// the last ubatch that held it (at most n_score_queries), or in every ubatch of that
// llama_decode under INFMLLM_SCORE_ALL_ROWS.  Several sequences decoded in one llama_decode
// are split by llama.cpp into ubatches of its own choosing, so a sequence's last ubatch may
// hold fewer of its tokens than it would have alone; this says what was scored.  0 before
// any scored decode (and after infmllm_set_scoring).
LLAMA_API int32_t infmllm_kv_seq_scored_rows(struct llama_context * ctx, llama_seq_id seq_id);

// Cells in the KV buffer of one stream: the largest cell index + 1 that
// infmllm_kv_seq_cells() can report.  llama.cpp pads the requested n_ctx (to a multiple of
// 256), so this may exceed it.  INFMLLM_ERR_INVALID_ARG for NULL, INFMLLM_ERR_UNSUPPORTED
// without a plain or iSWA KV cache (iSWA: its full-attention half).
LLAMA_API int32_t infmllm_kv_size(struct llama_context * ctx);

// Number of cells holding seq_id.
LLAMA_API int32_t infmllm_kv_seq_n_cells(struct llama_context * ctx, llama_seq_id seq_id);

// The cells of seq_id in stream (position) order: cell index, position and the latest
// attention score (softmax probability mass summed over layers, heads and scored query
// rows; 0 while scoring is off).  Any output pointer may be NULL.  Returns the count.
LLAMA_API int32_t infmllm_kv_seq_cells(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t              * cells,
        llama_pos            * positions,
        float                * scores,
        int32_t                n_max);

// Remove seq_id from the cells holding the given positions, in one pass.  Freed cells are
// reused by later batches.  All positions are checked before anything changes.
LLAMA_API int32_t infmllm_kv_seq_evict(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const llama_pos      * positions,
        int32_t                n_positions);

// Remove seq_id from the n listed cells, in one pass: eviction where positions do not name
// cells one to one (an M-RoPE image's cells share one position).  Every cell must hold
// seq_id and be listed once, else INFMLLM_ERR_INVALID_ARG; all are checked before anything
// changes.  Returns n.
LLAMA_API int32_t infmllm_kv_seq_evict_cells(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const int32_t        * cells,
        int32_t                n);

// Renumber the cells of seq_id to 0..n-1 in stream order; the RoPE re-rotation (K-shift)
// is applied by the next llama_decode or infmllm_kv_update.  Returns n, the next free position.
LLAMA_API int32_t infmllm_kv_seq_compact(struct llama_context * ctx, llama_seq_id seq_id);

// Apply pending cache updates (the K-shift compaction leaves) now rather than at the start of
// the next llama_decode, with the abort callback suspended: a K-shift rotates keys in place,
// and one stopped halfway would later be applied again over the layers it had rotated.
// Returns 1 if keys were re-rotated, 0 if nothing was pending (or the update failed and stays
// pending), INFMLLM_ERR_INVALID_ARG for a NULL context.
LLAMA_API int32_t infmllm_kv_update(struct llama_context * ctx);

struct infmllm_select_params {
    int32_t budget;       // cells to keep
    int32_t n_sink;       // oldest cells always kept
    int32_t n_recent;     // newest cells always kept
    int32_t local_window; // w: r_j = sum of a_i over |i - j| <= w (0: the score itself)
    float   bias;         // r_j += bias * recency_j, recency in [0, 1] by rank (1 = newest)
};

// The InfMLLM rule over n cells in stream order (scores[0] = oldest): keep sinks, recent and
// the top (budget - n_sink - n_recent) of the rest by local-sum score (normalised to sum 1
// over all n cells) plus recency bias; ties go to the newer cell.  A non-finite score adds
// nothing to the sums; its own cell ranks by it: +inf above every finite rank, -inf below,
// NaN below everything.  O(n).  Writes keep[i] in {0, 1} and returns the number kept
// (min(n, budget)); INFMLLM_ERR_INVALID_ARG for NULL pointers, negative counts,
// n_sink + n_recent > budget or a non-finite bias.
LLAMA_API int32_t infmllm_select_keep(
        const float                         * scores,
        int32_t                               n,
        const struct infmllm_select_params  * params,
        uint8_t                             * keep);

// --- K/V rows in host memory ----------------------------------------------------------

// One layer of the KV cache as infmllm_kv_seq_read() lays it out.  A cell's K row is its
// n_embd_k keys (n_head_kv heads of head_dim) in the cache's type_k (a ggml_type), rotated
// at the cell's position; its V row is n_embd_v values in type_v, gathered into a row even
// where llama.cpp stores V transposed.  Quantized types are copied as their blocks.
struct infmllm_kv_layer {
    int32_t il;          // the model's layer index
    int32_t type_k;
    int32_t type_v;
    int32_t n_head;      // query heads (the layout of infmllm_get_queries())
    int32_t n_head_kv;
    int32_t head_dim;    // of keys and queries
    int32_t n_embd_k;    // n_head_kv * head_dim
    int32_t n_embd_v;
    int32_t k_row_bytes;
    int32_t v_row_bytes;
};

// The layers of the KV cache in cache order (the order every buffer below uses).  Writes
// up to n_max entries and returns the number of layers; INFMLLM_ERR_UNSUPPORTED without a
// plain KV cache.
LLAMA_API int32_t infmllm_kv_layers(
        struct llama_context    * ctx,
        struct infmllm_kv_layer * out,
        int32_t                   n_max);

// The rotation the cache's K-shift gives a key moved by d positions, as far as a host needs
// it to score stored keys at other distances: rope_type (LLAMA_ROPE_TYPE_*), the rotated
// dimensions of each head (the first n_rot) and the context's frequency base and scale, as
// llama.cpp resolved them from the model and the context's parameters.  Not included, so a
// host rotation only approximates a K-shift where they apply: YaRN's corrections and a
// model's per-dimension frequency factors (rope_freqs).
struct infmllm_rope {
    int32_t rope_type;
    int32_t n_rot;
    float   freq_base;
    float   freq_scale;
};

// Write the context's RoPE to *out.  INFMLLM_ERR_INVALID_ARG for NULL, INFMLLM_ERR_UNSUPPORTED
// without a plain KV cache (as the row transfers).
LLAMA_API int32_t infmllm_kv_rope(struct llama_context * ctx, struct infmllm_rope * out);

// Copy the K and V rows of the cells of seq_id at the n given positions to host memory:
// k_out[layer][i][k_row_bytes] and v_out[layer][i][v_row_bytes], layers in cache order, row i
// for positions[i].  Nothing in the cache changes.  INFMLLM_ERR_BUFFER_TOO_SMALL unless the
// sizes are exactly n times the summed row bytes; INFMLLM_ERR_POS_NOT_FOUND as for evict.
// Backend-agnostic (ggml_backend_tensor_get): one copy per run of adjacent cells, per value
// channel as well where V is transposed.
LLAMA_API int32_t infmllm_kv_seq_read(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const llama_pos      * positions,
        int32_t                n,
        void                 * k_out,
        size_t                 k_size,
        void                 * v_out,
        size_t                 v_size);

// Write n rows laid out as infmllm_kv_seq_read() reads them into n free cells of seq_id's
// stream, row i at position positions[i] (the position its keys were rotated at, so the
// cell is consistent as written).  Cells holding other sequences are never touched.  The
// cells used are written to cells_out (may be NULL).  Returns n; INFMLLM_ERR_NO_FREE_CELLS
// (nothing written) when fewer than n cells are free; INFMLLM_ERR_UNSUPPORTED where keys
// cannot be re-rotated (the rows only make sense re-positioned, see infmllm_kv_seq_arrange).
LLAMA_API int32_t infmllm_kv_seq_write(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const llama_pos      * positions,
        int32_t                n,
        const void           * k_rows,
        size_t                 k_size,
        const void           * v_rows,
        size_t                 v_size,
        int32_t              * cells_out);

// Renumber the cells of seq_id to positions 0..n-1 in the order listed (cells[0] takes 0).
// Every cell of seq_id must be listed exactly once; they must hold seq_id alone.  The keys'
// re-rotation is the K-shift that compaction leaves (apply it with infmllm_kv_update).
// Returns n; INFMLLM_ERR_INVALID_ARG for a list that is not exactly the sequence's cells,
// INFMLLM_ERR_SHARED_CELLS, INFMLLM_ERR_UNSUPPORTED as for compact.  Nothing changes on error.
LLAMA_API int32_t infmllm_kv_seq_arrange(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const int32_t        * cells,
        int32_t                n);

// The KV stream's search head of seq_id: the cell from which llama.cpp looks for free cells
// for the next batch.  Returns it (>= 0), or an error as for infmllm_kv_seq_cells.
LLAMA_API int32_t infmllm_kv_seq_head(struct llama_context * ctx, llama_seq_id seq_id);

// Move the cells of seq_id, taken in position order, onto the n cells listed (cells[i]
// receives the i-th), K and V rows with them, and set the stream's search head to `head`
// (-1 leaves it).  For putting a restored sequence back on the cells it had, so that later
// batches land where they did: llama.cpp's state API places cells wherever it finds room,
// and the attention's float rounding follows the cells' order.  Every target must be free
// or a cell of seq_id; targets distinct.  Returns n; INFMLLM_ERR_INVALID_ARG for a list that
// does not fit, a head out of range or keys awaiting a K-shift; INFMLLM_ERR_SHARED_CELLS;
// INFMLLM_ERR_UNSUPPORTED for M-RoPE caches (2-D positions are not moved).  Nothing changes
// on error.  Cells already where they are asked to be are not copied (only the head is set).
LLAMA_API int32_t infmllm_kv_seq_place(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const int32_t        * cells,
        int32_t                n,
        int32_t                head);

// --- queries ------------------------------------------------------------------------------

// Keep the queries (after RoPE, before the attention scale) of the newest n_rows query rows
// decoded into each KV stream, across ubatches and decodes, for infmllm_get_queries().
// 0 turns it off (and empties what was kept); 1..n_ubatch, else INFMLLM_ERR_INVALID_ARG.
// Changing it rebuilds the graph on the next decode.  Needs a plain KV cache.
LLAMA_API int32_t infmllm_set_query_capture(struct llama_context * ctx, int32_t n_rows);

// Copy the kept queries of seq_id's stream: out[layer][head][row][head_dim] floats, layers
// in cache order with infmllm_kv_layers()' n_head and head_dim, rows oldest first, n_rows as
// set (rows not yet decoded are zero).  Returns the rows held (<= n_rows);
// INFMLLM_ERR_BUFFER_TOO_SMALL unless n_floats covers every layer's n_head * n_rows * head_dim.
LLAMA_API int32_t infmllm_get_queries(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        float                * out,
        size_t                 n_floats);

// Forget the kept queries of seq_id's stream (e.g. after the tokens they belong to were
// taken back); returns INFMLLM_OK.
LLAMA_API int32_t infmllm_clear_queries(struct llama_context * ctx, llama_seq_id seq_id);

// Replace the kept queries of seq_id's stream with what infmllm_get_queries() gave (e.g. for a
// restored session, whose cells hold the keys those queries were decoded with): n_floats as
// infmllm_get_queries() wants it, n_held 0..n_rows, rows laid out as it writes them.  Returns
// INFMLLM_OK; INFMLLM_ERR_BUFFER_TOO_SMALL if n_floats differs from the capture's size,
// INFMLLM_ERR_INVALID_ARG for n_held out of range or NULL data, nothing changed on failure.
LLAMA_API int32_t infmllm_set_queries(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const float          * in,
        size_t                 n_floats,
        int32_t                n_held);

// Abort callback for llama_set_abort_callback(): data points to an int32_t file descriptor;
// returns true once a byte is waiting on it (e.g. the signal wakeup fd that Python writes to
// when SIGINT arrives), so llama_decode stops between graph nodes and returns 2.  The fd is
// polled at most once per millisecond per thread; a negative fd or NULL data never aborts.
// The byte is not consumed: the caller drains the fd.
LLAMA_API bool infmllm_abort_on_fd(void * data);

#ifdef __cplusplus
}
#endif
