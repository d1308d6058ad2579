// Discrete-diffusion mask sampling, C++ CPU kernels. Semantics: the launcher contract of the
// mask-sampling op family.
//
// maskgit_step, phase 1, one masked position at a time (positions split across OpenMP threads,
// dynamically: known positions cost nothing). The position's K logits (cond, and uncond with
// guidance) are read from memory once:
//   pass A  y_k = ((1+g)·cond_k − g·uncond_k)·(1/T) into a per-thread fp32 row (L1/L2-resident),
//           a non-finite y_k (NaN, +inf) taken as −inf (the contract's policy), m = max_k y_k;
//           m = −inf (no finite y_k): token 0, confidence −inf
//   pass B  e_k = exp(y_k − m), s = Σ e_k, and the sample:
//             explicit noise: ŷ = argmax (y_k + G_k), exactly as the contract states;
//             Philox noise:   ŷ = argmax e_k / E_k with E_k = −log u_k ~ Exp(1), the exponential
//                             race: the same law as the Gumbel-max (G = −log E) with one log per
//                             element instead of two, and e_k is already needed for s.
//   confidence = (y_ŷ − m − log s) + τ·G_choice.
// Phase 2, one sequence at a time: nth_element of the L (confidence, position) pairs.
//
// Philox words come 4 per counter (columns 4q … 4q+3 share counter q), 16 counters per 64-column
// block in one vectorised loop; Philox is most of a column's cost on that path. log/exp are our own
// branch-free polynomials (libm's do not vectorise without -ffast-math); each position routine is
// compiled for several instruction sets and one is picked at run time (cpu_simd.h).
#include "mask_sampling.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "unif2ace/cpu_simd.h"
#include "unif2ace/philox.h"

