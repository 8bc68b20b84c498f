// Runs kernels/paged_attention.cu's kernels on the CPU (cuda_emu.h) against a float64 reference
// on random inputs: decode, prefill chunks over cached prefixes, GQA groups 1-17, head sizes
// 32-128, block sizes 1-32, sliding windows, f32 and bf16; each case also with split keys (the
// partial states merged by paged_attention_combine, including splits that get no tile), in f32
// and, for the cheaper cases, bf16; and write_kv. The work list is built as crates/tandem-kernels' `work_list` builds it. Exit
// status 1 if any case fails.
#include "cuda_emu.h"
#include "check.h"
#include "../paged_attention.cu"

#include <cstdio>
#include <random>

struct Seq {
    int cached, fresh;  // keys already in the cache before this call's tokens, and new tokens
};
struct Case {
    const char *name;
    int nh, nkv, hd, bs, window;
    std::vector<Seq> seqs;
    int splits;       // besides the run without splits (f32)
    bool bf16_split;  // that run in bf16 too (the merge is the same code; kept to the cheap cases)
};

template <typename T>
bool run(const Case &c, int splits, std::mt19937 &rng, const char *dtype) {
    const int group = c.nh / c.nkv;
    std::normal_distribution<float> nd;
    std::vector<int> positions, token_seg, table_off{0}, tables;
    int num_blocks = 0;
    for (size_t s = 0; s < c.seqs.size(); ++s) {
        const int len = c.seqs[s].cached + c.seqs[s].fresh;
        for (int p = c.seqs[s].cached; p < len; ++p) {
            positions.push_back(p);
            token_seg.push_back(int(s));
        }
        num_blocks += (len + c.bs - 1) / c.bs;
    }
    // Blocks in a shuffled order, so that no sequence's table is contiguous.
    std::vector<int> order(num_blocks + 3);
    for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
    std::shuffle(order.begin(), order.end(), rng);
    int next = 0;
    for (auto &s : c.seqs) {
        const int n = (s.cached + s.fresh + c.bs - 1) / c.bs;
        for (int b = 0; b < n; ++b) tables.push_back(order[next++]);
        table_off.push_back(int(tables.size()));
    }
    const int slots = int(order.size()) * c.bs, T_ = int(positions.size()), HD = c.hd;
    std::vector<T> kc(size_t(slots) * c.nkv * HD), vc(kc.size()), q(size_t(T_) * c.nh * HD);
    for (auto &x : kc) x = cvt<T>(nd(rng));
    for (auto &x : vc) x = cvt<T>(nd(rng));
    for (auto &x : q) x = cvt<T>(nd(rng));
    std::vector<T> out(q.size(), cvt<T>(NAN));
    // The work list, as tandem-kernels' work_list makes it.
    std::vector<int4> work;
    int max_rows = 1;
    const int hn = std::clamp(group, 1, MAX_ROWS), per_item = std::max(MAX_ROWS / hn, 1);
    for (int a = 0; a < T_;) {
        int b = a;
        while (b < T_ && token_seg[b] == token_seg[a]) ++b;
        for (int h0 = 0; h0 < group; h0 += hn)
            for (int t = a; t < b; t += per_item) {
                const int nt = std::min(per_item, b - t), heads = std::min(hn, group - h0);
                work.push_back({token_seg[a], t, nt, h0 | (heads << 16)});
                max_rows = std::max(max_rows, nt * heads);
            }
        a = b;
    }
    const float scale = 1.f / std::sqrt(float(HD));
    const int rows = T_ * c.nh;
    std::vector<float> part_acc(splits > 1 ? size_t(rows) * splits * HD : 0, NAN);
    std::vector<float> part_ml(splits > 1 ? size_t(rows) * splits * 2 : 0, NAN);
    float *pa = splits > 1 ? part_acc.data() : nullptr, *pm = splits > 1 ? part_ml.data() : nullptr;
    const auto suffix = std::string(dtype) + "_d" + std::to_string(HD);
    // Every (dtype, head size) entry point, by the suffix the host would pick.
#define EACH_VARIANT(X) \
    X(f32_d32, float)   \
    X(f32_d64, float)   \
    X(f32_d96, float)   \
    X(f32_d128, float)  \
    X(bf16_d32, __nv_bfloat16) X(bf16_d64, __nv_bfloat16) X(bf16_d96, __nv_bfloat16) X(bf16_d128, __nv_bfloat16)
    auto kernel = [&]() {
#define CALL(SUFFIX, TT)                                                                                 \
    if (suffix == #SUFFIX)                                                                              \
        return paged_attention_##SUFFIX((const TT *)q.data(), (const TT *)kc.data(), (const TT *)vc.data(), \
                                        (TT *)out.data(), work.data(), positions.data(), table_off.data(), \
                                        tables.data(), c.nh, c.nkv, c.bs, c.window, scale, pa, pm);
        EACH_VARIANT(CALL)
#undef CALL
        std::abort();
    };
    auto combine = [&]() {
#define CALL(SUFFIX, TT) \
    if (suffix == #SUFFIX) return paged_attention_combine_##SUFFIX((TT *)out.data(), pa, pm, rows, splits);
        EACH_VARIANT(CALL)
#undef CALL
        std::abort();
    };
#undef EACH_VARIANT
    emu::launch({unsigned(work.size()), unsigned(c.nkv), unsigned(splits)}, {unsigned(32 * max_rows), 1, 1},
                kernel);
    if (splits > 1) emu::launch({unsigned((rows + 3) / 4), 1, 1}, {128, 1, 1}, combine);
    // float64 reference over the same (rounded) inputs.
    auto f = [](T v) { return double(to_f32(v)); };
    double max_err = 0, max_ref = 0;
    for (int t = 0; t < T_; ++t) {
        const int s = token_seg[t], pos = positions[t];
        const int first = c.window > 0 ? std::max(0, pos + 1 - c.window) : 0;
        for (int h = 0; h < c.nh; ++h) {
            const int g = h / group;
            std::vector<double> w;
            double m = -INFINITY;
            for (int j = first; j <= pos; ++j) {
                const size_t slot = size_t(tables[table_off[s] + j / c.bs]) * c.bs + j % c.bs;
                double d = 0;
                for (int e = 0; e < HD; ++e)
                    d += f(q[(size_t(t) * c.nh + h) * HD + e]) * f(kc[(slot * c.nkv + g) * HD + e]);
                w.push_back(d * scale);
                m = std::max(m, w.back());
            }
            double sum = 0;
            for (auto &x : w) sum += (x = std::exp(x - m));
            for (int e = 0; e < HD; ++e) {
                double acc = 0;
                for (int j = first; j <= pos; ++j) {
                    const size_t slot = size_t(tables[table_off[s] + j / c.bs]) * c.bs + j % c.bs;
                    acc += w[j - first] / sum * f(vc[(slot * c.nkv + g) * HD + e]);
                }
                const double got = f(out[(size_t(t) * c.nh + h) * HD + e]);
                max_err = std::max(max_err, std::isnan(got) ? INFINITY : std::abs(got - acc));
                max_ref = std::max(max_ref, std::abs(acc));
            }
        }
    }
    const double rel = max_err / max_ref, limit = sizeof(T) == 4 ? 1e-5 : 1e-2;
    const bool ok = rel <= limit;
    std::printf("%s %-26s %-4s nh %2d nkv %d hd %3d bs %2d window %3d items %3zu splits %2d  rel err %.2e (limit %.0e)\n",
                ok ? "ok  " : "FAIL", c.name, dtype, c.nh, c.nkv, HD, c.bs, c.window, work.size(), splits, rel,
                limit);
    return ok;
}

bool write_kv_check(std::mt19937 &rng) {
    const int t = 7, row = 2 * 64, slots = 40;
    std::vector<float> cache(size_t(slots) * row, 0.f), src(size_t(t) * row);
    std::normal_distribution<float> nd;
    for (auto &x : src) x = nd(rng);
    std::vector<int> slot{5, -1, 0, 39, 17, -1, 8};
    auto want = cache;
    for (int i = 0; i < t; ++i)
        if (slot[i] >= 0) std::copy(&src[size_t(i) * row], &src[size_t(i + 1) * row], &want[size_t(slot[i]) * row]);
    emu::launch({unsigned(t), 1, 1}, {128, 1, 1}, [&] { write_kv_f32(cache.data(), src.data(), slot.data(), row); });
    const bool ok = cache == want;
    std::printf("%s write_kv f32 (7 tokens, 2 skipped)\n", ok ? "ok  " : "FAIL");
    return ok;
}

int main() {
    std::mt19937 rng(7);
    std::vector<Case> cases = {
        {"decode b8 multi-tile", 32, 8, 128, 16, 0, {{0, 1}, {1, 1}, {31, 1}, {32, 1}, {63, 1}, {100, 1}, {200, 1}, {5, 1}}, 3, true},
        {"decode b1 long context", 32, 8, 128, 16, 0, {{700, 1}}, 22, true},
        {"prefill after prefix", 32, 8, 128, 16, 0, {{70, 40}, {0, 1}}, 2, false},
        {"decode + chunks", 9, 3, 64, 16, 0, {{15, 1}, {16, 1}, {31, 40}, {0, 77}}, 4, false},
        {"window 50 across tiles", 9, 3, 64, 4, 50, {{120, 1}, {90, 30}, {0, 70}}, 3, false},
        {"MHA hd32 bs1", 4, 4, 32, 1, 0, {{40, 3}, {0, 50}}, 64, true},
        {"hd96 bs32 window 40", 12, 4, 96, 32, 40, {{33, 20}, {64, 1}}, 5, true},
        {"group 17", 34, 2, 64, 16, 0, {{10, 9}, {0, 1}}, 2, true},
        {"group 16 one row per token", 16, 1, 64, 8, 0, {{3, 5}, {40, 1}}, 7, true},
    };
    bool ok = true;
    for (auto &c : cases) {
        for (int splits : {1, c.splits}) {
            ok &= run<float>(c, splits, rng, "f32");
            if (splits == 1 || c.bf16_split) ok &= run<__nv_bfloat16>(c, splits, rng, "bf16");
        }
    }
    ok &= write_kv_check(rng);
    std::printf("%s\n", ok ? "all emulated checks pass" : "SOME EMULATED CHECKS FAIL");
    return ok ? 0 : 1;
}
