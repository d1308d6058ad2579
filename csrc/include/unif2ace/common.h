// Shared by the CPU (C++) and CUDA kernels. No torch headers anywhere under csrc/: kernels take raw
// pointers, sizes, strides and scalars; the Python layer passes tensor.data_ptr().
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define U2A_HD __host__ __device__ __forceinline__
#else
#define U2A_HD inline
#endif

namespace unif2ace {

// Launchers return one of these; the pybind11 binding turns a non-zero code into a Python exception.
enum Status : int {
  kOk = 0,
  kBadDtype = 1,
  kBadShape = 2,
  kBadStride = 3,
  kCudaError = 4,
  kBadArgument = 5,
};

inline const char* status_message(int s) {
  switch (s) {
    case kOk: return "ok";
    case kBadDtype: return "unsupported dtype code";
    case kBadShape: return "invalid shape";
    case kBadStride: return "invalid stride";
    case kCudaError: return "CUDA launch error";
    case kBadArgument: return "invalid argument";
    default: return "unknown error";
  }
}

// dtype codes passed from Python (unif2ace/_backend.py: DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- 16-bit float conversions, host and device, no library types --------------------------------
U2A_HD float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (what torch does); NaN stays a quiet NaN.
U2A_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

U2A_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, with overflow to inf and gradual underflow.
U2A_HD uint16_t float_to_fp16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (absu < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = absu >> 23;
    const uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24 -> mantissa shift to the half subnormal grid
    uint32_t half = m >> (shift);
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (r >> 13));
}

}  // namespace unif2ace