namespace unif2ace {
namespace {

using namespace cpu;  // NOLINT: the shared SIMD helpers

constexpr float kInf = std::numeric_limits<float>::infinity();

// The contract's policy for a non-finite y (NaN, +inf): it counts as −inf, never sampled. One
// select, so the loops around it still vectorise.
U2A_ALWAYS_INLINE float policy_y(float v) {
  return v > -kInf && v < kInf ? v : -kInf;  // NaN fails both compares
}


// exp(x) in fp32, Cephes expf (cpu_simd.h's polynomial) with its own range handling: here
// x = y − m <= 0 always, and below -87.3 (or NaN) the result is 0 (such a token has probability
// < e^-87 of being drawn).
U2A_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5·2^23
  const float xc = x > -87.3f ? x : -87.3f;  // NaN -> clamp; n stays in [-126, 0]
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = expf_poly(r);
  p = p * (r * r) + r + 1.f;
  const float two_n = bits_as_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float y = p * two_n;
  return x > -87.3f ? y : 0.f;
}

// log(x) for positive normal fp32 x, Cephes logf: x = 2^e·f with f ∈ [√½, √2), log f by a degree-8
// polynomial in f − 1. Relative error ~1e-7 over the range used here ([2^-33, 1]).
U2A_ALWAYS_INLINE float log_simd(float x) {
  const uint32_t bits = float_as_bits(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  float f = bits_as_float((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = f < 0.707106781186547524f;
  e -= small ? 1 : 0;
  f = (small ? f + f : f) - 1.f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// E = −log u ~ Exp(1) from one Philox word, the contract's two branches without a branch:
// u = t (top bit 0) or u = 1 − t (top bit 1), and for the latter log1p(−t) = log u − δ/u with
// δ = (u − 1) + t the rounding error of u (the classic log1p correction, exact to fp32 even when
// 1 − t rounds to 1). The 1/u is dropped: it changes E by δ·(1 − u)/u ≤ 2^-24·E (u ≥ 1/2 and
// E ≥ 1 − u), under one ulp, and saves a division per element.
U2A_ALWAYS_INLINE float exponential_simd(uint32_t x) {
  const float t = (static_cast<float>(static_cast<int32_t>(x & 0x7fffffffu)) + 0.5f) *
                  2.3283064365386963e-10f;
  const bool hi = (x >> 31) != 0;
  const float u = hi ? 1.f - t : t;
  const float corr = hi ? (u - 1.f) + t : 0.f;
  return corr - log_simd(u);
}

// The launcher's operands and the scalars derived from them.
struct StepArgs : MaskgitStepArgs {
  float g1, g0;  // float32(1 + g) and float32(g), as torch rounds a Python scalar for fp32 math
  uint32_t c3_sample, c3_choice;
};

constexpr int kLanes = 16;            // argmax / sum lanes: one AVX-512 vector of fp32
constexpr int kBlock = 4 * kLanes;    // columns per Philox block: 16 counters × 4 words

// Pass B on the Philox path over columns [0, K) of the row y (max m). Returns (ŷ, s).
U2A_ALWAYS_INLINE std::pair<int64_t, float> race_philox(const float* y, int64_t K, float m,
                                                        uint32_t l, uint32_t b, uint32_t c3,
                                                        uint64_t seed) {
  // The running best of each lane is the fraction e_best / E_best, compared by cross-multiplying
  // (e·E_best > e_best·E): no division per element. e ∈ [0, 1], E ∈ [1e-10, 23]: no overflow.
  alignas(64) float best_e[kLanes];
  alignas(64) float best_E[kLanes];
  alignas(64) int32_t besti[kLanes];
  alignas(64) float sum[kLanes];
  alignas(64) uint32_t words[kBlock];
  for (int j = 0; j < kLanes; ++j) {
    best_e[j] = -1.f;  // -1/1: below every score e/E >= 0
    best_E[j] = 1.f;
    besti[j] = 0;
    sum[j] = 0.f;
  }
  int64_t kb = 0;
  for (; kb + kBlock <= K; kb += kBlock) {
    const uint32_t q0 = static_cast<uint32_t>(kb >> 2);
#pragma omp simd
    for (int i = 0; i < kLanes; ++i) {
      const Philox4 p = philox4x32_10(q0 + static_cast<uint32_t>(i), l, b, c3, seed);
      words[4 * i + 0] = p.w[0];
      words[4 * i + 1] = p.w[1];
      words[4 * i + 2] = p.w[2];
      words[4 * i + 3] = p.w[3];
    }
    for (int sub = 0; sub < 4; ++sub) {
      const float* yb = y + kb + sub * kLanes;
      const uint32_t* wb = words + sub * kLanes;
      const int32_t k0 = static_cast<int32_t>(kb + sub * kLanes);
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const float e = exp_nonpositive(yb[j] - m);
        sum[j] += e;
        const float E = exponential_simd(wb[j]);
        const bool better = e * best_E[j] > best_e[j] * E;  // strict: earliest column of a lane wins
        best_e[j] = better ? e : best_e[j];
        best_E[j] = better ? E : best_E[j];
        besti[j] = better ? k0 + j : besti[j];
      }
    }
  }
  float be = -1.f, bE = 1.f, s = 0.f;
  int64_t bi = 0;
  for (int j = 0; j < kLanes; ++j) {
    s += sum[j];
    const float lhs = best_e[j] * bE, rhs = be * best_E[j];
    if (lhs > rhs || (lhs == rhs && besti[j] < bi)) {
      be = best_e[j];
      bE = best_E[j];
      bi = besti[j];
    }
  }
  for (; kb < K; kb += 4) {  // tail (< 64 columns), scalar
    const Philox4 p = philox4x32_10(static_cast<uint32_t>(kb >> 2), l, b, c3, seed);
    for (int64_t j = 0; j < 4 && kb + j < K; ++j) {
      const float e = exp_nonpositive(y[kb + j] - m);
      s += e;
      const float E = exponential_simd(p.w[j]);
      if (e * bE > be * E) {
        be = e;
        bE = E;
        bi = kb + j;
      }
    }
  }
  return {bi, s};
}

// Pass B with explicit Gumbel noise: ŷ = first argmax of y_k + G_k (fp32 add), as the contract.
U2A_ALWAYS_INLINE std::pair<int64_t, float> gumbel_max_explicit(const float* y, const float* g,
                                                                int64_t K, float m) {
  alignas(64) float best[kLanes];
  alignas(64) int32_t besti[kLanes];
  alignas(64) float sum[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    best[j] = -kInf;
    besti[j] = -1;
    sum[j] = 0.f;
  }
  int64_t kb = 0;
  for (; kb + kLanes <= K; kb += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const float v = y[kb + j] + g[kb + j];
      sum[j] += exp_nonpositive(y[kb + j] - m);
      const bool better = v > best[j];
      best[j] = better ? v : best[j];
      besti[j] = better ? static_cast<int32_t>(kb + j) : besti[j];
    }
  }
  float bv = -kInf, s = 0.f;
  int64_t bi = -1;
  for (int j = 0; j < kLanes; ++j) {
    s += sum[j];
    if (besti[j] >= 0 && (bi < 0 || best[j] > bv || (best[j] == bv && besti[j] < bi))) {
      bv = best[j];
      bi = besti[j];
    }
  }
  for (; kb < K; ++kb) {
    const float v = y[kb] + g[kb];
    s += exp_nonpositive(y[kb] - m);
    if (bi < 0 || v > bv) {
      bv = v;
      bi = kb;
    }
  }
  return {bi < 0 ? 0 : bi, s};  // bi < 0 only if every y + G is NaN or −inf
}

// One position n = b·L + l.
template <class E>
U2A_ALWAYS_INLINE void step_position(const StepArgs& a, int64_t n, float* y) {
  using T = typename E::T;
  const int64_t id = a.ids[n];
  if (id != a.mask_id) {
    a.out_ids[n] = id;
    a.confidence[n] = kInf;
    return;
  }
  const int64_t b = n / a.L, l = n % a.L, K = a.K;
  const T* c = static_cast<const T*>(a.logits) + b * a.stride_b + l * a.stride_l;
  float m = -kInf;
  if (a.uncond) {
    const T* u = static_cast<const T*>(a.uncond) + b * a.ustride_b + l * a.ustride_l;
    const float g1 = a.g1, g0 = a.g0, it = a.inv_temperature;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      const float v = policy_y((g1 * E::load(c[k]) - g0 * E::load(u[k])) * it);
      y[k] = v;
      m = v > m ? v : m;
    }
  } else {
    const float it = a.inv_temperature;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      const float v = policy_y(E::load(c[k]) * it);
      y[k] = v;
      m = v > m ? v : m;
    }
  }
  if (m == -kInf) {  // no finite y: nothing can be sampled (the contract: token 0, −inf)
    a.out_ids[n] = 0;
    a.confidence[n] = -kInf;
    return;
  }
  const std::pair<int64_t, float> r =
      a.gumbel ? gumbel_max_explicit(y, a.gumbel + n * K, K, m)
               : race_philox(y, K, m, static_cast<uint32_t>(l), static_cast<uint32_t>(b),
                             a.c3_sample, a.seed);
  float conf = (y[r.first] - m) - std::log(r.second);
  if (a.choice_temperature != 0.f) {
    const float gc = a.choice ? a.choice[n]
                              : gumbel_from_bits(philox4x32_10(0u, static_cast<uint32_t>(l),
                                                               static_cast<uint32_t>(b),
                                                               a.c3_choice, a.seed)
                                                     .w[0]);
    conf = conf + a.choice_temperature * gc;
  }
  a.out_ids[n] = r.first;
  a.confidence[n] = conf;
}

// Positions [begin, end), compiled once per instruction set (step_position and the helpers are
// always_inline, so each copy is vectorised for its own target).
#define U2A_STEP_POSITIONS(NAME, ATTR)                                      \
  template <class E>                                                        \
  ATTR void NAME(const StepArgs& a, int64_t begin, int64_t end, float* y) { \
    for (int64_t n = begin; n < end; ++n) step_position<E>(a, n, y);        \
  }

U2A_STEP_POSITIONS(step_positions_baseline, )
#if U2A_X86
U2A_STEP_POSITIONS(step_positions_avx2, U2A_TARGET_AVX2_FMA)
U2A_STEP_POSITIONS(step_positions_avx512, U2A_TARGET_AVX512)
#endif
#undef U2A_STEP_POSITIONS

// n Gumbels of stream 1 at (b = 0, l = 0): the step's own noise, through the same code.
#define U2A_GUMBEL_FILL(NAME, ATTR)                                                   \
  ATTR void NAME(uint64_t seed, uint32_t c3, int64_t begin, int64_t end, float* out) { \
    alignas(64) uint32_t words[kBlock];                                                \
    for (int64_t q0 = begin; q0 < end; q0 += kLanes) { /* end − begin: multiple of 16 */ \
      _Pragma("omp simd") for (int i = 0; i < kLanes; ++i) {                           \
        const Philox4 p = philox4x32_10(static_cast<uint32_t>(q0 + i), 0u, 0u, c3, seed); \
        for (int j = 0; j < 4; ++j) words[4 * i + j] = p.w[j];                          \
      }                                                                                \
      float* o = out + 4 * (q0 - begin);                                               \
      _Pragma("omp simd") for (int j = 0; j < kBlock; ++j) o[j] = -log_simd(exponential_simd(words[j])); \
    }                                                                                  \
  }
U2A_GUMBEL_FILL(gumbel_fill_baseline, )
#if U2A_X86
U2A_GUMBEL_FILL(gumbel_fill_avx512, U2A_TARGET_AVX512)
#endif
#undef U2A_GUMBEL_FILL

// ---- run-time choice of the instruction-set variant ----------------------------------------------

// cpu_simd.h's level, but this kernel has no AVX-without-AVX2 copy: a CPU at that level runs the
// baseline, and UNIF2ACE_CPU_SIMD=avx_fma caps at the AVX2 copy.
int current_level() {
  static const int level = [] {
    int cap = simd_level_cap();
    if (cap == kSimdAvxFma) cap = kSimdAvx2Fma;
    const int l = std::min(max_simd_level(), cap);
    return l == kSimdAvxFma ? static_cast<int>(kSimdBaseline) : l;
  }();
  return level;
}

using PositionsFn = void (*)(const StepArgs&, int64_t, int64_t, float*);

template <class E>
PositionsFn positions_fn(int level) {
#if U2A_X86
  if (level == kSimdAvx512) return step_positions_avx512<E>;
  if (level == kSimdAvx2Fma) return step_positions_avx2<E>;
#else
  (void)level;
#endif
  return step_positions_baseline<E>;
}

// Total order for the selection: (value, position) lexicographic; NaN ranks as −inf (first), so
// the comparator is a strict weak order whatever the data (nth_element needs one to stay in bounds).
template <class V>
struct RankKey {
  V v;
  int64_t pos;
  bool operator<(const RankKey& o) const { return v < o.v || (v == o.v && pos < o.pos); }
};

// Mark the n smallest of keys[0, L) (any order on entry) as masked: out_ids = mask_id, mask = 1.
template <class V>
void mask_smallest(RankKey<V>* keys, int64_t L, int64_t n, int64_t mask_id, int64_t* out_ids,
                   bool* out_mask) {
  n = std::min<int64_t>(std::max<int64_t>(n, 0), L);
  for (int64_t l = 0; l < L; ++l) out_mask[l] = false;
  if (n == 0) return;
  if (n < L) std::nth_element(keys, keys + n, keys + L);
  for (int64_t i = 0; i < n; ++i) {
    out_ids[keys[i].pos] = mask_id;
    out_mask[keys[i].pos] = true;
  }
}

}  // namespace

