// Runs kernels/elementwise.cu's kernels on the CPU (cuda_emu.h) against a float64 reference on
// random inputs: add_rms_norm over rows of 1, 100, 576 and 4096 elements (fewer and more than
// the block's threads, not a multiple of them), swiglu over a grid-stride loop; f32 and bf16.
// The sums must equal the element type's rounding of x + r exactly. Exit status 1 on a failure.
#include "cuda_emu.h"
#include "check.h"
#include "../elementwise.cu"

#include <cstdio>
#include <random>
#include <string>

template <typename T>
bool norm_case(int rows, int hidden, std::mt19937 &rng, const char *dtype) {
    std::normal_distribution<float> nd;
    std::vector<T> x(size_t(rows) * hidden), r(x.size()), w(hidden), out(2 * x.size(), cvt<T>(NAN));
    for (auto &v : x) v = cvt<T>(nd(rng));
    for (auto &v : r) v = cvt<T>(nd(rng) * 0.5f);
    for (auto &v : w) v = cvt<T>(1.f + 0.1f * nd(rng));
    const float eps = 1e-5f;
    emu::launch({unsigned(rows), 1, 1}, {NORM_THREADS, 1, 1}, [&] {
        if constexpr (sizeof(T) == 4)
            add_rms_norm_f32(x.data(), r.data(), w.data(), out.data(), rows, hidden, eps);
        else
            add_rms_norm_bf16(x.data(), r.data(), w.data(), out.data(), rows, hidden, eps);
    });
    bool sums_exact = true;
    double max_err = 0, max_ref = 0;
    for (int row = 0; row < rows; ++row) {
        std::vector<double> s(hidden);
        double sq = 0;
        for (int i = 0; i < hidden; ++i) {
            const size_t at = size_t(row) * hidden + i;
            const T want = cvt<T>(to_f32(x[at]) + to_f32(r[at]));
            sums_exact &= to_f32(out[at]) == to_f32(want);
            s[i] = to_f32(want);
            sq += s[i] * s[i];
        }
        const double inv = 1.0 / std::sqrt(sq / hidden + eps);
        for (int i = 0; i < hidden; ++i) {
            const double ref = s[i] * inv * to_f32(w[i]);
            const double got = to_f32(out[size_t(rows + row) * hidden + i]);
            max_err = std::max(max_err, std::isnan(got) ? INFINITY : std::abs(got - ref));
            max_ref = std::max(max_ref, std::abs(ref));
        }
    }
    const double rel = max_err / max_ref, limit = sizeof(T) == 4 ? 1e-6 : 1e-2;
    const bool ok = sums_exact && rel <= limit;
    std::printf("%s add_rms_norm %-4s rows %d hidden %4d  sums %s, normed rel err %.2e (limit %.0e)\n",
                ok ? "ok  " : "FAIL", dtype, rows, hidden, sums_exact ? "exact" : "WRONG", rel, limit);
    return ok;
}

template <typename T>
bool swiglu_case(int64_t n, unsigned grid, std::mt19937 &rng, const char *dtype) {
    std::normal_distribution<float> nd;
    std::vector<T> g(n), u(n), out(n, cvt<T>(NAN));
    for (auto &v : g) v = cvt<T>(3.f * nd(rng));
    for (auto &v : u) v = cvt<T>(nd(rng));
    emu::launch({grid, 1, 1}, {128, 1, 1}, [&] {
        if constexpr (sizeof(T) == 4)
            swiglu_f32(g.data(), u.data(), out.data(), n);
        else
            swiglu_bf16(g.data(), u.data(), out.data(), n);
    });
    double max_err = 0, max_ref = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double gv = to_f32(g[i]), ref = gv / (1.0 + std::exp(-gv)) * to_f32(u[i]);
        const double got = to_f32(out[i]);
        max_err = std::max(max_err, std::isnan(got) ? INFINITY : std::abs(got - ref));
        max_ref = std::max(max_ref, std::abs(ref));
    }
    const double rel = max_err / max_ref, limit = sizeof(T) == 4 ? 1e-6 : 1e-2;
    const bool ok = rel <= limit;
    std::printf("%s swiglu       %-4s n %lld grid %u x 128  rel err %.2e (limit %.0e)\n", ok ? "ok  " : "FAIL", dtype,
                (long long)n, grid, rel, limit);
    return ok;
}

int main() {
    std::mt19937 rng(11);
    bool ok = true;
    for (auto [rows, hidden] : {std::pair{3, 1}, {2, 100}, {5, 576}, {2, 4096}}) {
        ok &= norm_case<float>(rows, hidden, rng, "f32");
        ok &= norm_case<__nv_bfloat16>(rows, hidden, rng, "bf16");
    }
    for (auto [n, grid] : {std::pair{int64_t(1), 1u}, {int64_t(1000), 3u}, {int64_t(4096), 64u}}) {
        ok &= swiglu_case<float>(n, grid, rng, "f32");
        ok &= swiglu_case<__nv_bfloat16>(n, grid, rng, "bf16");
    }
    std::printf("%s\n", ok ? "all emulated checks pass" : "SOME EMULATED CHECKS FAIL");
    return ok ? 0 : 1;
}
