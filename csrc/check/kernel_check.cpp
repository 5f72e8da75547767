// Every ISA path this build and CPU support, against the portable scalar kernels, on random
// inputs: the full MoE expert FFN in every weight format (fp32 and int16 activations), the bf16 matmul, the Q8 copy and
// its matmul, attention (bit for bit: every path redoes attention.h's operations). Fast results
// must not change when a batch is run token by token (which moves tokens between matrix tiles and
// vector kernels) nor between the builds of one path (VBMI, AMX).
// Prints one line per check and "N passed, M failed"; exit code 1 on any failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "ops.h"

using namespace moemesh;

namespace {

int passed = 0, failed = 0;

void expect_close(const char* what, const char* isa, const std::vector<float>& got, const std::vector<float>& ref,
                  float rel_tol) {
    float max_ref = 0.f, max_err = 0.f;
    bool finite = true;  // fmax ignores NaN: without this, NaN outputs against NaN references passed
    for (size_t i = 0; i < ref.size(); ++i) {
        finite = finite && std::isfinite(got[i]) && std::isfinite(ref[i]);
        max_ref = std::fmax(max_ref, std::fabs(ref[i]));
        max_err = std::fmax(max_err, std::fabs(got[i] - ref[i]));
    }
    const bool ok = finite && max_err <= rel_tol * std::fmax(max_ref, 1e-30f);
    std::printf("%-6s %-28s rel err %.2e (tol %.0e) %s\n", isa, what, max_err / std::fmax(max_ref, 1e-30f), rel_tol,
                ok ? "ok" : "FAILED");
    (ok ? passed : failed)++;
}

// Random experts in every format: the same code bytes serve MXFP4 and Q4 (with their own scales),
// Q8 has its own values (natural order; each table's copy is put in its layout).
struct Inputs {
    int64_t E = 5, H = 640, I = 544, T, k = 2;  // 20 and 17 blocks: 16-block chunks and tails
    std::vector<uint8_t> gu_blocks, gu_e8m0, dn_blocks, dn_e8m0, gu_q8, dn_q8;
    std::vector<uint16_t> gu_f16, dn_f16, gu_bias, dn_bias;
    std::vector<float> x;
    std::vector<int32_t> ids;

    Inputs(std::mt19937& rng, int64_t tokens, int64_t hidden = 640, int64_t intermediate = 544)
        : H(hidden), I(intermediate), T(tokens) {
        std::uniform_int_distribution<int> byte(0, 255), scale(118, 124), expert(-1, int(E) - 1), q8(-127, 127);
        std::uniform_int_distribution<int> f16(0x2000, 0x2C00);  // fp16 scales 2^-7 .. 2^-4
        std::normal_distribution<float> normal(0.f, 1.f);
        auto fill = [&](auto& v, size_t n, auto& dist) { v.resize(n); for (auto& b : v) b = decltype(v[0] + 0)(dist(rng)); };
        fill(gu_blocks, size_t(E * 2 * I * H / 2), byte);
        fill(gu_e8m0, size_t(E * 2 * I * H / 32), scale);
        fill(dn_blocks, size_t(E * H * I / 2), byte);
        fill(dn_e8m0, size_t(E * H * I / 32), scale);
        fill(gu_f16, size_t(E * 2 * I * H / 32), f16);
        fill(dn_f16, size_t(E * H * I / 32), f16);
        fill(gu_q8, size_t(E * 2 * I * H), q8);
        fill(dn_q8, size_t(E * H * I), q8);
        auto bf16 = [&](std::vector<uint16_t>& v, size_t n) {
            v.resize(n);
            for (auto& b : v) { float f = 0.3f * normal(rng); uint32_t u; std::memcpy(&u, &f, 4); b = uint16_t(u >> 16); }
        };
        bf16(gu_bias, size_t(E * 2 * I));
        bf16(dn_bias, size_t(E * H));
        x.resize(size_t(T * H));
        for (auto& v : x) v = normal(rng);
        ids.resize(size_t(T * k));
        for (auto& v : ids) v = expert(rng);
    }
};

// One format's weights of `in` as `kt` reads them at precision p (Q8 values laid out in a copy of
// their own for the fast kernels).
struct FormatWeights {
    std::vector<uint8_t> gu_values, dn_values;
    MoeWeights w;

    FormatWeights(const Inputs& in, WeightFormat f, const KernelTable& kt, Precision p) {
        auto bytes = [](const std::vector<uint16_t>& v) { return reinterpret_cast<const uint8_t*>(v.data()); };
        if (f == WeightFormat::Q8) {
            gu_values = in.gu_q8, dn_values = in.dn_q8;
            if (p == Precision::Fast) {  // exact kernels read values as stored
                weight_layout(kt, f, gu_values.data(), in.E * 2 * in.I, in.H / 32);
                weight_layout(kt, f, dn_values.data(), in.E * in.H, in.I / 32);
            }
        }
        const bool q8 = f == WeightFormat::Q8, e8m0 = f == WeightFormat::Mxfp4;
        w = {in.E, in.H, in.I, f,
             q8 ? gu_values.data() : in.gu_blocks.data(), e8m0 ? in.gu_e8m0.data() : bytes(in.gu_f16), in.gu_bias.data(),
             q8 ? dn_values.data() : in.dn_blocks.data(), e8m0 ? in.dn_e8m0.data() : bytes(in.dn_f16), in.dn_bias.data(),
             1.702f, 7.0f};
    }
};

void expect(bool ok, const char* isa, const char* what) {
    std::printf("%-6s %-28s %s\n", isa, what, ok ? "ok" : "FAILED");
    (ok ? passed : failed)++;
}

}  // namespace