const char* mask_sampling_cpu_simd_level() { return kSimdLevelNames[current_level()]; }

Status maskgit_step_cpu(const MaskgitStepArgs& args) {
  const int64_t B = args.B, L = args.L, K = args.K;
  // K < 2^31 − 64: column indices are int32 in the vectorised argmax.
  // Counter words are uint32: b, l < 2^32.
  if (B < 0 || L < 1 || K < 1 || K > (int64_t{1} << 31) - kBlock || B > (int64_t{1} << 32) ||
      L > (int64_t{1} << 32))
    return kBadShape;
  if (args.stride_b < 0 || args.stride_l < 0 ||
      (args.uncond && (args.ustride_b < 0 || args.ustride_l < 0)))
    return kBadStride;
  if (args.offset >= (1u << 30) || !(args.inv_temperature > 0.f) ||
      !(args.choice_temperature >= 0.f))
    return kBadArgument;
  if (B == 0) return kOk;
  if (!args.logits || !args.ids || !args.mask_len || !args.out_ids || !args.out_mask ||
      !args.confidence)
    return kBadArgument;
  const StepArgs a{args, static_cast<float>(1.0 + args.guidance), static_cast<float>(args.guidance),
                   4u * args.offset + kStreamSample, 4u * args.offset + kStreamChoice};

  const int level = current_level();
  PositionsFn fn = nullptr;
  if (const int s = U2A_DISPATCH_FLOAT(args.dtype, E, fn = positions_fn<E>(level)); s != kOk)
    return static_cast<Status>(s);
  const int64_t N = B * L;
  // Below ~64K elements of work the fork/join costs more than the positions.
  const bool parallel = N > 1 && N * K >= (int64_t{1} << 16);
  const int max_threads = parallel ? std::max(omp_get_max_threads(), 1) : 1;
  const int64_t ld = (K + 15) / 16 * 16;  // per-thread y row, 64-byte padded
  std::unique_ptr<float[]> scratch(new (std::nothrow) float[static_cast<size_t>(max_threads) * ld]);
  std::unique_ptr<RankKey<float>[]> keys(
      new (std::nothrow) RankKey<float>[static_cast<size_t>(max_threads) * L]);
  if (!scratch || !keys) return kBadShape;
  // Positions in chunks of ~64K logits each: dynamic, because known positions cost nothing.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / K);
#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    const int tid = omp_get_thread_num();
    float* y = scratch.get() + tid * ld;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c0 = 0; c0 < N; c0 += chunk) fn(a, c0, std::min(N, c0 + chunk), y);
    // Phase 2 (after the implicit barrier): per sequence, re-mask the mask_len least confident.
    RankKey<float>* kk = keys.get() + tid * L;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* cf = args.confidence + b * L;
      for (int64_t l = 0; l < L; ++l) kk[l] = {std::isnan(cf[l]) ? -kInf : cf[l], l};
      mask_smallest(kk, L, args.mask_len[b], args.mask_id, args.out_ids + b * L,
                    args.out_mask + b * L);
    }
  }
  return kOk;
}

