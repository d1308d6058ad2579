// Counter-based random numbers shared by the CPU and CUDA kernels: Philox-4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), bit-for-bit the same as Triton's
// `tl.philox(seed, c0, c1, c2, c3)` (triton/language/random.py): key (k0, k1) = (seed low 32 bits,
// seed high 32 bits), counter (c0, c1, c2, c3), 10 rounds. The counter layout of each op (which
// (sequence, position, column, stream) goes into which word) is the mask-sampling op family's
// launcher contract.
#pragma once

#include <cmath>
#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {

struct Philox4 {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// Philox streams: counter word c3 = 4·offset + stream.
constexpr uint32_t kStreamMask = 0, kStreamSample = 1, kStreamChoice = 2;

// All-integer and branch-free, so a `#pragma omp simd` loop over counters vectorises it (the
// 32×32→64 multiply maps to vpmuludq).
U2A_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(pb);
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// t = (float(x & 0x7fffffff) + 0.5)·2^-32 ∈ (0, 1/2): the 31 low bits of a word as a uniform on
// (0, 1/2) with full relative precision near 0; the top bit picks u = t or u = 1 − t.
U2A_HD float half_uniform_from_bits(uint32_t x) {
  return (static_cast<float>(x & 0x7fffffffu) + 0.5f) * 2.3283064365386963e-10f;  // 2^-32
}

// Exp(1) = −log u from one 32-bit word without truncating either tail: −log t when u = t, and
// −log1p(−t) when u = 1 − t (so E goes down to ~1.2e-10 and the Gumbel −log E up to ~22.9; a
// 24-bit float uniform would stop the Gumbel near 16.6).
U2A_HD float exponential_from_bits(uint32_t x) {
  const float t = half_uniform_from_bits(x);
  return (x >> 31) ? -log1pf(-t) : -logf(t);
}

U2A_HD float gumbel_from_bits(uint32_t x) { return -logf(exponential_from_bits(x)); }

}  // namespace unif2ace