int main() {
    std::mt19937 rng(1234);
    // 7 tokens: 4-token passes only; 80: ~27 per expert, so matrix-unit paths (AMX) take one and
    // two groups of 16 too; 81 over rows of 7 and 3 blocks: fewer blocks than a 16-block chunk.
    const Inputs few(rng, 7), many(rng, 80), narrow(rng, 81, 224, 96);
    const Inputs& in = few;
    const KernelTable& scalar = *kernel_table(Isa::Scalar);
    // Variants of one path must agree bit for bit: key (path, token count).
    std::map<std::pair<std::string, int64_t>, std::vector<float>> fast_by_path;
    for (const KernelTable* kt : all_kernel_tables()) {
        for (int fi = 0; fi < kWeightFormats; ++fi)
            for (const Inputs* inputs : {&few, &many, &narrow})
                for (Precision p : {Precision::Exact, Precision::Fast}) {
                    const WeightFormat f = WeightFormat(fi);
                    const Inputs& v = *inputs;
                    const FormatWeights ref_w(v, f, scalar, p), got_w(v, f, *kt, p);
                    std::vector<float> ref(size_t(v.T * v.k * v.H)), got(ref.size());
                    moe_experts(scalar, p, ref_w.w, v.x.data(), v.T, v.ids.data(), v.k, ref.data());
                    moe_experts(*kt, p, got_w.w, v.x.data(), v.T, v.ids.data(), v.k, got.data());
                    // "moe_experts" alone is MXFP4 (the names the qemu test looks for).
                    const std::string fmt = f == WeightFormat::Mxfp4 ? "" : std::string(format_info(f).name) + " ";
                    const std::string tail = " T=" + std::to_string(v.T);
                    expect_close(("moe_experts " + fmt + (p == Precision::Exact ? "exact" : "fast") + tail).c_str(),
                                 kt->name, got, ref, 2e-5f);
                    if (p != Precision::Fast) continue;
                    // NEON redoes the scalar path's float steps on the same exact integer sums.
                    if (std::string(kt->name) == "neon")
                        expect(got == ref, kt->name, (fmt + "fast bit-identical to scalar" + tail).c_str());
                    // Token by token (4-token passes only) must give what the whole batch gave.
                    std::vector<float> one_by_one(got.size());
                    for (int64_t t = 0; t < v.T; ++t)
                        moe_experts(*kt, p, got_w.w, v.x.data() + t * v.H, 1, v.ids.data() + t * v.k, v.k,
                                    one_by_one.data() + t * v.k * v.H);
                    expect(one_by_one == got, kt->name, (fmt + "token split identical" + tail).c_str());
                    const auto key = std::make_pair(std::string(kt->name) + fmt, v.T);
                    const auto seen = fast_by_path.find(key);
                    if (seen == fast_by_path.end()) fast_by_path.emplace(key, got);
                    else expect(seen->second == got, kt->name, (fmt + "variants bit-identical" + tail).c_str());
                }
        const int64_t N = 37, K = 100, T = 5;
        std::vector<uint16_t> w(size_t(N * K));
        for (size_t i = 0; i < w.size(); ++i) w[i] = uint16_t(0x3C00 + (i * 2654435761u) % 0x1000);
        std::vector<float> ref(size_t(T * N)), got(ref.size());
        bf16_matmul(scalar, in.x.data(), T, K, w.data(), N, nullptr, ref.data());
        bf16_matmul(*kt, in.x.data(), T, K, w.data(), N, nullptr, got.data());
        expect_close("bf16_matmul (K tail)", kt->name, got, ref, 2e-5f);
        {  // A row's bits do not depend on the rows it is computed with (a lone decode vs a batch).
            const float* xs[kMaxTokens];
            for (int t = 0; t < kMaxTokens; ++t) xs[t] = in.x.data() + t * K;
            std::vector<float> together(size_t(N * kMaxTokens)), alone(together.size());
            kt->bf16_dot_f32(w.data(), N, K, xs, kMaxTokens, together.data());
            for (int64_t r = 0; r < N; ++r)
                kt->bf16_dot_f32(w.data() + r * K, 1, K, xs, kMaxTokens, alone.data() + r * kMaxTokens);
            expect(together == alone, kt->name, "bf16 rows identical alone and together");
        }
        {  // 40 tokens x 130 rows, K = 608: matrix tiles (where the CPU has them) and the vector rest
            const int64_t TB = 40, NB = 130, KB = 608;
            std::vector<uint16_t> wb(size_t(NB * KB));
            for (size_t i = 0; i < wb.size(); ++i) wb[i] = uint16_t(0x3C00 + (i * 2654435761u) % 0x0800) ^ (i & 1 ? 0x8000 : 0);
            std::vector<float> ref_b(size_t(TB * NB)), got_b(ref_b.size());
            bf16_matmul(scalar, many.x.data(), TB, KB, wb.data(), NB, nullptr, ref_b.data());
            bf16_matmul(*kt, many.x.data(), TB, KB, wb.data(), NB, nullptr, got_b.data());
            expect_close("bf16_matmul T=40 N=130", kt->name, got_b, ref_b, 2e-5f);
        }

        const int64_t KQ = 608;  // 19 blocks: a 16-block chunk and a tail, each copy in its ISA's layout
        auto q8_matmul = [&](const KernelTable& t, const float* x, int64_t TQ, const int8_t* v, const uint16_t* sc,
                             float* y) {
            quant_matmul(t, Precision::Fast, WeightFormat::Q8, x, TQ, KQ, reinterpret_cast<const uint8_t*>(v),
                         reinterpret_cast<const uint8_t*>(sc), N, y);
        };
        std::vector<int8_t> ref_values(size_t(N * KQ)), values(ref_values.size());
        std::vector<uint16_t> ref_scales(size_t(N * KQ / 32)), scales(ref_scales.size()), wq(size_t(N * KQ));
        // bf16 magnitudes 2^-7 .. 2^9: their Q8 scales stay well inside fp16's range.
        for (size_t i = 0; i < wq.size(); ++i) wq[i] = uint16_t(0x3C00 + (i * 2654435761u) % 0x0800) ^ (i & 1 ? 0x8000 : 0);
        q8_copy(scalar, wq.data(), N, KQ, ref_values.data(), ref_scales.data());
        q8_copy(*kt, wq.data(), N, KQ, values.data(), scales.data());
        for (const int64_t TQ : {T, int64_t(40)}) {  // 40: matrix-unit groups and a 4-token pass
            std::vector<float> ref_q(size_t(TQ * N)), got_q(ref_q.size()), one_by_one(ref_q.size());
            q8_matmul(scalar, many.x.data(), TQ, ref_values.data(), ref_scales.data(), ref_q.data());
            q8_matmul(*kt, many.x.data(), TQ, values.data(), scales.data(), got_q.data());
            expect_close(("q8_matmul T=" + std::to_string(TQ)).c_str(), kt->name, got_q, ref_q, 2e-5f);
            if (std::string(kt->name) == "neon")
                expect(got_q == ref_q, kt->name, ("q8 bit-identical to scalar T=" + std::to_string(TQ)).c_str());
            for (int64_t t = 0; t < TQ; ++t)
                q8_matmul(*kt, many.x.data() + t * KQ, 1, values.data(), scales.data(), one_by_one.data() + t * N);
            expect(one_by_one == got_q, kt->name, ("q8 token split identical T=" + std::to_string(TQ)).c_str());
            const auto key = std::make_pair(std::string(kt->name) + " q8", TQ);
            const auto seen = fast_by_path.find(key);
            if (seen == fast_by_path.end()) fast_by_path.emplace(key, got_q);
            else expect(seen->second == got_q, kt->name, ("q8 variants bit-identical T=" + std::to_string(TQ)).c_str());
        }
        {  // attention: 6 queries, 16 heads over 2 kv heads, 45 keys in ring order, with and without a window
            const int64_t TA = 6, NQ = 16, NKV = 2, D = 64, S = 45;
            std::vector<float> q(static_cast<size_t>(TA * NQ * D)), kv(static_cast<size_t>(2 * S * NKV * D)),
                sinks(static_cast<size_t>(NQ));
            std::normal_distribution<float> normal(0.f, 2.f);
            for (std::vector<float>* vec : {&q, &kv, &sinks})
                for (auto& v : *vec) v = normal(rng);
            std::vector<int64_t> k_pos(static_cast<size_t>(S)), q_pos(static_cast<size_t>(TA));
            for (int64_t j = 0; j < S; ++j) k_pos[size_t(j)] = 100 + (j + 7) % S;
            for (int64_t t = 0; t < TA; ++t) q_pos[size_t(t)] = 100 + S - TA + t;
            for (const int64_t window : {int64_t(0), int64_t(20)}) {
                std::vector<float> ref_a(q.size()), got_a(q.size());
                attend(scalar, q.data(), TA, NQ, D, kv.data(), kv.data() + S * NKV * D, S, NKV, sinks.data(),
                       q_pos.data(), k_pos.data(), window, 8.f, ref_a.data());
                attend(*kt, q.data(), TA, NQ, D, kv.data(), kv.data() + S * NKV * D, S, NKV, sinks.data(),
                       q_pos.data(), k_pos.data(), window, 8.f, got_a.data());
                expect(got_a == ref_a, kt->name, ("attend bit-identical window=" + std::to_string(window)).c_str());
            }
        }
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