Status mask_tokens_cpu(const MaskTokensArgs& a) {
  const int64_t B = a.B, L = a.L;
  if (a.mode != 0 && a.mode != 1) return kBadArgument;
  if (B < 0 || L < 1 || L > (int64_t{1} << 32) || B > (int64_t{1} << 32)) return kBadShape;
  if (a.offset >= (1u << 30)) return kBadArgument;
  if (B == 0) return kOk;
  if (!a.ids || !a.out_ids || !a.out_mask || (a.mode == 0 ? !a.n_mask : !a.gamma))
    return kBadArgument;
  const uint32_t c3 = 4u * a.offset + kStreamMask;
  const bool parallel = B > 1 && B * L >= 4096;
  const int max_threads = parallel ? std::max(omp_get_max_threads(), 1) : 1;
  std::unique_ptr<RankKey<uint64_t>[]> keys(
      a.mode == 0 ? new (std::nothrow) RankKey<uint64_t>[static_cast<size_t>(max_threads) * L]
                  : nullptr);
  if (a.mode == 0 && !keys) return kBadShape;
#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    const int tid = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* row = a.ids + b * L;
      int64_t* orow = a.out_ids + b * L;
      bool* mrow = a.out_mask + b * L;
      for (int64_t l = 0; l < L; ++l) orow[l] = row[l];
      if (a.mode == 0) {
        RankKey<uint64_t>* kk = keys.get() + tid * L;
        for (int64_t l = 0; l < L; ++l) {
          const Philox4 p =
              philox4x32_10(0u, static_cast<uint32_t>(l), static_cast<uint32_t>(b), c3, a.seed);
          kk[l] = {(static_cast<uint64_t>(p.w[0]) << 32) | p.w[1], l};
        }
        mask_smallest(kk, L, a.n_mask[b], a.mask_id, orow, mrow);
      } else {
        const float thr = a.gamma[b] * 16777216.0f;
        for (int64_t l = 0; l < L; ++l) {
          const Philox4 p =
              philox4x32_10(0u, static_cast<uint32_t>(l), static_cast<uint32_t>(b), c3, a.seed);
          const bool m = static_cast<float>(p.w[0] >> 8) < thr;
          mrow[l] = m;
          if (m) orow[l] = a.mask_id;
        }
      }
    }
  }
  return kOk;
}

