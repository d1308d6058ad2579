// Shared by the CPU (C++) and CUDA kernels: the launchers' Status codes and the host/device
// function qualifiers. No torch headers anywhere under csrc/: the kernels take raw pointers, sizes,
// strides and scalars; the bindings (csrc/bindings*.cpp) derive them from tensor descriptors.
#pragma once

#include <cstdint>

// U2A_HD: a function for host and device code. U2A_HD_INLINE: the same, always inlined (the element
// conversions sit in the innermost loops, and a `#pragma omp simd` loop vectorises only what it
// inlines).
#if defined(__CUDACC__)
#define U2A_HD __host__ __device__ __forceinline__
#define U2A_HD_INLINE __host__ __device__ __forceinline__
#else
#define U2A_HD inline
#define U2A_HD_INLINE inline __attribute__((always_inline))
#endif

namespace unif2ace {

// Launchers return one of these; the pybind11 bindings turn a non-zero code into a Python
// exception.
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

}  // namespace unif2ace
