// Helpers shared by the CUDA launchers and kernels (csrc/cuda/*.cu): the SM count of the current
// device, the launch status, and 8- / 16-byte vector loads and stores of an element type
// (unif2ace/dtype.h's Elem traits).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "launch.h"
#include "unif2ace/common.h"
#include "unif2ace/dtype.h"

namespace unif2ace {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// SM count of the current device, cached per device (a host query; allowed during graph capture).
inline int sm_count_current_device() {
  constexpr int kFallbackSmCount = 132;  // H100 SXM, if the device query fails
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // static storage: zero-initialised
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, or the launch check would report it
    return kFallbackSmCount;
  }
  if (dev >= 0 && dev < kMaxDevices) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    return kFallbackSmCount;
  }
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// The last failed launch of this host thread (read by cuda_last_error()).
inline thread_local cudaError_t t_last_cuda_error = cudaSuccess;

// kOk, or kCudaError (remembered for cuda_last_error()) when a launch since the last check failed.
inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    t_last_cuda_error = err;
    return kCudaError;
  }
  return kOk;
}

inline bool aligned(const void* p, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(p) % a == 0;
}

// N elements of E at p as floats with one vector load: N·sizeof(E::T) is 8 or 16 bytes, and p is
// aligned to it. Little-endian: 32-bit word k holds 16-bit elements 2k (low half) and 2k + 1.
template <class E, int N>
__device__ __forceinline__ void load_vec(const typename E::T* p, float* v) {
  using T = typename E::T;
  constexpr int kWords = N * static_cast<int>(sizeof(T)) / 4;
  static_assert(kWords == 2 || kWords == 4, "one 8- or 16-byte vector");
  uint32_t w[kWords];
  if constexpr (kWords == 4) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    w[0] = q.x;
    w[1] = q.y;
    w[2] = q.z;
    w[3] = q.w;
  } else {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    w[0] = q.x;
    w[1] = q.y;
  }
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    if constexpr (sizeof(T) == 4) {
      v[k] = __uint_as_float(w[k]);
    } else {
      v[2 * k] = E::load(static_cast<uint16_t>(w[k] & 0xffffu));
      v[2 * k + 1] = E::load(static_cast<uint16_t>(w[k] >> 16));
    }
  }
}

// The store counterpart of load_vec: N floats rounded to E, one 16-byte vector store.
template <class E, int N>
__device__ __forceinline__ void store_vec(typename E::T* p, const float* v) {
  using T = typename E::T;
  static_assert(N * sizeof(T) == 16, "one 16-byte vector");
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (sizeof(T) == 4) {
      w[k] = __float_as_uint(v[k]);
    } else {
      w[k] = static_cast<uint32_t>(E::store(v[2 * k])) |
             (static_cast<uint32_t>(E::store(v[2 * k + 1])) << 16);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace cuda
}  // namespace unif2ace