Status philox_gumbel_cpu(uint64_t seed, uint32_t offset, int64_t n, float* out) {
  if (n < 0 || n > (int64_t{1} << 34)) return kBadShape;
  if (offset >= (1u << 30)) return kBadArgument;
  if (n == 0) return kOk;
  if (!out) return kBadArgument;
  const uint32_t c3 = 4u * offset + kStreamSample;
  const int64_t nq = n / kBlock * kLanes;  // counters done in the vectorised blocks
  const bool avx512 = current_level() == kSimdAvx512;
  const int64_t chunk = 1 << 14;  // counters per task (a multiple of kLanes)
#pragma omp parallel for schedule(static) if (nq >= 2 * chunk)
  for (int64_t q0 = 0; q0 < nq; q0 += chunk) {
    const int64_t q1 = std::min(nq, q0 + chunk);
#if U2A_X86
    if (avx512) {
      gumbel_fill_avx512(seed, c3, q0, q1, out + 4 * q0);
      continue;
    }
#endif
    (void)avx512;
    gumbel_fill_baseline(seed, c3, q0, q1, out + 4 * q0);
  }
  for (int64_t q = nq; 4 * q < n; ++q) {  // the last < 64 values, scalar
    const Philox4 p = philox4x32_10(static_cast<uint32_t>(q), 0u, 0u, c3, seed);
    for (int64_t j = 0; j < 4 && 4 * q + j < n; ++j) out[4 * q + j] = gumbel_from_bits(p.w[j]);
  }
  return kOk;
}

}  // namespace unif2ace
