// The InfMLLM keep rule on scores in stream order.  Baselines use the same
// routine with other parameters: StreamingLLM (no saddles), H2O (accumulated scores, no
// sinks), SnapKV (no local sum, no bias).
#include "infmllm.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

int32_t infmllm_select_keep(
        const float                        * scores,
        int32_t                              n,
        const struct infmllm_select_params * p,
        uint8_t                            * keep) {
    if (p == nullptr || keep == nullptr || n < 0 || (n > 0 && scores == nullptr) ||
        p->budget < 0 || p->n_sink < 0 || p->n_recent < 0 || p->local_window < 0 ||
        (int64_t) p->n_sink + p->n_recent > p->budget || !std::isfinite(p->bias)) {
        return INFMLLM_ERR_INVALID_ARG;
    }
    if (n <= p->budget) {
        std::fill(keep, keep + n, 1);
        return n;
    }
    std::fill(keep, keep + n, 0);
    std::fill(keep, keep + p->n_sink, 1);
    std::fill(keep + n - p->n_recent, keep + n, 1);

    const int32_t lo = p->n_sink;
    const int32_t hi = n - p->n_recent;
    const int32_t k  = p->budget - p->n_sink - p->n_recent;
    if (k == 0) {
        return p->budget;
    }

    // local sum via prefix sums over the whole cache, normalised to total mass 1; a
    // non-finite score adds nothing to any sum, so its neighbours keep their ranks
    std::vector<double> prefix(n + 1, 0.0);
    for (int32_t i = 0; i < n; ++i) {
        prefix[i + 1] = prefix[i] + (std::isfinite(scores[i]) ? scores[i] : 0.0);
    }
    const double total = prefix[n] > 0.0 ? prefix[n] : 1.0;
    const int32_t w = p->local_window;

    std::vector<std::pair<double, int32_t>> cand;
    cand.reserve(hi - lo);
    for (int32_t j = lo; j < hi; ++j) {
        double r;
        if (std::isfinite(scores[j])) {
            const int64_t a = std::max<int64_t>(0, (int64_t) j - w); // 64-bit: w may be INT32_MAX
            const int64_t b = std::min<int64_t>(n, (int64_t) j + w + 1);
            const double recency = (double) j / (double) (n - 1);
            r = (prefix[b] - prefix[a]) / total + p->bias * recency;
        } else {
            r = scores[j]; // +inf above, -inf below every finite score; NaN below everything
        }
        cand.emplace_back(r, j);
    }
    // higher score first, NaN last (a comparison with NaN is no strict weak order, which
    // nth_element needs); ties to the newer cell
    auto better = [](const auto & x, const auto & y) {
        const bool x_nan = std::isnan(x.first);
        const bool y_nan = std::isnan(y.first);
        if (x_nan != y_nan) {
            return y_nan;
        }
        if (!x_nan && x.first != y.first) {
            return x.first > y.first;
        }
        return x.second > y.second;
    };
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
    for (int32_t i = 0; i < k; ++i) {
        keep[cand[i].second] = 1;
    }
    return p->budget;
}
