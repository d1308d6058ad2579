// Element types shared by the C++ and CUDA kernels: the dtype codes that cross the binding, the
// 16-bit float conversions, one trait per floating type (Elem<code>: storage type, load as float,
// store from float) and the dispatch from a run-time code to that trait (U2A_DISPATCH_FLOAT).
//
// Every conversion rounds to nearest even, as torch does, and keeps NaN a quiet NaN (bf16: the
// payload's top bits plus the quiet bit; fp16: 0x7e00 with the sign). Host code uses the
// branch-free bit manipulations below (they vectorise in `#pragma omp simd` loops); device code
// uses the CUDA intrinsics, which round the same way.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "unif2ace/common.h"

namespace unif2ace {

// dtype codes passed from Python (python/unif2ace/ops/_native.py: DTYPE_CODES). The float codes are
// what the kernels dispatch on; the others only describe index and mask operands.
enum DType : int {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kUInt8 = 5,
  kBool = 6,
};

inline bool is_float_dtype(int code) {
  return code == kFloat32 || code == kBFloat16 || code == kFloat16;
}

// Bytes per element (0 for an unknown code).
inline int64_t dtype_size(int code) {
  switch (code) {
    case kFloat32:
    case kInt32: return 4;
    case kBFloat16:
    case kFloat16: return 2;
    case kInt64: return 8;
    case kUInt8:
    case kBool: return 1;
    default: return 0;
  }
}

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    case kUInt8: return "uint8";
    case kBool: return "bool";
    default: return "an unsupported dtype";
  }
}

// ---- bit casts and 16-bit float conversions (host and device; straight-line code) ---------------

U2A_HD_INLINE float bits_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

U2A_HD_INLINE uint32_t float_as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

U2A_HD_INLINE float bf16_bits_to_float(uint16_t h) {
  return bits_as_float(static_cast<uint32_t>(h) << 16);
}

U2A_HD_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// F. Giesen's half_to_float_fast3: the 15 magnitude bits in place, then times 2^112 rebiases the
// exponent (and turns a half subnormal, here an fp32 subnormal, into the right normal value). The
// only select has a constant arm, so gcc keeps it branch-free. With denormals-are-zero set (not the
// default) a half subnormal reads as 0.
U2A_HD_INLINE float fp16_bits_to_float(uint16_t h) {
  const float mag = bits_as_float(static_cast<uint32_t>(h & 0x7fffu) << 13) * 0x1.0p+112f;
  uint32_t o = float_as_bits(mag);
  o |= mag >= 65536.f ? 0x7f800000u : 0u;  // half inf/NaN (exponent 31): exponent 255, payload kept
  return bits_as_float(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// M. Dukhan's fp16_ieee_from_fp32_value (the FP16 library): scaling by 2^112 then 2^-110 makes
// values that overflow fp16 inf; adding a power of two at the right exponent rounds the mantissa to
// 10 bits (round to nearest even, subnormals included) in the fp32 adder.
U2A_HD_INLINE uint16_t float_to_fp16_bits(float f) {
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

// ---- the element traits ------------------------------------------------------------------------

// Elem<code>::T is the storage type (16-bit floats as their raw bits); load widens one element to
// float, store rounds a float to one element.
template <int DT>
struct Elem;

template <>
struct Elem<kFloat32> {
  using T = float;
  static constexpr int kDType = kFloat32;
  static U2A_HD_INLINE float load(T v) { return v; }
  static U2A_HD_INLINE T store(float f) { return f; }
};

template <>
struct Elem<kBFloat16> {
  using T = uint16_t;
  static constexpr int kDType = kBFloat16;
  static U2A_HD_INLINE float load(T v) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
#else
    return bf16_bits_to_float(v);
#endif
  }
  static U2A_HD_INLINE T store(float f) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return float_to_bf16_bits(f);
#endif
  }
};

template <>
struct Elem<kFloat16> {
  using T = uint16_t;
  static constexpr int kDType = kFloat16;
  static U2A_HD_INLINE float load(T v) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v));
#else
    return fp16_bits_to_float(v);
#endif
  }
  static U2A_HD_INLINE T store(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return float_to_fp16_bits(f);
#endif
  }
};

// f(Elem<code>{}) for a floating dtype code; kBadDtype for any other code, else f's Status (kOk
// when f returns nothing).
template <class F>
int dispatch_float(int dtype, F&& f) {
  auto call = [&](auto elem) -> int {
    if constexpr (std::is_void_v<decltype(f(elem))>) {
      f(elem);
      return kOk;
    } else {
      return f(elem);
    }
  };
  switch (dtype) {
    case kFloat32: return call(Elem<kFloat32>{});
    case kBFloat16: return call(Elem<kBFloat16>{});
    case kFloat16: return call(Elem<kFloat16>{});
    default: return kBadDtype;
  }
}

}  // namespace unif2ace

// Runs the statements `...` with `E` naming the element trait of the floating dtype code `DTYPE`;
// evaluates to kOk, or kBadDtype for any other code. Example:
//   if (int s = U2A_DISPATCH_FLOAT(dtype, E, kernel<E><<<grid, block>>>(p)); s != kOk) return s;
#define U2A_DISPATCH_FLOAT(DTYPE, E, ...)                                 \
  ::unif2ace::dispatch_float((DTYPE), [&](auto u2a_elem_) {               \
    using E = decltype(u2a_elem_);                                        \
    (void)u2a_elem_;                                                      \
    __VA_ARGS__;                                                          \
  })
