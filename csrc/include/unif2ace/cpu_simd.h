// Branch-free scalar helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp): bit casts, fp16
// conversions and the element-type adapters. Everything here is straight-line so that
// `#pragma omp simd` loops calling it vectorise (checked with gcc 12 -fopt-info-vec).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "unif2ace/common.h"

#if defined(__x86_64__) || defined(__i386__)
#define U2A_X86 1
#else
#define U2A_X86 0
#endif

#define U2A_ALWAYS_INLINE inline __attribute__((always_inline))

namespace unif2ace {
namespace cpu {

// ---- SIMD-friendly scalar helpers (branch-free: `#pragma omp simd` loops vectorise them) -------

U2A_ALWAYS_INLINE float bits_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

U2A_ALWAYS_INLINE uint32_t float_as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// fp16 <-> fp32 in straight-line code. Bit-for-bit the same as common.h's fp16_bits_to_float and
// float_to_fp16_bits (checked over all 2^16 halves and all 2^32 floats), which normalise subnormals
// in a loop or branch on the range and so do not vectorise. The float multiplies do the rebiasing
// and the subnormal cases in hardware, so the only selects left have a constant arm (nothing for
// gcc to move into a branch; see exp_simd). With denormals-are-zero set (not the default), fp16
// subnormal logits read as 0.
U2A_ALWAYS_INLINE float fp16_to_float_simd(uint16_t h) {
  // F. Giesen's half_to_float_fast3: the 15 magnitude bits in place, then times 2^112 rebiases the
  // exponent (and turns a half subnormal, here an fp32 subnormal, into the right normal value).
  const float mag = bits_as_float(static_cast<uint32_t>(h & 0x7fffu) << 13) * 0x1.0p+112f;
  uint32_t o = float_as_bits(mag);
  o |= mag >= 65536.f ? 0x7f800000u : 0u;  // half inf/NaN (exponent 31): exponent 255, payload kept
  return bits_as_float(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

U2A_ALWAYS_INLINE uint16_t float_to_fp16_simd(float f) {
  // M. Dukhan's fp16_ieee_from_fp32_value (the FP16 library): scaling by 2^112 then 2^-110 makes
  // values that overflow fp16 inf; adding a power of two at the right exponent rounds the mantissa
  // to 10 bits (round to nearest even, subnormals included) in the fp32 adder.
  const uint32_t w = float_as_bits(f);
  const uint32_t shl1_w = w + w;  // without the sign
  const uint32_t sign = w & 0x80000000u;
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_as_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  // NaN -> 0x7e00 with a mask, not a select: gcc would move nonsign's fp ops into a branch.
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(shl1_w > 0xff000000u);
  return static_cast<uint16_t>((sign >> 16) | (nonsign & ~nan_mask) | (0x7e00u & nan_mask));
}

// ---- element types: storage and conversions ----------------------------------------------------

struct ElemF32 {
  using T = float;
  static U2A_ALWAYS_INLINE float load(T v) { return v; }
  static U2A_ALWAYS_INLINE T store(float f) { return f; }
};
struct ElemBF16 {
  using T = uint16_t;
  static U2A_ALWAYS_INLINE float load(T v) { return bf16_bits_to_float(v); }
  static U2A_ALWAYS_INLINE T store(float f) { return float_to_bf16_bits(f); }  // nearest even
};
struct ElemF16 {
  using T = uint16_t;
  static U2A_ALWAYS_INLINE float load(T v) { return fp16_to_float_simd(v); }
  static U2A_ALWAYS_INLINE T store(float f) { return float_to_fp16_simd(f); }  // nearest even
};

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
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  // 2^n: n + 127 shifted into the exponent field (the bits above it fall off the top).
  return p * bits_as_float(float_as_bits(t) << 23);
}

}  // namespace cpu
}  // namespace unif2ace
