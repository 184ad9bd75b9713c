// Interrupts: an abort callback that stops a running llama_decode once a file descriptor
// turns readable, and the one update that must never be stopped halfway.
//
// Python's C-level signal handler writes a byte to the "wakeup fd" the moment SIGINT
// arrives, even while the main thread is blocked inside llama_decode; ggml calls the abort
// callback between graph nodes, so an interrupt stops a long prefill within a node or two.
#include "infmllm.h"
#include "infmllm-access.h"

int32_t infmllm_kv_update(llama_context * ctx) {
    if (ctx == nullptr) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    // the K-shift rotates keys in place: stopped halfway, it would later be applied again
    // on top of the layers it had already rotated
    const auto saved = infmllm_access::abort_callback(*ctx);
    ctx->set_abort_callback(nullptr, nullptr);
    const bool updated = ctx->memory_update(false);
    ctx->set_abort_callback(saved.first, saved.second);
    return updated ? 1 : 0;
}

#ifdef _WIN32

bool infmllm_abort_on_fd(void * data) { // no poll(): an interrupt lands between decodes
    (void) data;
    return false;
}

#else

#include <poll.h>

#include <chrono>

bool infmllm_abort_on_fd(void * data) {
    if (data == nullptr) {
        return false;
    }
    // ggml asks after every node; a clock read is cheap, a poll() per node is not
    using clock = std::chrono::steady_clock;
    thread_local clock::time_point next_poll;
    const clock::time_point now = clock::now();
    if (now < next_poll) {
        return false;
    }
    next_poll = now + std::chrono::milliseconds(1);

    pollfd p = {};
    p.fd     = *static_cast<const int32_t *>(data);
    p.events = POLLIN;
    return p.fd >= 0 && poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
}

#endif
