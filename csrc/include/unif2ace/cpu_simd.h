// Helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp): a vectorisable exp and the run-time
// choice of an instruction-set variant. Everything called inside a loop is straight-line so that
// `#pragma omp simd` loops calling it vectorise (checked with gcc 12 -fopt-info-vec). The element
// conversions are unif2ace/dtype.h's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "unif2ace/dtype.h"

#if defined(__x86_64__) || defined(__i386__)
#define U2A_X86 1
#else
#define U2A_X86 0
#endif

#define U2A_ALWAYS_INLINE inline __attribute__((always_inline))

namespace unif2ace {
namespace cpu {

// The degree-5 polynomial P of Cephes expf, e^r = 1 + r + r²·P(r) for |r| <= ln2/2. Every exp of
// the CPU kernels evaluates it (each keeps its own range reduction and special cases).
U2A_ALWAYS_INLINE float expf_poly(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p;
}

// exp(x) in fp32 (Cephes expf; used by d3diff_loss.cpp and attention.cpp): x = n·ln2 + r with
// n = round(x·log2 e), |r| <= ln2/2;
// e^r = 1 + r + r²·P(r), P of degree 5; 2^n assembled in the exponent bits. Under 1 ulp over the
// normal-result range: max relative error 8.2e-8 (8.5e-8 with FMA contraction), checked against
// double exp on every float in [-87.33, 88.37].
// x is clamped to [-88, 89] first, which is all the special-casing there is:
//   x < -87.68 gives n = -127, 2^n = +0 and so 0 (true values there are < 2^-126.5: fp32
//   subnormals, flushed), -inf -> 0; x > 88.38 gives n = 128, 2^n = +inf and so +inf (true values
//   in (88.38, 88.72] are up to FLT_MAX: returned as inf), +inf -> +inf; NaN stays NaN (the
//   comparisons are false for NaN, so the clamps pass it through to the polynomial).
// No select on the result, and the clamp bounds hidden from the optimiser (ExpRange below): with
// constant bounds gcc folds the whole function to 0 / inf for a clamped input, which moves the
// polynomial into one arm of a branch; the SSE/AVX2 vectorisers then reject the loop ("control
// flow in loop": the moved fp ops could trap) and only AVX-512, with masked ops, vectorises it.
struct ExpRange {
  float lo, hi;
};
// Call once outside the loop: the empty asm makes the bounds unknown values (no code in the loop).
U2A_ALWAYS_INLINE ExpRange exp_range() {
  ExpRange b{-88.f, 89.f};
  __asm__("" : "+g"(b.lo), "+g"(b.hi));
  return b;
}
U2A_ALWAYS_INLINE float exp_simd(float x, ExpRange b) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo; 9 bits: n·kLn2Hi exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  // 1.5·2^23 + 127: adding it rounds x·log2 e to an integer n (ulp 1 there, ties to even) and
  // leaves n + 127 (in [0, 255] after the clamp) in the low mantissa bits of t.
  constexpr float kBias = 12582912.f + 127.f;
  float xc = x < b.lo ? b.lo : x;
  xc = xc > b.hi ? b.hi : xc;
  const float t = xc * kLog2e + kBias;
  const float n = t - kBias;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = expf_poly(r);
  p = p * (r * r) + r + 1.f;
  // 2^n: n + 127 shifted into the exponent field (the bits above it fall off the top).
  return p * bits_as_float(float_as_bits(t) << 23);
}

// ---- run-time choice of an instruction-set variant ----------------------------------------------
// A kernel compiles its hot routine once per level (target attributes) and calls the copy of the
// level in use: the best this CPU runs, capped by the environment variable UNIF2ACE_CPU_SIMD (one
// of the names below; for tests of every variant and for timing them against each other).

enum SimdLevel : int { kSimdBaseline = 0, kSimdAvxFma = 1, kSimdAvx2Fma = 2, kSimdAvx512 = 3 };
constexpr int kNumSimdLevels = 4;
constexpr const char* kSimdLevelNames[kNumSimdLevels] = {"baseline", "avx_fma", "avx2_fma",
                                                         "avx512"};

// The target attribute string of each x86 level above the baseline.
#define U2A_TARGET_AVX_FMA __attribute__((target("avx,fma")))
#define U2A_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#define U2A_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

// The best level this CPU runs (libgcc's checks include the OS's XSAVE support for the AVX/AVX-512
// registers). Detected once.
inline int max_simd_level() {
  static const int level = [] {
#if U2A_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return static_cast<int>(kSimdAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return static_cast<int>(kSimdAvx2Fma);
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("fma"))
      return static_cast<int>(kSimdAvxFma);
#endif
    return static_cast<int>(kSimdBaseline);
  }();
  return level;
}

// The level named `name`, or -1.
inline int simd_level_from_name(const char* name) {
  for (int l = 0; l < kNumSimdLevels; ++l)
    if (name != nullptr && std::strcmp(name, kSimdLevelNames[l]) == 0) return l;
  return -1;
}

// The level named by UNIF2ACE_CPU_SIMD, or kNumSimdLevels - 1 (no cap) when unset or unknown.
inline int simd_level_cap() {
  const int l = simd_level_from_name(std::getenv("UNIF2ACE_CPU_SIMD"));
  return l >= 0 ? l : kNumSimdLevels - 1;
}

}  // namespace cpu
}  // namespace unif2ace
